"""Triton kernels of one-token NSA decode (v2: three launches, no host sync).

Every kernel reads each sequence's position from ``lengths`` on the device, so a step is
CUDA-graph capturable and ragged batches need nothing special. One program works on the
G query heads of one KV group (M dimension of the dots, padded to GP >= 16 rows); decode
is bandwidth-bound, so padded rows cost no memory traffic.

1. ``_dec_stage1`` grid (B*H, SPLITS + N_WT). Programs u < SPLITS take BLOCK_C visible
   compressed tokens each: scores, a partial softmax (max, sum, P@V), and *partial block
   scores*: P_local @ W with W[i, j] = overlap(i, j) / d (Eq. 9, a tensor-core dot), kept
   relative to the split's own max and stored per head (Eq. 10 sums heads later). The
   other programs attend one tile of the window ring (it does not wait for selection).
   The last program of each (b, h) to finish (atomic ticket) merges the splits' maxima
   and sums into the log-sum-exp, rescales and sums the partial block scores over splits
   and heads, and picks the top-n blocks (forced initial/local first, ties to the lower
   index), stored ascending with -1 last.
2. ``_dec_stage2`` grid (B*H, n): one selected block per program (causal at token level).
3. ``_dec_stage3`` grid (B*HQ): one query head per program merges all its partials
   (cmp splits, window tiles, selected blocks) with vector loads, applies the gates, and
   the first head of each group writes the read counters: sums of the keys each program
   actually loaded, not a formula.

Partial slots per (b, h): [0, n_wt) window tiles, [SLOT_SEL, SLOT_SEL + n) selected
blocks, [SLOT_CMP, SLOT_CMP + SPLITS) compressed splits (fixed offsets whichever
branches run).
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))
# order-preserving int32 of -inf (bits ^ 0x7FFFFFFF for negatives) times 2^32
ORD_NEG_INF_KEY = tl.constexpr(-2139095041 * 4294967296)


@triton.jit
def _load_q(Q, b, h, stride_qb, stride_qh,
            G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, D_K: tl.constexpr):
    g = tl.arange(0, GP)
    dk = tl.arange(0, DK)
    ptrs = Q + b * stride_qb + (h * G + g)[:, None] * stride_qh + dk[None, :]
    return tl.load(ptrs, mask=(g[:, None] < G) & (dk[None, :] < D_K), other=0.0)


@triton.jit
def _partial(q, k, v, ok, scale, PM, PL, PO, CNT, slot, G: tl.constexpr, GP: tl.constexpr,
             DV: tl.constexpr, D_V: tl.constexpr, DOT_PREC: tl.constexpr):
    """Softmax partial of the group's heads over keys k (rows ok); returns (p, m)."""
    g = tl.arange(0, GP)
    dv = tl.arange(0, DV)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
    s = tl.where(ok[None, :], s, NEG_INF)
    m = tl.max(s, 1)
    m_safe = tl.where(m > NEG_INF, m, 0.0)
    p = tl.exp(s - m_safe[:, None])
    o = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    r = slot * G + g
    tl.store(PM + r, m, mask=g < G)
    tl.store(PL + r, tl.sum(p, 1), mask=g < G)
    tl.store(PO + r[:, None] * D_V + dv[None, :], o, mask=(g[:, None] < G) & (dv[None, :] < D_V))
    tl.store(CNT + slot, tl.sum(ok.to(tl.int32), 0))
    return p, m


