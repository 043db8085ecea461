"""Triton backward kernels shared by the compressed and the sliding-window branches.

Both branches are flash attention with a structured mask, so one pair of kernels serves
both; ``MASK`` (constexpr) picks the visibility rule:

* ``MASK == 0`` (compressed): key i is visible to query t iff ``i*d + l - 1 <= t`` and
  ``i < N``;
* ``MASK == 1`` (window): key s is visible to query t iff ``t - w < s <= t``.

Notation (per row r = one (position, query head)): ``dO = g * dout`` (the branch's gate
times the output gradient), ``P = exp2(S*log2e*scale - lse)`` from the base-2
log-sum-exp the forward stored, ``Delta = rowsum(dO * O)`` (precomputed),
``dS = P * (dO V^T - Delta)``; then ``dQ = scale * dS K``, ``dK = scale * dS^T Q``,
``dV = P^T dO``. The dQ kernel forms dO once per tile; the dK/dV kernel, which loads a new
dout tile every step, scales P's and (dout V^T)'s columns by g instead.

As in the forward kernels, the M dimension of every dot packs PP consecutive positions
times GP2 query heads of one GQA group (padded heads masked), so one key tile is loaded
once for the whole group.

Query/key head dims that are not a power of two may come as two tiles (``DK2 > 0``:
columns [0, DK) and [DK, DK + DK2), :func:`nsa.ops.compression.launch.head_dim_split`;
d_k = 192 is 128 + 64 instead of one 256-wide tile): every product over d_k is the sum of
the two tiles' products, and dQ/dK are formed and stored per tile. ``DK2 == 0``: one
tile, nothing of the second is compiled.

* :func:`_bwd_dkdv_kernel`: one program per (key tile, query chunk, KV head x batch).
  It walks the query positions that can see the tile (compressed: from the first t
  with ``i*d + l - 1 <= t``; window: the tile's positions plus w - 1) in the chunk and
  accumulates dK, dV in registers; each chunk writes its own float32 partial (summed in
  a fixed order by the launcher: deterministic, no atomics). Chunks bound the work per
  program: the compressed branch's first key tile is seen by every query. Compressed
  chunks are absolute position ranges shared by every key tile (window chunks count
  from the tile's first position).
* :func:`_bwd_dq_kernel`: one program per (tile of PP positions, KV head, batch),
  streaming the visible key tiles like the forward; adds its dQ to a float32 buffer
  that the three branches share (each program owns its rows: no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl

from nsa.ops.rows import _group_rows, _tile_rows


@triton.jit
def _visible(t, k, N, W, MASK: tl.constexpr, CMP_L: tl.constexpr, CMP_D: tl.constexpr):
    """Broadcastable visibility of key k to query position t."""
    if MASK == 0:
        return (k * CMP_D + CMP_L - 1 <= t) & (k < N)
    else:
        return (k <= t) & (k > t - W)


@triton.jit
def _bwd_dkdv_kernel(
    Q, Q2, K, V, DO, GATE, LSE, DELTA, DKP, DVP,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_gb, stride_gt, stride_gh,
    stride_lb, stride_lh,
    stride_pc, stride_pb, stride_pt, stride_ph,
    stride_rc, stride_rb, stride_rt, stride_rh,
    T, NK, H, W, QCHUNK, qk_scale, sm_scale,
    G: tl.constexpr, GP2: tl.constexpr, PP: tl.constexpr, BLOCK_N: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    MASK: tl.constexpr, CMP_L: tl.constexpr, CMP_D: tl.constexpr, DOT_PREC: tl.constexpr,
    USE_DESC: tl.constexpr = False, DK2: tl.constexpr = 0,
):
    """dK, dV partials of one key tile over one chunk of query positions. With
    ``DK2 > 0`` the q/k columns [DK, DK + DK2) are a second tile (Q2: its q rows
    descriptor where ``USE_DESC``, else unused)."""
    BLOCK_M: tl.constexpr = PP * GP2
    kt_i = tl.program_id(0)
    chunk = tl.program_id(1)
    hb = tl.program_id(2)
    h = hb % H
    b = (hb // H).to(tl.int64)
    n0 = kt_i * BLOCK_N

    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, DK)
    offs_dv = tl.arange(0, DV)
    p_loc, g_loc, hq = _group_rows(h, G, GP2, PP)
    kpos = n0 + offs_n
    key_ok = kpos < NK
    dk_ok = offs_dk[None, :] < D_K
    dv_ok = offs_dv[None, :] < D_V

    n64 = n0.to(tl.int64)
    k = tl.load(K + b * stride_kb + h * stride_kh + n64 * stride_kt
                + (offs_n * stride_kt)[:, None] + offs_dk[None, :],
                mask=key_ok[:, None] & dk_ok, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + n64 * stride_vt
                + (offs_n * stride_vt)[:, None] + offs_dv[None, :],
                mask=key_ok[:, None] & dv_ok, other=0.0)
    if DK2 > 0:  # the second tile of k's columns, DK .. DK + DK2
        offs_dk2 = tl.arange(0, DK2)
        dk2_ok = DK + offs_dk2[None, :] < D_K
        k2 = tl.load(K + b * stride_kb + h * stride_kh + n64 * stride_kt + DK
                     + (offs_n * stride_kt)[:, None] + offs_dk2[None, :],
                     mask=key_ok[:, None] & dk2_ok, other=0.0)

    # query positions that can see some key of the tile, cut to this program's chunk
    if MASK == 0:
        # chunks are absolute position ranges [chunk * QCHUNK, (chunk + 1) * QCHUNK): the
        # key tiles of one chunk, launched next to each other, read the same q/dout rows
        # at about the same time, so all but the first read them from L2
        c_lo = tl.maximum(n0 * CMP_D + CMP_L - 1, chunk * QCHUNK)
        c_hi = tl.minimum(T, (chunk + 1) * QCHUNK)
    else:
        # the window's rows (at most BLOCK_N - 1 + W) overlap the next tile's anyway
        c_lo = n0 + chunk * QCHUNK
        c_hi = tl.minimum(tl.minimum(T, n0 + BLOCK_N - 1 + W), c_lo + QCHUNK)

    dk = tl.zeros([BLOCK_N, DK], tl.float32)
    dv = tl.zeros([BLOCK_N, DV], tl.float32)
    if DK2 > 0:
        dk2 = tl.zeros([BLOCK_N, DK2], tl.float32)
    # 32-bit offsets inside a tile, one 64-bit scalar base per tile (keeps registers free)
    q_rows = p_loc * stride_qt + hq * stride_qh
    o_rows = p_loc * stride_ot + hq * stride_oh
    g_rows = p_loc * stride_gt + hq * stride_gh
    l_rows = hq * stride_lh + p_loc
    for p0 in range(c_lo, c_hi, PP):
        t_row = p0 + p_loc
        row_ok = (g_loc < G) & (t_row < c_hi)
        p64 = tl.full([], 0, tl.int64) + p0  # (the interpreter hands loop indices as ints)
        if USE_DESC:
            # bulk copies of PP positions x the group's G (= GP2) heads; rows past c_hi are
            # real rows of later positions, masked below like padding rows (p = 0)
            q = tl.reshape(Q.load([b.to(tl.int32), p0, h * G, 0]), [BLOCK_M, DK])
            do = tl.reshape(DO.load([b.to(tl.int32), p0, h * G, 0]), [BLOCK_M, DV])
            if DK2 > 0:
                q2 = tl.reshape(Q2.load([b.to(tl.int32), p0, h * G, DK]), [BLOCK_M, DK2])
        else:
            q = tl.load(Q + b * stride_qb + p64 * stride_qt + q_rows[:, None]
                        + offs_dk[None, :], mask=row_ok[:, None] & dk_ok, other=0.0)
            do = tl.load(DO + b * stride_ob + p64 * stride_ot + o_rows[:, None]
                         + offs_dv[None, :], mask=row_ok[:, None] & dv_ok, other=0.0)
            if DK2 > 0:
                q2 = tl.load(Q + b * stride_qb + p64 * stride_qt + DK + q_rows[:, None]
                             + offs_dk2[None, :], mask=row_ok[:, None] & dk2_ok, other=0.0)
        g_off = b * stride_gb + p64 * stride_gt + g_rows
        gate = tl.load(GATE + g_off, mask=row_ok, other=0.0).to(tl.float32)
        lse = tl.load(LSE + b * stride_lb + p64 + l_rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + g_off, mask=row_ok, other=0.0)  # gate's [B, T, HQ] layout
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_M]
        if DK2 > 0:
            qk_t = tl.dot(k2, tl.trans(q2), qk_t, input_precision=DOT_PREC)
        ok = _visible(t_row[None, :], kpos[:, None], NK, W, MASK, CMP_L, CMP_D) & row_ok[None, :]
        p_t = tl.where(ok, tl.math.exp2(qk_t * qk_scale - lse[None, :]), 0.0)
        # the gate scales P's and dP's columns (its rows), not the dout tile: the tile then
        # goes from the pipeline's shared-memory copy to the tensor cores untouched
        dv += tl.dot((p_t * gate[None, :]).to(q.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC) * gate[None, :]
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
        if DK2 > 0:
            dk2 += tl.dot(ds_t.to(q.dtype), q2, input_precision=DOT_PREC)

    dk = dk * sm_scale
    p_base = DKP + chunk.to(tl.int64) * stride_pc + b * stride_pb + h * stride_ph
    tl.store(p_base + n64 * stride_pt + (offs_n * stride_pt)[:, None] + offs_dk[None, :], dk,
             mask=key_ok[:, None] & dk_ok)
    if DK2 > 0:
        tl.store(p_base + n64 * stride_pt + DK + (offs_n * stride_pt)[:, None]
                 + offs_dk2[None, :], dk2 * sm_scale, mask=key_ok[:, None] & dk2_ok)
    r_base = DVP + chunk.to(tl.int64) * stride_rc + b * stride_rb + h * stride_rh
    tl.store(r_base + n64 * stride_rt + (offs_n * stride_rt)[:, None] + offs_dv[None, :], dv,
             mask=key_ok[:, None] & dv_ok)


@triton.jit
def _dq_branch_rows(DO, GATE, LSE, DELTA, b, t64, p_loc, hq, row_ok,
                    stride_ob, stride_ot, stride_oh, stride_gb, stride_gt, stride_gh,
                    stride_lb, stride_lh, DV: tl.constexpr, D_V: tl.constexpr, dtype):
    """One branch's rows of a query tile starting at position t64: dO = gate * dout (in
    ``dtype``), lse and Delta. DELTA has GATE's layout."""
    offs_dv = tl.arange(0, DV)
    do = tl.load(DO + b * stride_ob + t64 * stride_ot
                 + (p_loc * stride_ot + hq * stride_oh)[:, None] + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv[None, :] < D_V), other=0.0)
    g_off = b * stride_gb + t64 * stride_gt + p_loc * stride_gt + hq * stride_gh
    gate = tl.load(GATE + g_off, mask=row_ok, other=0.0)
    do = (do.to(tl.float32) * gate.to(tl.float32)[:, None]).to(dtype)
    lse = tl.load(LSE + b * stride_lb + t64 + hq * stride_lh + p_loc, mask=row_ok,
                  other=float("inf"))
    delta = tl.load(DELTA + g_off, mask=row_ok, other=0.0)
    return do, lse, delta


