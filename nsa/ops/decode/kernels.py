"""Triton kernels of one-token NSA decode (split over keys so batch 1 fills the GPU).

Four launches per step, all reading the sequence position from ``lengths`` on the device
(no host sync, CUDA-graph capturable), one program per (sequence b, KV head h) and split:

1. ``_dec_cmp_kernel``   grid (B*H, splits of BLOCK_C compressed tokens): scores of the
   G query heads of the group against a tile of visible compressed tokens, stored raw
   (fp32 scratch, [B, H, G, Ncap]); partial softmax (max, sum, P@V) per split.
2. ``_dec_select_kernel`` grid (B*H,): merges the cmp partials (O_cmp, log-sum-exp),
   turns the stored scores into probabilities, maps them to selection blocks with the
   overlap weights (Eq. 9) summed over the group (Eq. 10), and picks the top-n blocks
   (forced initial/local first, ties to the lower index), stored ascending, -1 last.
3. ``_dec_attn_kernel``  grid (B*H, n + window tiles): each program attends the group's
   G heads to one selected block (causal at token level) or one tile of the window ring;
   writes a partial softmax and the number of keys it actually loaded (the read counters
   are sums of these loads, not a formula).
4. ``_dec_combine_kernel`` grid (B*H,): merges the partials of each branch, applies the
   gates, writes the output and the per-branch read counters.

Dots put the G heads of a group on the M dimension (padded to GP >= 16 rows for tensor
cores); decode is bandwidth-bound, so the padded rows cost no memory traffic.
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _load_q(Q, b, h, stride_qb, stride_qh,
            G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, D_K: tl.constexpr):
    g = tl.arange(0, GP)
    dk = tl.arange(0, DK)
    ptrs = Q + b * stride_qb + (h * G + g)[:, None] * stride_qh + dk[None, :]
    return tl.load(ptrs, mask=(g[:, None] < G) & (dk[None, :] < D_K), other=0.0)


@triton.jit
def _dec_cmp_kernel(
    Q, KC, VC, LENGTHS, S, PM, PL, PO, CNTC,
    stride_qb, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    NCAP, SPLITS, scale,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    CMP_L: tl.constexpr, CMP_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // H
    h = bh % H
    t = tl.load(LENGTHS + b) - 1
    n_vis = tl.minimum(tl.maximum(t + 1 - CMP_L + CMP_D, 0) // CMP_D, NCAP)
    g = tl.arange(0, GP)
    i = sp * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = i < n_vis
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    q = _load_q(Q, b, h, stride_qb, stride_qh, G, GP, DK, D_K)
    k = tl.load(KC + b * stride_kb + i[:, None] * stride_kn + h * stride_kh + dk[None, :],
                mask=ok[:, None] & (dk[None, :] < D_K), other=0.0)
    s = tl.dot(q, tl.trans(k)) * scale  # [GP, BLOCK_C]
    s = tl.where(ok[None, :], s, NEG_INF)
    base = bh * G
    tl.store(S + (base + g)[:, None] * NCAP + i[None, :], s,
             mask=(g[:, None] < G) & (i[None, :] < NCAP))
    m = tl.max(s, 1)
    m_safe = tl.where(m > NEG_INF, m, 0.0)
    p = tl.exp(s - m_safe[:, None])
    lsum = tl.sum(p, 1)
    v = tl.load(VC + b * stride_vb + i[:, None] * stride_vn + h * stride_vh + dv[None, :],
                mask=ok[:, None] & (dv[None, :] < D_V), other=0.0)
    o = tl.dot(p.to(v.dtype), v)  # [GP, DV]
    pidx = (bh * SPLITS + sp) * G + g
    tl.store(PM + pidx, m, mask=g < G)
    tl.store(PL + pidx, lsum, mask=g < G)
    tl.store(PO + pidx[:, None] * D_V + dv[None, :], o,
             mask=(g[:, None] < G) & (dv[None, :] < D_V))
    tl.store(CNTC + bh * SPLITS + sp, tl.sum(ok.to(tl.int32), 0))


@triton.jit
def _merge(PM, PL, PO, row0, NPART, G: tl.constexpr, GP: tl.constexpr, DV: tl.constexpr,
           D_V: tl.constexpr):
    """Merge NPART partial softmaxes (rows row0 + part*G + g) -> (o [GP, DV], m, l)."""
    g = tl.arange(0, GP)
    dv = tl.arange(0, DV)
    gm = g < G
    m = tl.full([GP], NEG_INF, tl.float32)
    for part in range(NPART):
        m = tl.maximum(m, tl.load(PM + row0 + part * G + g, mask=gm, other=NEG_INF))
    m_safe = tl.where(m > NEG_INF, m, 0.0)
    lsum = tl.zeros([GP], tl.float32)
    o = tl.zeros([GP, DV], tl.float32)
    for part in range(NPART):
        r = row0 + part * G + g
        mp = tl.load(PM + r, mask=gm, other=NEG_INF)
        a = tl.where(mp > NEG_INF, tl.exp(mp - m_safe), 0.0)
        lsum += a * tl.load(PL + r, mask=gm, other=0.0)
        op = tl.load(PO + r[:, None] * D_V + dv[None, :], mask=gm[:, None] & (dv[None, :] < D_V),
                     other=0.0)
        o += a[:, None] * op
    return o, m, lsum


@triton.jit
def _dec_select_kernel(
    S, PM, PL, PO, LENGTHS, OC, IDX,
    NCAP, SPLITS, NBCAP,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DV: tl.constexpr, D_V: tl.constexpr,
    CMP_L: tl.constexpr, CMP_D: tl.constexpr, SEL_L: tl.constexpr,
    N_SEL: tl.constexpr, NP: tl.constexpr, N_INIT: tl.constexpr, N_LOCAL: tl.constexpr,
    NB_P: tl.constexpr, DO_SELECT: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    t = tl.load(LENGTHS + b) - 1
    g = tl.arange(0, GP)
    dv = tl.arange(0, DV)
    o, m, lsum = _merge(PM, PL, PO, bh * SPLITS * G, SPLITS, G, GP, DV, D_V)
    l_safe = tl.where(lsum > 0, lsum, 1.0)
    tl.store(OC + (bh * G + g)[:, None] * D_V + dv[None, :], o / l_safe[:, None],
             mask=(g[:, None] < G) & (dv[None, :] < D_V))
    if DO_SELECT:
        n_vis = tl.minimum(tl.maximum(t + 1 - CMP_L + CMP_D, 0) // CMP_D, NCAP)
        lse = tl.where(lsum > 0, tl.where(m > NEG_INF, m, 0.0) + tl.log(l_safe), 0.0)
        j = tl.arange(0, NB_P)
        LB: tl.constexpr = SEL_L // CMP_D  # selection block in units of d
        LC: tl.constexpr = CMP_L // CMP_D  # compression block in units of d
        score = tl.zeros([NB_P], tl.float32)
        # compressed tokens overlapping block j: i in [j*LB - LC + 1, (j+1)*LB - 1]
        for r in range(LB + LC - 1):
            i = j * LB - LC + 1 + r
            ok = (i >= 0) & (i < n_vis) & (j < NBCAP)
            ov = (tl.minimum(i * CMP_D + CMP_L, (j + 1) * SEL_L)
                  - tl.maximum(i * CMP_D, j * SEL_L))
            wgt = tl.maximum(ov, 0).to(tl.float32) / CMP_D
            for gg in range(G):
                lse_g = tl.sum(tl.where(g == gg, lse, 0.0), 0)
                sv = tl.load(S + (bh * G + gg) * NCAP + i, mask=ok, other=NEG_INF)
                score += tl.where(ok, tl.exp(sv - lse_g), 0.0) * wgt
        cur = t // SEL_L
        cand = j <= cur
        forced = cand & ((j < N_INIT) | ((cur - j >= 0) & (cur - j < N_LOCAL)))
        prio = tl.where(forced, float("inf"), tl.where(cand, score, NEG_INF))
        slot = tl.arange(0, NP)
        BIG: tl.constexpr = 1 << 30
        chosen = tl.full([NP], BIG, tl.int32)
        for it in range(N_SEL):
            mx = tl.max(prio, 0)
            pick = tl.min(tl.where(prio == mx, j, BIG), 0)
            val = tl.where(mx > NEG_INF, pick, BIG)
            chosen = tl.where(slot == it, val, chosen)
            prio = tl.where(j == pick, NEG_INF, prio)
        chosen = tl.sort(chosen, 0)
        chosen = tl.where(chosen == BIG, -1, chosen)
        tl.store(IDX + bh * N_SEL + slot, chosen, mask=slot < N_SEL)


@triton.jit
def _dec_attn_kernel(
    Q, KS, VS, KW, VW, LENGTHS, IDX, PM, PL, PO, CNT,
    stride_qb, stride_qh,
    stride_ksb, stride_ksn, stride_ksh,
    stride_vsb, stride_vsn, stride_vsh,
    stride_kwb, stride_kwn, stride_kwh,
    stride_vwb, stride_vwn, stride_vwh,
    NUNITS, scale,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    SEL_L: tl.constexpr, LP: tl.constexpr, N_SEL: tl.constexpr, NSU: tl.constexpr,
    W: tl.constexpr,
):
    """Unit u < NSU: selected block IDX[u] (tokens <= t); else window ring tile u - NSU
    (LP slots). Exactly one of the two masked loads is live per row."""
    bh = tl.program_id(0)
    u = tl.program_id(1)
    b = bh // H
    h = bh % H
    t = tl.load(LENGTHS + b) - 1
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    g = tl.arange(0, GP)
    r = tl.arange(0, LP)
    q = _load_q(Q, b, h, stride_qb, stride_qh, G, GP, DK, D_K)
    is_sel = u < NSU
    jblk = tl.load(IDX + bh * N_SEL + u, mask=is_sel, other=-1)
    pos_s = jblk * SEL_L + r
    ok_s = is_sel & (jblk >= 0) & (r < SEL_L) & (pos_s <= t)
    pos_s = tl.where(ok_s, pos_s, 0)
    slot = (u - NSU) * LP + r
    pos_w = t - ((t - slot) % W + W) % W
    ok_w = (u >= NSU) & (slot >= 0) & (slot < W) & (pos_w >= 0)
    slot = tl.where(ok_w, slot, 0)
    mk, mv = dk[None, :] < D_K, dv[None, :] < D_V
    k = (tl.load(KS + b * stride_ksb + pos_s[:, None] * stride_ksn + h * stride_ksh
                 + dk[None, :], mask=ok_s[:, None] & mk, other=0.0)
         + tl.load(KW + b * stride_kwb + slot[:, None] * stride_kwn + h * stride_kwh
                   + dk[None, :], mask=ok_w[:, None] & mk, other=0.0))
    v = (tl.load(VS + b * stride_vsb + pos_s[:, None] * stride_vsn + h * stride_vsh
                 + dv[None, :], mask=ok_s[:, None] & mv, other=0.0)
         + tl.load(VW + b * stride_vwb + slot[:, None] * stride_vwn + h * stride_vwh
                   + dv[None, :], mask=ok_w[:, None] & mv, other=0.0))
    ok = ok_s | ok_w
    s = tl.dot(q, tl.trans(k)) * scale
    s = tl.where(ok[None, :], s, NEG_INF)
    m = tl.max(s, 1)
    m_safe = tl.where(m > NEG_INF, m, 0.0)
    p = tl.exp(s - m_safe[:, None])
    lsum = tl.sum(p, 1)
    o = tl.dot(p.to(v.dtype), v)
    pidx = (bh * NUNITS + u) * G + g
    tl.store(PM + pidx, m, mask=g < G)
    tl.store(PL + pidx, lsum, mask=g < G)
    tl.store(PO + pidx[:, None] * D_V + dv[None, :], o, mask=(g[:, None] < G) & mv)
    tl.store(CNT + bh * NUNITS + u, tl.sum(ok.to(tl.int32), 0))


@triton.jit
def _dec_combine_kernel(
    OC, PM, PL, PO, CNT, CNTC, GC, GS, GW, OUT, READS,
    stride_ob, stride_oh, stride_gb,
    NUNITS, N_WT, SPLITS,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DV: tl.constexpr, D_V: tl.constexpr,
    NSU: tl.constexpr,
    USE_CMP: tl.constexpr, USE_WIN: tl.constexpr, COUNT_CMP: tl.constexpr,
):
    """Gated sum of the branches; read counters summed from what each program loaded."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    g = tl.arange(0, GP)
    dv = tl.arange(0, DV)
    gm = g < G
    heads = h * G + g
    acc = tl.zeros([GP, DV], tl.float32)
    if USE_CMP:
        oc = tl.load(OC + (bh * G + g)[:, None] * D_V + dv[None, :],
                     mask=gm[:, None] & (dv[None, :] < D_V), other=0.0)
        gc = tl.load(GC + b * stride_gb + heads, mask=gm, other=0.0).to(tl.float32)
        acc += gc[:, None] * oc
    if NSU > 0:
        o, m, lsum = _merge(PM, PL, PO, bh * NUNITS * G, NSU, G, GP, DV, D_V)
        gs = tl.load(GS + b * stride_gb + heads, mask=gm, other=0.0).to(tl.float32)
        acc += (gs / tl.where(lsum > 0, lsum, 1.0))[:, None] * o
        sc = tl.zeros([], tl.int32)
        for u in range(NSU):
            sc += tl.load(CNT + bh * NUNITS + u)
        tl.store(READS + bh * 3 + 1, sc)
    if USE_WIN:
        o, m, lsum = _merge(PM, PL, PO, (bh * NUNITS + NSU) * G, N_WT, G, GP, DV, D_V)
        gw = tl.load(GW + b * stride_gb + heads, mask=gm, other=0.0).to(tl.float32)
        acc += (gw / tl.where(lsum > 0, lsum, 1.0))[:, None] * o
        wc = tl.zeros([], tl.int32)
        for u in range(N_WT):
            wc += tl.load(CNT + bh * NUNITS + NSU + u)
        tl.store(READS + bh * 3 + 2, wc)
    if COUNT_CMP:
        cc = tl.zeros([], tl.int32)
        for sp in range(SPLITS):
            cc += tl.load(CNTC + bh * SPLITS + sp)
        tl.store(READS + bh * 3 + 0, cc)
    tl.store(OUT + b * stride_ob + heads[:, None] * stride_oh + dv[None, :],
             acc.to(OUT.dtype.element_ty), mask=gm[:, None] & (dv[None, :] < D_V))
