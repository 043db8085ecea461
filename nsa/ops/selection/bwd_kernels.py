"""Triton backward kernels of the selected-attention branch.

Notation as in :mod:`nsa.ops.flashbwd.kernels`: per row (position t, query head),
``dO = g_sel * dout``, ``P = exp2(S*log2e*scale - lse)`` from the forward's base-2
log-sum-exp, ``Delta = rowsum(dO * O_sel)``, ``dS = P * (dO V^T - Delta)``.

* :func:`_sel_bwd_dq_kernel` mirrors the forward (group-centric): one program per (tile
  of PP positions, KV head, batch) streams the selected blocks (PP = 1: its index row;
  PP > 1: the union of its positions' blocks, each block once) and accumulates
  ``dQ += scale * dS K`` into the float32 buffer the branches share.
* :func:`_sel_bwd_dkdv_kernel` is key-centric over an inverted index: the launcher sorts
  the (block, position) pairs of the selection per (batch, KV head) so the positions
  that selected block j are contiguous, and cuts each block's list into segments of at
  most C positions. One program per (segment, key sub-tile, KV head, batch) holds the
  block's keys/values in registers, walks its segment PP positions at a time (gathering
  the G query heads of each position: rows = PP x GP2) and accumulates ``dV += P^T dO``
  and ``dK += scale * dS^T Q``; causal inside the block. It then either adds its dK/dV
  to float32 buffers with atomics (``ATOMIC``) or stores them as a per-segment partial
  that :func:`_sel_bwd_reduce_kernel` sums in segment order (deterministic).
  Segments bound the work per program: every position selects block 0 (initial block).

Every kernel with a ``DK`` (``DKT``) constexpr takes ``DK2`` (``DKT2``): where > 0 the
q/k columns [DK, DK + DK2) are a second tile (d_k = 192: 128 + 64 instead of one 256-wide
tile, :func:`nsa.ops.compression.launch.head_dim_split`); products over d_k sum the two
tiles' products, dQ/dK are formed and stored per tile. 0: one tile, as before.
"""

from __future__ import annotations

import triton
import triton.language as tl

from nsa.ops.flashbwd.kernels import _dq_rows, _dq_store
from nsa.ops.rows import _group_rows, _tile_rows
from nsa.ops.selection.kernels import _block_at, _block_list


