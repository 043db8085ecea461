"""Triton kernels of the compressed branch: attention over compressed tokens + block scores.

Tiling (one program per (tile of positions, KV head h, batch b)): the M dimension of every
tensor-core dot packs ``PP`` consecutive query positions times ``GP2`` query heads of
group h (``GP2`` = G rounded up to a power of two; padded heads are masked). Row r is
position ``t0 + r // GP2`` and head ``h*G + r % GP2``. Each compressed key/value tile is
therefore loaded once for the whole GQA group, and with d = 16 every row of a tile sees
the same keys except at the last tile (the causal edge moves one compressed token per d
positions), so little work is masked.

Pass 1 is flash attention (online softmax, exp2 domain) over the visible compressed
tokens ``i < min(N, N_cmp(t))``; it writes O_cmp and keeps the base-2 log-sum-exp per row.
Pass 2 recomputes S = Q K^T tile by tile, turns it into the exact probabilities
p = exp2(S - lse), sums them over the G heads of each position (Eq. 10) and maps
compressed tokens to selection blocks with the overlap weights of Eq. 9, so only the
[T, ceil(T / l')] group scores ever reach memory (never a [T, N] matrix).

Eq. 9 as a stride-b convolution (a = l / d, b = l' / d, both in units of d tokens):
compressed token i = j*b + r (0 <= r < b) gives block j the weight min(a, b - r) and
block j + 1 the weight max(0, r + a - b); nothing reaches block j + 2 when a <= b + 1
(l <= l' + d, checked by the launcher). Within a key tile of BN = BJ * b tokens the
"inner" part is a reshape-and-sum; the "tail" part is shifted one block to the right with
``tl.gather`` and the tail of the tile's last block is carried to the next tile.

Both passes run in one program (``PASS1 and PASS2``: "fused") or in two launches that
hand the log-sum-exp through memory ("two-pass"); the launcher measures both.
"""

from __future__ import annotations

import triton
import triton.language as tl

from nsa.ops.rows import _k2_tile, _q_tiles, _softmax_step, _tile_rows