@triton.jit
def _dq_rows(Q, DO, GATE, LSE, DELTA, b, t64, p_loc, hq, row_ok,
             stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh,
             stride_gb, stride_gt, stride_gh, stride_lb, stride_lh,
             DK: tl.constexpr, DV: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
             DK2: tl.constexpr = 0):
    """Rows of a query tile starting at position t64 (row r: position t64 + p_loc[r], head
    hq[r]): q, q2 (q's columns DK .. DK + DK2 where ``DK2 > 0``, else q itself), dO =
    gate * dout (q's dtype), lse and Delta. DELTA has GATE's layout."""
    offs_dk = tl.arange(0, DK)
    q_ptrs = (Q + b * stride_qb + t64 * stride_qt
              + (p_loc * stride_qt + hq * stride_qh)[:, None] + offs_dk[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_dk[None, :] < D_K), other=0.0)
    if DK2 > 0:
        offs_dk2 = tl.arange(0, DK2)
        q2 = tl.load(Q + b * stride_qb + t64 * stride_qt + DK
                     + (p_loc * stride_qt + hq * stride_qh)[:, None] + offs_dk2[None, :],
                     mask=row_ok[:, None] & (DK + offs_dk2[None, :] < D_K), other=0.0)
    else:
        q2 = q
    do, lse, delta = _dq_branch_rows(DO, GATE, LSE, DELTA, b, t64, p_loc, hq, row_ok,
                                     stride_ob, stride_ot, stride_oh, stride_gb, stride_gt,
                                     stride_gh, stride_lb, stride_lh, DV, D_V, q.dtype)
    return q, q2, do, lse, delta


