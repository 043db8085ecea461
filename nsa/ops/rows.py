"""Row layout shared by the group-packed Triton kernels (forward and backward).

The M dimension of a tile packs ``PP`` consecutive query positions times ``GP2`` query
heads of KV group h (``GP2`` = G rounded up to a power of two; padded heads masked):
row r is position ``t0 + r // GP2`` and query head ``h*G + r % GP2``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_rows(t0, h, T, G: tl.constexpr, GP2: tl.constexpr, PP: tl.constexpr):
    """(position offset in the tile, position, row is real, query head) per row."""
    offs_m = tl.arange(0, PP * GP2)
    p_loc = offs_m // GP2
    g_loc = offs_m % GP2
    t_row = t0 + p_loc
    row_ok = (g_loc < G) & (t_row < T)
    return p_loc, t_row, row_ok, h * G + g_loc
