"""One-token NSA decode over an :class:`nsa.cache.NSACache` (public layer).

``nsa_decode`` runs after ``cache.append(...)`` of the new token: the query of sequence
b at position ``cache.lengths[b] - 1`` sees every cached token up to and including
itself. The tokens each branch actually read (counted from the masks/indices the
computation used) are stored in ``cache.last_reads`` as [B, H] tensors and accumulated
in ``cache.total_reads``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa.cache import CacheError, NSACache
from nsa.config import NSAConfig
from nsa.ops.reference import compute_dtype, nsa_chunk

__all__ = ["DECODE_COLUMNS", "decode_append", "nsa_decode"]

# the projections of a step's new token, as column blocks of one row per sequence
DECODE_COLUMNS = ("q", "k_cmp", "v_cmp", "k_sel", "v_sel", "k_win", "v_win")


def _triton_reasons(q_t: Tensor, cache: NSACache) -> list[str]:
    from nsa.backends import BACKEND_SPECS

    too_old = BACKEND_SPECS["triton"].version_reasons()
    if too_old:
        return too_old
    try:
        from nsa.ops.decode.launch import decode_not_supported_reasons
    except ImportError as e:  # triton not installed
        return [f"triton is not importable ({e})"]
    return decode_not_supported_reasons(q_t, cache)


def _route(name: str, backend: str, x: Tensor, reasons) -> str:
    """"reference" or "triton" for a public function's ``backend`` argument: "auto" takes
    Triton on CUDA where ``reasons()`` (why the kernels cannot run) is empty; "triton"
    raises with those reasons."""
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"{name}: backend must be 'auto', 'reference' or 'triton', got "
                         f"{backend!r}")
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        why = reasons()
        if why and backend == "triton":
            raise ValueError(f"{name}: backend='triton' cannot run this step: "
                             + "; ".join(why))
        return "reference" if why else "triton"
    return "reference"


def _check_gate(name: str, g: Tensor | None, B: int, HQ: int, q: Tensor) -> None:
    if g is None:
        return
    if not isinstance(g, Tensor) or tuple(g.shape) != (B, HQ):
        got = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
        raise ValueError(f"nsa_decode: {name} must have shape [B, HQ] = {(B, HQ)}, got {got}")
    if g.device != q.device:
        raise ValueError(f"nsa_decode: {name} is on {g.device}, q_t is on {q.device}")


def nsa_decode(
    q_t: Tensor,
    cache: NSACache,
    g_cmp: Tensor | None,
    g_sel: Tensor | None,
    g_win: Tensor | None,
    config: NSAConfig | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_indices: bool = False,
) -> Tensor | tuple[Tensor, Tensor | None]:
    """NSA output for the newest token of each sequence.

    q_t: [B, HQ, d_k] query of each sequence's newest token (position lengths[b] - 1).
    g_cmp, g_sel, g_win: [B, HQ] gates, None skips a branch.
    Returns [B, HQ, d_v] in q_t's dtype (and the [B, H, n] block indices if asked).
    """
    cfg = cache.config if config is None else config
    if not isinstance(q_t, Tensor) or q_t.dim() != 3:
        got = tuple(q_t.shape) if isinstance(q_t, Tensor) else type(q_t).__name__
        raise ValueError(f"nsa_decode: q_t must be [B, HQ, d_k], got {got}")
    B, HQ, dk = q_t.shape
    if B != cache.B:
        raise ValueError(f"nsa_decode: q_t batch {B} != cache batch {cache.B}")
    if dk != cache.d_k:
        raise ValueError(f"nsa_decode: q_t d_k={dk} != cache d_k={cache.d_k}")
    if HQ % cache.H:
        raise ValueError(f"nsa_decode: q_t has HQ={HQ} heads, not divisible by the cache's "
                         f"H={cache.H} KV heads")
    if q_t.device != cache.device:
        raise ValueError(f"nsa_decode: q_t is on {q_t.device}, cache is on {cache.device}")
    if cache.max_length == 0:
        raise ValueError("nsa_decode: the cache is empty; append the new token first")
    for name, g in (("g_cmp", g_cmp), ("g_sel", g_sel), ("g_win", g_win)):
        _check_gate(name, g, B, HQ, q_t)
    if g_cmp is None and g_sel is None and g_win is None:
        raise ValueError("nsa_decode: at least one of g_cmp, g_sel, g_win must be a tensor")
    backend = _route("nsa_decode", backend, q_t, lambda: _triton_reasons(q_t, cache))
    if scale is None:
        scale = cfg.scale if cfg.scale is not None else dk ** -0.5
    if backend == "triton":
        from nsa.ops.decode.launch import triton_decode

        out, reads, idx = triton_decode(q_t, cache, g_cmp, g_sel, g_win, cfg, scale)
        cache.record_reads(reads, accumulated=True)
        return (out, idx) if return_indices else out

    ct = compute_dtype(q_t.dtype)
    # a static (graph-captured) step must not depend on host lengths: read whole buffers,
    # visibility comes from each sequence's position alone
    T = cache.capacity if cache.static else cache.max_length
    N = cache.k_cmp.shape[1] if cache.static else cache.num_cmp
    q_pos = (cache.lengths - 1)[:, None]
    c = lambda x: x.to(ct)  # noqa: E731
    g = lambda x: None if x is None else x[:, None].to(ct)  # noqa: E731
    with torch.no_grad():
        r = nsa_chunk(
            c(q_t[:, None]), q_pos,
            c(cache.k_sel[:, :T]), c(cache.v_sel[:, :T]),
            c(cache.k_win), c(cache.v_win), cache.window_positions(),
            c(cache.k_cmp[:, :N]), c(cache.v_cmp[:, :N]),
            g(g_cmp), g(g_sel), g(g_win), cfg, scale,
        )
    cache.record_reads({k: v[:, 0] for k, v in r.reads.items()})
    out = r.out[:, 0].to(q_t.dtype)
    if return_indices:
        return out, None if r.block_indices is None else r.block_indices[:, 0]
    return out


def _append_triton_reasons(z: Tensor, cache: NSACache) -> list[str]:
    try:
        from nsa.ops.decode.launch import device_dtype_reasons
    except ImportError as e:  # triton not installed
        return [f"triton is not importable ({e})"]
    reasons = device_dtype_reasons(z)
    if z.stride(1) != 1:
        reasons.append("z's columns are not contiguous")
    bufs = ("k_sel", "v_sel", "k_win", "v_win", "k_raw", "v_raw", "k_cmp", "v_cmp")
    if not all(getattr(cache, n).is_contiguous() for n in bufs):
        reasons.append("the cache's buffers are not contiguous")
    return reasons


def decode_append(
    z: Tensor,
    columns: dict[str, int],
    cache: NSACache,
    rope_inv_freq: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Append each sequence's new token to ``cache`` from its projections and return its
    query, position-encoded: the prologue of a decode step, before :func:`nsa_decode`.

    z: [B, F], one row of projections per sequence; ``columns`` gives the first column of
    each block in DECODE_COLUMNS: q ([HQ * d_k]), then per branch the key ([H * d_k]) and
    value ([H * d_v]); blocks may coincide (shared keys/values).
    rope_inv_freq: [d_k / 2] inverse frequencies (float32; float64 for float64 z), as
    :func:`nsa.module.rope_inv_freq` makes them; when given, q and every key are
    rotated (rotate-half RoPE) at the sequence's position ``cache.lengths[b]``.
    Returns q [B, HQ, d_k] in z's dtype. Equivalent to rotating the views of z and calling
    ``cache.append(...)`` (the reference path, taken where the Triton kernel cannot run),
    in one kernel launch (two and phi where a compressed token may be due), with no host
    synchronisation. Everything is checked before the cache changes.
    """
    cfg = cache.config
    HQ, H, dk, dv = cfg.n_heads, cache.H, cache.d_k, cache.d_v
    if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[0] != cache.B:
        got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"decode_append: z must be [B={cache.B}, F], got {got}")
    if z.device != cache.device or z.dtype != cache.dtype:
        raise ValueError(f"decode_append: z is {z.dtype} on {z.device}, the cache holds "
                         f"{cache.dtype} on {cache.device}")
    widths = {"q": HQ * dk, "k_cmp": H * dk, "k_sel": H * dk, "k_win": H * dk,
              "v_cmp": H * dv, "v_sel": H * dv, "v_win": H * dv}
    for name in DECODE_COLUMNS:
        if name not in columns:
            raise ValueError(f"decode_append: columns lacks {name!r} (needs {DECODE_COLUMNS})")
        lo = columns[name]
        if not isinstance(lo, int) or lo < 0 or lo + widths[name] > z.shape[1]:
            raise ValueError(f"decode_append: columns[{name!r}] = {lo!r} puts its "
                             f"{widths[name]} columns outside z's {z.shape[1]}")
    ft = torch.float64 if z.dtype == torch.float64 else torch.float32
    if rope_inv_freq is not None and (tuple(rope_inv_freq.shape) != (dk // 2,)
                                      or rope_inv_freq.dtype != ft
                                      or rope_inv_freq.device != z.device or dk % 2):
        raise ValueError(f"decode_append: rope_inv_freq must be {ft} [{dk // 2}] on "
                         f"{z.device} (d_k={dk} even), got {rope_inv_freq.dtype} "
                         f"{tuple(rope_inv_freq.shape)} on {rope_inv_freq.device}")
    backend = _route("decode_append", backend, z, lambda: _append_triton_reasons(z, cache))
    B = z.shape[0]
    if backend == "reference":
        view = lambda n, heads, D: z[:, columns[n]:columns[n] + heads * D].view(B, heads, D)  # noqa: E731
        q = view("q", HQ, dk)
        keys = {n: view(n, H, dk) for n in ("k_sel", "k_win", "k_cmp")}
        if rope_inv_freq is not None:
            from nsa.module import apply_rope, rope_tables_at

            cos, sin = rope_tables_at(cache.lengths[:, None], rope_inv_freq)  # [B,1,1,dk/2]
            rot = lambda x: apply_rope(x[:, None], cos, sin)[:, 0]  # noqa: E731
            q = rot(q)
            keys = {n: rot(k) for n, k in keys.items()}
        cache.append(keys["k_sel"], view("v_sel", H, dv), keys["k_win"], view("v_win", H, dv),
                     keys["k_cmp"], view("v_cmp", H, dv))
        return q

    from nsa.ops.decode.launch import triton_decode_append

    n = cache.max_length + 1
    cache._ensure_capacity(n)
    # None: the kernel decides per sequence, so phi runs (its write is masked on the device)
    if cache.next_emission() is False:
        q, _, _ = triton_decode_append(z, columns, cache, rope_inv_freq, False, True)
    else:  # phi's input first, the cache untouched until phi has run
        _, kb, vb = triton_decode_append(z, columns, cache, rope_inv_freq, True, False)
        with torch.no_grad():
            kc, vc = cache.compress(kb, vb)
        for name, x, D in (("k", kc, dk), ("v", vc, dv)):
            if tuple(x.shape) != (B, 1, H, D) or x.dtype != cache.dtype:
                raise CacheError(f"decode_append: phi returned {name} {x.dtype} "
                                 f"{tuple(x.shape)}, expected {cache.dtype} {(B, 1, H, D)}")
        q, _, _ = triton_decode_append(z, columns, cache, rope_inv_freq, False, True,
                                       kc[:, 0].contiguous(), vc[:, 0].contiguous())
    cache.max_length = n
    return q
