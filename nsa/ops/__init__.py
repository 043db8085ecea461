"""The public functional op: :func:`nsa_attention`.

Three layers, as for every op here: kernels/launchers (per backend), autograd glue, and
this public function, which validates every argument once and routes to a backend.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import Tensor

from nsa.config import NSAConfig
from nsa.ops.reference import NSAAux, compress_mean, reference_nsa

__all__ = ["NSAAux", "compress_mean", "load_backend", "nsa_attention", "register_backend",
           "BACKENDS"]

# name -> callable with reference_nsa's signature. Kernel backends register themselves.
BACKENDS: dict[str, Callable[..., Tensor | tuple[Tensor, NSAAux]]] = {"reference": reference_nsa}


# backends whose module registers itself on import (kernels load only when asked for)
_LAZY_BACKENDS = {"triton": "nsa.ops.triton_backend"}


def register_backend(name: str, fn: Callable[..., Tensor | tuple[Tensor, NSAAux]]) -> None:
    BACKENDS[name] = fn


def load_backend(name: str) -> bool:
    """Import a lazily registered backend now (True if it is registered afterwards).

    ``nsa_attention`` does this on first use; modules call it at construction so that a
    ``torch.compile``d forward never traces an import. "auto" loads "triton" when Triton is
    importable (and not older than the kernels need) and quietly does nothing otherwise.
    """
    if name == "auto":
        from nsa.backends import BACKEND_SPECS

        if BACKEND_SPECS["triton"].version_reasons():
            return False
        try:
            return load_backend("triton")
        except ImportError:
            return False
    if name not in BACKENDS and name in _LAZY_BACKENDS:
        importlib.import_module(_LAZY_BACKENDS[name])  # registers itself
    return name in BACKENDS


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_tensor(name: str, x: object, ndim: int, layout: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"nsa_attention: {name} must be a torch.Tensor {layout}, "
                        f"got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"nsa_attention: {name} must be {ndim}-D {layout}, "
                         f"got shape {_shape(x)}")
    return x


def _validate(
    q: Tensor,
    kv: dict[str, Tensor | None],
    gates: dict[str, Tensor | None],
    config: NSAConfig,
    block_indices: Tensor | None,
) -> None:
    if not isinstance(config, NSAConfig):
        raise TypeError(f"nsa_attention: config must be an NSAConfig, got {type(config).__name__}")
    _check_tensor("q", q, 4, "[B, T, HQ, d_k]")
    if not q.is_floating_point():
        raise TypeError(f"nsa_attention: q must be a floating tensor, got dtype {q.dtype}")
    B, T, HQ, dk = q.shape
    if all(g is None for g in gates.values()):
        raise ValueError("nsa_attention: at least one of g_cmp, g_sel, g_win must be a tensor")
    need = {
        "cmp": gates["g_cmp"] is not None
        or (gates["g_sel"] is not None and block_indices is None),
        "sel": gates["g_sel"] is not None,
        "win": gates["g_win"] is not None,
    }
    H = dv = None
    for branch in ("sel", "win", "cmp"):
        if not need[branch]:
            continue
        kname, vname = f"k_{branch}", f"v_{branch}"
        k, v = kv[kname], kv[vname]
        why = (" (selection scores come from the compressed branch; pass block_indices "
               "to skip it)" if branch == "cmp" and gates["g_cmp"] is None else "")
        if k is None or v is None:
            raise ValueError(f"nsa_attention: {kname} and {vname} are required when the "
                             f"{branch} branch is computed{why}")
        tlabel = "N" if branch == "cmp" else "T"
        _check_tensor(kname, k, 4, f"[B, {tlabel}, H, d_k]")
        _check_tensor(vname, v, 4, f"[B, {tlabel}, H, d_v]")
        if k.shape[0] != B or v.shape[0] != B:
            raise ValueError(f"nsa_attention: batch of {kname} {_shape(k)} / {vname} "
                             f"{_shape(v)} must equal q's batch B={B}")
        if branch != "cmp" and (k.shape[1] != T or v.shape[1] != T):
            raise ValueError(f"nsa_attention: {kname}/{vname} must hold T={T} tokens like q, "
                             f"got {k.shape[1]} and {v.shape[1]}")
        if branch == "cmp" and k.shape[1] != v.shape[1]:
            raise ValueError(f"nsa_attention: k_cmp and v_cmp must hold the same number of "
                             f"compressed tokens, got {k.shape[1]} and {v.shape[1]}")
        if k.shape[3] != dk:
            raise ValueError(f"nsa_attention: {kname} head dim must equal q's d_k={dk}, "
                             f"got {k.shape[3]}")
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"nsa_attention: {kname} and {vname} must have the same number "
                             f"of KV heads, got {k.shape[2]} and {v.shape[2]}")
        if H is None:
            H, dv = k.shape[2], v.shape[3]
        elif k.shape[2] != H:
            raise ValueError(f"nsa_attention: {kname} has {k.shape[2]} KV heads, other "
                             f"branches have H={H}")
        elif v.shape[3] != dv:
            raise ValueError(f"nsa_attention: {vname} has d_v={v.shape[3]}, other branches "
                             f"have d_v={dv}")
        for name, x in ((kname, k), (vname, v)):
            if x.device != q.device:
                raise ValueError(f"nsa_attention: {name} is on {x.device}, q is on {q.device}")
            if x.dtype != q.dtype:
                raise TypeError(f"nsa_attention: {name} has dtype {x.dtype}, q has {q.dtype}")
    assert H is not None
    if HQ % H:
        raise ValueError(f"nsa_attention: q's HQ={HQ} query heads must be divisible by the "
                         f"H={H} KV heads (HQ % H = {HQ % H})")
    for name, g in gates.items():
        if g is None:
            continue
        _check_tensor(name, g, 3, "[B, T, HQ]")
        if _shape(g) != (B, T, HQ):
            raise ValueError(f"nsa_attention: {name} must have shape [B, T, HQ] = "
                             f"{(B, T, HQ)}, got {_shape(g)}")
        if g.device != q.device:
            raise ValueError(f"nsa_attention: {name} is on {g.device}, q is on {q.device}")
        if g.dtype != q.dtype:
            raise TypeError(f"nsa_attention: {name} has dtype {g.dtype}, q has {q.dtype}")
    if block_indices is not None:
        _check_tensor("block_indices", block_indices, 4, "[B, T, H, n]")
        if block_indices.dtype.is_floating_point or block_indices.dtype == torch.bool:
            raise TypeError(f"nsa_attention: block_indices must be an integer tensor, "
                            f"got {block_indices.dtype}")
        if _shape(block_indices) != (B, T, H, config.n):
            raise ValueError(f"nsa_attention: block_indices must be [B, T, H, n] = "
                             f"{(B, T, H, config.n)}, got {_shape(block_indices)}")
        if block_indices.device != q.device:
            raise ValueError(f"nsa_attention: block_indices is on {block_indices.device}, "
                             f"q is on {q.device}")
        nb = config.num_sel_blocks(T)
        if block_indices.numel() and (
            int(block_indices.min()) < -1 or int(block_indices.max()) >= nb
        ):
            raise ValueError(f"nsa_attention: block_indices values must lie in [-1, {nb}) "
                             f"(ceil(T / l_sel) blocks), got min {int(block_indices.min())} "
                             f"max {int(block_indices.max())}")


def nsa_attention(
    q: Tensor,
    k_sel: Tensor | None,
    v_sel: Tensor | None,
    k_win: Tensor | None,
    v_win: Tensor | None,
    k_cmp: Tensor | None,
    v_cmp: Tensor | None,
    g_cmp: Tensor | None,
    g_sel: Tensor | None,
    g_win: Tensor | None,
    config: NSAConfig,
    block_indices: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_aux: bool = False,
    deterministic: bool = False,
) -> Tensor | tuple[Tensor, NSAAux]:
    """Native Sparse Attention over T causal tokens at positions 0..T-1.

    Shapes (HQ query heads, H key/value heads, G = HQ / H; query head h uses KV head h // G):
        q               [B, T, HQ, d_k]
        k_sel, v_sel    [B, T, H, d_k], [B, T, H, d_v]   selection branch raw keys/values
        k_win, v_win    [B, T, H, d_k], [B, T, H, d_v]   sliding-window branch
        k_cmp, v_cmp    [B, N, H, d_k], [B, N, H, d_v]   compressed tokens (after phi);
                        token i covers raw tokens [i*d, i*d+l) and is visible to query t
                        iff i*d + l - 1 <= t, whatever N is.
        g_cmp, g_sel, g_win  [B, T, HQ] gates in [0, 1]; None skips that branch.
        block_indices   optional [B, T, H, n] int, -1 = unused slot: skips selection.
    Output: [B, T, HQ, d_v] in q's dtype; with ``return_aux`` a tuple (out, NSAAux) whose
    block_indices are ascending with -1 last.
    ``backend``: "reference" (pure PyTorch), "triton", or "auto" (routing policy, see
    ``nsa.policy``). Every backend computes the function in NSA-SPEC.md.
    ``deterministic``: on the Triton backend, the backward sums the selected branch's
    key/value gradients in a fixed order instead of with atomics, so gradients are bitwise
    reproducible (a little slower); the reference follows PyTorch's own determinism.
    """
    if not isinstance(deterministic, bool):
        raise TypeError(f"nsa_attention: deterministic must be a bool, got "
                        f"{type(deterministic).__name__}")
    kv = {"k_sel": k_sel, "v_sel": v_sel, "k_win": k_win, "v_win": v_win,
          "k_cmp": k_cmp, "v_cmp": v_cmp}
    gates = {"g_cmp": g_cmp, "g_sel": g_sel, "g_win": g_win}
    _validate(q, kv, gates, config, block_indices)
    if scale is None:
        scale = config.scale if config.scale is not None else q.shape[-1] ** -0.5
    if backend == "auto":
        from nsa.policy import choose_op_backend

        v_any = next(v for v in (v_sel, v_win, v_cmp) if v is not None)
        backend = choose_op_backend(q, config, d_v=int(v_any.shape[-1]),
                                    n_kv_heads=int(v_any.shape[2])).backend
    if backend not in BACKENDS and backend in _LAZY_BACKENDS:
        load_backend(backend)
    if backend not in BACKENDS:
        raise ValueError(f"nsa_attention: backend must be one of {sorted(BACKENDS) + ['auto']}, "
                         f"got {backend!r}")
    return BACKENDS[backend](
        q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp, g_cmp, g_sel, g_win, config, scale,
        block_indices=block_indices, return_aux=return_aux, deterministic=deterministic,
    )
