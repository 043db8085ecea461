"""Triton kernels of one-token NSA decode (v3: four launches, no host sync).

Every sequence's position comes from ``lengths`` on the device, so a step is CUDA-graph
capturable and ragged batches need nothing special. A program handles the G query heads
of one KV group (the M dimension of the dots, padded to GP >= 16 rows); decode is
bandwidth-bound, so padded rows cost no memory traffic.

1. ``_dec_p1`` grid (B*H, splits + window tiles): a compressed split (TPS tiles of
   BLOCK_C compressed tokens, online softmax) writes a partial (max, sum, P@V) and, per
   tile, the *partial block scores* relative to the tile's own max, which is stored too:
   where tiles start on block boundaries (``SUM_SCORES``), each block's sum of p over its
   own tokens with the Eq. 9 weights (plane 0) and the tail its last tokens hand to the
   next block (plane 1); otherwise P_tile @ W with W[i, j] = overlap(i, j) / d (a dot,
   two parity planes so neighbouring tiles never write the same block). A window program
   attends one tile of the window ring.
2. ``_dec_p2`` grid (B*H, chunks of JT blocks): log-sum-exp of every head over the
   splits, block scores of the chunk summed over the group's heads (Eq. 10), forced
   initial/local blocks, and the chunk's n best as packed (score, index) keys.
3. ``_dec_p3`` grid (B*H, n / BPP): the n best of all chunks' candidates (ties to the
   lower index), sorted ascending; program u attends blocks u*BPP .. u*BPP + BPP - 1
   (causal at token level) into one partial.
4. ``_dec_p4`` grid (B*HQ): one query head merges its partials (window, selected,
   compressed) and applies the gates; head 0 of each group writes the read counters
   (sums of the keys each program actually loaded, not a formula).

Partial slots per (b, h): [0, n_wt) window tiles, [SLOT_SEL, SLOT_SEL + n / BPP)
selected blocks, [SLOT_CMP, SLOT_CMP + splits) compressed splits.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

NEG_INF = tl.constexpr(float("-inf"))
# order-preserving int32 of -inf (bits ^ 0x7FFFFFFF for negatives) times 2^32
ORD_NEG_INF_KEY = tl.constexpr(-2139095041 * 4294967296)
BIG = tl.constexpr(1 << 30)  # an unused block slot
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_q(Q, b, h, stride_qb, stride_qh,
            G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, D_K: tl.constexpr):
    g = tl.arange(0, GP)
    dk = tl.arange(0, DK)
    ptrs = Q + b * stride_qb + (h * G + g)[:, None] * stride_qh + dk[None, :]
    return tl.load(ptrs, mask=(g[:, None] < G) & (dk[None, :] < D_K), other=0.0)


@triton.jit
def _load_kv_rows(K, V, b, rows, h, ok, stride_kb, stride_kn, stride_kh, stride_vb,
                  stride_vn, stride_vh, DK: tl.constexpr, DV: tl.constexpr,
                  D_K: tl.constexpr, D_V: tl.constexpr):
    """Key and value rows ``rows`` of (b, h) by pointer loads; rows not ``ok`` are zeros."""
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    k = tl.load(K + b * stride_kb + rows[:, None] * stride_kn + h * stride_kh + dk[None, :],
                mask=ok[:, None] & (dk[None, :] < D_K), other=0.0)
    v = tl.load(V + b * stride_vb + rows[:, None] * stride_vn + h * stride_vh + dv[None, :],
                mask=ok[:, None] & (dv[None, :] < D_V), other=0.0)
    return k, v


@triton.jit
def _tile_probs(q, k, ok, scale, DOT_PREC: tl.constexpr):
    """Scores of the group's heads over keys k (rows ok) -> (exp(s - m), m) per head.

    Computed in base 2 (exp2 of scores scaled by log2(e): one MUFU op per element, where
    exp adds a multiply and a range fix-up); the max is returned in natural units."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * (scale * LOG2E)
    s = tl.where(ok[None, :], s, NEG_INF)
    m = tl.max(s, 1)
    p = tl.math.exp2(s - tl.where(m > NEG_INF, m, 0.0)[:, None])
    return p, m * LN2


