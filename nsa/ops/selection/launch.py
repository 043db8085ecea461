"""Raw launchers of the selection kernels: top-n block choice and selected attention."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from nsa.config import NSAConfig
from nsa.ops.compression.launch import (
    LOG2E,
    cdiv,
    dot_precision,
    head_dim_split,
    head_dim_tile,
    interpreting,
    last_dim_contiguous,
    next_pow2,
    rows_per_position,
    shrink_on_oor,
)
from nsa.ops.descriptors import kv_desc, resolve_desc
from nsa.ops.selection.kernels import (
    _entry_hist_kernel,
    _entry_keys_kernel,
    _entry_offsets_kernel,
    _entry_place_kernel,
    _entry_scan_kernel,
    _sel_fwd_blocks_kernel,
    _sel_fwd_kernel,
    _sel_merge_kernel,
    _topn_kernel,
)
from nsa.policy import SEL_BLOCK_MAX_G, SEL_BLOCK_MAX_PARTIAL_BYTES, SEL_MODES, sel_mode_env

# Programmatic override of sel_forward's mode (tests, tuning scripts): "group" or "block"
# forces it; None defers to NSA_SEL_MODE, then to auto_sel_mode. Read at every launch.
SEL_MODE: str | None = None
# the block path's merge tile, (rows, pipeline stages); None: the defaults (tuning)
MERGE_TILE: tuple[int, int] | None = None
# the block kernel gathers the next step's query rows during this step's dots: True /
# False force it; None: the measured rule (at head dims <= 128, except where the group
# rounds up to 2 heads). The 41 GPU forward and backward tests pass with the rule (H200);
# the CPU tests check it bit for bit against the plain gather
BLOCK_PREFETCH: bool | None = None
# tests: fill the counting sort's table with this value before its kernels run
INDEX_TABLE_FILL: int | None = None
# tests: fill the partial buffers with this value before the kernels run (None: no fill)
PARTIAL_FILL: float | None = None
# entries_by_block sorts by counting while its table of per-tile bin counts, B * H *
# (tiles + 1) * (blocks + 1) int32, takes at most this many bytes, by torch.sort above
# (tests lower it to reach both); in the CPU interpreter also only while the blocks + 1
# bins fit COUNT_INDEX_MAX_BINS (its tile histograms cost time in proportion to the bins)
COUNT_INDEX_MAX_BYTES = 1 << 28
COUNT_INDEX_MAX_BINS = 1024
# entries per tile of the counting sort (the count table has one row per tile), and the
# scan's (rows, bins) per step. H200, G = 1, graph replays at 16k / 32k / 64k: tiles of
# 512 with 256 x 16 steps 0.052 / 0.090 / 0.184 ms, of 1024 0.084 / 0.153 / 0.295, of 256
# 0.053 / 0.094 / 0.223 (torch.sort, wall: 0.154 / 0.250 / 0.448)
COUNT_INDEX_TILE = 512
COUNT_INDEX_SCAN = (256, 16)
# count and rank inside a tile by tl.sort (None: on the GPU; the CPU interpreter runs a
# sort element by element, so it takes tl.histogram and pairwise compares instead; tests
# force the sort on tiny inputs)
COUNT_INDEX_SORT: bool | None = None
# sort keys of the block-centric paths are int32 below this bound, int64 from it (tests
# lower it to reach the int64 paths, which real inputs take from T ~ 370k at l' = 64)
KEY32_LIMIT = 2**31


def select_topn(
    scores: Tensor, T: int, N: int, cfg: NSAConfig, *, out: Tensor | None = None,
    rows: int | None = None, chunk: int | None = None, warps: int | None = None,
) -> Tensor:
    """Top-n blocks per (query, KV head) from group scores, canonical order, on the device.

    scores: [B, H, T, >= ceil(T / l_sel)] float32 group block scores (Eq. 10), read only
    where a query can have a nonzero score (see :func:`nsa.ops.compression.cmp_forward`);
    N: number of compressed tokens (visibility is min(N, N_cmp(t))).
    Returns int32 [B, T, H, n]: ascending block indices, -1 last, identical to
    ``reference.select_blocks`` on the same scores (forced initial/local blocks, ties to
    the lower index).
    """
    B, H = scores.shape[0], scores.shape[1]
    n_free = cfg.n - cfg.n_initial - cfg.n_local
    P = next_pow2(max(cfg.n_initial + cfg.n_local, n_free, 1))
    if out is None:
        out = torch.empty(B, T, H, cfg.n, device=scores.device, dtype=torch.int32)
    on_gpu = scores.device.type == "cuda"
    # H200, 64k (16k): 4 rows in chunks of 32 on one warp 1.05 ms (0.14); 8 rows in
    # chunks of 128 on 4 warps 2.53 (0.33); other tiles in docs/perf-notes.md. The CPU
    # interpreter pays per operation, so it takes wide tiles
    rows = rows or (4 if on_gpu else 32)
    chunk = chunk or (32 if on_gpu else 64)
    warps = warps or (1 if on_gpu else 4)
    grid = (cdiv(T, rows), H, B)
    _topn_kernel[grid](
        scores, out,
        scores.stride(0), scores.stride(1), scores.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        T, N,
        CMP_L=cfg.l, CMP_D=cfg.d, L_SEL=cfg.l_sel,
        SEL_B=cfg.l_sel // cfg.d, SEL_A=cfg.l // cfg.d,
        N_SEL=cfg.n, N_INIT=cfg.n_initial, N_LOCAL=cfg.n_local,
        K_FREE=n_free, P=P, NOUT=next_pow2(cfg.n), ROWS=rows, CH=chunk,
        num_warps=warps, num_stages=1,
    )
    return out


def one_position_warps(pp: int, DK: int, DV: int, on_cuda: bool, warps: int, *,
                       up_to: int = 128) -> int:
    """Warps of a group-centric selected kernel (forward or dQ): 2 where a program holds
    one position (G >= 16) and the head-dim tiles are at most ``up_to`` wide, on CUDA;
    else ``warps``. H200, paper shape, 64k: forward 17.1 ms against 17.6 on 4 warps; dQ
    16.07 against 17.49 (8 warps 22.79), the same dQ bit for bit. Past 128 columns (16k,
    2 stages; the forward passes ``up_to=256``): forward d_k = 192 9.64 ms on 2 warps
    against 10.49 on 4, d_k = 256 8.33 against 8.19; dQ d_k = 192 13.70 against 10.07."""
    return 2 if pp == 1 and max(DK, DV) <= up_to and on_cuda else warps


def _sel_config(DK: int, DV: int, L_SEL: int, device: torch.device, desc: bool):
    """(BLOCK_N, num_warps, num_stages): BLOCK_N keys of a selected block per dot."""
    block = max(16, next_pow2(L_SEL))  # keys past the block's end are masked
    if device.type != "cuda":
        return min(block, 64), 4, 1
    if max(DK, DV) <= 128:
        # descriptor loads, H200, 64k: 2 warps 2 stages 14.5 ms (G=16) / 12.1 (G=4) / 10.1
        # (G=1); 3 stages 14.6 / 11.9 / 10.4; 4 warps 16.3 / 12.9 / 10.7
        return (min(block, 64), 2, 2) if desc else (min(block, 64), 4, 3)
    # past 128 columns (32-key tiles): 2 stages keep a program at ~73 KB of shared memory
    # (3 stages: 137 KB, one program per SM). H200, 16k, G = 16 (scripts/
    # gpu_wide_head_tune.py): d_k = 192 9.72 ms on 2 warps / 2 stages, 10.49 on 4 / 2,
    # 15.96 on 4 / 3 (the default before); d_k = 256 8.38 / 8.19
    return min(block, 32), 4, 2


def tuning_tile(who: str, name: str, value: int) -> int:
    """A keys-per-dot tuning argument, checked: a power of two of at least 16."""
    if value < 16 or value & (value - 1):
        raise ValueError(f"{who}: {name} must be a power of two >= 16, got {value}")
    return value


def sel_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_indices: Tensor,
    cfg: NSAConfig,
    scale: float,
    *,
    o_branch: Tensor | None = None,
    out: Tensor | None = None,
    g_sel: Tensor | None = None,
    o_cmp: Tensor | None = None,
    g_cmp: Tensor | None = None,
    o_win: Tensor | None = None,
    g_win: Tensor | None = None,
    lse: Tensor | None = None,
    positions_per_program: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_desc: bool | None = None,
    mode: str | None = None,
    block_rows: int | None = None,
    seg_len: int | None = None,
    partial_dtype: torch.dtype | None = None,
    block_n: int | None = None,
    before_combine: Callable[[], None] | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Selected-block attention, optionally fused with the gate combine.

    q [B, T, HQ, d_k]; k/v [B, T, H, d_k/d_v]; block_indices int [B, T, H, n] canonical
    (ascending, deduplicated, -1 last; as ``select_topn`` writes them).
    ``o_branch`` (allocated if None and ``g_sel`` is None): ungated O_sel [B, T, HQ, d_v].
    With ``g_sel`` given, also writes ``out`` = g_sel*O_sel (+ g_cmp*o_cmp) (+ g_win*o_win)
    in q's dtype. Returns (o_branch or None, out or None).
    ``lse``: optional float32 [B, HQ, T] (last dim contiguous) that receives the base-2
    log-sum-exp of every row (for the backward).
    ``positions_per_program``: query positions packed into one program (default
    max(1, 16 // GP2): every dot has at least 16 rows). ``num_warps``/``num_stages``
    override the launch config (for tuning runs). ``use_desc``: load the selected key and
    value tiles as bulk tensor copies through tensor descriptors (None:
    :func:`nsa.ops.descriptors.resolve_desc` decides).
    ``mode``: "group" (group-centric: each position streams its n blocks) or "block"
    (block-centric: each selected block is read once by the programs of the positions that
    chose it, which write per-block partials that a second kernel merges; see
    :func:`sel_forward_mode` for the default). ``block_rows``, ``seg_len``,
    ``partial_dtype``: the block path's rows per dot, positions per program and partial
    output dtype (tuning runs; defaults measured). ``block_n``: the group path's keys per
    dot (a power of two of at least 16; tuning runs). ``before_combine``: called right
    before the launch that reads ``o_cmp``/``o_win`` (the caller's stream join when a
    branch was computed on another CUDA stream).
    """
    q, k, v = map(last_dim_contiguous, (q, k, v))
    B, T, HQ, d_k = q.shape
    H, d_v = k.shape[2], v.shape[-1]
    G = HQ // H
    GP2 = rows_per_position(G)
    PP = positions_per_program or max(1, 16 // GP2)
    if PP & (PP - 1):
        raise ValueError(f"sel_forward: positions_per_program must be a power of two, got {PP}")
    DV = head_dim_tile(d_v)
    # a head dim as two tiles where that pads less (d_k = 192: 128 + 64)
    DK, DK2 = head_dim_split(d_k)
    write_out = g_sel is not None
    if not write_out and o_branch is None:
        o_branch = torch.empty(B, T, HQ, d_v, device=q.device, dtype=q.dtype)
    if write_out and out is None:
        out = torch.empty(B, T, HQ, d_v, device=q.device, dtype=q.dtype)
    mode = sel_forward_mode(q, d_v, H, block_indices.shape[-1], mode)
    if mode == "block":
        _sel_forward_blocks(q, k, v, block_indices, cfg, scale, o_branch, out, g_sel, o_cmp,
                            g_cmp, o_win, g_win, lse, block_rows=block_rows, seg_len=seg_len,
                            partial_dtype=partial_dtype, num_warps=num_warps,
                            num_stages=num_stages, before_combine=before_combine)
        return o_branch, out
    use_desc = resolve_desc("sel_forward", use_desc, k, v, DK + DK2, DV)
    bn, warps, stages = _sel_config(DK, DV, cfg.l_sel, q.device, use_desc)
    if block_n is not None:
        bn = tuning_tile("sel_forward", "block_n", block_n)
    # one position per program (G >= 16): 2 warps share the softmax reductions with less
    # traffic than 4
    warps = one_position_warps(PP, DK, DV, q.device.type == "cuda", warps, up_to=256)
    warps, stages = num_warps or warps, num_stages or stages
    ptrs, strides, flags = _epilogue_args(q, out, o_branch, o_cmp, o_win, g_sel, g_cmp, g_win,
                                          lse)

    if before_combine is not None:
        before_combine()

    def launch(_bm, stages_):
        kd, vd = ((kv_desc(k, T, bn, DK), kv_desc(v, T, bn, DV)) if use_desc else (k, v))
        kd2 = kv_desc(k, T, bn, DK2) if use_desc and DK2 else kd
        _sel_fwd_kernel[(cdiv(T, PP), H, B)](
            q, kd, kd2, vd, block_indices, *ptrs,
            *_t3(q), *_t3(k), *_t3(v), *_t3(block_indices), *strides,
            T, scale * LOG2E,
            G=G, GP2=GP2, PP=PP, DK=DK, DV=DV, D_K=d_k, D_V=d_v,
            L_SEL=cfg.l_sel, BLOCK_N=bn, N_SEL=block_indices.shape[-1],
            NP=next_pow2(block_indices.shape[-1]), DOT_PREC=dot_precision(q.dtype, q.device),
            USE_DESC=use_desc, DK2=DK2, num_warps=warps, num_stages=stages_, **flags,
        )

    shrink_on_oor(launch, 16, stages, 16)
    return o_branch, out


def _partial_bytes(q: Tensor, d_v: int, H: int, n: int, dtype: torch.dtype) -> int:
    B, T, HQ, _ = q.shape
    return B * T * H * n * (HQ // H) * (d_v * dtype.itemsize + 4)


def auto_sel_mode(G: int, on_gpu: bool, partial_bytes: int) -> str:
    """The measured default path: "block" on the GPU for G <= SEL_BLOCK_MAX_G while its
    partials fit SEL_BLOCK_MAX_PARTIAL_BYTES (:mod:`nsa.policy`), else "group" (the CPU
    interpreter keeps the group path unless asked; the group path needs no scratch).
    H200, paper shape but G, selected forward + combine at 64k: group 10.0 / 10.9 / 12.1 /
    12.7 / 14.1 ms against block 1.9 / 3.5 / 6.1 / 10.8 / 17.8 ms for G = 1 / 2 / 4 / 8 /
    16 (docs/perf-notes.md)."""
    if on_gpu and G <= SEL_BLOCK_MAX_G and partial_bytes <= SEL_BLOCK_MAX_PARTIAL_BYTES:
        return "block"
    return "group"


def forced_sel_mode(mode: str | None = None) -> str | None:
    """The selected-attention path forced for this call, if any: ``mode`` if given, else
    SEL_MODE if set, else NSA_SEL_MODE if set (None: the default decides)."""
    mode = mode or SEL_MODE or sel_mode_env()
    if mode is not None and mode not in SEL_MODES:
        raise ValueError(f"sel_forward: mode must be one of {SEL_MODES}, got {mode!r}")
    return mode


def sel_forward_mode(q: Tensor, d_v: int, H: int, n: int, mode: str | None = None) -> str:
    """The selected-attention path for this call: :func:`forced_sel_mode`, else
    :func:`auto_sel_mode`. The group-centric kernel streams the same n*l' keys per
    position whatever G, so small groups pay nearly what G = 16 pays; the block-centric
    path reads each block once and moves G rows of queries and partials per position."""
    forced = forced_sel_mode(mode)
    if forced is not None:
        return forced
    on_gpu = q.device.type == "cuda" and not interpreting()
    return auto_sel_mode(q.shape[2] // H, on_gpu, _partial_bytes(q, d_v, H, n, q.dtype))


def entries_by_block(idx: Tensor, nb: int, by_position: bool = False) -> tuple[Tensor, Tensor]:
    """The selection's (position, slot) entries sorted by block, on the device, no host sync.

    idx int [B, T, H, n] (blocks < nb, -1 unused). Returns keys [B, H, T*n] sorted
    ascending, key = block * E + t * n + j with E = T * n (``by_position``: block * T + t,
    E = T), unused slots counting as block nb so they sort last; int32, or int64 where
    (nb + 1) * E >= 2^31. And off int32 [B, H, nb + 1]: block c's entries are
    keys[off[c]:off[c + 1]]; off[nb] is the number of used entries.

    A counting sort (per-tile counts, a cumulative sum over the tiles, the bins' first
    slots, placement by rank inside the tile: four small launches and no atomics) while
    its count table fits COUNT_INDEX_MAX_BYTES, else keys and ``torch.sort``. Both give
    the same keys.
    """
    B, T, H, n = idx.shape
    span = T if by_position else T * n
    kdt = torch.int32 if (nb + 1) * span < KEY32_LIMIT else torch.int64
    if idx.stride(-1) != 1:
        idx = idx.contiguous()
    E = T * n
    keys = torch.empty(B, H, E, device=idx.device, dtype=kdt)
    st = (idx.stride(0), idx.stride(1), idx.stride(2))
    tile = COUNT_INDEX_TILE
    P = cdiv(E, tile)
    nbp = next_pow2(nb + 1)
    interp = interpreting()
    by_sort = not interp if COUNT_INDEX_SORT is None else COUNT_INDEX_SORT
    if (B * H * (P + 1) * (nb + 1) * 4 <= COUNT_INDEX_MAX_BYTES and (nb + 2) * tile < 2**31
            and (by_sort or nbp <= COUNT_INDEX_MAX_BINS)):
        hist = torch.empty(B, H, P + 1, nb + 1, device=idx.device, dtype=torch.int32)
        if INDEX_TABLE_FILL is not None:
            hist.fill_(INDEX_TABLE_FILL)
        hs = hist.stride()[:3]
        grid = (P, H, B)
        _entry_hist_kernel[grid](idx, hist, *st, *hs, E, nb, N_SEL=n, BLOCK=tile, NBP=nbp,
                                 BY_SORT=by_sort, num_warps=4)
        pb, cb = COUNT_INDEX_SCAN
        _entry_scan_kernel[(cdiv(nb + 1, cb), H, B)](hist, *hs, P, nb, PB=pb, CB=cb,
                                                           num_warps=4)
        off = torch.empty(B, H, nb + 1, device=idx.device, dtype=torch.int32)
        tot = hist[:, :, P]
        _entry_offsets_kernel[(H, B)](tot, off, tot.stride(0), tot.stride(1), off.stride(0),
                                      off.stride(1), nb, BLOCK=1024, num_warps=4)
        rc = min(tile, 256) if interp else 64  # columns per step without the sort
        _entry_place_kernel[grid](idx, hist, keys, *st, *hs, keys.stride(0), keys.stride(1),
                                  E, nb, P, span, N_SEL=n, BLOCK=tile, RC=rc,
                                  BY_SORT=by_sort, BY_POSITION=by_position, num_warps=4)
        return keys, off
    blk = 1024
    _entry_keys_kernel[(cdiv(E, blk), H, B)](
        idx, keys, *st, keys.stride(0), keys.stride(1), E, nb, span, N_SEL=n,
        BY_POSITION=by_position, BLOCK=blk, num_warps=4,
    )
    keys = torch.sort(keys, dim=-1)[0]
    capturing = idx.is_cuda and torch.cuda.is_current_stream_capturing()
    starts = (_block_starts.__wrapped__ if capturing else _block_starts)(B, H, nb, span, kdt,
                                                                        idx.device)
    off = torch.searchsorted(keys, starts, out_int32=True)
    return keys, off


@functools.lru_cache(maxsize=16)
def _block_starts(B: int, H: int, nb: int, span: int, kdt: torch.dtype,
                  device: torch.device) -> Tensor:
    """The first key of every block, [B, H, nb + 1]. Cached per shape (read only), except
    while a CUDA graph is captured: its memory belongs to the graph's pool."""
    c = torch.arange(nb + 1, device=device, dtype=kdt) * span
    return c.expand(B, H, nb + 1).contiguous()


def _sel_forward_blocks(q, k, v, block_indices, cfg, scale, o_branch, out, g_sel, o_cmp,
                        g_cmp, o_win, g_win, lse, *, block_rows, seg_len, partial_dtype,
                        num_warps, num_stages, before_combine=None):
    """Block-centric selected attention: inverted index, per-block partials, merge."""
    B, T, HQ, d_k = q.shape
    H, d_v = k.shape[2], v.shape[-1]
    G = HQ // H
    GP2 = rows_per_position(G)
    (DK, DK2), DV = head_dim_split(d_k), head_dim_tile(d_v)
    n = block_indices.shape[-1]
    nb = cfg.num_sel_blocks(T)
    if T * q.stride(1) + HQ * q.stride(2) >= 2**31:
        raise ValueError(f"sel_forward: q of {tuple(q.shape)} is too large for the 32-bit row "
                         f"offsets of the block-centric kernel (T * stride(1) >= 2^31); "
                         f"use mode='group'")
    on_gpu = q.device.type == "cuda" and not interpreting()
    seg = seg_len or (512 if on_gpu else 16)
    # sorted entries: inside a block in position order, the forced blocks' rows are
    # contiguous (H200, 64k, G = 1, selected forward 1.90 ms sorted against 2.32 ms on
    # entries grouped by block in arbitrary order)
    keys, off = entries_by_block(block_indices, nb)
    pdt = partial_dtype or q.dtype
    po = torch.empty(B, T, H, n, G, d_v, device=q.device, dtype=pdt)
    pl = torch.empty(B, T, H, n, G, device=q.device, dtype=torch.float32)
    if PARTIAL_FILL is not None:
        po.fill_(PARTIAL_FILL)
        pl.fill_(PARTIAL_FILL)
    # H200, 64k, G = 1 / 2 / 4 / 8, two runs: 64 rows on 3 stages 1.90 / 3.50 / 6.26 /
    # 10.8 ms (1.90 / 3.49 / 6.25 / 10.8); on 2 stages 2.04 / 3.78 / 6.86 / 11.9; 128 rows
    # on 2 stages 1.95 / 3.46 / 6.10 / 12.1, on 3 stages 2.39 / 4.23 / 7.70 / 14.8 (spills)
    bm = block_rows or (64 if on_gpu else 16)
    bn = min(max(16, next_pow2(cfg.l_sel)), 64)
    # H200, selected forward + combine at 16k / 64k, ms, with / without the prefetch (two
    # runs, within 0.5%): G = 1 0.395 / 0.405, 1.472 / 1.541; G = 2 0.690 / 0.679, 2.698 /
    # 2.643-2.653; G = 4 1.248 / 1.234, 4.757-4.784 / 4.871-4.889; G = 8 2.324 / 2.356,
    # 9.067-9.110 / 9.303-9.350 (scripts/gpu_block_tune.py --prefetch-only)
    # (measured at d = 128; past 128 head columns its sm_90 compile spills 840 bytes
    # against 320, so those keep the plain gather)
    # (the split head dim, d_k = 192 as 128 + 64, keeps the plain gather too: not measured)
    prefetch = (BLOCK_PREFETCH if BLOCK_PREFETCH is not None
                else GP2 != 2 and DK + DK2 <= 128)
    warps = num_warps or 4
    stages = num_stages or (3 if on_gpu else 1)
    prec = dot_precision(q.dtype, q.device)

    def launch(bm_, st):
        _sel_fwd_blocks_kernel[(cdiv(T * n, seg), H, B)](
            q, k, v, keys, off, po, pl,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            keys.stride(0), keys.stride(1),
            off.stride(0), off.stride(1),
            *po.stride()[:5], *pl.stride()[:4],
            T, nb, T * n, scale * LOG2E,
            G=G, GP2=GP2, PP=max(1, bm_ // GP2), SEG=seg, DK=DK, DV=DV, D_K=d_k, D_V=d_v,
            L_SEL=cfg.l_sel, BLOCK_N=bn, N_SEL=n, DOT_PREC=prec, PREFETCH=prefetch,
            DK2=DK2, num_warps=warps, num_stages=st,
        )

    shrink_on_oor(launch, max(bm, GP2), stages, max(16, GP2))

    ptrs, strides, flags = _epilogue_args(q, out, o_branch, o_cmp, o_win, g_sel, g_cmp, g_win,
                                          lse)
    # 128 rows on 2 stages. H200, selected forward + combine, ms at 16k / 64k, the merge
    # with its slot weights first (scripts/gpu_block_tune.py): G = 4 1.247 / 4.895 (64
    # rows on 1 stage 1.368 / 5.388; one online log-sum-exp step per slot, the merge
    # before, 1.514 / 5.961 on 64 x 1, 1.258 / 4.941 on 128 x 2), G = 8 2.368 / 9.387
    # (online 64 x 1 2.469 / 10.568), G = 1 0.410 / 1.526 (online 128 x 2 0.406 / 1.541)
    # Past 128 value columns 64 rows: 128 spill ~3.5 KB per thread (sm_90 compile).
    rows, m_stages = MERGE_TILE or (((128 if DV <= 128 else 64), 2) if on_gpu else (16, 1))
    pp = max(1, rows // GP2)
    if before_combine is not None:
        before_combine()
    _sel_merge_kernel[(cdiv(T, pp), H, B)](
        po, pl, block_indices, *ptrs,
        *po.stride()[:5], *pl.stride()[:4], *_t3(block_indices), *strides,
        T, G=G, GP2=GP2, PP=pp, DV=DV, D_V=d_v, N_SEL=n, NJ=next_pow2(n),
        num_warps=4, num_stages=m_stages,
        **flags,
    )


def _t3(x: Tensor | None) -> tuple[int, int, int]:
    return (x.stride(0), x.stride(1), x.stride(2)) if x is not None else (0, 0, 0)


def _epilogue_args(q, out, o_branch, o_cmp, o_win, g_sel, g_cmp, g_win, lse):
    """Pointers, strides and flags of the selected kernels' shared epilogue
    (:func:`nsa.ops.selection.kernels._sel_epilogue`): absent tensors become a dummy."""
    dummy = q.new_empty(1, 1, 1, 1)
    lse_arg = lse if lse is not None else q.new_empty(1, 1, 1, dtype=torch.float32)
    tensors = (out, o_branch, o_cmp, o_win, g_sel, g_cmp, g_win)
    ptrs = tuple(x if x is not None else dummy for x in tensors) + (lse_arg,)
    strides = tuple(st for x in tensors for st in _t3(x)) + (lse_arg.stride(0),
                                                             lse_arg.stride(1))
    write_out = g_sel is not None
    flags = dict(WRITE_OUT=write_out, WRITE_BRANCH=o_branch is not None,
                 HAS_CMP=write_out and o_cmp is not None and g_cmp is not None,
                 HAS_WIN=write_out and o_win is not None and g_win is not None,
                 STORE_LSE=lse is not None)
    return ptrs, strides, flags