@triton.jit
def _dq_store_cols(DQ, dq, b, t64, p_loc, hq, row_ok, stride_db, stride_dt, stride_dh,
                   C0: tl.constexpr, DK: tl.constexpr, D_K: tl.constexpr,
                   ACCUMULATE: tl.constexpr, OUT):
    """:func:`_dq_store` of the columns C0 .. C0 + DK (those below D_K)."""
    offs_dk = tl.arange(0, DK)
    rows = (p_loc * stride_dt + hq * stride_dh)[:, None] + offs_dk[None, :]
    if C0 > 0:
        rows += C0
    dq_ptrs = DQ + b * stride_db + t64 * stride_dt + rows
    if C0 > 0:
        st = row_ok[:, None] & (C0 + offs_dk[None, :] < D_K)
    else:
        st = row_ok[:, None] & (offs_dk[None, :] < D_K)
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=st, other=0.0)
    if OUT is None:
        tl.store(dq_ptrs, dq, mask=st)
    else:
        tl.store(OUT + b * stride_db + t64 * stride_dt + rows,
                 dq.to(OUT.dtype.element_ty), mask=st)


@triton.jit
def _dq_store(DQ, dq, b, t64, p_loc, hq, row_ok, stride_db, stride_dt, stride_dh,
              DK: tl.constexpr, D_K: tl.constexpr, ACCUMULATE: tl.constexpr, OUT=None,
              dq2=None, DK2: tl.constexpr = 0):
    """Write (or add to the float32 buffer) a query tile's dQ rows; with ``OUT`` (DQ's
    strides) the sum goes there in OUT's dtype instead, and DQ is only read. ``DK2 > 0``:
    dq2 holds the columns DK .. DK + DK2."""
    _dq_store_cols(DQ, dq, b, t64, p_loc, hq, row_ok, stride_db, stride_dt, stride_dh,
                   0, DK, D_K, ACCUMULATE, OUT)
    if DK2 > 0:
        _dq_store_cols(DQ, dq2, b, t64, p_loc, hq, row_ok, stride_db, stride_dt, stride_dh,
                       DK, DK2, D_K, ACCUMULATE, OUT)


