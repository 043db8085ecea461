"""Block index of the selected forward (entries grouped by block): variants of the count
and place kernels timed side by side, results checked against the sorted index.

    python scripts/gpu_index_tune.py                 # T = 16k, 32k, G = 1 (H = 4)
    python scripts/gpu_index_tune.py --smoke         # CPU interpreter, tiny shapes

Paper shape (H=4, l=32, d=16, l'=64, n=16), indices from the top-n of real block scores
(random inputs). Variants: count by one atomic per entry (default), by one atomic per
bin of the program's histogram (``tl.histogram``), or with the program's local blocks
summed first; place by one atomic per entry (default) or with the local blocks' slots
taken once per program (ranks by cumsum).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
if "--smoke" in sys.argv:  # before the kernels below are defined
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from nsa.ops.selection.kernels import _entry_bins  # noqa: E402


@triton.jit
def _near(E, NB, N_SEL: tl.constexpr, BLOCK: tl.constexpr, L_SEL: tl.constexpr,
          N_LOCAL: tl.constexpr):
    """The program's first local block (>= 1) and its last block."""
    e0 = tl.program_id(0) * BLOCK
    t0 = e0 // N_SEL
    t1 = (tl.minimum(e0 + BLOCK, E) - 1) // N_SEL
    lo = tl.maximum(t0 // L_SEL - N_LOCAL + 1, 1)
    hi = tl.minimum(t1 // L_SEL, NB - 1)
    return lo, hi


@triton.jit
def _count_var(
    IDX, CNT, stride_ib, stride_it, stride_ih, stride_cb, stride_ch,
    E, NB, N_SEL: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr, NBP: tl.constexpr,
    L_SEL: tl.constexpr, N_LOCAL: tl.constexpr, NEAR: tl.constexpr,
):
    e, ok, bn = _entry_bins(IDX, stride_ib, stride_it, stride_ih, E, NB, N_SEL, BLOCK)
    c_base = CNT + tl.program_id(2).to(tl.int64) * stride_cb + tl.program_id(1) * stride_ch
    if MODE == 2:  # one atomic per nonzero bin of the program's histogram
        h = tl.histogram(bn, NBP, mask=ok)
        c = tl.arange(0, NBP)
        tl.atomic_add(c_base + c, h, mask=(h > 0) & (c <= NB), sem="relaxed")
    else:
        first = ok & (bn == 0)
        unused = ok & (bn == NB)
        tl.atomic_add(c_base, tl.sum(first.to(tl.int32)), sem="relaxed")
        tl.atomic_add(c_base + NB, tl.sum(unused.to(tl.int32)), sem="relaxed")
        rest = ok & ~first & ~unused
        if MODE == 1:  # local blocks summed per program
            lo, hi = _near(E, NB, N_SEL, BLOCK, L_SEL, N_LOCAL)
            for k in tl.static_range(NEAR):
                m = rest & (bn == lo + k)
                tl.atomic_add(c_base + lo + k, tl.sum(m.to(tl.int32)), mask=lo + k <= hi,
                              sem="relaxed")
            rest = rest & ((bn < lo) | (bn > hi))
        tl.atomic_add(c_base + bn, tl.full([BLOCK], 1, tl.int32), mask=rest, sem="relaxed")


@triton.jit
def _place_var(
    IDX, CUR, KEYS, stride_ib, stride_it, stride_ih, stride_cb, stride_ch,
    stride_kb, stride_kh, E, NB, SPAN, N_SEL: tl.constexpr, BLOCK: tl.constexpr,
    MODE: tl.constexpr, L_SEL: tl.constexpr, N_LOCAL: tl.constexpr, NEAR: tl.constexpr,
):
    e, ok, bn = _entry_bins(IDX, stride_ib, stride_it, stride_ih, E, NB, N_SEL, BLOCK)
    b = tl.program_id(2).to(tl.int64)
    c_base = CUR + b * stride_cb + tl.program_id(1) * stride_ch
    first = ok & (bn == 0)
    unused = ok & (bn == NB)
    base0 = tl.atomic_add(c_base, tl.sum(first.to(tl.int32)), sem="relaxed")
    base_n = tl.atomic_add(c_base + NB, tl.sum(unused.to(tl.int32)), sem="relaxed")
    rest = ok & ~first & ~unused
    slot = tl.zeros([BLOCK], tl.int32)
    if MODE == 1:
        lo, hi = _near(E, NB, N_SEL, BLOCK, L_SEL, N_LOCAL)
        for k in tl.static_range(NEAR):
            m = rest & (bn == lo + k)
            mi = m.to(tl.int32)
            base = tl.atomic_add(c_base + lo + k, tl.sum(mi), mask=lo + k <= hi,
                                 sem="relaxed")
            slot = tl.where(m, base + tl.cumsum(mi, 0) - 1, slot)
        rest = rest & ((bn < lo) | (bn > hi))
    slot_r = tl.atomic_add(c_base + bn, tl.full([BLOCK], 1, tl.int32), mask=rest,
                           sem="relaxed")
    slot = tl.where(rest, slot_r, slot)
    slot = tl.where(first, base0 + tl.cumsum(first.to(tl.int32), 0) - 1, slot)
    slot = tl.where(unused, base_n + tl.cumsum(unused.to(tl.int32), 0) - 1, slot)
    kdt = KEYS.dtype.element_ty
    tl.store(KEYS + b * stride_kb + tl.program_id(1) * stride_kh + slot,
             bn.to(kdt) * SPAN + e.to(kdt), mask=ok)


def grouped(idx, nb, count_mode, place_mode, cfg, parts=None):
    """(keys, off) like ``entries_grouped_by_block`` with the chosen kernel variants;
    ``parts`` (a dict) gets the three launches as separate callables for timing."""
    import torch

    from nsa.ops.selection.kernels import _entry_offsets_kernel
    from nsa.ops.selection.launch import KEY32_LIMIT

    B, T, H, n = idx.shape
    E = T * n
    kdt = torch.int32 if (nb + 1) * E < KEY32_LIMIT else torch.int64
    cnt = torch.zeros(B, H, nb + 1, device=idx.device, dtype=torch.int32)
    off = torch.empty_like(cnt)
    keys = torch.empty(B, H, E, device=idx.device, dtype=kdt)
    blk = 1024
    grid = (triton.cdiv(E, blk), H, B)
    st = (idx.stride(0), idx.stride(1), idx.stride(2))
    near = ((blk // n) - 1) // cfg.l_sel + 1 + cfg.n_local
    kw = dict(L_SEL=cfg.l_sel, N_LOCAL=cfg.n_local, NEAR=near)

    def count():
        _count_var[grid](idx, cnt, *st, cnt.stride(0), cnt.stride(1), E, nb, N_SEL=n,
                         BLOCK=blk, MODE=count_mode, NBP=triton.next_power_of_2(nb + 1),
                         num_warps=4, **kw)

    def offsets():
        _entry_offsets_kernel[(H, B)](cnt, off, cnt.stride(0), cnt.stride(1),
                                      off.stride(0), off.stride(1), nb, BLOCK=1024,
                                      num_warps=4)

    def place():
        _place_var[grid](idx, cnt, keys, *st, cnt.stride(0), cnt.stride(1),
                         keys.stride(0), keys.stride(1), E, nb, E, N_SEL=n, BLOCK=blk,
                         MODE=place_mode, num_warps=4, **kw)

    cnt.zero_()
    count()
    offsets()
    place()
    if parts is not None:
        # offsets and place consume the counts, so they are timed after a fresh count
        parts.update(count=lambda: (cnt.zero_(), count()),
                     offsets=lambda: (cnt.zero_(), count(), offsets()))
    return keys, off


def main() -> None:
    import gpu_check_forward as cf  # scripts/ is sys.path[0] when run as a script

    args, cfg, H, d, Ts, groups = cf.tuning_setup(__doc__, "16384,32768", "1", 2, [1])
    import torch

    import nsa.ops.selection.launch as SL
    from nsa.ops.selection import select_topn
    from nsa.ops.selection.launch import entries_by_block

    gpu = torch.cuda.get_device_name() if cf.DEVICE == "cuda" else "cpu (smoke)"
    print(f"GPU: {gpu}; torch {torch.__version__}", flush=True)
    rows = []
    for T in Ts:
        for G in groups:
            scores, N = cf.block_scores(T, G, H, d, cfg)
            idx = select_topn(scores, T, N, cfg)
            nb = triton.cdiv(T, cfg.l_sel)
            cap = SL.COUNT_INDEX_MAX_BYTES
            SL.COUNT_INDEX_MAX_BYTES = 0
            want_keys, want_off = entries_by_block(idx, nb)
            rows.append((T, G, "torch.sort", cf.bench(lambda i=idx, c=nb: entries_by_block(i, c)),
                         "", "", ""))
            SL.COUNT_INDEX_MAX_BYTES = 1 << 40
            tile0, scan0, bins0 = SL.COUNT_INDEX_TILE, SL.COUNT_INDEX_SCAN, SL.COUNT_INDEX_MAX_BINS
            SL.COUNT_INDEX_MAX_BINS = 1 << 20
            for tile, scan in ((tile0, scan0), (256, (64, 32)), (256, (256, 16)), (512, (64, 32)),
                               (1024, (64, 32)), (1024, (256, 16)),
                               (2048, (64, 32))):
                SL.COUNT_INDEX_TILE, SL.COUNT_INDEX_SCAN = tile, scan
                keys, off = entries_by_block(idx, nb)
                if not (torch.equal(keys, want_keys) and torch.equal(off, want_off)):
                    raise SystemExit(f"counting sort, tile {tile}, differs at T={T}")
                fn = lambda i=idx, c=nb: entries_by_block(i, c)  # noqa: E731
                rows.append((T, G, f"counting, tile {tile} scan {scan[0]}x{scan[1]}",
                             cf.bench(fn), cf.graph_bench(fn) if cf.DEVICE == "cuda" else "",
                             "", ""))
            SL.COUNT_INDEX_TILE, SL.COUNT_INDEX_SCAN = tile0, scan0
            SL.COUNT_INDEX_MAX_BYTES, SL.COUNT_INDEX_MAX_BINS = cap, bins0
            for cm, pm in ((0, 0), (1, 1), (2, 1), (2, 0)):
                parts = {}
                keys, off = grouped(idx, nb, cm, pm, cfg, parts)
                ok = torch.equal(off, want_off) and torch.equal(keys.sort(-1)[0], want_keys)
                if not ok:
                    raise SystemExit(f"variant count {cm} place {pm} differs at T={T}")
                tot = cf.bench(lambda i=idx, c=nb, a=cm, p=pm: grouped(i, c, a, p, cfg))
                t_c, t_co = cf.bench(parts["count"]), cf.bench(parts["offsets"])
                rows.append((T, G, f"count {cm} place {pm}", tot, t_c, t_co - t_c,
                             tot - t_co))
    print("\nvariant times, ms (atomic variants, grouped in no fixed order: count 0 "
          "atomic per entry, 1 local blocks summed, 2 histogram; place 0 atomic per entry, "
          "1 local blocks summed; offsets and place: differences of cumulative times)")
    print("counting rows: total by do_bench, then the graph-replayed GPU time in 'count'")
    print(f"{'T':>6} {'G':>3} {'variant':<32} {'total':>8} {'count':>8} {'offsets':>8} "
          f"{'place':>8}")
    for T, G, name, tot, *p in rows:
        ps = " ".join(f"{x:8.4f}" if x != "" else f"{'':8}" for x in p)
        print(f"{T:6d} {G:3d} {name:<32} {tot:8.4f} {ps}")


if __name__ == "__main__":
    main()
