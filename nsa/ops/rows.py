"""Row layout shared by the group-packed Triton kernels (forward and backward).

The M dimension of a tile packs ``PP`` consecutive query positions times ``GP2`` query
heads of KV group h (``GP2`` = G rounded up to a power of two; padded heads masked):
row r is position ``t0 + r // GP2`` and query head ``h*G + r % GP2``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _group_rows(h, G: tl.constexpr, GP2: tl.constexpr, PP: tl.constexpr):
    """(position offset in the tile, head offset in the group, query head) per row of a
    tile of PP positions x GP2 heads of KV head h."""
    offs_m = tl.arange(0, PP * GP2)
    p_loc = offs_m // GP2
    g_loc = offs_m % GP2
    return p_loc, g_loc, h * G + g_loc


@triton.jit
def _tile_rows(t0, h, T, G: tl.constexpr, GP2: tl.constexpr, PP: tl.constexpr):
    """(position offset in the tile, position, row is real, query head) per row."""
    p_loc, g_loc, hq = _group_rows(h, G, GP2, PP)
    t_row = t0 + p_loc
    row_ok = (g_loc < G) & (t_row < T)
    return p_loc, t_row, row_ok, hq


@triton.jit
def _softmax_step(s, m_i, l_i):
    """One online-softmax step over a tile of base-2 scores ``s`` [M, N] (-inf = masked):
    (p, alpha, m_new, l_new) with p = exp2(s - m_new), the accumulator's rescale alpha
    and the updated running max and sum. Rows with nothing visible yet keep m = -inf,
    p = 0 and l = 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _q_tiles(q_rows, row_ok, offs_n, stride_kn, DK: tl.constexpr, DK2: tl.constexpr,
             D_K: tl.constexpr):
    """A query tile's rows as the head dim's tiles (``DK2 > 0``: columns DK..DK+DK2 are a
    second tile, :func:`nsa.ops.compression.launch.head_dim_split`). ``q_rows``: [M, 1]
    row pointers. Returns (q [M, DK], q2 [M, DK2], the second K^T tile's offsets
    [DK2, BLOCK_N] for keys ``stride_kn`` apart, its column mask [DK2, 1]); without a
    second tile, q, q, offs_n and row_ok stand in for the last three (never read)."""
    offs_dk = tl.arange(0, DK)
    q = tl.load(q_rows + offs_dk[None, :], mask=row_ok[:, None] & (offs_dk[None, :] < D_K),
                other=0.0)
    if DK2 > 0:
        offs_dk2 = DK + tl.arange(0, DK2)
        q2 = tl.load(q_rows + offs_dk2[None, :],
                     mask=row_ok[:, None] & (offs_dk2[None, :] < D_K), other=0.0)
        k2_cols = offs_dk2[:, None] + offs_n[None, :] * stride_kn
        dk2_ok = offs_dk2[:, None] < D_K
    else:
        q2 = q
        k2_cols = offs_n
        dk2_ok = row_ok
    return q, q2, k2_cols, dk2_ok


@triton.jit
def _k2_tile(K2, k_base, k2_cols, dk2_ok, b32, start, h, N, stride_kn, offs_n,
             BLOCK_N: tl.constexpr, DK: tl.constexpr, DK2: tl.constexpr,
             USE_DESC: tl.constexpr):
    """K^T tile [DK2, BLOCK_N] of the head dim's second tile (columns DK..DK+DK2) at key
    ``start`` (keys from N on read as zeros): by the second descriptor K2, else by pointers
    from ``k_base`` (the key rows of one batch and head; ``k2_cols``: the tile's offsets)."""
    if USE_DESC:
        kb = K2.load([b32, tl.cast(start, tl.int32), h, DK])
        kt2 = tl.trans(tl.reshape(kb, [BLOCK_N, DK2]))
    else:
        kt2 = tl.load(k_base + start * stride_kn + k2_cols,
                      mask=dk2_ok & ((start + offs_n)[None, :] < N), other=0.0)
    return kt2