@triton.jit
def _dq_flash_loop(dq, q, do, lse, delta, K, V, b, h, t0, t_row, row_ok,
                   stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                   T, NK, W, qk_scale,
                   PP: tl.constexpr, BLOCK_N: tl.constexpr, DK: tl.constexpr,
                   DV: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
                   MASK: tl.constexpr, CMP_L: tl.constexpr, CMP_D: tl.constexpr,
                   DOT_PREC: tl.constexpr, USE_DESC: tl.constexpr,
                   dq2=None, q2=None, K_HI=None, DK2: tl.constexpr = 0):
    """dq += dS K (unscaled) over one branch's key tiles visible to the query tile; returns
    (dq, dq2). ``DK2 > 0``: q2/dq2 are the columns DK .. DK + DK2 (K_HI: the descriptor of
    k's, where ``USE_DESC``); else dq2 comes back as given."""
    offs_dk = tl.arange(0, DK)
    offs_dv = tl.arange(0, DV)
    offs_n = tl.arange(0, BLOCK_N)
    if DK2 > 0:
        offs_dk2 = tl.arange(0, DK2)
    t_last = tl.minimum(t0 + PP - 1, T - 1)
    if MASK == 0:
        lo = 0
        hi = tl.minimum(tl.maximum(t_last + 1 - CMP_L + CMP_D, 0) // CMP_D, NK)
    else:
        lo = (tl.maximum(t0 - W + 1, 0) // BLOCK_N) * BLOCK_N
        hi = t_last + 1
    if not USE_DESC:
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
    for start in range(lo, hi, BLOCK_N):
        kpos = start + offs_n
        if USE_DESC:  # bulk tensor copies; keys past NK arrive as zeros
            k = tl.reshape(K.load([b.to(tl.int32), start, h, 0]), [BLOCK_N, DK])
            v = tl.reshape(V.load([b.to(tl.int32), start, h, 0]), [BLOCK_N, DV])
            if DK2 > 0:
                k2 = tl.reshape(K_HI.load([b.to(tl.int32), start, h, DK]), [BLOCK_N, DK2])
        else:
            s64 = tl.full([], 0, tl.int64) + start
            key_ok = kpos < NK
            k = tl.load(k_base + s64 * stride_kt + (offs_n * stride_kt)[:, None]
                        + offs_dk[None, :], mask=key_ok[:, None] & (offs_dk[None, :] < D_K),
                        other=0.0)
            v = tl.load(v_base + s64 * stride_vt + (offs_n * stride_vt)[:, None]
                        + offs_dv[None, :], mask=key_ok[:, None] & (offs_dv[None, :] < D_V),
                        other=0.0)
            if DK2 > 0:
                k2 = tl.load(k_base + s64 * stride_kt + DK + (offs_n * stride_kt)[:, None]
                             + offs_dk2[None, :],
                             mask=key_ok[:, None] & (DK + offs_dk2[None, :] < D_K), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if DK2 > 0:
            s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)
        ok = _visible(t_row[:, None], kpos[None, :], NK, W, MASK, CMP_L, CMP_D) & row_ok[:, None]
        p = tl.where(ok, tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(q.dtype), k, input_precision=DOT_PREC)
        if DK2 > 0:
            dq2 += tl.dot(ds.to(q.dtype), k2, input_precision=DOT_PREC)
    return dq, dq2


@triton.jit
def _bwd_dq_kernel(
    Q, K, K_HI, V, DO, GATE, LSE, DELTA, DQ,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_gb, stride_gt, stride_gh,
    stride_lb, stride_lh,
    stride_db, stride_dt, stride_dh,
    T, NK, W, qk_scale, sm_scale,
    G: tl.constexpr, GP2: tl.constexpr, PP: tl.constexpr, BLOCK_N: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    MASK: tl.constexpr, CMP_L: tl.constexpr, CMP_D: tl.constexpr,
    ACCUMULATE: tl.constexpr, DOT_PREC: tl.constexpr, USE_DESC: tl.constexpr = False,
    K2=None, V2=None, GATE2=None, LSE2=None, DELTA2=None, OUT=None,
    stride_k2b=0, stride_k2t=0, stride_k2h=0, stride_v2b=0, stride_v2t=0, stride_v2h=0,
    NK2=0, MASK2: tl.constexpr = -1, K2_HI=None, DK2: tl.constexpr = 0,
):
    """dQ of one flash branch (``MASK``) or, with ``MASK2 >= 0``, of two (the second's
    keys K2/V2, gate, lse and Delta in the first's layouts) summed in registers: q is
    loaded and dQ stored once for both. ``OUT``: the final dQ in its dtype (see
    :func:`_dq_store`). ``DK2 > 0``: q/k columns DK .. DK + DK2 as a second tile (K_HI,
    K2_HI: the keys' descriptors of it where ``USE_DESC``, else unused)."""
    n_tiles_t = tl.cdiv(T, PP)
    tile = n_tiles_t - 1 - tl.program_id(0)  # heaviest tiles first
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t0 = tile * PP
    p_loc, t_row, row_ok, hq = _tile_rows(t0, h, T, G, GP2, PP)
    t64 = t0.to(tl.int64)

    q, q2, do, lse, delta = _dq_rows(Q, DO, GATE, LSE, DELTA, b, t64, p_loc, hq, row_ok,
                                     stride_qb, stride_qt, stride_qh, stride_ob, stride_ot,
                                     stride_oh, stride_gb, stride_gt, stride_gh, stride_lb,
                                     stride_lh, DK, DV, D_K, D_V, DK2)
    dq = tl.zeros([PP * GP2, DK], tl.float32)
    if DK2 > 0:
        dq2 = tl.zeros([PP * GP2, DK2], tl.float32)
    else:
        dq2 = dq
    dq, dq2 = _dq_flash_loop(dq, q, do, lse, delta, K, V, b, h, t0, t_row, row_ok,
                             stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                             T, NK, W, qk_scale, PP, BLOCK_N, DK, DV, D_K, D_V, MASK, CMP_L,
                             CMP_D, DOT_PREC, USE_DESC, dq2, q2, K_HI, DK2)
    if MASK2 >= 0:
        do, lse, delta = _dq_branch_rows(DO, GATE2, LSE2, DELTA2, b, t64, p_loc, hq, row_ok,
                                         stride_ob, stride_ot, stride_oh, stride_gb,
                                         stride_gt, stride_gh, stride_lb, stride_lh, DV, D_V,
                                         q.dtype)
        dq, dq2 = _dq_flash_loop(dq, q, do, lse, delta, K2, V2, b, h, t0, t_row, row_ok,
                                 stride_k2b, stride_k2t, stride_k2h, stride_v2b, stride_v2t,
                                 stride_v2h, T, NK2, W, qk_scale, PP, BLOCK_N, DK, DV, D_K,
                                 D_V, MASK2, CMP_L, CMP_D, DOT_PREC, USE_DESC, dq2, q2,
                                 K2_HI, DK2)

    _dq_store(DQ, dq * sm_scale, b, t64, p_loc, hq, row_ok, stride_db, stride_dt, stride_dh,
              DK, D_K, ACCUMULATE, OUT, dq2 * sm_scale, DK2)


@triton.jit
def _rowdot_kernel(
    DO, O1, O2, O3, R1, R2, R3, n_rows,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_R: tl.constexpr, N_OUT: tl.constexpr,
):
    """r_x[row] = sum_d dout[row, d] * O_x[row, d] in float32 for up to three branch
    outputs, reading dout once (rows of contiguous [rows, D] tensors)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, DP)
    ok = rows < n_rows
    m = ok[:, None] & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    do = tl.load(DO + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(R1 + rows, tl.sum(do * tl.load(O1 + offs, mask=m, other=0.0).to(tl.float32), 1),
             mask=ok)
    if N_OUT > 1:
        tl.store(R2 + rows, tl.sum(do * tl.load(O2 + offs, mask=m, other=0.0).to(tl.float32), 1),
                 mask=ok)
    if N_OUT > 2:
        tl.store(R3 + rows, tl.sum(do * tl.load(O3 + offs, mask=m, other=0.0).to(tl.float32), 1),
                 mask=ok)
