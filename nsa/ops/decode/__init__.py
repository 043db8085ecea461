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

from nsa.cache import NSACache
from nsa.config import NSAConfig
from nsa.ops.reference import compute_dtype, nsa_chunk

__all__ = ["nsa_decode"]


def _triton_reasons(q_t: Tensor, cache: NSACache) -> list[str]:
    try:
        from nsa.ops.decode.launch import decode_not_supported_reasons
    except ImportError as e:  # triton not installed
        return [f"triton is not importable ({e})"]
    return decode_not_supported_reasons(q_t, cache)


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
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"nsa_decode: backend must be 'auto', 'reference' or 'triton', "
                         f"got {backend!r}")
    if scale is None:
        scale = cfg.scale if cfg.scale is not None else dk ** -0.5
    if backend == "triton" or (backend == "auto" and q_t.is_cuda):
        reasons = _triton_reasons(q_t, cache)
        if reasons and backend == "triton":
            raise ValueError("nsa_decode: backend='triton' cannot run this step: "
                             + "; ".join(reasons))
        backend = "reference" if reasons else "triton"
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