@triton.jit
def _online(p, m_t, v, m_i, l_i, acc, DOT_PREC: tl.constexpr):
    """Fold a tile's p = exp(s - m_t) and its values into the running (max, sum, P@V)."""
    m_new = tl.maximum(m_i, m_t)
    m_new_safe = tl.where(m_new > NEG_INF, m_new, 0.0)
    alpha = tl.where(m_i > NEG_INF, tl.exp(m_i - m_new_safe), 0.0)
    beta = tl.where(m_t > NEG_INF, tl.exp(m_t - m_new_safe), 0.0)
    l_i = l_i * alpha + tl.sum(p, 1) * beta
    pv = tl.dot((p * beta[:, None]).to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _store_partial(PM, PL, PO, CNT, slot, m, l, o, n_keys, G: tl.constexpr,
                   GP: tl.constexpr, DV: tl.constexpr, D_V: tl.constexpr):
    g = tl.arange(0, GP)
    dv = tl.arange(0, DV)
    r = slot * G + g
    tl.store(PM + r, m, mask=g < G)
    tl.store(PL + r, l, mask=g < G)
    tl.store(PO + r[:, None] * D_V + dv[None, :], o, mask=(g[:, None] < G) & (dv[None, :] < D_V))
    tl.store(CNT + slot, n_keys)


@triton.jit
def _partial(q, k, v, ok, scale, PM, PL, PO, CNT, slot, G: tl.constexpr, GP: tl.constexpr,
             DV: tl.constexpr, D_V: tl.constexpr, DOT_PREC: tl.constexpr):
    """Softmax partial of the group's heads over keys k (rows ok), stored at slot."""
    p, m = _tile_probs(q, k, ok, scale, DOT_PREC)
    o = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    _store_partial(PM, PL, PO, CNT, slot, m, tl.sum(p, 1), o, tl.sum(ok.to(tl.int32), 0), G,
                   GP, DV, D_V)


@triton.jit
def _top_keys(key, N_SEL: tl.constexpr, NP: tl.constexpr, TOPK: tl.constexpr = False):
    """The N_SEL largest packed keys, descending, in [NP] (the floor key where none is
    left). Keys are unique (they carry the block index), so one knock-out per pick; or,
    with TOPK, Triton's bitonic top-k (the same keys in the same order: a fixed network
    instead of N_SEL serial max-reductions, but element by element in the interpreter),
    where ``key`` holds at least NP keys (the network returns NP of them)."""
    slot = tl.arange(0, NP)
    if TOPK and NP <= key.shape[0]:
        top_keys = tl.where(slot < N_SEL, tl.topk(key, NP), ORD_NEG_INF_KEY)
    else:
        top_keys = tl.full([NP], ORD_NEG_INF_KEY, tl.int64)
        for it in range(N_SEL):
            top = tl.max(key, 0)
            top_keys = tl.where(slot == it, top, top_keys)
            key = tl.where(key == top, ORD_NEG_INF_KEY, key)
    return top_keys


@triton.jit
def _overlaps(i, jj, CMP_L: tl.constexpr, CMP_D: tl.constexpr, SEL_L: tl.constexpr):
    """[len(i), len(jj)] raw tokens that compressed token i shares with selection block
    jj (Eq. 9's overlap; divided by d it is the weight)."""
    return tl.maximum(tl.minimum(i[:, None] * CMP_D + CMP_L, (jj[None, :] + 1) * SEL_L)
                      - tl.maximum(i[:, None] * CMP_D, jj[None, :] * SEL_L), 0)


@triton.jit
def _cmp_split(q, KC, VC, PM, PL, PO, CNT, TM, PS, bh, b, h, sp, n_vis, NTILE, NBCAP,
               NPART, NTCAP, scale,
               stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
               G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
               D_K: tl.constexpr, D_V: tl.constexpr, CMP_L: tl.constexpr,
               CMP_D: tl.constexpr, SEL_L: tl.constexpr, BLOCK_C: tl.constexpr,
               TPS: tl.constexpr, JB: tl.constexpr, SLOT_CMP: tl.constexpr,
               DO_SCORES: tl.constexpr, SPLIT_SCORES: tl.constexpr, DOT_PREC: tl.constexpr,
               USE_DESC: tl.constexpr, SUM_SCORES: tl.constexpr):
    g = tl.arange(0, GP)
    m_i = tl.full([GP], NEG_INF, tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DV], tl.float32)
    n_ok = tl.zeros([], tl.int32)
    # Eq. 9 weights of a tile's tokens to its blocks: where a tile starts on a block
    # boundary (BLOCK_C * d a multiple of l') they are the same for every tile, in tile
    # coordinates, so they are built once instead of in every iteration
    ALIGNED: tl.constexpr = (BLOCK_C * CMP_D) % SEL_L == 0
    if DO_SCORES and ALIGNED and not SUM_SCORES:
        ov0 = _overlaps(tl.arange(0, BLOCK_C), tl.arange(0, JB), CMP_L, CMP_D, SEL_L)
        ovb0 = ov0.to(tl.bfloat16)
        wgt0 = ov0.to(tl.float32) / CMP_D
    for tt in range(TPS):
        tile = sp * TPS + tt
        i = tile * BLOCK_C + tl.arange(0, BLOCK_C)
        okc = i < n_vis
        if USE_DESC:
            # bulk copies; rows past this sequence's tokens are zeroed like masked loads
            kc = tl.reshape(KC.load([b, tile * BLOCK_C, h, 0]), [BLOCK_C, DK])
            vc = tl.reshape(VC.load([b, tile * BLOCK_C, h, 0]), [BLOCK_C, DV])
            vc = tl.where(okc[:, None], vc, 0.0)
        else:
            kc, vc = _load_kv_rows(KC, VC, b, i, h, okc, stride_kb, stride_kn, stride_kh,
                                   stride_vb, stride_vn, stride_vh, DK, DV, D_K, D_V)
        p, m_t = _tile_probs(q, kc, okc, scale, DOT_PREC)
        here = tile < NTILE
        if DO_SCORES and SUM_SCORES:
            # Eq. 9 as sums over each block's own tokens (tiles start on block boundaries,
            # LB = l'/d tokens per block): token j*LB + r gives block j the weight
            # min(l, l' - r d) / d ("inner", plane 0) and block j + 1 the weight
            # max(0, r d + l - l') / d ("tail", plane 1, stored at j; p2 adds it to j + 1).
            # Reductions over LB neighbouring columns: no tensor-core operand round trip.
            LB: tl.constexpr = SEL_L // CMP_D
            BJ: tl.constexpr = BLOCK_C // LB
            rr = tl.arange(0, LB)
            p3 = tl.reshape(p, [GP, BJ, LB])
            w_in = tl.minimum(CMP_L, SEL_L - rr * CMP_D).to(tl.float32) / CMP_D
            jl = tile * BJ + tl.arange(0, BJ)
            okp = (g[:, None] < G) & (jl[None, :] < NBCAP) & here
            ps_rows = PS + ((bh * 2) * G + g[:, None]) * NBCAP + jl[None, :]
            tl.store(ps_rows, tl.sum(p3 * w_in[None, None, :], 2), mask=okp)
            if (LB - 1) * CMP_D + CMP_L > SEL_L:
                w_tail = tl.maximum(rr * CMP_D + CMP_L - SEL_L, 0).to(tl.float32) / CMP_D
                tl.store(ps_rows + G * NBCAP, tl.sum(p3 * w_tail[None, None, :], 2),
                         mask=okp)
            tl.store(TM + (bh * NTCAP + tile) * G + g, m_t, mask=(g < G) & here)
        if DO_SCORES and not SUM_SCORES:
            # Eq. 9 on this tile: blocks j0 .. j0 + JB - 1, weights overlap(i, j) / d,
            # relative to the tile's max (stored beside them)
            j0 = (tile * BLOCK_C * CMP_D) // SEL_L
            jj = j0 + tl.arange(0, JB)
            if not ALIGNED:
                ov = _overlaps(i, jj, CMP_L, CMP_D, SEL_L)
            if SPLIT_SCORES:
                # p = hi + mid + lo in bf16 (24 bits, float32 accuracy, float32 range)
                # against the integer overlaps (exact in bf16 up to 256): three bf16 dots
                # cost half of a 3xTF32 one and far fewer registers (masked tokens have
                # p = 0)
                if ALIGNED:
                    ovb = ovb0
                else:
                    ovb = ov.to(tl.bfloat16)
                p_hi = p.to(tl.bfloat16)
                r = p - p_hi.to(tl.float32)
                p_mid = r.to(tl.bfloat16)
                p_lo = (r - p_mid.to(tl.float32)).to(tl.bfloat16)
                ps = tl.dot(p_lo, ovb)
                ps = tl.dot(p_mid, ovb, ps)
                ps = tl.dot(p_hi, ovb, ps) / CMP_D
            else:
                if ALIGNED:
                    wgt = tl.where(okc[:, None], wgt0, 0.0)
                else:
                    wgt = tl.where(okc[:, None], ov.to(tl.float32) / CMP_D, 0.0)
                ps = tl.dot(p, wgt, input_precision="tf32x3")
            # only the blocks this tile touches: the other-parity neighbours own the rest
            j_last = (((tile + 1) * BLOCK_C - 1) * CMP_D + CMP_L - 1) // SEL_L
            tl.store(PS + ((bh * 2 + tile % 2) * G + g[:, None]) * NBCAP + jj[None, :], ps,
                     mask=(g[:, None] < G) & (jj[None, :] < NBCAP) & (jj[None, :] <= j_last)
                     & here)
            tl.store(TM + (bh * NTCAP + tile) * G + g, m_t, mask=(g < G) & here)
        m_i, l_i, acc = _online(p, m_t, vc, m_i, l_i, acc, DOT_PREC)
        n_ok += tl.sum(okc.to(tl.int32), 0)
    _store_partial(PM, PL, PO, CNT, bh * NPART + SLOT_CMP + sp, m_i, l_i, acc, n_ok, G, GP,
                   DV, D_V)


