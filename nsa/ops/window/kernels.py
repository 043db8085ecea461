"""Triton kernel of the sliding-window branch: flash attention over keys (t - w, t].

One program per (tile of PP positions, KV head, batch); like the compressed kernel, the
M dimension packs PP positions x GP2 heads of one GQA group so each K/V tile is loaded
once per group. Only key tiles that intersect [t_first - w + 1, t_last] are visited;
tiles every row sees entirely skip the mask (lower window edge and causal diagonal are
the only masked ones). With ``STORE_LSE`` it also writes the base-2 log-sum-exp of every
row ([B, HQ, T] float32) for the backward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from nsa.ops.rows import _q_tiles, _softmax_step, _tile_rows


@triton.jit
def _win_fwd_kernel(
    Q, K, K2, V, O, LSE,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    T, W, qk_scale,
    G: tl.constexpr, GP2: tl.constexpr, PP: tl.constexpr, BLOCK_N: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    STORE_LSE: tl.constexpr, DOT_PREC: tl.constexpr, USE_DESC: tl.constexpr = False,
    DK2: tl.constexpr = 0,
):
    BLOCK_M: tl.constexpr = PP * GP2
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t0 = tile * PP
    p_loc, t_row, row_ok, hq = _tile_rows(t0, h, T, G, GP2, PP)
    offs_dk = tl.arange(0, DK)
    offs_dv = tl.arange(0, DV)
    offs_n = tl.arange(0, BLOCK_N)
    dk_ok = offs_dk[:, None] < D_K
    dv_ok = offs_dv[None, :] < D_V

    # DK2 > 0: the head dim as two tiles (d_k = 192: 128 + 64 columns); K2: the second's
    q, q2, k2_cols, dk2_ok = _q_tiles(
        Q + b * stride_qb + t0.to(tl.int64) * stride_qt
        + (p_loc * stride_qt + hq * stride_qh)[:, None], row_ok, offs_n, stride_kt, DK, DK2,
        D_K)
    if not USE_DESC:
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
    b32 = b.to(tl.int32)
    k_cols = offs_dk[:, None] + offs_n[None, :] * stride_kt  # K^T tile [DK, BLOCK_N]
    v_rows = offs_n[:, None] * stride_vt + offs_dv[None, :]

    t_last = tl.minimum(t0 + PP - 1, T - 1)
    lo = (tl.maximum(t0 - W + 1, 0) // BLOCK_N) * BLOCK_N
    hi = t_last + 1
    # tiles [a, b) with a > t_last - w and b <= t0 + 1 are inside every row's window
    full_lo = tl.cdiv(tl.maximum(t_last - W + 1, 0), BLOCK_N) * BLOCK_N
    mid_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    mid_hi = tl.maximum(mid_lo, tl.minimum(((t0 + 1) // BLOCK_N) * BLOCK_N, hi))

    if not USE_DESC:
        # 64-bit pointers walk the key tiles (token offsets may pass 2^31 elements)
        kt_ptrs = k_base + lo.to(tl.int64) * stride_kt + k_cols
        v_ptrs = v_base + lo.to(tl.int64) * stride_vt + v_rows
        if DK2 > 0:
            kt2_ptrs = k_base + lo.to(tl.int64) * stride_kt + k2_cols
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    # one pipelined loop; only tiles outside [mid_lo, mid_hi) (window edge, causal
    # diagonal) pay for the mask
    for start in range(lo, hi, BLOCK_N):
        kpos = start + offs_n
        if USE_DESC:  # bulk tensor copy; keys past T arrive as zeros
            kt = tl.trans(tl.reshape(K.load([b32, start, h, 0]), [BLOCK_N, DK]))
        else:
            kt = tl.load(kt_ptrs, mask=dk_ok & (kpos[None, :] < T), other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PREC)
        if DK2 > 0:
            if USE_DESC:
                kt2 = tl.trans(tl.reshape(K2.load([b32, start, h, DK]), [BLOCK_N, DK2]))
            else:
                kt2 = tl.load(kt2_ptrs, mask=dk2_ok & (kpos[None, :] < T), other=0.0)
                kt2_ptrs += BLOCK_N * stride_kt
            s = tl.dot(q2, kt2, s, input_precision=DOT_PREC)
        s = s * qk_scale
        if (start < mid_lo) | (start >= mid_hi):
            ok = (kpos[None, :] <= t_row[:, None]) & (kpos[None, :] > t_row[:, None] - W)
            s = tl.where(ok, s, float("-inf"))
        p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i)
        if USE_DESC:
            v = tl.reshape(V.load([b32, start, h, 0]), [BLOCK_N, DV])
        else:
            v = tl.load(v_ptrs, mask=dv_ok & (kpos[:, None] < T), other=0.0)
            kt_ptrs += BLOCK_N * stride_kt
            v_ptrs += BLOCK_N * stride_vt
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = (O + b * stride_ob + t0.to(tl.int64) * stride_ot
              + (p_loc * stride_ot + hq * stride_oh)[:, None] + offs_dv[None, :])
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & dv_ok)
    if STORE_LSE:
        # base-2 log-sum-exp per row for the backward (+inf: no visible key)
        lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
        tl.store(LSE + b * stride_lb + hq.to(tl.int64) * stride_lh + t_row, lse, mask=row_ok)
