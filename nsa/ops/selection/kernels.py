"""Triton kernels of the selection branch: top-n block choice and selected-block attention.

Top-n (:func:`_topn_kernel`), one program per (tile of ROWS positions, KV head, batch):
each free candidate block j of query t (a candidate j*l' <= t that is not forced) gets
the int64 key ``order(score) << 32 | (2^31 - 1 - j)``; ``order`` maps float bits to
integers with the same order (-0.0 is first made +0.0, so equal scores give equal keys).
The largest key is the highest score, ties going to the lower block index: exactly the
order of the reference's stable descending sort. The row is streamed in chunks of CH
blocks (only up to the last candidate of the tile) and a running set of the K_FREE best
keys is kept: while the chunk's largest key beats the set's smallest, it replaces it (so
after the first chunk only the few keys that enter the set cost a round). With C
candidates and C > n, the forced blocks (n_initial first, n_local last) are distinct and
all exist, so exactly n - n_initial - n_local free picks remain; with C <= n every
candidate is taken and the free ones number at most that many too. Ascending order is
initial < free < local (a free block lies in [n_initial, cur - n_local]), so only the
picks are ranked among themselves; the blocks are written ascending with -1 last: the
canonical order of ``reference.select_blocks``. No host sync. On the GPU a program is
one warp over 4 rows in chunks of 32 blocks, so every round's reductions stay in the warp.

Selected attention (:func:`_sel_fwd_kernel`), group-centric: one program per (tile of PP
query positions, KV head, batch); the dot's M dimension packs PP positions x GP2 heads
(GP2 = G rounded up to a power of two; PP = max(1, 16 // GP2) by default, so G < 16
packs several positions and no program runs a dot with fewer than 16 rows). With PP = 1
the program streams the n selected blocks of its position straight from the index row.
With PP > 1 it streams the *union* of its positions' blocks (first occurrences, in
position order): each block is loaded once and each row keeps only the blocks its own position
selected, so positions that share blocks (always the forced ones; in trained models
most) share the loads and the dots. Causal inside the block (key position <= t). The
epilogue optionally fuses the gate combine ``g_sel*O_sel + g_cmp*O_cmp + g_win*O_win``
and writes the output in its dtype; with ``STORE_LSE`` it also writes the base-2
log-sum-exp of every row for the backward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from nsa.ops.rows import _group_rows, _k2_tile, _q_tiles, _softmax_step, _tile_rows

_KEY_NONE = tl.constexpr(-9223372036854775808)  # int64 min: "no candidate"
_KEY_FULL = tl.constexpr(9223372036854775807)  # int64 max: a slot that is not in use
_IDX_NONE = tl.constexpr(2147483647)  # int32 max: a free slot with no pick


@triton.jit
def _topn_kernel(
    SCORES, IDX,
    stride_sb, stride_sh, stride_st,
    stride_ib, stride_it, stride_ih,
    T, N,
    CMP_L: tl.constexpr, CMP_D: tl.constexpr, L_SEL: tl.constexpr,
    SEL_B: tl.constexpr, SEL_A: tl.constexpr,
    N_SEL: tl.constexpr, N_INIT: tl.constexpr, N_LOCAL: tl.constexpr,
    K_FREE: tl.constexpr, P: tl.constexpr, NOUT: tl.constexpr, ROWS: tl.constexpr,
    CH: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = tile * ROWS + tl.arange(0, ROWS)
    row_ok = t < T
    cur = t // L_SEL  # block holding t: candidates are 0..cur
    n_vis = tl.minimum(tl.maximum(t + 1 - CMP_L + CMP_D, 0) // CMP_D, N)
    # blocks past this one received no visible compressed token: score 0, never stored
    j_scored = (n_vis + SEL_A - 2) // SEL_B  # j*SEL_B - (SEL_A - 1) < n_vis  <=>  j <= this
    slot = tl.arange(0, P)
    # the K_FREE best keys so far; slots past K_FREE hold a key nothing can displace
    best = tl.where(slot[None, :] < K_FREE, _KEY_NONE, _KEY_FULL) + tl.zeros([ROWS, P], tl.int64)
    if K_FREE > 0:
        s_base = SCORES + b * stride_sb + h.to(tl.int64) * stride_sh  # H*T*NB may pass 2^31
        s_rows = s_base + (t.to(tl.int64) * stride_st)[:, None]
        t_hi = tl.minimum(tile * ROWS + ROWS - 1, T - 1)
        n_cand = t_hi // L_SEL + 1
        for c0 in range(0, n_cand, CH):
            j = c0 + tl.arange(0, CH)
            jr = j[None, :]
            cand = (jr <= cur[:, None]) & row_ok[:, None]
            forced = (jr < N_INIT) | ((cur[:, None] - jr >= 0) & (cur[:, None] - jr < N_LOCAL))
            free = cand & ~forced
            sc = tl.load(s_rows + jr, mask=free & (jr <= j_scored[:, None]), other=0.0)
            sc = tl.where(sc == 0.0, 0.0, sc)  # -0.0 -> +0.0
            bits = sc.to(tl.int32, bitcast=True)
            okey = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
            key = (okey.to(tl.int64) << 32) | (0x7FFFFFFF - jr).to(tl.int64)
            key = tl.where(free, key, _KEY_NONE)
            # insert the chunk's best keys while one beats a row's current worst: after
            # the first chunk only a few per chunk do, so later chunks cost few rounds
            top = tl.max(key, 1)
            worst = tl.min(best, 1)
            need = top > worst
            while tl.max(need.to(tl.int32), 0) > 0:
                at = tl.min(tl.where(best == worst[:, None], slot[None, :], P), 1)
                best = tl.where(need[:, None] & (slot[None, :] == at[:, None]), top[:, None], best)
                key = tl.where(need[:, None] & (key == top[:, None]), _KEY_NONE, key)
                top = tl.max(key, 1)
                worst = tl.min(best, 1)
                need = top > worst
    taken = (best != _KEY_NONE) & (slot[None, :] < K_FREE)
    picked = tl.where(taken, 0x7FFFFFFF - (best & 0xFFFFFFFF), _IDX_NONE)
    picked = picked.to(tl.int32)
    i_rows = IDX + b * stride_ib + h * stride_ih + (t.to(tl.int64) * stride_it)[:, None]
    # ascending order is initial < free < local: the initial blocks that exist
    # (j <= cur), the free picks (N_INIT <= j <= cur - N_LOCAL) ranked among
    # themselves, the local blocks cur - m >= N_INIT for m = n_l-1 .. 0, then -1
    n_i = tl.minimum(cur + 1, N_INIT)[:, None]
    n_l = tl.minimum(tl.maximum(cur + 1 - N_INIT, 0), N_LOCAL)[:, None]
    smaller = (picked[:, None, :] < picked[:, :, None]) & taken[:, None, :]
    rank = tl.sum(smaller.to(tl.int32), 2)
    k = tl.sum(taken.to(tl.int32), 1)[:, None]
    ok = row_ok[:, None]
    tl.store(i_rows + n_i + rank, picked, mask=ok & taken)
    # forced blocks: slots 0..N_INIT-1 initial, N_INIT..N_INIT+N_LOCAL-1 local
    sl = slot[None, :]
    m = sl - N_INIT
    local = cur[:, None] - m
    is_local = (m >= 0) & (m < n_l)
    f_col = tl.where(sl < N_INIT, sl, n_i + k + n_l - 1 - m)
    tl.store(i_rows + f_col, tl.where(sl < N_INIT, sl, local).to(tl.int32),
             mask=ok & (((sl < N_INIT) & (sl < n_i)) | is_local))
    col = tl.arange(0, NOUT)[None, :]
    tl.store(i_rows + col, tl.full([ROWS, NOUT], -1, tl.int32),
             mask=ok & (col >= n_i + k + n_l) & (col < N_SEL))


@triton.jit
def _entry_bins_at(IDX, e, b, h, stride_ib, stride_it, stride_ih, E, NB,
                   N_SEL: tl.constexpr):
    """Entries e = t * n + j of row (b, h): (in range, bin), the bin being the entry's
    block or NB for an unused slot (-1); entries past E count as bin 0."""
    ok = e < E
    t = e // N_SEL
    blk = tl.load(IDX + b * stride_ib + h * stride_ih + t.to(tl.int64) * stride_it
                  + e % N_SEL, mask=ok, other=0)
    return ok, tl.where(blk >= 0, blk, NB)


@triton.jit
def _entry_bins(IDX, stride_ib, stride_it, stride_ih, E, NB, N_SEL: tl.constexpr,
                BLOCK: tl.constexpr):
    """A program's BLOCK entries of row (b, h) = (program 1, program 2): (e, ok, bin)."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok, bn = _entry_bins_at(IDX, e, tl.program_id(2).to(tl.int64), tl.program_id(1),
                            stride_ib, stride_it, stride_ih, E, NB, N_SEL)
    return e, ok, bn


