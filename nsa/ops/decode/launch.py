"""Raw launcher of the Triton decode kernels (no validation: nsa_decode validates).

Scratch buffers live in a per-cache workspace, sized by the cache's capacity, so a step
allocates nothing and launches at most four kernels (CUDA-graph friendly)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from nsa.backends import device_info, triton_has_pdl
from nsa.cache import NSACache
from nsa.config import NSAConfig
from nsa.ops.compression.launch import cdiv, dot_precision, interpreting, next_pow2
from nsa.ops.decode.kernels import _dec_append, _dec_p1, _dec_p2, _dec_p3, _dec_p4
from nsa.ops.descriptors import kv_desc, resolve_desc
from nsa.ops.reference import num_compressed

BLOCK_C = 64  # compressed tokens per tile
SPC = 32  # splits per chunk of the log-sum-exp pass
PC = 32  # partials per chunk of the final merge
# warps of each kernel (p4, a per-head merge of small vectors, is fastest on one warp:
# H200, docs/perf-notes.md), and the software-pipeline depth of p1's tile loop
WARPS = {"p1": 4, "p2": 4, "p3": 4, "p4": 1}
P1_STAGES = 3
# above TILES_PER_SM compressed tiles per SM (large batches, long contexts) a split takes
# SPLIT_TILES tiles (H200, docs/perf-notes.md: 8 tiles 95.6 us at 64k batch 16 against
# 99.0 with 4, 57.4 against 59.6 with 1 at 16k batch 16; batch 1 stays at 1 tile)
TILES_PER_SM = 4
SPLIT_TILES = 8
SEL_PER_SM = 4  # above this many selected blocks per SM, a program takes 4 blocks
SPLIT_SCORES = True  # p1's block scores as bf16 hi/mid/lo dots (else one 3xTF32 dot)
# p1's block scores as sums over each block's tokens instead of a dot with the overlap
# matrix, where the configuration allows (:func:`sum_scores_supported`); None: there
SUM_SCORES: bool | None = None
MAX_BLOCKS = 8192  # selection blocks the in-register top-n handles
# the top-n picks of p2 and p3 by Triton's bitonic top-k (True) or by n serial
# max-reductions (False); None: top-k on the GPU, the reductions in the CPU interpreter
# (which runs top-k's network element by element)
TOPK: bool | None = None
# programmatic dependent launch of the step's kernels on SM 9.0+ (each may start while the
# previous one drains; docs/perf-notes.md); None = where the device supports it
PDL: bool | None = None


def _p2(x: int, lo: int = 16) -> int:
    return max(lo, next_pow2(max(1, x)))


def device_dtype_reasons(x: Tensor) -> list[str]:
    """What the decode kernels (step and append) need of their input's device and dtype."""
    reasons = []
    if not (x.is_cuda or x.device.type == "cpu" and interpreting()):
        reasons.append(f"device {x.device} is not CUDA (CPU needs TRITON_INTERPRET=1)")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"dtype {x.dtype} not in float16/bfloat16/float32")
    return reasons