@triton.jit
def _sel_bwd_dq_kernel(
    Q, K, K2, V, IDX, DO, GATE, LSE, DELTA, DQ,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ib, stride_it, stride_ih,
    stride_ob, stride_ot, stride_oh,
    stride_gb, stride_gt, stride_gh,
    stride_lb, stride_lh,
    stride_db, stride_dt, stride_dh,
    T, qk_scale, sm_scale,
    G: tl.constexpr, GP2: tl.constexpr, PP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    L_SEL: tl.constexpr, BLOCK_N: tl.constexpr, N_SEL: tl.constexpr, NP: tl.constexpr,
    ACCUMULATE: tl.constexpr, DOT_PREC: tl.constexpr, USE_DESC: tl.constexpr = False,
    DK2: tl.constexpr = 0,
):
    """dQ of a tile of PP positions over their selected blocks; ``DK2 > 0``: q/k columns
    DK .. DK + DK2 as a second tile (K2: k's descriptor of it where ``USE_DESC``)."""
    BLOCK_M: tl.constexpr = PP * GP2
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t0 = tile * PP
    p_loc, t_row, row_ok, hq = _tile_rows(t0, h, T, G, GP2, PP)
    t64 = t0.to(tl.int64)
    offs_dk = tl.arange(0, DK)
    offs_dv = tl.arange(0, DV)
    offs_n = tl.arange(0, BLOCK_N)
    dk_ok = offs_dk[None, :] < D_K
    dv_ok = offs_dv[None, :] < D_V

    q, q2, do, lse, delta = _dq_rows(Q, DO, GATE, LSE, DELTA, b, t64, p_loc, hq, row_ok,
                                     stride_qb, stride_qt, stride_qh, stride_ob, stride_ot,
                                     stride_oh, stride_gb, stride_gt, stride_gh, stride_lb,
                                     stride_lh, DK, DV, D_K, D_V, DK2)

    if not USE_DESC:
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
    i_base, flat, order, row_idx, n_blocks = _block_list(
        IDX, b, h, t0, T, p_loc, row_ok, stride_ib, stride_it, stride_ih, PP, NP, N_SEL)

    dq = tl.zeros([BLOCK_M, DK], tl.float32)
    if DK2 > 0:  # the second tile of the q/k columns, DK .. DK + DK2
        offs_dk2 = tl.arange(0, DK2)
        dk2_ok = DK + offs_dk2[None, :] < D_K
        dq2 = tl.zeros([BLOCK_M, DK2], tl.float32)
    else:
        dq2 = dq
    for u in range(0, n_blocks):
        blk, member = _block_at(u, i_base, flat, order, row_idx, row_ok, PP)
        for c0 in tl.static_range(0, L_SEL, BLOCK_N):
            s0 = blk.to(tl.int64) * L_SEL + c0
            kpos = s0 + offs_n
            key_ok = (kpos < T) & (c0 + offs_n < L_SEL)
            if USE_DESC:
                # bulk tensor copies (rows past T arrive as zeros)
                k = tl.reshape(K.load([b.to(tl.int32), s0.to(tl.int32), h, 0]), [BLOCK_N, DK])
                v = tl.reshape(V.load([b.to(tl.int32), s0.to(tl.int32), h, 0]), [BLOCK_N, DV])
                if DK2 > 0:
                    k2 = tl.reshape(K2.load([b.to(tl.int32), s0.to(tl.int32), h, DK]),
                                    [BLOCK_N, DK2])
            else:
                k = tl.load(k_base + s0 * stride_kt + (offs_n * stride_kt)[:, None]
                            + offs_dk[None, :], mask=key_ok[:, None] & dk_ok, other=0.0)
                v = tl.load(v_base + s0 * stride_vt + (offs_n * stride_vt)[:, None]
                            + offs_dv[None, :], mask=key_ok[:, None] & dv_ok, other=0.0)
                if DK2 > 0:
                    k2 = tl.load(k_base + s0 * stride_kt + DK + (offs_n * stride_kt)[:, None]
                                 + offs_dk2[None, :], mask=key_ok[:, None] & dk2_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            if DK2 > 0:
                s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)
            ok = member[:, None] & (kpos[None, :] <= t_row[:, None]) & key_ok[None, :]
            p = tl.where(ok, tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(q.dtype), k, input_precision=DOT_PREC)
            if DK2 > 0:
                dq2 += tl.dot(ds.to(q.dtype), k2, input_precision=DOT_PREC)

    _dq_store(DQ, dq * sm_scale, b, t64, p_loc, hq, row_ok, stride_db, stride_dt, stride_dh,
              DK, D_K, ACCUMULATE, None, dq2 * sm_scale, DK2)