@triton.jit
def _win_tile(q, KW, VW, PM, PL, PO, CNT, bh, b, h, u, t, NPART, scale,
              stride_kwb, stride_kwn, stride_kwh, stride_vwb, stride_vwn, stride_vwh,
              G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
              D_K: tl.constexpr, D_V: tl.constexpr, LP: tl.constexpr, W: tl.constexpr,
              DOT_PREC: tl.constexpr, USE_DESC: tl.constexpr):
    # window ring tile: slot s holds position t - ((t - s) mod W)
    slot = u * LP + tl.arange(0, LP)
    pos = t - ((t - slot) % W + W) % W
    ok = (slot < W) & (pos >= 0)
    if USE_DESC:  # the tile's ring slots are consecutive rows
        kw = tl.reshape(KW.load([b, u * LP, h, 0]), [LP, DK])
        vw = tl.where(ok[:, None], tl.reshape(VW.load([b, u * LP, h, 0]), [LP, DV]), 0.0)
    else:
        kw, vw = _load_kv_rows(KW, VW, b, slot, h, ok, stride_kwb, stride_kwn, stride_kwh,
                               stride_vwb, stride_vwn, stride_vwh, DK, DV, D_K, D_V)
    _partial(q, kw, vw, ok, scale, PM, PL, PO, CNT, bh * NPART + u, G, GP, DV, D_V, DOT_PREC)