def decode_not_supported_reasons(q_t: Tensor, cache: NSACache) -> list[str]:
    """Why the Triton decode kernels cannot run this step (empty list: they can)."""
    reasons = device_dtype_reasons(q_t)
    if cache.d_k > 256 or cache.d_v > 256:
        reasons.append(f"head dims d_k={cache.d_k}, d_v={cache.d_v} exceed 256")
    if BLOCK_C * cache.config.d < cache.config.l:
        reasons.append(f"compression block l={cache.config.l} exceeds {BLOCK_C} strides")
    if cache.config.l_sel + cache.config.l > BLOCK_C * cache.config.d:
        reasons.append(f"a selection block (l'={cache.config.l_sel}) overlaps compressed "
                       f"tokens of more than two tiles of {BLOCK_C} (d={cache.config.d})")
    nb = -(-cache.capacity // cache.config.l_sel)
    if nb > MAX_BLOCKS:
        reasons.append(f"{nb} selection blocks exceed the in-register top-n limit "
                       f"{MAX_BLOCKS}")
    return reasons


def sum_scores_supported(cfg: NSAConfig) -> bool:
    """Whether p1 can form the block scores as per-block sums (``SUM_SCORES``): compressed
    tiles start on block boundaries (BLOCK_C * d a multiple of l'), a block spans a power
    of two of compressed strides (l' / d, a reshape), and no compressed token reaches two
    blocks ahead (l <= l' + d)."""
    lb = cfg.l_sel // cfg.d
    return ((BLOCK_C * cfg.d) % cfg.l_sel == 0 and lb & (lb - 1) == 0 and lb <= BLOCK_C
            and cfg.l <= cfg.l_sel + cfg.d)


def _allocator(poison: bool):
    if poison:
        return lambda *shape, **kw: torch.full(shape, float("nan"), **kw)
    return lambda *shape, **kw: torch.empty(*shape, **kw)


def _chunk_blocks(nbcap: int) -> int:
    """Selection blocks per chunk: at least 128, and at most 16 chunks per (b, h) so the
    candidates (16 chunks x n) stay few."""
    return max(128, next_pow2(nbcap) // 16)


def _workspace(cache: NSACache, G: int, poison: bool) -> dict[str, Tensor]:
    """Scratch sized by capacity; rebuilt when the cache grows (or for poisoned runs)."""
    cfg = cache.config
    key = (cache.capacity, G, poison, BLOCK_C)
    ws = getattr(cache, "_triton_ws", None)
    if ws is not None and ws["key"] == key and not poison:
        return ws
    B, H, dv = cache.B, cache.H, cache.d_v
    dev = cache.device
    empty = _allocator(poison)
    f32 = {"device": dev, "dtype": torch.float32}
    ncap = max(1, num_compressed(cache.capacity, cfg.l, cfg.d))
    ntcap = cdiv(ncap, BLOCK_C)  # tiles; splits never outnumber them
    nbcap = -(-cache.capacity // cfg.l_sel)
    n_wt = cdiv(cfg.w, _p2(cfg.l_sel))
    npart = n_wt + cfg.n + ntcap
    jt = _chunk_blocks(nbcap)
    kp = next_pow2(cdiv(nbcap, jt)) * _p2(cfg.n, 1)
    ws = {
        "key": key,
        "pm": empty(B * H * npart * G, **f32),
        "pl": empty(B * H * npart * G, **f32),
        "po": empty(B * H * npart * G, dv, **f32),
        "cnt": torch.zeros(B * H * npart, device=dev, dtype=torch.int32),
        "tm": empty(B * H * ntcap * G, **f32),
        "ps": empty(B * H * 2 * G, nbcap, **f32),
        "cand": torch.zeros(B * H * kp, device=dev, dtype=torch.int64),
        "idx": torch.full((B * H, cfg.n), -1, device=dev, dtype=torch.int32),
        "reads": torch.zeros(B, H, 3, device=dev, dtype=torch.int64),
        "npart": npart, "ntcap": ntcap, "nbcap": nbcap, "jt": jt, "kp": kp,
    }
    if not poison:
        cache._triton_ws = ws
    return ws


@functools.cache
def pdl_supported() -> bool:
    """Whether the installed Triton compiles the kernels' programmatic-dependent-launch
    calls (:func:`nsa.backends.triton_has_pdl`: Triton >= 3.5), read once."""
    return triton_has_pdl()


def _chain(device: torch.device) -> dict:
    """Launch options of a kernel that waits for its predecessor inside (gdc_wait) and so
    may be launched early: programmatic dependent launch on SM 9.0+ (PDL) with a Triton
    that compiles it (:func:`pdl_supported`); ``PDL`` True / False forces it."""
    on = device.type == "cuda" and (
        PDL if PDL is not None else
        (device_info(device).capability or (0, 0)) >= (9, 0) and pdl_supported())
    return {"PDL": True, "launch_pdl": True} if on else {}


def _sm_count(device: torch.device) -> int:
    """SMs of the GPU (probed once per device, nsa.backends); 1 in the interpreter."""
    return device_info(device).sm_count if device.type == "cuda" else 1


def triton_decode(
    q_t: Tensor, cache: NSACache, g_cmp: Tensor | None, g_sel: Tensor | None,
    g_win: Tensor | None, cfg: NSAConfig, scale: float, poison: bool = False,
) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
    """Returns (out [B, HQ, d_v], reads {branch: [B, H] int64}, block indices [B, H, n]).
    The kernels also add the reads to ``cache.reads_total``.

    ``poison`` fills the output and the scratch buffers with NaN (tests: an element a
    kernel fails to write then shows up)."""
    B, HQ, dk = q_t.shape
    H, dv = cache.H, cache.d_v
    G = HQ // H
    GP, DK, DV = _p2(G), _p2(dk), _p2(dv)
    LP = _p2(cfg.l_sel)
    NP = _p2(cfg.n, 1)
    ws = _workspace(cache, G, poison)
    q = q_t.contiguous()
    out = _allocator(poison)(B, HQ, dv, device=q.device, dtype=q.dtype)
    use_cmp, use_sel, use_win = g_cmp is not None, g_sel is not None, g_win is not None
    # a static cache is read whole (captured graphs must not depend on host lengths)
    T_used = cache.capacity if cache.static else cache.max_length
    ncap = max(1, min(num_compressed(T_used, cfg.l, cfg.d), cache.k_cmp.shape[1]))
    ntile = cdiv(ncap, BLOCK_C) if (use_cmp or use_sel) else 0
    # many tiles per SM (large batches, long contexts): splits of several tiles (a
    # pipelined loop) write fewer partials
    sms = _sm_count(q.device)
    tps = SPLIT_TILES if B * H * ntile > TILES_PER_SM * sms else 1
    splits = cdiv(ntile, tps)
    # the same for the selected blocks: 4 per program pick the top-n once for 4 blocks
    bpp = 4 if B * H * cfg.n > SEL_PER_SM * sms else 1
    n_sp = cdiv(cfg.n, bpp)
    n_wt = cdiv(cfg.w, LP) if use_win else 0
    nch = cdiv(cdiv(T_used, cfg.l_sel), ws["jt"]) if use_sel else 0
    r2 = splits + n_wt
    npart = ws["npart"]
    jb = _p2((BLOCK_C * cfg.d) // cfg.l_sel + -(-cfg.l // cfg.l_sel) + 1, 16)
    kc, vc, kw, vw, ks, vs = (cache.k_cmp, cache.v_cmp, cache.k_win, cache.v_win,
                              cache.k_sel, cache.v_sel)
    # window tiles occupy slots [0, n_wt) only when the window branch is on
    n_wt_slots = cdiv(cfg.w, LP)
    # float32 decode runs its dots as 3xTF32 like the prefill kernels (plain TF32 put the
    # cached decode of a float32 model ~1e-3 away from its teacher-forced forward)
    prec = dot_precision(q.dtype, q.device)
    # block scores through three bf16 dots (GPU; the interpreter's bf16 dot is not
    # usable, it takes the 3xTF32 path); integer overlaps up to 256 are exact in bf16
    split_scores = SPLIT_SCORES and q.is_cuda and cfg.l <= 256
    sum_scores = SUM_SCORES is not False and sum_scores_supported(cfg)
    topk = TOPK if TOPK is not None else not interpreting()
    gates = [g if g is not None else q for g in (g_cmp, g_sel, g_win)]  # unused if None
    stride_gb = next(g for g in (g_cmp, g_sel, g_win) if g is not None).stride(0)
    common = dict(H=H, G=G)
    shape = dict(GP=GP, DK=DK, DV=DV, D_K=dk, D_V=dv)
    blocks = dict(CMP_L=cfg.l, CMP_D=cfg.d, SEL_L=cfg.l_sel, BLOCK_C=BLOCK_C)
    slots = dict(SLOT_SEL=n_wt_slots, SLOT_CMP=n_wt_slots + cfg.n, N_SEL=cfg.n)
    pick = dict(NP=NP, N_INIT=cfg.n_initial, N_LOCAL=cfg.n_local, JT=ws["jt"], KP=ws["kp"])
    merge = dict(N_WT=n_wt, PC=PC, CP=_p2(npart, 1), USE_CMP=use_cmp, USE_SEL=use_sel,
                 USE_WIN=use_win)
    qs = (q.stride(0), q.stride(1))
    kcs = (kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2))
    kws = (kw.stride(0), kw.stride(1), kw.stride(2), vw.stride(0), vw.stride(1), vw.stride(2))
    kss = (ks.stride(0), ks.stride(1), ks.stride(2), vs.stride(0), vs.stride(1), vs.stride(2))
    part = (ws["pm"], ws["pl"], ws["po"], ws["cnt"])
    # key/value tiles by bulk copy only where forced (USE_DESC / NSA_KV_DESC=1): on an
    # H200 they measured slower here (64k: 97.2 against 95.0 us at batch 16, 32.9 against
    # 32.3 at batch 1), unlike in the prefill kernels
    desc = all(resolve_desc("triton_decode", None, k_, v_, DK, DV, default=False)
               for k_, v_ in ((kc, vc), (kw, vw), (ks, vs)))
    if desc:
        kc, vc = kv_desc(kc, ncap, BLOCK_C, DK), kv_desc(vc, ncap, BLOCK_C, DV)
        kw, vw = kv_desc(kw, cfg.w, LP, DK), kv_desc(vw, cfg.w, LP, DV)
        ks, vs = kv_desc(ks, ks.shape[1], LP, DK), kv_desc(vs, vs.shape[1], LP, DV)
    # PDL where the compressed splits are single tiles (one wave); with many tiles per SM
    # the next kernel's early programs took slots from p1's last wave (64k, batch 16: 97.3
    # against 95.2 us; batch 1: 30.0 against 32.4, H200)
    chain = _chain(q.device) if tps == 1 else {}
    if r2:
        _dec_p1[(B * H, r2)](
            q, kc, vc, kw, vw, cache.lengths, *part, ws["tm"], ws["ps"], *qs, *kcs, *kws,
            ncap, splits, ntile, ws["nbcap"], npart, ws["ntcap"], scale, **common, **shape,
            **blocks, TPS=tps, JB=jb, LP=LP, W=cfg.w, SLOT_CMP=slots["SLOT_CMP"],
            USE_SEL=use_sel, SPLIT_SCORES=split_scores, DOT_PREC=prec, USE_DESC=desc,
            SUM_SCORES=sum_scores,
            num_warps=WARPS["p1"], num_stages=P1_STAGES, **chain,
        )
    if use_sel:
        _dec_p2[(B * H, nch)](
            cache.lengths, ws["pm"], ws["pl"], ws["tm"], ws["ps"], ws["cand"], ncap, splits,
            ntile, ws["nbcap"], npart, ws["ntcap"], **common, GP=GP, **blocks,
            SLOT_CMP=slots["SLOT_CMP"], N_SEL=cfg.n, **pick, SPC=SPC, SUM_SCORES=sum_scores,
            TOPK=topk, num_warps=WARPS["p2"],
            **chain,
        )
        _dec_p3[(B * H, n_sp)](
            q, ks, vs, cache.lengths, *part, ws["cand"], ws["idx"], *qs, *kss, nch, npart,
            scale, **common, **shape, SEL_L=cfg.l_sel, LP=LP, N_SEL=cfg.n, NP=NP,
            KP=ws["kp"], BPP=bpp, SLOT_SEL=n_wt_slots, DOT_PREC=prec, USE_DESC=desc,
            TOPK=topk, num_warps=WARPS["p3"], **chain,
        )
    _dec_p4[(B * HQ,)](
        *part, *gates, out, ws["reads"], cache.reads_total, out.stride(0), out.stride(1),
        stride_gb, splits, npart, **common, DV=DV, D_V=dv, **{**slots, "N_SEL": n_sp},
        **merge,
        num_warps=WARPS["p4"], **chain,
    )
    reads = {}
    for i, (name, on) in enumerate((("cmp", use_cmp or use_sel), ("sel", use_sel),
                                    ("win", use_win))):
        if on:
            reads[name] = ws["reads"][..., i]
    idx = ws["idx"].view(B, H, cfg.n) if use_sel else None
    return out, reads, idx


def _ring_cols(l: int, row: int) -> int:
    """Columns per tile of the append kernel's ring copy: [l, cols] tiles of at most 8192
    elements (64 registers per thread on 4 warps)."""
    return min(_p2(row, 1), max(16, 8192 // _p2(l, 1)))


def triton_decode_append(
    z: Tensor, cols: dict[str, int], cache: NSACache, inv_freq: Tensor | None,
    blocks: bool, write: bool, kc: Tensor | None = None, vc: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One launch of ``_dec_append`` over the projections z [B, F] (columns ``cols``: q,
    k_cmp, v_cmp, k_sel, v_sel, k_win, v_win offsets). Returns (q rotated [B, HQ, d_k],
    phi's input blocks [B, l, H, d_k] and [B, l, H, d_v] when ``blocks``). With ``write``
    the cache rows are stored (and kc/vc [B, H, *] where a compressed token is due) and
    lengths advance by one. No validation: nsa.ops.decode.decode_append validates."""
    cfg = cache.config
    B, H, dk, dv = cache.B, cache.H, cache.d_k, cache.d_v
    HQ = cfg.n_heads
    q_rot = torch.empty(B, HQ, dk, device=z.device, dtype=z.dtype)
    kb = vb = None
    if blocks:
        kb = torch.empty(B, cfg.l, H, dk, device=z.device, dtype=z.dtype)
        vb = torch.empty(B, cfg.l, H, dv, device=z.device, dtype=z.dtype)
    emit = kc is not None
    _dec_append[(B,)](
        z, inv_freq if inv_freq is not None else q_rot, q_rot,
        kb if blocks else q_rot, vb if blocks else q_rot,
        kc if emit else q_rot, vc if emit else q_rot,
        cache.k_sel, cache.v_sel, cache.k_win, cache.v_win, cache.k_raw, cache.v_raw,
        cache.k_cmp, cache.v_cmp, cache.lengths, z.stride(0), cache.capacity,
        cache.k_cmp.shape[1],
        HQ=HQ, H=H, D_K=dk, D_V=dv, HQP=_p2(HQ, 1), HP=_p2(H, 1), DKP=_p2(dk, 1),
        DVP=_p2(dv, 1), LP=_p2(cfg.l, 1), CBK=_ring_cols(cfg.l, H * dk),
        CBV=_ring_cols(cfg.l, H * dv),
        OFF_Q=cols["q"], OFF_KC=cols["k_cmp"], OFF_VC=cols["v_cmp"], OFF_KS=cols["k_sel"],
        OFF_VS=cols["v_sel"], OFF_KW=cols["k_win"], OFF_VW=cols["v_win"],
        L=cfg.l, CMP_D=cfg.d, W=cfg.w, ROPE=inv_freq is not None, PRECISE=z.is_cuda,
        BLOCKS=blocks, WRITE=write, EMIT=emit, num_warps=4, **_chain(z.device),
    )
    return q_rot, kb, vb