@triton.jit
def _sel_bwd_dkdv_kernel(
    Q, K, V, DO, GATE, LSE, DELTA, KEYS, SEG_BLK, SEG_LO, SEG_HI, DKO, DVO,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_gb, stride_gt, stride_gh,
    stride_lb, stride_lh,
    stride_eb, stride_eh,
    stride_sb, stride_sh,
    stride_k0, stride_k1, stride_k2, stride_k3,
    stride_v0, stride_v1, stride_v2, stride_v3,
    T, H, NB, qk_scale, sm_scale,
    G: tl.constexpr, GP2: tl.constexpr, PP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    L_SEL: tl.constexpr, BLOCK_N: tl.constexpr, NSUB: tl.constexpr,
    ATOMIC: tl.constexpr, DOT_PREC: tl.constexpr,
    DQX=None, stride_x0=0, stride_x1=0, stride_x2=0, stride_x3=0, stride_x4=0, SPAN=0,
    N_SEL: tl.constexpr = 1, DQ_OUT: tl.constexpr = 0, DK2: tl.constexpr = 0,
):
    """dK/dV (and with ``DQ_OUT`` dQ) of one key sub-tile over one segment of the
    positions that selected its block; ``DK2 > 0``: q/k columns DK .. DK + DK2 as a second
    tile."""
    pid = tl.program_id(0)
    seg = pid // NSUB
    c0 = (pid % NSUB) * BLOCK_N
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    s_off = b * stride_sb + h * stride_sh + seg
    blk = tl.load(SEG_BLK + s_off)
    if blk < NB:
        lo = tl.load(SEG_LO + s_off)
        hi = tl.load(SEG_HI + s_off)
        offs_n = tl.arange(0, BLOCK_N)
        offs_dk = tl.arange(0, DK)
        offs_dv = tl.arange(0, DV)
        p_loc, g_loc, hq = _group_rows(h, G, GP2, PP)
        dk_ok = offs_dk[None, :] < D_K
        dv_ok = offs_dv[None, :] < D_V
        s0 = blk * L_SEL + c0  # first key of this sub-tile
        kpos = s0 + offs_n
        key_ok = (kpos < T) & (c0 + offs_n < L_SEL)
        s64 = s0.to(tl.int64)
        k = tl.load(K + b * stride_kb + h * stride_kh + s64 * stride_kt
                    + (offs_n * stride_kt)[:, None] + offs_dk[None, :],
                    mask=key_ok[:, None] & dk_ok, other=0.0)
        v = tl.load(V + b * stride_vb + h * stride_vh + s64 * stride_vt
                    + (offs_n * stride_vt)[:, None] + offs_dv[None, :],
                    mask=key_ok[:, None] & dv_ok, other=0.0)
        if DK2 > 0:  # the second tile of k's columns, DK .. DK + DK2
            offs_dk2 = tl.arange(0, DK2)
            dk2_ok = DK + offs_dk2[None, :] < D_K
            k2 = tl.load(K + b * stride_kb + h * stride_kh + s64 * stride_kt + DK
                         + (offs_n * stride_kt)[:, None] + offs_dk2[None, :],
                         mask=key_ok[:, None] & dk2_ok, other=0.0)
        e_base = KEYS + b * stride_eb + h * stride_eh
        # gathered rows use 32-bit offsets (the launcher checks T * stride < 2^31)
        q_base = Q + b * stride_qb
        o_base = DO + b * stride_ob
        g_base = GATE + b * stride_gb
        d_base = DELTA + b * stride_gb
        l_base = LSE + b * stride_lb
        hq_q = hq * stride_qh
        hq_o = hq * stride_oh
        hq_g = hq * stride_gh
        hq_l = hq * stride_lh
        # keys: block * T + t, or with DQ_OUT block * T * n + t * n + j (SPAN = T or T * n;
        # int64 where (NB + 1) * SPAN >= 2^31)
        key0 = blk.to(KEYS.dtype.element_ty) * SPAN
        dk = tl.zeros([BLOCK_N, DK], tl.float32)
        dv = tl.zeros([BLOCK_N, DV], tl.float32)
        if DK2 > 0:
            dk2 = tl.zeros([BLOCK_N, DK2], tl.float32)
        for p0 in range(lo, hi, PP):
            e = p0 + p_loc
            row_ok = (g_loc < G) & (e < hi)
            key = tl.load(e_base + e, mask=row_ok, other=0)
            ent = (key - key0).to(tl.int32)  # rows past the segment: masked below
            if DQ_OUT > 0:
                tr = ent // N_SEL  # the position and its slot
                jr = ent % N_SEL
            else:
                tr = ent
            q = tl.load(q_base + (tr * stride_qt + hq_q)[:, None] + offs_dk[None, :],
                        mask=row_ok[:, None] & dk_ok, other=0.0)
            if DK2 > 0:
                q2 = tl.load(q_base + DK + (tr * stride_qt + hq_q)[:, None] + offs_dk2[None, :],
                             mask=row_ok[:, None] & dk2_ok, other=0.0)
            do = tl.load(o_base + (tr * stride_ot + hq_o)[:, None] + offs_dv[None, :],
                         mask=row_ok[:, None] & dv_ok, other=0.0)
            gate = tl.load(g_base + tr * stride_gt + hq_g, mask=row_ok, other=0.0).to(tl.float32)
            if DQ_OUT > 0:
                # dO = gate * dout formed once: with the gate on P's and dP's columns this
                # variant took 129 KB of shared memory instead of 112 (one program per SM)
                do = (do.to(tl.float32) * gate[:, None]).to(q.dtype)
            lse = tl.load(l_base + hq_l + tr, mask=row_ok, other=float("inf"))
            delta = tl.load(d_base + tr * stride_gt + hq_g, mask=row_ok, other=0.0)
            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_M]
            if DK2 > 0:
                qk_t = tl.dot(k2, tl.trans(q2), qk_t, input_precision=DOT_PREC)
            ok = key_ok[:, None] & row_ok[None, :] & (kpos[:, None] <= tr[None, :])
            p_t = tl.where(ok, tl.math.exp2(qk_t * qk_scale - lse[None, :]), 0.0)
            if DQ_OUT > 0:
                dv += tl.dot(p_t.to(q.dtype), do, input_precision=DOT_PREC)
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            else:
                # the gate scales P's and dP's columns (the gathered rows), not the dout tile
                dv += tl.dot((p_t * gate[None, :]).to(q.dtype), do, input_precision=DOT_PREC)
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC) * gate[None, :]
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
            if DK2 > 0:
                dk2 += tl.dot(ds_t.to(q.dtype), q2, input_precision=DOT_PREC)
            if DQ_OUT > 0:
                # this block's share of dQ for the gathered rows
                dq_t = tl.dot(tl.trans(ds_t.to(q.dtype)), k, input_precision=DOT_PREC) * sm_scale
                st = row_ok[:, None] & dk_ok
                if DK2 > 0:
                    dq_t2 = tl.dot(tl.trans(ds_t.to(q.dtype)), k2,
                                   input_precision=DOT_PREC) * sm_scale
                    st2 = row_ok[:, None] & dk2_ok
                if DQ_OUT == 1:  # float32 atomics into dq [B, T, HQ, d_k]
                    x = (DQX + b * stride_x0 + tr.to(tl.int64) * stride_x1 + hq * stride_x2)
                    tl.atomic_add(x[:, None] + offs_dk[None, :], dq_t, mask=st, sem="relaxed")
                    if DK2 > 0:
                        tl.atomic_add(x[:, None] + DK + offs_dk2[None, :], dq_t2, mask=st2,
                                      sem="relaxed")
                else:  # float32 partial in slot (j, sub-tile) [B, T, H, n * NSUB, G, d_k]
                    x = (DQX + b * stride_x0 + tr.to(tl.int64) * stride_x1 + h * stride_x2
                         + (jr * NSUB + c0 // BLOCK_N) * stride_x3 + g_loc * stride_x4)
                    tl.store(x[:, None] + offs_dk[None, :], dq_t, mask=st)
                    if DK2 > 0:
                        tl.store(x[:, None] + DK + offs_dk2[None, :], dq_t2, mask=st2)
        dk = dk * sm_scale
        if ATOMIC:
            # float32 [B, T, H, D] accumulators
            dk_ptrs = (DKO + b * stride_k0 + h * stride_k2 + s64 * stride_k1
                       + (offs_n * stride_k1)[:, None] + offs_dk[None, :])
            dv_ptrs = (DVO + b * stride_v0 + h * stride_v2 + s64 * stride_v1
                       + (offs_n * stride_v1)[:, None] + offs_dv[None, :])
            tl.atomic_add(dk_ptrs, dk, mask=key_ok[:, None] & dk_ok, sem="relaxed")
            tl.atomic_add(dv_ptrs, dv, mask=key_ok[:, None] & dv_ok, sem="relaxed")
            if DK2 > 0:
                dk2_ptrs = (DKO + b * stride_k0 + h * stride_k2 + s64 * stride_k1 + DK
                            + (offs_n * stride_k1)[:, None] + offs_dk2[None, :])
                tl.atomic_add(dk2_ptrs, dk2 * sm_scale, mask=key_ok[:, None] & dk2_ok,
                              sem="relaxed")
        else:
            # float32 partials [B, H, S_MAX * L_SEL, D] (segment-major)
            r64 = (seg * L_SEL + c0).to(tl.int64)
            dk_ptrs = (DKO + b * stride_k0 + h * stride_k1 + r64 * stride_k2
                       + (offs_n * stride_k2)[:, None] + offs_dk[None, :])
            dv_ptrs = (DVO + b * stride_v0 + h * stride_v1 + r64 * stride_v2
                       + (offs_n * stride_v2)[:, None] + offs_dv[None, :])
            live = (c0 + offs_n < L_SEL)[:, None]
            tl.store(dk_ptrs, dk, mask=live & dk_ok)
            tl.store(dv_ptrs, dv, mask=live & dv_ok)
            if DK2 > 0:
                dk2_ptrs = (DKO + b * stride_k0 + h * stride_k1 + r64 * stride_k2 + DK
                            + (offs_n * stride_k2)[:, None] + offs_dk2[None, :])
                tl.store(dk2_ptrs, dk2 * sm_scale, mask=live & dk2_ok)


@triton.jit
def _sel_bwd_reduce_kernel(
    DKP, DVP, SEG_FIRST, SEG_COUNT, DK, DV,
    stride_p0, stride_p1, stride_p2,
    stride_r0, stride_r1, stride_r2,
    stride_sb, stride_sh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    T,
    DKT: tl.constexpr, DVT: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    L_SEL: tl.constexpr, BLOCK_N: tl.constexpr, NSUB: tl.constexpr, DKT2: tl.constexpr = 0,
):
    """dK/dV of block j = sum of its segments' partials, in segment order (deterministic);
    ``DKT2 > 0``: dK's columns DKT .. DKT + DKT2 as a second tile."""
    pid = tl.program_id(0)
    j = pid // NSUB
    c0 = (pid % NSUB) * BLOCK_N
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    first = tl.load(SEG_FIRST + b * stride_sb + h * stride_sh + j)
    count = tl.load(SEG_COUNT + b * stride_sb + h * stride_sh + j)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, DKT)
    offs_dv = tl.arange(0, DVT)
    live = (c0 + offs_n < L_SEL)[:, None]
    dk = tl.zeros([BLOCK_N, DKT], tl.float32)
    dv = tl.zeros([BLOCK_N, DVT], tl.float32)
    if DKT2 > 0:
        offs_dk2 = DKT + tl.arange(0, DKT2)
        dk2 = tl.zeros([BLOCK_N, DKT2], tl.float32)
    for s in range(first, first + count):
        rows = (s * L_SEL + c0 + offs_n).to(tl.int64)
        dk += tl.load(DKP + b * stride_p0 + h * stride_p1 + rows[:, None] * stride_p2
                      + offs_dk[None, :], mask=live & (offs_dk[None, :] < D_K), other=0.0)
        if DKT2 > 0:
            dk2 += tl.load(DKP + b * stride_p0 + h * stride_p1 + rows[:, None] * stride_p2
                           + offs_dk2[None, :], mask=live & (offs_dk2[None, :] < D_K),
                           other=0.0)
        dv += tl.load(DVP + b * stride_r0 + h * stride_r1 + rows[:, None] * stride_r2
                      + offs_dv[None, :], mask=live & (offs_dv[None, :] < D_V), other=0.0)
    kpos = (j * L_SEL + c0 + offs_n).to(tl.int64)
    ok = live & (kpos < T)[:, None]
    tl.store(DK + b * stride_kb + h * stride_kh + kpos[:, None] * stride_kt + offs_dk[None, :],
             dk.to(DK.dtype.element_ty), mask=ok & (offs_dk[None, :] < D_K))
    if DKT2 > 0:
        tl.store(DK + b * stride_kb + h * stride_kh + kpos[:, None] * stride_kt
                 + offs_dk2[None, :], dk2.to(DK.dtype.element_ty),
                 mask=ok & (offs_dk2[None, :] < D_K))
    tl.store(DV + b * stride_vb + h * stride_vh + kpos[:, None] * stride_vt + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=ok & (offs_dv[None, :] < D_V))


@triton.jit
def _sel_bwd_dq_reduce_kernel(
    DQP, IDX, DQ,
    stride_x0, stride_x1, stride_x2, stride_x3, stride_x4,
    stride_ib, stride_it, stride_ih,
    stride_db, stride_dt, stride_dh,
    T,
    G: tl.constexpr, GP2: tl.constexpr, PP: tl.constexpr, DK: tl.constexpr,
    D_K: tl.constexpr, N_SEL: tl.constexpr, NSUB: tl.constexpr, ACCUMULATE: tl.constexpr,
    DK2: tl.constexpr = 0,
):
    """dQ of every row = sum of its selected blocks' float32 partials (those of the
    key-centric kernel), in slot order (deterministic); slots whose index is -1 are never
    read. Written to, or added into, the float32 dQ buffer. ``DK2 > 0``: the columns
    DK .. DK + DK2 as a second tile."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t0 = tile * PP
    p_loc, t_row, row_ok, hq = _tile_rows(t0, h, T, G, GP2, PP)
    offs_dk = tl.arange(0, DK)
    dk_ok = offs_dk[None, :] < D_K
    t64 = t_row.to(tl.int64)
    i_row = IDX + b * stride_ib + t64 * stride_it + h * stride_ih
    x_row = DQP + b * stride_x0 + t64 * stride_x1 + h * stride_x2 + (hq - h * G) * stride_x4
    dq = tl.zeros([PP * GP2, DK], tl.float32)
    if DK2 > 0:
        offs_dk2 = DK + tl.arange(0, DK2)
        dk2_ok = offs_dk2[None, :] < D_K
        dq2 = tl.zeros([PP * GP2, DK2], tl.float32)
    else:
        dq2 = dq
    for j in range(N_SEL):
        live = row_ok & (tl.load(i_row + j, mask=row_ok, other=-1) >= 0)
        for sb in tl.static_range(NSUB):
            dq += tl.load(x_row[:, None] + (j * NSUB + sb) * stride_x3 + offs_dk[None, :],
                          mask=live[:, None] & dk_ok, other=0.0)
            if DK2 > 0:
                dq2 += tl.load(x_row[:, None] + (j * NSUB + sb) * stride_x3 + offs_dk2[None, :],
                               mask=live[:, None] & dk2_ok, other=0.0)
    _dq_store(DQ, dq, b, t0.to(tl.int64), p_loc, hq, row_ok, stride_db, stride_dt, stride_dh,
              DK, D_K, ACCUMULATE, None, dq2, DK2)


@triton.jit
def _segment_table_kernel(
    FIRST, SEG_BLK, SEG_LO, SEG_HI, SEG_FIRST, SEG_CNT,
    stride_fb, stride_fh, stride_sb, stride_sh, stride_cb, stride_ch,
    NB, S_MAX, SEG_LEN, STEP0, BLOCK: tl.constexpr,
):
    """The segment tables of ``bwd_launch.inverted_index`` for one row (b, h): block c's
    entries FIRST[c] .. FIRST[c + 1] cut into SEG_CNT[c] = ceil(count / SEG_LEN) segments
    numbered from SEG_FIRST[c] (exclusive scan), then for every segment s < S_MAX its
    block (binary search over the segment ends; NB past the last one) and entry range
    (0, 0 when unused). STEP0: the largest power of two <= NB."""
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    f_base = FIRST + b * stride_fb + h * stride_fh
    c_first = SEG_FIRST + b * stride_cb + h * stride_ch
    c_cnt = SEG_CNT + b * stride_cb + h * stride_ch
    carry = tl.zeros([], tl.int32)
    for c0 in range(0, NB, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        ok = c < NB
        cnt = tl.load(f_base + c + 1, mask=ok, other=0) - tl.load(f_base + c, mask=ok, other=0)
        nseg = (cnt + SEG_LEN - 1) // SEG_LEN
        tl.store(c_first + c, carry + tl.cumsum(nseg, 0) - nseg, mask=ok)
        tl.store(c_cnt + c, nseg, mask=ok)
        carry += tl.sum(nseg, 0)
    tl.debug_barrier()  # the scan's stores are read back by other threads below
    s_base = b * stride_sb + h * stride_sh
    for s0 in range(0, S_MAX, BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        ok = s < S_MAX
        # blk = number of blocks whose segments end at or before s
        blk = tl.zeros([BLOCK], tl.int32)
        step = STEP0
        while step > 0:
            cand = blk + step
            probe = tl.minimum(cand, NB) - 1
            end = tl.load(c_first + probe) + tl.load(c_cnt + probe)
            blk = tl.where((cand <= NB) & (end <= s), cand, blk)
            step = step // 2
        used = blk < NB
        bc = tl.minimum(blk, NB - 1)
        lo = tl.load(f_base + bc) + (s - tl.load(c_first + bc)) * SEG_LEN
        hi = tl.minimum(lo + SEG_LEN, tl.load(f_base + bc + 1))
        tl.store(SEG_BLK + s_base + s, blk, mask=ok)
        tl.store(SEG_LO + s_base + s, tl.where(used, lo, 0), mask=ok)
        tl.store(SEG_HI + s_base + s, tl.where(used, hi, 0), mask=ok)