@triton.jit
def _sel_chunk(PM, PL, TM, PS, CAND, bh, c, t, n_vis, SPLITS, NTILE, NBCAP, NPART, NTCAP,
               G: tl.constexpr, GP: tl.constexpr, CMP_L: tl.constexpr, CMP_D: tl.constexpr,
               SEL_L: tl.constexpr, BLOCK_C: tl.constexpr, SLOT_CMP: tl.constexpr,
               N_SEL: tl.constexpr, NP: tl.constexpr, N_INIT: tl.constexpr,
               N_LOCAL: tl.constexpr, JT: tl.constexpr, KP: tl.constexpr,
               SPC: tl.constexpr, SUM_SCORES: tl.constexpr, TOPK: tl.constexpr):
    g = tl.arange(0, GP)
    gm = g < G
    # group block scores of blocks c*JT ..: a block gets the partials of the (at most two)
    # tiles holding compressed tokens that overlap it (layer = tile parity), each turned
    # into probabilities by exp(m_tile - M) / L; loaded before the log-sum-exp pass below,
    # so their loads do not wait for its loop
    LB: tl.constexpr = SEL_L // CMP_D
    LC: tl.constexpr = CMP_L // CMP_D
    nb = t // SEL_L + 1
    j = c * JT + tl.arange(0, JT)
    i_lo = tl.maximum(j * LB - LC + 1, 0)  # first compressed token overlapping block j
    okj = (j < nb) & (i_lo < n_vis)  # a block with no visible token scores 0
    if SUM_SCORES:
        # p1 stored each block's inner sum (plane 0) and the tail it hands to the next
        # block (plane 1): block j = inner(j), relative to the max of the tile holding
        # token j*LB, + tail(j - 1), relative to the max of the tile holding (j - 1)*LB.
        # Tiles past NTILE were not computed this step (their rows hold stale values).
        s_a = (j * LB) // BLOCK_C
        s_b = tl.maximum(j - 1, 0) * LB // BLOCK_C
        m2 = gm[:, None] & (okj & (s_a < NTILE))[None, :]
        two = gm[:, None] & (okj & (j >= 1) & (s_b < NTILE))[None, :]
        jb = tl.maximum(j - 1, 0)
        pa = tl.load(PS + ((bh * 2) * G + g[:, None]) * NBCAP + j[None, :],
                     mask=m2, other=0.0, cache_modifier=".cg")
        pb = tl.load(PS + ((bh * 2 + 1) * G + g[:, None]) * NBCAP + jb[None, :],
                     mask=two, other=0.0, cache_modifier=".cg")
    else:
        s_a = i_lo // BLOCK_C
        s_b = tl.minimum(((j + 1) * LB - 1) // BLOCK_C, NTILE - 1)
        m2 = gm[:, None] & okj[None, :]
        two = m2 & (s_b > s_a)[None, :]
        pa = tl.load(PS + ((bh * 2 + s_a[None, :] % 2) * G + g[:, None]) * NBCAP
                     + j[None, :], mask=m2, other=0.0, cache_modifier=".cg")
        pb = tl.load(PS + ((bh * 2 + s_b[None, :] % 2) * G + g[:, None]) * NBCAP
                     + j[None, :], mask=two, other=0.0, cache_modifier=".cg")
    ma = tl.load(TM + (bh * NTCAP + s_a[None, :]) * G + g[:, None], mask=m2, other=NEG_INF,
                 cache_modifier=".cg")
    mb = tl.load(TM + (bh * NTCAP + s_b[None, :]) * G + g[:, None], mask=two, other=NEG_INF,
                 cache_modifier=".cg")
    slot0 = bh * NPART + SLOT_CMP
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
    fa = tl.where(ma > NEG_INF, tl.exp(ma - mx_safe[:, None]), 0.0)
    fb = tl.where(mb > NEG_INF, tl.exp(mb - mx_safe[:, None]), 0.0)
    score = tl.sum((fa * pa + fb * pb) * inv_l[:, None], 0)
    cur = t // SEL_L
    cand = j <= cur
    forced = cand & ((j < N_INIT) | ((cur - j >= 0) & (cur - j < N_LOCAL)))
    prio = tl.where(forced, float("inf"), tl.where(cand, score, NEG_INF))
    # packed key = (order-preserving int of the score) * 2^32 + (2^32 - 1 - j): one max
    # per pick, equal scores go to the lower block index
    bits = prio.to(tl.int32, bitcast=True)
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)
    key = ordered * 4294967296 + (4294967295 - j.to(tl.int64))
    top = _top_keys(key, N_SEL, NP, TOPK)
    tl.store(CAND + bh * KP + c * NP + tl.arange(0, NP), top)