@triton.jit
def _n_visible(t, N, CMP_L: tl.constexpr, CMP_D: tl.constexpr):
    """min(N, N_cmp(t)): compressed tokens i with i*d + l - 1 <= t (and i < N)."""
    return tl.minimum(tl.maximum(t + 1 - CMP_L + CMP_D, 0) // CMP_D, N)


@triton.jit
def _overlap_matrix(BLOCK_N: tl.constexpr, BJ2: tl.constexpr, SEL_B: tl.constexpr,
                    SEL_A: tl.constexpr):
    """[BLOCK_N, BJ2] fp16 weights of a key tile's compressed tokens to the tile's blocks
    (columns 0..BJ-1) and to the next tile's first block (column BJ): overlap / d, small
    integers (exact in fp16)."""
    i = tl.arange(0, BLOCK_N)[:, None]
    jj = tl.arange(0, BJ2)[None, :]
    r = i % SEL_B
    grp = i // SEL_B
    w_in = tl.minimum(SEL_A, SEL_B - r)
    w_tail = tl.maximum(r + SEL_A - SEL_B, 0)
    w = tl.where(grp == jj, w_in, 0) + tl.where(grp == jj - 1, w_tail, 0)
    return w.to(tl.float16)


@triton.jit
def _scores_tile_dot(p, wt, carry, s_rows, kt_i, pos_ok, NB,
                     PP: tl.constexpr, GP2: tl.constexpr, BLOCK_N: tl.constexpr,
                     SEL_B: tl.constexpr, BJ2: tl.constexpr):
    """:func:`_scores_tile` on the tensor cores: P @ W with the overlap matrix of
    :func:`_overlap_matrix`, P split into fp16 hi + lo after scaling by 2^15 (22 bits and
    no underflow for p >= 2^-39; the products with the integer weights are exact), then the
    sum over the group's heads on the [rows, BJ2] result instead of on P itself."""
    BJ: tl.constexpr = BLOCK_N // SEL_B
    ps = p * 32768.0
    p_hi = ps.to(tl.float16)
    p_lo = (ps - p_hi.to(tl.float32)).to(tl.float16)
    pw = tl.dot(p_hi, wt)
    pw = tl.dot(p_lo, wt, pw) * (1.0 / 32768.0)  # [PP*GP2, BJ2]
    pg = tl.sum(tl.reshape(pw, [PP, GP2, BJ2]), 1)  # Eq. 10: sum over the group's heads
    jj = tl.arange(0, BJ2)[None, :]
    sc = pg + tl.where(jj == 0, carry[:, None], 0.0)
    carry = tl.sum(tl.where(jj == BJ, pg, 0.0), 1)
    j0 = kt_i * BJ
    tl.store(s_rows + j0 + jj, sc, mask=pos_ok & (jj < BJ) & (j0 + jj < NB))
    return carry


@triton.jit
def _scores_tile(p, carry, s_ptrs, kt_i, pos_ok, NB,
                 PP: tl.constexpr, GP2: tl.constexpr, BLOCK_N: tl.constexpr,
                 SEL_B: tl.constexpr, SEL_A: tl.constexpr):
    """Eq. 9/10 for one key tile: p [PP*GP2, BLOCK_N] -> group block scores [PP, BJ] (stored).

    Returns the tail this tile hands to the first block of the next tile.
    """
    BJ: tl.constexpr = BLOCK_N // SEL_B
    r = tl.arange(0, SEL_B)
    w_in = tl.minimum(SEL_A, SEL_B - r).to(tl.float32)
    pg = tl.sum(tl.reshape(p, [PP, GP2, BLOCK_N]), 1)  # Eq. 10: sum over the group's heads
    p3 = tl.reshape(pg, [PP, BJ, SEL_B])  # compressed token kt_i*BLOCK_N + jj*SEL_B + r
    sc = tl.sum(p3 * w_in[None, None, :], 2)
    if SEL_A > 1:
        w_tail = tl.maximum(r + SEL_A - SEL_B, 0).to(tl.float32)
        tail = tl.sum(p3 * w_tail[None, None, :], 2)  # what block jj gives block jj + 1
        jj = tl.broadcast_to(tl.arange(0, BJ)[None, :], [PP, BJ])
        shifted = tl.gather(tail, tl.maximum(jj - 1, 0), 1)
        sc += tl.where(jj == 0, carry[:, None], shifted)
        carry = tl.sum(tl.where(jj == BJ - 1, tail, 0.0), 1)
    j0 = kt_i * BJ
    tl.store(s_ptrs + j0, sc, mask=pos_ok & (j0 + tl.arange(0, BJ)[None, :] < NB))
    return carry


@triton.jit
def _cmp_fwd_kernel(
    Q, K, K2, V, O, LSE, SCORES,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    stride_sb, stride_sh, stride_st,
    T, N, NB, qk_scale,
    G: tl.constexpr, GP2: tl.constexpr, PP: tl.constexpr, BLOCK_N: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    CMP_L: tl.constexpr, CMP_D: tl.constexpr, SEL_B: tl.constexpr, SEL_A: tl.constexpr,
    PASS1: tl.constexpr, PASS2: tl.constexpr, DO_PV: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_PREC: tl.constexpr, USE_DESC: tl.constexpr = False, SCORE_DOT: tl.constexpr = False,
    BJ2: tl.constexpr = 32, DK2: tl.constexpr = 0,
):
    BLOCK_M: tl.constexpr = PP * GP2
    n_tiles_t = tl.cdiv(T, PP)
    # heaviest tiles (largest t) first: better tail behaviour of the causal grid
    tile = n_tiles_t - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t0 = tile * PP

    p_loc, t_row, row_ok, hq = _tile_rows(t0, h, T, G, GP2, PP)
    offs_dk = tl.arange(0, DK)
    offs_dv = tl.arange(0, DV)
    offs_n = tl.arange(0, BLOCK_N)

    q_base = Q + b * stride_qb + t0.to(tl.int64) * stride_qt
    # DK2 > 0: the head dim as two tiles (d_k = 192: 128 + 64 columns); K2: the second's
    q, q2, k2_cols, dk2_ok = _q_tiles(q_base + (p_loc * stride_qt + hq * stride_qh)[:, None],
                                      row_ok, offs_n, stride_kn, DK, DK2, D_K)

    if not USE_DESC:
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
    else:
        k_base = K2  # not read: the descriptors load every tile
    b32 = b.to(tl.int32)
    k_cols = offs_dk[:, None] + offs_n[None, :] * stride_kn  # K^T tile [DK, BLOCK_N]
    v_rows = offs_n[:, None] * stride_vn + offs_dv[None, :]  # V tile [BLOCK_N, DV]
    # masks on the head dims only where they are padded (keeps the loads vectorised)
    dk_ok = offs_dk[:, None] < (D_K if D_K < DK else 1 << 30)
    dv_ok = offs_dv[None, :] < (D_V if D_V < DV else 1 << 30)

    n_vis = _n_visible(t_row, N, CMP_L, CMP_D)  # [BLOCK_M]
    t_last = tl.minimum(t0 + PP - 1, T - 1)
    n_lo = _n_visible(t0, N, CMP_L, CMP_D)  # every row sees at least this many tokens
    n_hi = _n_visible(t_last, N, CMP_L, CMP_D)
    n_full = (n_lo // BLOCK_N) * BLOCK_N

    lse_ptrs = LSE + b * stride_lb + hq.to(tl.int64) * stride_lh + t_row

    if PASS1:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DV], tl.float32)
        # one pipelined loop; only tiles past n_full (the causal edge) pay for the mask
        for start in range(0, n_hi, BLOCK_N):
            cols = start + offs_n
            if USE_DESC:  # bulk tensor copy; tokens past N arrive as zeros
                kt = tl.trans(tl.reshape(K.load([b32, start, h, 0]), [BLOCK_N, DK]))
            else:
                kt = tl.load(k_base + start * stride_kn + k_cols,
                             mask=dk_ok & (cols[None, :] < N), other=0.0)
            s = tl.dot(q, kt, input_precision=DOT_PREC)
            if DK2 > 0:
                s = tl.dot(q2, _k2_tile(K2, k_base, k2_cols, dk2_ok, b32, start, h, N,
                                        stride_kn, offs_n, BLOCK_N, DK, DK2, USE_DESC),
                           s, input_precision=DOT_PREC)
            s = s * qk_scale
            if start >= n_full:
                s = tl.where(cols[None, :] < n_vis[:, None], s, float("-inf"))
            p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i)
            if DO_PV:
                if USE_DESC:
                    v = tl.reshape(V.load([b32, start, h, 0]), [BLOCK_N, DV])
                else:
                    v = tl.load(v_base + start * stride_vn + v_rows,
                                mask=dv_ok & (cols[:, None] < N), other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new
        if DO_PV:
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            o_ptrs = (O + b * stride_ob + t0.to(tl.int64) * stride_ot
                      + (p_loc * stride_ot + hq * stride_oh)[:, None] + offs_dv[None, :])
            tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & dv_ok)
        # rows with no visible token (or padding rows) get lse = +inf: p = 0 in pass 2
        lse = tl.where((l_i > 0) & row_ok, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)),
                       float("inf"))
        if STORE_LSE:
            tl.store(lse_ptrs, lse, mask=row_ok)
    else:
        lse = tl.load(lse_ptrs, mask=row_ok, other=float("inf"))

    if PASS2:
        BJ: tl.constexpr = BLOCK_N // SEL_B  # selection blocks per key tile
        offs_p = tl.arange(0, PP)
        t_pos = t0 + offs_p
        s_base = (SCORES + b * stride_sb + h.to(tl.int64) * stride_sh
                  + t0.to(tl.int64) * stride_st)
        s_rows = s_base + (offs_p * stride_st)[:, None]
        s_ptrs = s_rows + tl.arange(0, BJ)[None, :]
        pos_ok = (t_pos < T)[:, None]
        carry = tl.zeros([PP], tl.float32)
        if SCORE_DOT:
            wt = _overlap_matrix(BLOCK_N, BJ2, SEL_B, SEL_A)
        n_tiles = tl.cdiv(n_hi, BLOCK_N)
        for kt_i in range(0, n_tiles):
            cols = kt_i * BLOCK_N + offs_n
            if USE_DESC:
                kt = tl.trans(tl.reshape(K.load([b32, kt_i * BLOCK_N, h, 0]), [BLOCK_N, DK]))
            else:
                kt = tl.load(k_base + kt_i * BLOCK_N * stride_kn + k_cols,
                             mask=dk_ok & (cols[None, :] < N), other=0.0)
            s = tl.dot(q, kt, input_precision=DOT_PREC)
            if DK2 > 0:
                s = tl.dot(q2, _k2_tile(K2, k_base, k2_cols, dk2_ok, b32, kt_i * BLOCK_N, h, N,
                                        stride_kn, offs_n, BLOCK_N, DK, DK2, USE_DESC),
                           s, input_precision=DOT_PREC)
            s = s * qk_scale
            p = tl.math.exp2(s - lse[:, None])
            if kt_i * BLOCK_N >= n_full:
                p = tl.where(cols[None, :] < n_vis[:, None], p, 0.0)
            if SCORE_DOT:
                carry = _scores_tile_dot(p, wt, carry, s_rows, kt_i, pos_ok, NB,
                                         PP, GP2, BLOCK_N, SEL_B, BJ2)
            else:
                carry = _scores_tile(p, carry, s_ptrs, kt_i, pos_ok, NB,
                                     PP, GP2, BLOCK_N, SEL_B, SEL_A)
        if SEL_A > 1:
            # the last tile's tail belongs to the block after it
            j_last = n_tiles * BJ
            tl.store(s_base + offs_p * stride_st + j_last, carry,
                     mask=(t_pos < T) & (j_last < NB))