@triton.jit
def _entry_keys_kernel(
    IDX, KEYS, stride_ib, stride_it, stride_ih, stride_kb, stride_kh,
    E, NB, SPAN, N_SEL: tl.constexpr, BY_POSITION: tl.constexpr, BLOCK: tl.constexpr,
):
    """Sort keys of the selection's entries (see ``launch.entries_by_block``): entry
    e = t * n + j of row (b, h) gets ``bin * SPAN + (t if BY_POSITION else e)``, the bin
    being its block (NB for an unused slot); keys in KEYS' integer type."""
    e, ok, bn = _entry_bins(IDX, stride_ib, stride_it, stride_ih, E, NB, N_SEL, BLOCK)
    kdt = KEYS.dtype.element_ty
    pos = (e // N_SEL if BY_POSITION else e).to(kdt)
    tl.store(KEYS + tl.program_id(2).to(tl.int64) * stride_kb + tl.program_id(1) * stride_kh
             + e, bn.to(kdt) * SPAN + pos, mask=ok)


@triton.jit
def _max_i32(a, b):
    return tl.maximum(a, b)


@triton.jit
def _runs(sb, BLOCK: tl.constexpr):
    """For sorted values sb [BLOCK]: each element's rank in its run of equal values, and
    whether it ends its run."""
    i = tl.arange(0, BLOCK)
    prev = tl.gather(sb, tl.maximum(i - 1, 0), 0)
    nxt = tl.gather(sb, tl.minimum(i + 1, BLOCK - 1), 0)
    first = tl.associative_scan(tl.where((i == 0) | (sb != prev), i, 0), 0, _max_i32)
    return i - first, (i == BLOCK - 1) | (sb != nxt)


@triton.jit
def _entry_hist_kernel(
    IDX, HIST, stride_ib, stride_it, stride_ih, stride_hb, stride_hh, stride_hp,
    E, NB, N_SEL: tl.constexpr, BLOCK: tl.constexpr, NBP: tl.constexpr,
    BY_SORT: tl.constexpr,
):
    """Counting sort, step 1: row p + 1 of HIST[b, h] = how many of tile p's BLOCK
    entries fall in each bin 0..NB; tile 0 also zeroes row 0, so that a cumulative sum
    over the rows gives every tile the entries of each bin in the tiles before it (and
    row P the bins' totals). BY_SORT (GPU): the row is zeroed, then the run lengths of
    the tile's sorted bins stored, whose cost does not grow with the bins as
    ``tl.histogram``'s does (NBP = next power of two above NB, for the histogram)."""
    e, ok, bn = _entry_bins(IDX, stride_ib, stride_it, stride_ih, E, NB, N_SEL, BLOCK)
    p = tl.program_id(0)
    base = HIST + tl.program_id(2).to(tl.int64) * stride_hb + tl.program_id(1) * stride_hh
    if BY_SORT:
        row = base + (p + 1) * stride_hp
        for c0 in range(0, NB + 1, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            zero = tl.zeros([BLOCK], tl.int32)
            tl.store(row + c, zero, mask=c <= NB)
            tl.store(base + c, zero, mask=(c <= NB) & (p == 0))
        tl.debug_barrier()  # the zeros land before the counts (same program, same row)
        sb = tl.sort(tl.where(ok, bn, NB + 1), 0)  # entries past E last, as NB + 1
        rank, last = _runs(sb, BLOCK)
        tl.store(row + sb, rank + 1, mask=last & (sb <= NB))
    else:
        cnt = tl.histogram(bn, NBP, mask=ok)
        c = tl.arange(0, NBP)
        tl.store(base + (p + 1) * stride_hp + c, cnt, mask=c <= NB)
        tl.store(base + c, tl.zeros_like(cnt), mask=(c <= NB) & (p == 0))


@triton.jit
def _entry_offsets_kernel(
    CNT, OFF, stride_cb, stride_ch, stride_fb, stride_fh, NB, BLOCK: tl.constexpr,
):
    """OFF[c] = entries of the bins before c (exclusive scan of CNT over c = 0..NB); CNT
    is overwritten with the same values. One program per row (b, h)."""
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c_base = CNT + b * stride_cb + h * stride_ch
    f_base = OFF + b * stride_fb + h * stride_fh
    carry = tl.zeros([], tl.int32)
    for c0 in range(0, NB + 1, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        ok = c <= NB
        x = tl.load(c_base + c, mask=ok, other=0)
        first = carry + tl.cumsum(x, 0) - x
        tl.store(f_base + c, first, mask=ok)
        tl.store(c_base + c, first, mask=ok)
        carry += tl.sum(x, 0)


@triton.jit
def _entry_scan_kernel(HIST, stride_hb, stride_hh, stride_hp, P, NB, PB: tl.constexpr,
                       CB: tl.constexpr):
    """Counting sort, step 2, in place: HIST[b, h, p, c] becomes the sum of its rows
    0..p (a cumulative sum over p = 0..P), for CB bins per program."""
    c = tl.program_id(0) * CB + tl.arange(0, CB)
    base = HIST + tl.program_id(2).to(tl.int64) * stride_hb + tl.program_id(1) * stride_hh
    carry = tl.zeros([CB], tl.int32)
    for p0 in range(0, P + 1, PB):
        p = p0 + tl.arange(0, PB)
        m = (p[:, None] <= P) & (c[None, :] <= NB)
        ptrs = base + p[:, None] * stride_hp + c[None, :]
        x = tl.load(ptrs, mask=m, other=0)
        tl.store(ptrs, tl.cumsum(x, 0) + carry[None, :], mask=m)
        carry += tl.sum(x, 0)


@triton.jit
def _entry_place_kernel(
    IDX, CSUM, KEYS, stride_ib, stride_it, stride_ih, stride_cb, stride_ch, stride_cp,
    stride_kb, stride_kh, E, NB, P, SPAN, N_SEL: tl.constexpr, BLOCK: tl.constexpr,
    RC: tl.constexpr, BY_SORT: tl.constexpr, BY_POSITION: tl.constexpr,
):
    """Counting sort, step 3: entry e of tile p goes to slot first(bin) + (entries of its
    bin in the tiles before p: CSUM[p, bin]) + (entries of its bin before it in tile p),
    so the keys come out sorted by (bin, e), as a stable sort leaves them. CSUM[P] holds
    each bin's first slot (exclusive scan of the totals).

    The rank inside the tile: BY_SORT sorts the tile's (bin, entry) keys and counts along
    each run of equal bins (GPU); otherwise every entry is compared with the tile's
    others, RC at a time (the CPU interpreter, where a sort runs element by element)."""
    b = tl.program_id(2).to(tl.int64)
    h = tl.program_id(1)
    p = tl.program_id(0)
    cs = CSUM + b * stride_cb + h * stride_ch
    e, ok, bn = _entry_bins(IDX, stride_ib, stride_it, stride_ih, E, NB, N_SEL, BLOCK)
    if BY_SORT:
        # (bin, entry) keys: sorting them sorts the bins and keeps entry order in a run
        sk = tl.sort(tl.where(ok, bn, NB + 1) * BLOCK + tl.arange(0, BLOCK), 0)
        bn = sk // BLOCK
        rank, _ = _runs(bn, BLOCK)
        ok = bn <= NB
        bn = tl.where(ok, bn, 0)
        e = p * BLOCK + sk % BLOCK
    else:
        rank = tl.zeros([BLOCK], tl.int32)
        for c0 in tl.static_range(0, BLOCK, RC):
            e2 = p * BLOCK + c0 + tl.arange(0, RC)
            ok2, bn2 = _entry_bins_at(IDX, e2, b, h, stride_ib, stride_it, stride_ih, E, NB,
                                      N_SEL)
            same = (bn[:, None] == bn2[None, :]) & (e2[None, :] < e[:, None]) & ok2[None, :]
            rank += tl.sum(same.to(tl.int32), 1)
    slot = (tl.load(cs + P * stride_cp + bn, mask=ok) + tl.load(cs + p * stride_cp + bn,
                                                                 mask=ok) + rank)
    kdt = KEYS.dtype.element_ty
    pos = (e // N_SEL if BY_POSITION else e).to(kdt)
    tl.store(KEYS + b * stride_kb + h * stride_kh + slot, bn.to(kdt) * SPAN + pos, mask=ok)


@triton.jit
def _block_list(IDX, b, h, t0, T, p_loc, row_ok, stride_ib, stride_it, stride_ih,
                PP: tl.constexpr, NP: tl.constexpr, N_SEL: tl.constexpr):
    """The blocks a tile of PP positions streams: (i_base, flat, order, row_idx, n_blocks).

    PP = 1: the position's (canonical, deduplicated) index row is the list. PP > 1: the
    union of the positions' blocks, each at its first occurrence (position-major order);
    ``row_idx`` holds each row's own index row, to test membership of a streamed block.
    """
    i_base = IDX + b * stride_ib + h * stride_ih + t0.to(tl.int64) * stride_it
    offs_s = tl.arange(0, NP)
    if PP == 1:
        row_idx = tl.load(i_base + offs_s, mask=offs_s < N_SEL, other=-1)
        n_blocks = tl.sum((row_idx >= 0).to(tl.int32), 0)
        flat = row_idx
        order = row_idx
    else:
        FL: tl.constexpr = PP * NP
        offs_p = tl.arange(0, PP)
        pos_idx = tl.load(i_base + (offs_p * stride_it)[:, None] + offs_s[None, :],
                          mask=((t0 + offs_p) < T)[:, None] & (offs_s[None, :] < N_SEL), other=-1)
        flat = tl.reshape(pos_idx, [FL])
        flat_pos = tl.arange(0, FL) // NP
        # a block is streamed at its first occurrence (position-major order)
        dup = flat < 0
        for pp in tl.static_range(PP - 1):
            row_pp = tl.load(i_base + pp * stride_it + offs_s,
                             mask=(offs_s < N_SEL) & (t0 + pp < T), other=-1)
            hit = tl.max((flat[:, None] == row_pp[None, :]).to(tl.int32), 1) > 0
            dup = dup | (hit & (flat_pos > pp))
        first = ~dup
        order = tl.where(first, tl.cumsum(first.to(tl.int32), 0) - 1, -1)
        n_blocks = tl.sum(first.to(tl.int32), 0)
        row_idx = tl.load(i_base + (p_loc * stride_it)[:, None] + offs_s[None, :],
                          mask=row_ok[:, None] & (offs_s[None, :] < N_SEL), other=-1)
    return i_base, flat, order, row_idx, n_blocks


@triton.jit
def _block_at(u, i_base, flat, order, row_idx, row_ok, PP: tl.constexpr):
    """The u-th streamed block of :func:`_block_list` and which rows selected it."""
    if PP == 1:
        blk = tl.load(i_base + u)
        member = row_ok
    else:
        blk = tl.sum(tl.where(order == u, flat, 0), 0)
        member = tl.max((row_idx == blk).to(tl.int32), 1) > 0
    return blk, member


@triton.jit
def _sel_epilogue(
    o, lse, b, t0, p_loc, t_row, row_ok, hq, O, OB, OC, OW, GS, GC, GW, LSE,
    stride_ob, stride_ot, stride_oh, stride_bb, stride_bt, stride_bh,
    stride_cb, stride_ct, stride_ch, stride_wb, stride_wt, stride_wh,
    stride_gsb, stride_gst, stride_gsh, stride_gcb, stride_gct, stride_gch,
    stride_gwb, stride_gwt, stride_gwh, stride_lb, stride_lh,
    DV: tl.constexpr, D_V: tl.constexpr, WRITE_OUT: tl.constexpr, WRITE_BRANCH: tl.constexpr,
    HAS_CMP: tl.constexpr, HAS_WIN: tl.constexpr, STORE_LSE: tl.constexpr,
):
    """Stores of a tile of O_sel rows (float32 ``o`` [M, DV], base-2 ``lse`` [M]): the
    log-sum-exp, the ungated branch output and/or ``out`` = g_sel*O_sel + g_cmp*O_cmp +
    g_win*O_win in the output's dtype."""
    offs_dv = tl.arange(0, DV)
    dv_ok = offs_dv[None, :] < D_V
    if STORE_LSE:
        tl.store(LSE + b * stride_lb + hq.to(tl.int64) * stride_lh + t_row, lse, mask=row_ok)
    st_mask = row_ok[:, None] & dv_ok
    rows_t = (p_loc * stride_ot + hq * stride_oh)[:, None]
    if WRITE_BRANCH:
        ob_ptrs = (OB + b * stride_bb + t0.to(tl.int64) * stride_bt
                   + (p_loc * stride_bt + hq * stride_bh)[:, None] + offs_dv[None, :])
        tl.store(ob_ptrs, o.to(OB.dtype.element_ty), mask=st_mask)
    if WRITE_OUT:
        gs = tl.load(GS + b * stride_gsb + t_row.to(tl.int64) * stride_gst + hq * stride_gsh,
                     mask=row_ok, other=0.0).to(tl.float32)
        res = o * gs[:, None]
        if HAS_CMP:
            gc = tl.load(GC + b * stride_gcb + t_row.to(tl.int64) * stride_gct + hq * stride_gch,
                         mask=row_ok, other=0.0).to(tl.float32)
            oc = tl.load(OC + b * stride_cb + t0.to(tl.int64) * stride_ct
                         + (p_loc * stride_ct + hq * stride_ch)[:, None] + offs_dv[None, :],
                         mask=st_mask, other=0.0).to(tl.float32)
            res += oc * gc[:, None]
        if HAS_WIN:
            gw = tl.load(GW + b * stride_gwb + t_row.to(tl.int64) * stride_gwt + hq * stride_gwh,
                         mask=row_ok, other=0.0).to(tl.float32)
            ow = tl.load(OW + b * stride_wb + t0.to(tl.int64) * stride_wt
                         + (p_loc * stride_wt + hq * stride_wh)[:, None] + offs_dv[None, :],
                         mask=st_mask, other=0.0).to(tl.float32)
            res += ow * gw[:, None]
        o_ptrs = O + b * stride_ob + t0.to(tl.int64) * stride_ot + rows_t + offs_dv[None, :]
        tl.store(o_ptrs, res.to(O.dtype.element_ty), mask=st_mask)


@triton.jit
def _sel_fwd_kernel(
    Q, K, K2, V, IDX, O, OB, OC, OW, GS, GC, GW, LSE,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ib, stride_it, stride_ih,
    stride_ob, stride_ot, stride_oh,
    stride_bb, stride_bt, stride_bh,
    stride_cb, stride_ct, stride_ch,
    stride_wb, stride_wt, stride_wh,
    stride_gsb, stride_gst, stride_gsh,
    stride_gcb, stride_gct, stride_gch,
    stride_gwb, stride_gwt, stride_gwh,
    stride_lb, stride_lh,
    T, qk_scale,
    G: tl.constexpr, GP2: tl.constexpr, PP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    L_SEL: tl.constexpr, BLOCK_N: tl.constexpr, N_SEL: tl.constexpr, NP: tl.constexpr,
    WRITE_OUT: tl.constexpr, WRITE_BRANCH: tl.constexpr,
    HAS_CMP: tl.constexpr, HAS_WIN: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_PREC: tl.constexpr, USE_DESC: tl.constexpr = False, DK2: tl.constexpr = 0,
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
    else:
        k_base = K2  # not read: the descriptors load every tile
    k_cols = offs_dk[:, None] + offs_n[None, :] * stride_kt  # K^T tile [DK, BLOCK_N]
    v_rows = offs_n[:, None] * stride_vt + offs_dv[None, :]
    i_base, flat, order, row_idx, n_blocks = _block_list(
        IDX, b, h, t0, T, p_loc, row_ok, stride_ib, stride_it, stride_ih, PP, NP, N_SEL)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)

    for u in range(0, n_blocks):
        blk, member = _block_at(u, i_base, flat, order, row_idx, row_ok, PP)
        for c0 in tl.static_range(0, L_SEL, BLOCK_N):
            s0 = blk.to(tl.int64) * L_SEL + c0
            kpos = s0 + offs_n
            if USE_DESC:
                # bulk tensor copy of the [BLOCK_N, DK] tile (rows past T arrive as zeros)
                kb = K.load([b.to(tl.int32), s0.to(tl.int32), h, 0])
                kt = tl.trans(tl.reshape(kb, [BLOCK_N, DK]))
            else:
                kt = tl.load(k_base + s0 * stride_kt + k_cols,
                             mask=dk_ok & (kpos[None, :] < T), other=0.0)
            s = tl.dot(q, kt, input_precision=DOT_PREC)
            if DK2 > 0:
                s = tl.dot(q2, _k2_tile(K2, k_base, k2_cols, dk2_ok, b.to(tl.int32), s0, h, T,
                                        stride_kt, offs_n, BLOCK_N, DK, DK2, USE_DESC),
                           s, input_precision=DOT_PREC)
            s = s * qk_scale
            ok = (member[:, None] & (kpos[None, :] <= t_row[:, None])
                  & (c0 + offs_n < L_SEL)[None, :])
            p, alpha, m_new, l_i = _softmax_step(tl.where(ok, s, float("-inf")), m_i, l_i)
            if USE_DESC:
                v = tl.reshape(V.load([b.to(tl.int32), s0.to(tl.int32), h, 0]), [BLOCK_N, DV])
            else:
                v = tl.load(v_base + s0 * stride_vt + v_rows,
                            mask=dv_ok & (kpos[:, None] < T), other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    # base-2 log-sum-exp per row for the backward (+inf: no selected key visible)
    lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
    _sel_epilogue(
        o, lse, b, t0, p_loc, t_row, row_ok, hq, O, OB, OC, OW, GS, GC, GW, LSE,
        stride_ob, stride_ot, stride_oh, stride_bb, stride_bt, stride_bh,
        stride_cb, stride_ct, stride_ch, stride_wb, stride_wt, stride_wh,
        stride_gsb, stride_gst, stride_gsh, stride_gcb, stride_gct, stride_gch,
        stride_gwb, stride_gwt, stride_gwh, stride_lb, stride_lh,
        DV, D_V, WRITE_OUT, WRITE_BRANCH, HAS_CMP, HAS_WIN, STORE_LSE)


@triton.jit
def _entry_keys(e_base, start, end, p_loc, g_loc, G: tl.constexpr):
    """(rows in use, sort keys) of the block kernel's step over entries start + p_loc."""
    e = start + p_loc
    ok = (g_loc < G) & (e < end)
    return ok, tl.load(e_base + e, mask=ok, other=0)


@triton.jit
def _entry_rows(key, ok, key0, q_base, hq, offs_dk, dk_ok, stride_qt, stride_qh,
                N_SEL: tl.constexpr):
    """(entry t * n + j within its block, the gathered query rows of position t) of the
    block kernel's step, from the sort keys ``key`` of block key0 / E."""
    ent = tl.where(ok, key.to(tl.int64) - key0, 0).to(tl.int32)
    q = tl.load(q_base + ((ent // N_SEL) * stride_qt + hq * stride_qh)[:, None]
                + offs_dk[None, :], mask=ok[:, None] & dk_ok, other=0.0)
    return ent, q


@triton.jit
def _entry_q2(ent, ok, q_base, hq, offs_dk2, dk2_ok, stride_qt, stride_qh,
              N_SEL: tl.constexpr):
    """The gathered query rows' second head-dim tile (columns ``offs_dk2``, already offset
    by the first tile's width) for entries ``ent`` of :func:`_entry_rows`."""
    return tl.load(q_base + ((ent // N_SEL) * stride_qt + hq * stride_qh)[:, None]
                   + offs_dk2[None, :], mask=ok[:, None] & dk2_ok, other=0.0)


@triton.jit
def _sel_fwd_blocks_kernel(
    Q, K, V, KEYS, OFF, PO, PL,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_eb, stride_eh,
    stride_fb, stride_fh,
    stride_pb, stride_pt, stride_ph, stride_pj, stride_pg,
    stride_lb, stride_lt, stride_lh, stride_lj,
    T, NB, E, qk_scale,
    G: tl.constexpr, GP2: tl.constexpr, PP: tl.constexpr, SEG: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    L_SEL: tl.constexpr, BLOCK_N: tl.constexpr, N_SEL: tl.constexpr,
    DOT_PREC: tl.constexpr, PREFETCH: tl.constexpr, DK2: tl.constexpr = 0,
):
    """Block-centric selected attention over the selection's entries sorted by block
    (``KEYS`` = block * E + t * n + j, ``OFF`` = each block's first entry; see
    :func:`nsa.ops.selection.launch.entries_by_block`). One program per (SEG consecutive
    sorted entries, KV head, batch): for each block its range touches, it reads the
    block's keys and values once and, PP positions (PP x GP2 rows) at a time, gathers the
    G query heads of each position, attends to the block (causal inside it) and stores the
    normalised partial output and its base-2 log-sum-exp in the position's slot j (its
    j-th selected block) of PO / PL. :func:`_sel_merge_kernel` then combines the slots.
    ``DK2 > 0``: q/k columns DK .. DK + DK2 as a second tile (d_k = 192: 128 + 64)."""
    BLOCK_M: tl.constexpr = PP * GP2
    NSUB: tl.constexpr = (L_SEL + BLOCK_N - 1) // BLOCK_N
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    f_base = OFF + b * stride_fb + h * stride_fh
    lo = tl.program_id(0) * SEG
    hi = tl.minimum(lo + SEG, tl.load(f_base + NB))  # entries past OFF[NB] are unused slots
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, DK)
    offs_dv = tl.arange(0, DV)
    p_loc, g_loc, hq = _group_rows(h, G, GP2, PP)
    dk_ok = offs_dk[None, :] < D_K
    dv_ok = offs_dv[None, :] < D_V
    if DK2 > 0:
        offs_dk2 = DK + tl.arange(0, DK2)
        dk2_ok = offs_dk2[None, :] < D_K
    e_base = KEYS + b * stride_eb + h * stride_eh
    # query rows: 32-bit offsets within one batch element (the launcher checks)
    q_base = Q + b * stride_qb
    cur = lo
    while cur < hi:
        blk = (tl.load(e_base + cur).to(tl.int64) // E).to(tl.int32)
        end = tl.minimum(hi, tl.load(f_base + blk + 1))
        k_base = K + b * stride_kb + h * stride_kh + (blk * L_SEL).to(tl.int64) * stride_kt
        v_base = V + b * stride_vb + h * stride_vh + (blk * L_SEL).to(tl.int64) * stride_vt
        if NSUB == 1:  # the block's keys/values once per block
            key_ok = (blk * L_SEL + offs_n < T) & (offs_n < L_SEL)
            k = tl.load(k_base + (offs_n * stride_kt)[:, None] + offs_dk[None, :],
                        mask=key_ok[:, None] & dk_ok, other=0.0)
            v = tl.load(v_base + (offs_n * stride_vt)[:, None] + offs_dv[None, :],
                        mask=key_ok[:, None] & dv_ok, other=0.0)
            if DK2 > 0:
                k2 = tl.load(k_base + (offs_n * stride_kt)[:, None] + offs_dk2[None, :],
                             mask=key_ok[:, None] & dk2_ok, other=0.0)
        key0 = blk.to(tl.int64) * E
        if PREFETCH:
            # the first step's rows, and the second step's keys
            ok_c, key_c = _entry_keys(e_base, cur, end, p_loc, g_loc, G)
            ent_c, q_c = _entry_rows(key_c, ok_c, key0, q_base, hq, offs_dk, dk_ok,
                                     stride_qt, stride_qh, N_SEL)
            if DK2 > 0:
                q2_c = _entry_q2(ent_c, ok_c, q_base, hq, offs_dk2, dk2_ok, stride_qt,
                                 stride_qh, N_SEL)
            ok_n, key_n = _entry_keys(e_base, cur + PP, end, p_loc, g_loc, G)
        for p0 in range(cur, end, PP):
            if PREFETCH:
                # this step's rows were loaded a step ago; issue the next step's query rows
                # (their keys arrived a step ago) and the keys of the step after it, so the
                # gathers' latency overlaps this step's dots
                row_ok = ok_c
                ent = ent_c
                q = q_c
                if DK2 > 0:
                    q2 = q2_c
                ok_c = ok_n
                ent_c, q_c = _entry_rows(key_n, ok_n, key0, q_base, hq, offs_dk, dk_ok,
                                         stride_qt, stride_qh, N_SEL)
                if DK2 > 0:
                    q2_c = _entry_q2(ent_c, ok_c, q_base, hq, offs_dk2, dk2_ok, stride_qt,
                                     stride_qh, N_SEL)
                ok_n, key_n = _entry_keys(e_base, p0 + 2 * PP, end, p_loc, g_loc, G)
            else:
                row_ok, key = _entry_keys(e_base, p0, end, p_loc, g_loc, G)
                ent, q = _entry_rows(key, row_ok, key0, q_base, hq, offs_dk, dk_ok,
                                     stride_qt, stride_qh, N_SEL)
                if DK2 > 0:
                    q2 = _entry_q2(ent, row_ok, q_base, hq, offs_dk2, dk2_ok, stride_qt,
                                   stride_qh, N_SEL)
            t = ent // N_SEL  # the query position and its slot j
            j = ent % N_SEL
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, DV], tl.float32)
            for c0 in tl.static_range(0, L_SEL, BLOCK_N):
                kpos = blk * L_SEL + c0 + offs_n
                if NSUB > 1:  # sub-tiles (re)loaded per chunk of positions
                    key_ok = (kpos < T) & (c0 + offs_n < L_SEL)
                    k = tl.load(k_base + ((c0 + offs_n) * stride_kt)[:, None] + offs_dk[None, :],
                                mask=key_ok[:, None] & dk_ok, other=0.0)
                    v = tl.load(v_base + ((c0 + offs_n) * stride_vt)[:, None] + offs_dv[None, :],
                                mask=key_ok[:, None] & dv_ok, other=0.0)
                    if DK2 > 0:
                        k2 = tl.load(k_base + ((c0 + offs_n) * stride_kt)[:, None]
                                     + offs_dk2[None, :], mask=key_ok[:, None] & dk2_ok,
                                     other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
                if DK2 > 0:
                    s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)
                s = s * qk_scale
                ok = row_ok[:, None] & key_ok[None, :] & (kpos[None, :] <= t[:, None])
                p, alpha, m_new, l_i = _softmax_step(tl.where(ok, s, float("-inf")), m_i, l_i)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
                m_i = m_new
            # l_i = 0 only for a block wholly after its position (given indices): its
            # partial gets weight 0 in the merge
            l_safe = tl.where(l_i > 0, l_i, 1.0)
            o = acc / l_safe[:, None]
            lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("-inf"))
            t64 = t.to(tl.int64)
            po = (PO + b * stride_pb + t64 * stride_pt + h * stride_ph + j * stride_pj
                  + g_loc * stride_pg)
            tl.store(po[:, None] + offs_dv[None, :], o.to(PO.dtype.element_ty),
                     mask=row_ok[:, None] & dv_ok)
            pl = PL + b * stride_lb + t64 * stride_lt + h * stride_lh + j * stride_lj + g_loc
            tl.store(pl, lse, mask=row_ok)
        cur = end


@triton.jit
def _sel_merge_kernel(
    PO, PL, IDX, O, OB, OC, OW, GS, GC, GW, LSE,
    stride_pb, stride_pt, stride_ph, stride_pj, stride_pg,
    stride_xb, stride_xt, stride_xh, stride_xj,
    stride_ib, stride_it, stride_ih,
    stride_ob, stride_ot, stride_oh,
    stride_bb, stride_bt, stride_bh,
    stride_cb, stride_ct, stride_ch,
    stride_wb, stride_wt, stride_wh,
    stride_gsb, stride_gst, stride_gsh,
    stride_gcb, stride_gct, stride_gch,
    stride_gwb, stride_gwt, stride_gwh,
    stride_lb, stride_lh,
    T,
    G: tl.constexpr, GP2: tl.constexpr, PP: tl.constexpr, DV: tl.constexpr,
    D_V: tl.constexpr, N_SEL: tl.constexpr, NJ: tl.constexpr,
    WRITE_OUT: tl.constexpr, WRITE_BRANCH: tl.constexpr,
    HAS_CMP: tl.constexpr, HAS_WIN: tl.constexpr, STORE_LSE: tl.constexpr,
):
    """O_sel of every row from its n block partials (slots whose index is -1 are never
    read): every slot's log-sum-exp first, each partial's weight against the row's
    largest, then the weighted sum in slot order (no rescaling inside the loop, so its
    partial loads pipeline; a slot of weight 0 is not read), then the same stores as the
    group-centric kernel (:func:`_sel_epilogue`). NJ = N_SEL rounded up to a power of
    two."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t0 = tile * PP
    p_loc, t_row, row_ok, hq = _tile_rows(t0, h, T, G, GP2, PP)
    g_loc = hq - h * G
    offs_dv = tl.arange(0, DV)
    dv_ok = offs_dv[None, :] < D_V
    t64 = t_row.to(tl.int64)
    i_row = IDX + b * stride_ib + t64 * stride_it + h * stride_ih
    po_row = PO + b * stride_pb + t64 * stride_pt + h * stride_ph + g_loc * stride_pg
    pl_row = PL + b * stride_xb + t64 * stride_xt + h * stride_xh + g_loc
    # every slot's index and log-sum-exp first, the weights against the row's maximum,
    # then the partials: the loop carries no rescale, so its loads pipeline
    offs_j = tl.arange(0, NJ)
    j_ok = row_ok[:, None] & (offs_j[None, :] < N_SEL)
    live_j = j_ok & (tl.load(i_row[:, None] + offs_j[None, :], mask=j_ok, other=-1) >= 0)
    l_all = tl.load(pl_row[:, None] + offs_j[None, :] * stride_xj, mask=live_j,
                    other=float("-inf"))
    m_i = tl.max(l_all, 1)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    w_all = tl.math.exp2(l_all - m_safe[:, None])
    l_i = tl.sum(w_all, 1)
    acc = tl.zeros([PP * GP2, DV], tl.float32)
    for j in range(N_SEL):
        w = tl.sum(tl.where(offs_j[None, :] == j, w_all, 0.0), 1)
        oj = tl.load(po_row[:, None] + j * stride_pj + offs_dv[None, :],
                     mask=(w > 0)[:, None] & dv_ok, other=0.0).to(tl.float32)
        acc += oj * w[:, None]
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
    _sel_epilogue(
        o, lse, b, t0, p_loc, t_row, row_ok, hq, O, OB, OC, OW, GS, GC, GW, LSE,
        stride_ob, stride_ot, stride_oh, stride_bb, stride_bt, stride_bh,
        stride_cb, stride_ct, stride_ch, stride_wb, stride_wt, stride_wh,
        stride_gsb, stride_gst, stride_gsh, stride_gcb, stride_gct, stride_gch,
        stride_gwb, stride_gwt, stride_gwh, stride_lb, stride_lh,
        DV, D_V, WRITE_OUT, WRITE_BRANCH, HAS_CMP, HAS_WIN, STORE_LSE)