@triton.jit
def _sel_blocks(q, KS, VS, PM, PL, PO, CNT, CAND, IDX, bh, b, h, u, t, NCH, NPART, scale,
                stride_ksb, stride_ksn, stride_ksh, stride_vsb, stride_vsn, stride_vsh,
                G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                D_K: tl.constexpr, D_V: tl.constexpr, SEL_L: tl.constexpr, LP: tl.constexpr,
                N_SEL: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr, BPP: tl.constexpr,
                SLOT_SEL: tl.constexpr, DOT_PREC: tl.constexpr, USE_DESC: tl.constexpr,
                TOPK: tl.constexpr):
    """Selected blocks u*BPP .. u*BPP + BPP - 1 (ascending block order) into one partial."""
    # the n best of all chunks' candidates, as ascending block indices (unused: BIG)
    kp = tl.arange(0, KP)
    keys = tl.load(CAND + bh * KP + kp, mask=kp < NCH * NP, other=ORD_NEG_INF_KEY,
                   cache_modifier=".cg")
    top = _top_keys(keys, N_SEL, NP, TOPK)
    valid = top >= ORD_NEG_INF_KEY + 4294967296  # a -inf score: no candidate was left
    blocks = tl.sort(tl.where(valid, (4294967295 - (top & 4294967295)).to(tl.int32), BIG), 0)
    slot = tl.arange(0, NP)
    if u == 0:
        tl.store(IDX + bh * N_SEL + slot, tl.where(blocks == BIG, -1, blocks),
                 mask=slot < N_SEL)
    r = tl.arange(0, LP)
    m_i = tl.full([GP], NEG_INF, tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DV], tl.float32)
    n_ok = tl.zeros([], tl.int32)
    for kk in range(BPP):
        jblk = tl.sum(tl.where(slot == u * BPP + kk, blocks, 0), 0)
        used = (jblk < BIG) & (u * BPP + kk < N_SEL)
        jblk = tl.where(used, jblk, 0)
        pos = jblk * SEL_L + r
        ok = used & (r < SEL_L) & (pos <= t)
        if USE_DESC:
            k = tl.reshape(KS.load([b, jblk * SEL_L, h, 0]), [LP, DK])
            v = tl.where(ok[:, None], tl.reshape(VS.load([b, jblk * SEL_L, h, 0]), [LP, DV]),
                         0.0)
        else:
            k, v = _load_kv_rows(KS, VS, b, pos, h, ok, stride_ksb, stride_ksn, stride_ksh,
                                 stride_vsb, stride_vsn, stride_vsh, DK, DV, D_K, D_V)
        p, m_t = _tile_probs(q, k, ok, scale, DOT_PREC)
        m_i, l_i, acc = _online(p, m_t, v, m_i, l_i, acc, DOT_PREC)
        n_ok += tl.sum(ok.to(tl.int32), 0)
    _store_partial(PM, PL, PO, CNT, bh * NPART + SLOT_SEL + u, m_i, l_i, acc, n_ok, G, GP,
                   DV, D_V)


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
        m_s = tl.load(PM + r, mask=ok, other=NEG_INF, cache_modifier=".cg")
        l_s = tl.load(PL + r, mask=ok, other=0.0, cache_modifier=".cg")
        o_s = tl.load(PO + r[:, None] * D_V + dv[None, :], mask=ok[:, None] & (dv[None, :] < D_V),
                      other=0.0, cache_modifier=".cg")
        new = tl.maximum(mx, tl.max(m_s, 0))
        new_safe = tl.where(new > NEG_INF, new, 0.0)
        a = tl.where(m_s > NEG_INF, tl.exp(m_s - new_safe), 0.0)
        old = tl.where(mx > NEG_INF, tl.exp(mx - new_safe), 0.0)
        ls = ls * old + tl.sum(a * l_s, 0)
        o = o * old + tl.sum(a[:, None] * o_s, 0)
        mx = new
    return o / tl.where(ls > 0, ls, 1.0)


@triton.jit
def _merge_head(PM, PL, PO, CNT, GC, GS, GW, OUT, READS, TOTAL, bh, b, h, g, SPLITS, NPART,
                stride_ob, stride_oh, stride_gb,
                G: tl.constexpr, DV: tl.constexpr, D_V: tl.constexpr, N_WT: tl.constexpr,
                SLOT_SEL: tl.constexpr, N_SEL: tl.constexpr, SLOT_CMP: tl.constexpr,
                PC: tl.constexpr, CP: tl.constexpr, USE_CMP: tl.constexpr,
                USE_SEL: tl.constexpr, USE_WIN: tl.constexpr, COUNT_CMP: tl.constexpr):
    """Output of query head g: its window, compressed and selected partials merged, gated."""
    hq = h * G + g
    row0 = bh * NPART
    dv = tl.arange(0, DV)
    acc = tl.zeros([DV], tl.float32)
    if USE_WIN:
        gw = tl.load(GW + b * stride_gb + hq).to(tl.float32)
        acc += gw * _merge_range(PM, PL, PO, row0, 0, N_WT, g, G, DV, D_V, PC)
    if USE_CMP:
        gc = tl.load(GC + b * stride_gb + hq).to(tl.float32)
        acc += gc * _merge_range(PM, PL, PO, row0, SLOT_CMP, SLOT_CMP + SPLITS, g, G, DV,
                                 D_V, PC)
    if USE_SEL:
        gs = tl.load(GS + b * stride_gb + hq).to(tl.float32)
        acc += gs * _merge_range(PM, PL, PO, row0, SLOT_SEL, SLOT_SEL + N_SEL, g, G, DV, D_V,
                                 PC)
    tl.store(OUT + b * stride_ob + hq * stride_oh + dv, acc.to(OUT.dtype.element_ty),
             mask=dv < D_V)
    if g == 0:
        c = tl.arange(0, CP)
        cnt = tl.load(CNT + row0 + c, mask=c < SLOT_CMP + SPLITS, other=0,
                      cache_modifier=".cg").to(tl.int64)
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