@triton.jit
def _dec_stage1(
    Q, KC, VC, KW, VW, LENGTHS, PM, PL, PO, CNT, PS, SC, IDX, TICKET,
    stride_qb, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_kwb, stride_kwn, stride_kwh,
    stride_vwb, stride_vwn, stride_vwh,
    NCAP, SPLITS, NBCAP, NPART, scale,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    CMP_L: tl.constexpr, CMP_D: tl.constexpr, SEL_L: tl.constexpr,
    BLOCK_C: tl.constexpr, JB: tl.constexpr, LP: tl.constexpr, W: tl.constexpr,
    N_WT: tl.constexpr, SLOT_CMP: tl.constexpr, N_SEL: tl.constexpr, NP: tl.constexpr,
    N_INIT: tl.constexpr, N_LOCAL: tl.constexpr,
    NB_P: tl.constexpr, JT: tl.constexpr, SPC: tl.constexpr, DO_SELECT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    u = tl.program_id(1)
    b = bh // H
    h = bh % H
    t = tl.load(LENGTHS + b) - 1
    n_vis = tl.minimum(tl.maximum(t + 1 - CMP_L + CMP_D, 0) // CMP_D, NCAP)
    g = tl.arange(0, GP)
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    mk, mv = dk[None, :] < D_K, dv[None, :] < D_V
    q = _load_q(Q, b, h, stride_qb, stride_qh, G, GP, DK, D_K)
    base = bh * NPART
    if u < N_WT:
        # window ring tile: slot s holds position t - ((t - s) mod W)
        slot = u * LP + tl.arange(0, LP)
        pos = t - ((t - slot) % W + W) % W
        ok = (slot < W) & (pos >= 0)
        slot = tl.where(ok, slot, 0)
        kw = tl.load(KW + b * stride_kwb + slot[:, None] * stride_kwn + h * stride_kwh
                     + dk[None, :], mask=ok[:, None] & mk, other=0.0)
        vw = tl.load(VW + b * stride_vwb + slot[:, None] * stride_vwn + h * stride_vwh
                     + dv[None, :], mask=ok[:, None] & mv, other=0.0)
        _partial(q, kw, vw, ok, scale, PM, PL, PO, CNT, base + u, G, GP, DV, D_V, DOT_PREC)
    else:
        sp = u - N_WT
        i = sp * BLOCK_C + tl.arange(0, BLOCK_C)
        okc = i < n_vis
        kc = tl.load(KC + b * stride_kb + i[:, None] * stride_kn + h * stride_kh + dk[None, :],
                     mask=okc[:, None] & mk, other=0.0)
        vc = tl.load(VC + b * stride_vb + i[:, None] * stride_vn + h * stride_vh + dv[None, :],
                     mask=okc[:, None] & mv, other=0.0)
        p, m = _partial(q, kc, vc, okc, scale, PM, PL, PO, CNT, base + SLOT_CMP + sp,
                        G, GP, DV, D_V, DOT_PREC)
        if DO_SELECT:
            # Eq. 9 on this split: blocks j0 .. j0 + JB - 1, weights overlap(i, j) / d
            j0 = (sp * BLOCK_C * CMP_D) // SEL_L
            jj = j0 + tl.arange(0, JB)
            ov = (tl.minimum(i[:, None] * CMP_D + CMP_L, (jj[None, :] + 1) * SEL_L)
                  - tl.maximum(i[:, None] * CMP_D, jj[None, :] * SEL_L))
            wgt = tl.where(okc[:, None], tl.maximum(ov, 0).to(tl.float32) / CMP_D, 0.0)
            ps = tl.dot(p, wgt, input_precision="ieee")  # [GP, JB], relative to m
            # only the blocks this split touches: the same-parity neighbours own the rest
            j_last = (((sp + 1) * BLOCK_C - 1) * CMP_D + CMP_L - 1) // SEL_L
            tl.store(PS + ((bh * 2 + sp % 2) * G + g[:, None]) * NBCAP + jj[None, :], ps,
                     mask=(g[:, None] < G) & (jj[None, :] < NBCAP) & (jj[None, :] <= j_last))
    if DO_SELECT:
        # the last program of this (b, h) to arrive runs the selection
        tl.debug_barrier()
        ticket = tl.atomic_add(TICKET + bh, 1, sem="acq_rel")
        if ticket == SPLITS + N_WT - 1:
            tl.store(TICKET + bh, 0)  # ready for the next step
            _select(PM, PL, PS, SC, IDX, bh, base + SLOT_CMP, t, n_vis, SPLITS,
                    NBCAP, G, GP, CMP_L, CMP_D, SEL_L, BLOCK_C, N_SEL, NP, N_INIT,
                    N_LOCAL, NB_P, JT, SPC)


@triton.jit
def _select(PM, PL, PS, SC, IDX, bh, slot0, t, n_vis, SPLITS, NBCAP,
            G: tl.constexpr, GP: tl.constexpr, CMP_L: tl.constexpr, CMP_D: tl.constexpr,
            SEL_L: tl.constexpr, BLOCK_C: tl.constexpr, N_SEL: tl.constexpr,
            NP: tl.constexpr, N_INIT: tl.constexpr, N_LOCAL: tl.constexpr,
            NB_P: tl.constexpr, JT: tl.constexpr, SPC: tl.constexpr):
    g = tl.arange(0, GP)
    gm = g < G
    # log-sum-exp per head over the compressed splits (online over chunks of SPC splits)
    mx = tl.full([GP], NEG_INF, tl.float32)
    ls = tl.zeros([GP], tl.float32)
    for c0 in range(0, SPLITS, SPC):
        s = c0 + tl.arange(0, SPC)
        r = (slot0 + s)[:, None] * G + g[None, :]
        okc = (s[:, None] < SPLITS) & gm[None, :]
        m_s = tl.load(PM + r, mask=okc, other=NEG_INF, cache_modifier=".cg")
        l_s = tl.load(PL + r, mask=okc, other=0.0, cache_modifier=".cg")
        new = tl.maximum(mx, tl.max(m_s, 0))
        new_safe = tl.where(new > NEG_INF, new, 0.0)
        a = tl.where(m_s > NEG_INF, tl.exp(m_s - new_safe[None, :]), 0.0)
        ls = ls * tl.where(mx > NEG_INF, tl.exp(mx - new_safe), 0.0) + tl.sum(a * l_s, 0)
        mx = new
    mx_safe = tl.where(mx > NEG_INF, mx, 0.0)
    inv_l = tl.where(ls > 0, 1.0 / tl.where(ls > 0, ls, 1.0), 0.0)
    # group block scores: a block gets the partials of the (at most two) splits that hold
    # compressed tokens overlapping it (layer = split parity), each turned into
    # probabilities by exp(m_split - M) / L
    LB: tl.constexpr = SEL_L // CMP_D
    LC: tl.constexpr = CMP_L // CMP_D
    nb = t // SEL_L + 1
    for j0 in range(0, NB_P, JT):
        j = j0 + tl.arange(0, JT)
        i_lo = tl.maximum(j * LB - LC + 1, 0)  # first compressed token overlapping block j
        okj = (j < nb) & (i_lo < n_vis)  # a block with no visible token scores 0
        s_a = i_lo // BLOCK_C
        s_b = tl.minimum(((j + 1) * LB - 1) // BLOCK_C, SPLITS - 1)
        m2 = gm[:, None] & okj[None, :]
        two = m2 & (s_b > s_a)[None, :]
        ma = tl.load(PM + (slot0 + s_a[None, :]) * G + g[:, None], mask=m2, other=NEG_INF,
                     cache_modifier=".cg")
        mb = tl.load(PM + (slot0 + s_b[None, :]) * G + g[:, None], mask=two, other=NEG_INF,
                     cache_modifier=".cg")
        pa = tl.load(PS + ((bh * 2 + s_a[None, :] % 2) * G + g[:, None]) * NBCAP + j[None, :],
                     mask=m2, other=0.0, cache_modifier=".cg")
        pb = tl.load(PS + ((bh * 2 + s_b[None, :] % 2) * G + g[:, None]) * NBCAP + j[None, :],
                     mask=two, other=0.0, cache_modifier=".cg")
        fa = tl.where(ma > NEG_INF, tl.exp(ma - mx_safe[:, None]), 0.0)
        fb = tl.where(mb > NEG_INF, tl.exp(mb - mx_safe[:, None]), 0.0)
        tl.store(SC + bh * NB_P + j, tl.sum((fa * pa + fb * pb) * inv_l[:, None], 0))
    tl.debug_barrier()
    j = tl.arange(0, NB_P)
    score = tl.load(SC + bh * NB_P + j)
    cur = t // SEL_L
    cand = j <= cur
    forced = cand & ((j < N_INIT) | ((cur - j >= 0) & (cur - j < N_LOCAL)))
    prio = tl.where(forced, float("inf"), tl.where(cand, score, NEG_INF))
    # one max-reduction per pick: key = (order-preserving int of the score) * 2^32
    # + (2^32 - 1 - j), so equal scores go to the lower block index
    bits = prio.to(tl.int32, bitcast=True)
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)
    key = ordered * 4294967296 + (4294967295 - j.to(tl.int64))
    floor = ORD_NEG_INF_KEY  # key of -inf at j = 2^32 - 1: below every real key
    slot = tl.arange(0, NP)
    BIG: tl.constexpr = 1 << 30
    chosen = tl.full([NP], BIG, tl.int32)
    for it in range(N_SEL):
        top = tl.max(key, 0)
        pick = (4294967295 - (top & 4294967295)).to(tl.int32)
        # a -inf top means no candidate is left: the slot stays unused
        chosen = tl.where(slot == it, tl.where(top >= floor + 4294967296, pick, BIG), chosen)
        key = tl.where(j == pick, floor, key)
    chosen = tl.sort(chosen, 0)
    tl.store(IDX + bh * N_SEL + slot, tl.where(chosen == BIG, -1, chosen), mask=slot < N_SEL)


@triton.jit
def _dec_stage2(
    Q, KS, VS, LENGTHS, IDX, PM, PL, PO, CNT,
    stride_qb, stride_qh,
    stride_ksb, stride_ksn, stride_ksh,
    stride_vsb, stride_vsn, stride_vsh,
    NPART, scale,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    SEL_L: tl.constexpr, LP: tl.constexpr, N_SEL: tl.constexpr, SLOT_SEL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    u = tl.program_id(1)
    b = bh // H
    h = bh % H
    t = tl.load(LENGTHS + b) - 1
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    r = tl.arange(0, LP)
    q = _load_q(Q, b, h, stride_qb, stride_qh, G, GP, DK, D_K)
    jblk = tl.load(IDX + bh * N_SEL + u)
    pos = jblk * SEL_L + r
    ok = (jblk >= 0) & (r < SEL_L) & (pos <= t)
    pos = tl.where(ok, pos, 0)
    k = tl.load(KS + b * stride_ksb + pos[:, None] * stride_ksn + h * stride_ksh + dk[None, :],
                mask=ok[:, None] & (dk[None, :] < D_K), other=0.0)
    v = tl.load(VS + b * stride_vsb + pos[:, None] * stride_vsn + h * stride_vsh + dv[None, :],
                mask=ok[:, None] & (dv[None, :] < D_V), other=0.0)
    _partial(q, k, v, ok, scale, PM, PL, PO, CNT, bh * NPART + SLOT_SEL + u, G, GP, DV, D_V,
             DOT_PREC)


@triton.jit
def _merge_range(PM, PL, PO, row0, lo, hi, g, G: tl.constexpr, DV: tl.constexpr,
                 D_V: tl.constexpr, PC: tl.constexpr):
    """Merge partial slots [lo, hi) of head g -> normalised output [DV] (zeros if empty)."""
    dv = tl.arange(0, DV)
    mx = tl.full([], NEG_INF, tl.float32)
    ls = tl.zeros([], tl.float32)
    o = tl.zeros([DV], tl.float32)
    for c0 in range(lo, hi, PC):
        s = c0 + tl.arange(0, PC)
        ok = s < hi
        r = (row0 + s) * G + g
        m_s = tl.load(PM + r, mask=ok, other=NEG_INF)
        l_s = tl.load(PL + r, mask=ok, other=0.0)
        o_s = tl.load(PO + r[:, None] * D_V + dv[None, :], mask=ok[:, None] & (dv[None, :] < D_V),
                      other=0.0)
        new = tl.maximum(mx, tl.max(m_s, 0))
        new_safe = tl.where(new > NEG_INF, new, 0.0)
        a = tl.where(m_s > NEG_INF, tl.exp(m_s - new_safe), 0.0)
        old = tl.where(mx > NEG_INF, tl.exp(mx - new_safe), 0.0)
        ls = ls * old + tl.sum(a * l_s, 0)
        o = o * old + tl.sum(a[:, None] * o_s, 0)
        mx = new
    return o / tl.where(ls > 0, ls, 1.0)


@triton.jit
def _dec_stage3(
    PM, PL, PO, CNT, GC, GS, GW, OUT, READS, TOTAL,
    stride_ob, stride_oh, stride_gb,
    NPART, SPLITS,
    H: tl.constexpr, G: tl.constexpr, DV: tl.constexpr, D_V: tl.constexpr,
    N_WT: tl.constexpr, SLOT_SEL: tl.constexpr, N_SEL: tl.constexpr, SLOT_CMP: tl.constexpr,
    PC: tl.constexpr, CP: tl.constexpr,
    USE_CMP: tl.constexpr, USE_SEL: tl.constexpr, USE_WIN: tl.constexpr,
    COUNT_CMP: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // (H * G)
    hq = pid % (H * G)
    h = hq // G
    g = hq % G
    bh = b * H + h
    row0 = bh * NPART
    dv = tl.arange(0, DV)
    acc = tl.zeros([DV], tl.float32)
    if USE_WIN:
        gw = tl.load(GW + b * stride_gb + hq).to(tl.float32)
        acc += gw * _merge_range(PM, PL, PO, row0, 0, N_WT, g, G, DV, D_V, PC)
    if USE_SEL:
        gs = tl.load(GS + b * stride_gb + hq).to(tl.float32)
        acc += gs * _merge_range(PM, PL, PO, row0, SLOT_SEL, SLOT_SEL + N_SEL, g, G, DV, D_V,
                                 PC)
    if USE_CMP:
        gc = tl.load(GC + b * stride_gb + hq).to(tl.float32)
        acc += gc * _merge_range(PM, PL, PO, row0, SLOT_CMP, SLOT_CMP + SPLITS, g, G, DV,
                                 D_V, PC)
    tl.store(OUT + b * stride_ob + hq * stride_oh + dv, acc.to(OUT.dtype.element_ty),
             mask=dv < D_V)
    if g == 0:
        c = tl.arange(0, CP)
        cnt = tl.load(CNT + row0 + c, mask=c < SLOT_CMP + SPLITS, other=0).to(tl.int64)
        if USE_WIN:
            n_win = tl.sum(tl.where(c < N_WT, cnt, 0), 0)
            tl.store(READS + bh * 3 + 2, n_win)
            tl.store(TOTAL + bh * 3 + 2, tl.load(TOTAL + bh * 3 + 2) + n_win)
        if USE_SEL:
            n_sel = tl.sum(tl.where((c >= SLOT_SEL) & (c < SLOT_SEL + N_SEL), cnt, 0), 0)
            tl.store(READS + bh * 3 + 1, n_sel)
            tl.store(TOTAL + bh * 3 + 1, tl.load(TOTAL + bh * 3 + 1) + n_sel)
        if COUNT_CMP:
            n_cmp = tl.sum(tl.where(c >= SLOT_CMP, cnt, 0), 0)
            tl.store(READS + bh * 3 + 0, n_cmp)
            tl.store(TOTAL + bh * 3 + 0, tl.load(TOTAL + bh * 3 + 0) + n_cmp)