@triton.jit
def _pdl_enter():
    """Programmatic dependent launch (SM 9.0+, the kernel launched with launch_pdl): let
    the next kernel of the step be scheduled now, so its launch overlaps this one, then
    wait until the previous kernel has finished and its writes are visible. Every kernel of
    the chain waits, so each also waits for all earlier ones."""
    tl.extra.cuda.gdc_launch_dependents()
    tl.extra.cuda.gdc_wait()

# ----------------------------------------------------------------------------- kernels
# The sizes that follow the context length (compressed tokens, splits, tiles, chunks,
# capacity) are not specialised: otherwise a growing cache crosses their "== 1" and
# "divisible by 16" specialisations and recompiles the kernels in the middle of a
# generation.

@triton.jit(do_not_specialize=["NCAP", "SPLITS", "NTILE", "NBCAP", "NPART", "NTCAP"])
def _dec_p1(
    Q, KC, VC, KW, VW, LENGTHS, PM, PL, PO, CNT, TM, PS,
    stride_qb, stride_qh,
    stride_kcb, stride_kcn, stride_kch, stride_vcb, stride_vcn, stride_vch,
    stride_kwb, stride_kwn, stride_kwh, stride_vwb, stride_vwn, stride_vwh,
    NCAP, SPLITS, NTILE, NBCAP, NPART, NTCAP, scale,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    CMP_L: tl.constexpr, CMP_D: tl.constexpr, SEL_L: tl.constexpr,
    BLOCK_C: tl.constexpr, TPS: tl.constexpr, JB: tl.constexpr, LP: tl.constexpr,
    W: tl.constexpr, SLOT_CMP: tl.constexpr, USE_SEL: tl.constexpr,
    SPLIT_SCORES: tl.constexpr, DOT_PREC: tl.constexpr, USE_DESC: tl.constexpr = False,
    PDL: tl.constexpr = False, SUM_SCORES: tl.constexpr = False,
):
    if PDL:
        _pdl_enter()
    bh = tl.program_id(0)
    r = tl.program_id(1)
    b = bh // H
    h = bh % H
    t = tl.load(LENGTHS + b) - 1
    n_vis = tl.minimum(tl.maximum(t + 1 - CMP_L + CMP_D, 0) // CMP_D, NCAP)
    q = _load_q(Q, b, h, stride_qb, stride_qh, G, GP, DK, D_K)
    if r < SPLITS:
        _cmp_split(q, KC, VC, PM, PL, PO, CNT, TM, PS, bh, b, h, r, n_vis, NTILE, NBCAP,
                   NPART, NTCAP, scale, stride_kcb, stride_kcn, stride_kch, stride_vcb,
                   stride_vcn, stride_vch, G, GP, DK, DV, D_K, D_V, CMP_L, CMP_D, SEL_L,
                   BLOCK_C, TPS, JB, SLOT_CMP, USE_SEL, SPLIT_SCORES, DOT_PREC, USE_DESC,
                   SUM_SCORES)
    else:
        _win_tile(q, KW, VW, PM, PL, PO, CNT, bh, b, h, r - SPLITS, t, NPART, scale,
                  stride_kwb, stride_kwn, stride_kwh, stride_vwb, stride_vwn, stride_vwh,
                  G, GP, DK, DV, D_K, D_V, LP, W, DOT_PREC, USE_DESC)


@triton.jit(do_not_specialize=["NCAP", "SPLITS", "NTILE", "NBCAP", "NPART", "NTCAP"])
def _dec_p2(
    LENGTHS, PM, PL, TM, PS, CAND, NCAP, SPLITS, NTILE, NBCAP, NPART, NTCAP,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, CMP_L: tl.constexpr,
    CMP_D: tl.constexpr, SEL_L: tl.constexpr, BLOCK_C: tl.constexpr,
    SLOT_CMP: tl.constexpr, N_SEL: tl.constexpr, NP: tl.constexpr, N_INIT: tl.constexpr,
    N_LOCAL: tl.constexpr, JT: tl.constexpr, KP: tl.constexpr, SPC: tl.constexpr,
    PDL: tl.constexpr = False, SUM_SCORES: tl.constexpr = False, TOPK: tl.constexpr = False,
):
    if PDL:
        _pdl_enter()
    bh = tl.program_id(0)
    c = tl.program_id(1)
    t = tl.load(LENGTHS + bh // H) - 1
    n_vis = tl.minimum(tl.maximum(t + 1 - CMP_L + CMP_D, 0) // CMP_D, NCAP)
    _sel_chunk(PM, PL, TM, PS, CAND, bh, c, t, n_vis, SPLITS, NTILE, NBCAP, NPART, NTCAP,
               G, GP, CMP_L, CMP_D, SEL_L, BLOCK_C, SLOT_CMP, N_SEL, NP, N_INIT, N_LOCAL,
               JT, KP, SPC, SUM_SCORES, TOPK)


@triton.jit(do_not_specialize=["NCH", "NPART"])
def _dec_p3(
    Q, KS, VS, LENGTHS, PM, PL, PO, CNT, CAND, IDX,
    stride_qb, stride_qh,
    stride_ksb, stride_ksn, stride_ksh, stride_vsb, stride_vsn, stride_vsh,
    NCH, NPART, scale,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    SEL_L: tl.constexpr, LP: tl.constexpr, N_SEL: tl.constexpr, NP: tl.constexpr,
    KP: tl.constexpr, BPP: tl.constexpr, SLOT_SEL: tl.constexpr, DOT_PREC: tl.constexpr,
    USE_DESC: tl.constexpr = False, PDL: tl.constexpr = False, TOPK: tl.constexpr = False,
):
    if PDL:
        _pdl_enter()
    bh = tl.program_id(0)
    u = tl.program_id(1)
    b = bh // H
    h = bh % H
    t = tl.load(LENGTHS + b) - 1
    q = _load_q(Q, b, h, stride_qb, stride_qh, G, GP, DK, D_K)
    _sel_blocks(q, KS, VS, PM, PL, PO, CNT, CAND, IDX, bh, b, h, u, t, NCH, NPART, scale,
                stride_ksb, stride_ksn, stride_ksh, stride_vsb, stride_vsn, stride_vsh,
                G, GP, DK, DV, D_K, D_V, SEL_L, LP, N_SEL, NP, KP, BPP, SLOT_SEL, DOT_PREC,
                USE_DESC, TOPK)


@triton.jit(do_not_specialize=["SPLITS", "NPART"])
def _dec_p4(
    PM, PL, PO, CNT, GC, GS, GW, OUT, READS, TOTAL,
    stride_ob, stride_oh, stride_gb, SPLITS, NPART,
    H: tl.constexpr, G: tl.constexpr, DV: tl.constexpr, D_V: tl.constexpr,
    N_WT: tl.constexpr, SLOT_SEL: tl.constexpr, N_SEL: tl.constexpr,
    SLOT_CMP: tl.constexpr, PC: tl.constexpr, CP: tl.constexpr, USE_CMP: tl.constexpr,
    USE_SEL: tl.constexpr, USE_WIN: tl.constexpr, PDL: tl.constexpr = False,
):
    if PDL:
        _pdl_enter()
    pid = tl.program_id(0)
    bh = pid // G
    _merge_head(PM, PL, PO, CNT, GC, GS, GW, OUT, READS, TOTAL, bh, bh // H, bh % H,
                pid % G, SPLITS, NPART, stride_ob, stride_oh, stride_gb, G, DV, D_V, N_WT,
                SLOT_SEL, N_SEL, SLOT_CMP, PC, CP, USE_CMP, USE_SEL, USE_WIN,
                USE_CMP or USE_SEL)


# ---------------------------------------------------------------------------------------
# The step's prologue: RoPE and every cache write of the new token in one launch.
#
# A decode step's projections arrive as one row per sequence, Z [B, F] (q, each branch's
# key and value, at the column offsets OFF_*). ``_dec_append`` (grid (B,), one program per
# sequence, so it may advance that sequence's length itself) rotates q and the keys at
# position lengths[b] and then, per mode:
# - BLOCKS: writes phi's input, the raw compressed-branch keys/values of positions
#   [t - l + 1, t] in order ([B, l, H, D], the ring's l - 1 older tokens and the new one),
#   and writes nothing to the cache, so phi may run before the cache changes;
# - WRITE: stores the selection, window and raw-ring rows, with EMIT the compressed token
#   phi produced (KC, VC [B, H, D]) where one is due for that sequence, and advances
#   lengths[b].
# Caches are contiguous: rows of the selection cache are CAP apart per sequence, of the
# compressed cache NCAP.

@triton.jit
def _rotate(Z, col0, rows, ok, jd, c, s, partner, D_K: tl.constexpr, ROPE: tl.constexpr):
    """Rows ``rows`` of D_K columns at Z + col0, rotate-half RoPE in float32 (x * cos +
    x[partner] * sign * sin, sign folded into s)."""
    ptr = Z + col0 + rows[:, None] * D_K
    x = tl.load(ptr + jd[None, :], mask=ok, other=0.0).to(tl.float32)
    if ROPE:
        p = tl.load(ptr + partner[None, :], mask=ok, other=0.0).to(tl.float32)
        x = x * c[None, :] + p * s[None, :]
    return x


@triton.jit
def _ring_rows(RING, OUT, b, t, ROW: tl.constexpr, L: tl.constexpr, LP: tl.constexpr,
               CB: tl.constexpr):
    """OUT[b, j] = RING[b, (t + 1 + j) % L] for j < L - 1 (rows of ROW elements)."""
    j = tl.arange(0, LP)
    slot = (t + 1 + j) % L
    for c0 in range(0, ROW, CB):
        col = c0 + tl.arange(0, CB)
        ok = (j[:, None] < L - 1) & (col[None, :] < ROW)
        x = tl.load(RING + (b * L + slot[:, None]) * ROW + col[None, :], mask=ok)
        tl.store(OUT + (b * L + j[:, None]) * ROW + col[None, :], x, mask=ok)


@triton.jit(do_not_specialize=["CAP", "NCAP"])
def _dec_append(
    Z, INV, QR, KB, VB, KC, VC, CKS, CVS, CKW, CVW, CKR, CVR, CKC, CVC, LENGTHS,
    stride_zb, CAP, NCAP,
    HQ: tl.constexpr, H: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    HQP: tl.constexpr, HP: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr,
    LP: tl.constexpr, CBK: tl.constexpr, CBV: tl.constexpr,
    OFF_Q: tl.constexpr, OFF_KC: tl.constexpr, OFF_VC: tl.constexpr, OFF_KS: tl.constexpr,
    OFF_VS: tl.constexpr, OFF_KW: tl.constexpr, OFF_VW: tl.constexpr,
    L: tl.constexpr, CMP_D: tl.constexpr, W: tl.constexpr,
    ROPE: tl.constexpr, PRECISE: tl.constexpr, BLOCKS: tl.constexpr, WRITE: tl.constexpr,
    EMIT: tl.constexpr, PDL: tl.constexpr = False,
):
    if PDL:
        _pdl_enter()
    b = tl.program_id(0)
    t = tl.load(LENGTHS + b)  # position of the new token
    z = Z + b * stride_zb
    jd = tl.arange(0, DKP)
    jv = tl.arange(0, DVP)
    half: tl.constexpr = D_K // 2
    c = jd.to(tl.float32)
    s = c
    partner = jd
    if ROPE:  # cos/sin of pos * inv_freq (the frequencies torch computed: same angles)
        ang = t.to(tl.float32) * tl.load(INV + jd % half, mask=jd < D_K, other=0.0)
        if PRECISE:
            c = libdevice.cos(ang)
            s = libdevice.sin(ang)
        else:
            c = tl.cos(ang)
            s = tl.sin(ang)
        s = tl.where(jd < half, -s, s)
        partner = tl.where(jd < half, jd + half, jd - half)
    rq = tl.arange(0, HQP)
    okq = (rq[:, None] < HQ) & (jd[None, :] < D_K)
    q = _rotate(z, OFF_Q, rq, okq, jd, c, s, partner, D_K, ROPE)
    tl.store(QR + (b * HQ + rq[:, None]) * D_K + jd[None, :], q.to(QR.dtype.element_ty),
             mask=okq)
    rh = tl.arange(0, HP)
    okk = (rh[:, None] < H) & (jd[None, :] < D_K)
    okv = (rh[:, None] < H) & (jv[None, :] < D_V)
    offk = rh[:, None] * D_K + jd[None, :]
    offv = rh[:, None] * D_V + jv[None, :]
    k_raw = _rotate(z, OFF_KC, rh, okk, jd, c, s, partner, D_K, ROPE).to(CKR.dtype.element_ty)
    v_raw = tl.load(z + OFF_VC + offv, mask=okv, other=0.0)
    if BLOCKS:
        # position t - (L - 1) + j sits in ring slot (t + 1 + j) % L; rows j < L - 1 are
        # copied as [LP, CB] tiles (independent loads: one latency, not one per row)
        _ring_rows(CKR, KB, b, t, H * D_K, L, LP, CBK)
        _ring_rows(CVR, VB, b, t, H * D_V, L, LP, CBV)
        tl.store(KB + (b * L + L - 1) * H * D_K + offk, k_raw, mask=okk)
        tl.store(VB + (b * L + L - 1) * H * D_V + offv, v_raw, mask=okv)
    if WRITE:
        k_sel = _rotate(z, OFF_KS, rh, okk, jd, c, s, partner, D_K, ROPE)
        k_win = _rotate(z, OFF_KW, rh, okk, jd, c, s, partner, D_K, ROPE)
        v_sel = tl.load(z + OFF_VS + offv, mask=okv, other=0.0)
        v_win = tl.load(z + OFF_VW + offv, mask=okv, other=0.0)
        tl.store(CKS + (b * CAP + t) * H * D_K + offk, k_sel.to(CKS.dtype.element_ty), mask=okk)
        tl.store(CVS + (b * CAP + t) * H * D_V + offv, v_sel, mask=okv)
        tl.store(CKW + (b * W + t % W) * H * D_K + offk, k_win.to(CKW.dtype.element_ty),
                 mask=okk)
        tl.store(CVW + (b * W + t % W) * H * D_V + offv, v_win, mask=okv)
        tl.store(CKR + (b * L + t % L) * H * D_K + offk, k_raw, mask=okk)
        tl.store(CVR + (b * L + t % L) * H * D_V + offv, v_raw, mask=okv)
        if EMIT:  # compressed token (n - L) / CMP_D once n = t + 1 tokens reach L + m * CMP_D
            n = t + 1
            due = (n >= L) & ((n - L) % CMP_D == 0)
            i = tl.maximum(n - L, 0) // CMP_D
            kc = tl.load(KC + b * H * D_K + offk, mask=okk, other=0.0)
            vc = tl.load(VC + b * H * D_V + offv, mask=okv, other=0.0)
            tl.store(CKC + (b * NCAP + i) * H * D_K + offk, kc, mask=okk & due)
            tl.store(CVC + (b * NCAP + i) * H * D_V + offv, vc, mask=okv & due)
        tl.store(LENGTHS + b, t + 1)
