"""Raw launcher of the Triton decode kernels (no validation: nsa_decode validates).

Scratch buffers live in a per-cache workspace, sized by the cache's capacity, so a step
allocates nothing and launches exactly three kernels (CUDA-graph friendly)."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from nsa.cache import NSACache
from nsa.config import NSAConfig
from nsa.ops.compression.launch import dot_precision
from nsa.ops.decode.kernels import _dec_stage1, _dec_stage2, _dec_stage3
from nsa.ops.reference import num_compressed

BLOCK_C = 64  # compressed tokens per split
JT = 128  # selection blocks per chunk of the score pass
SPC = 32  # splits per chunk of the log-sum-exp pass
PC = 32  # partials per chunk of the final merge
STAGE1_WARPS = 4
MAX_BLOCKS = 8192  # selection blocks the in-register top-n handles


def _p2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, x)))


def decode_not_supported_reasons(q_t: Tensor, cache: NSACache) -> list[str]:
    """Why the Triton decode kernels cannot run this step (empty list: they can)."""
    reasons = []
    if not (q_t.is_cuda or q_t.device.type == "cpu" and _interpreting()):
        reasons.append(f"device {q_t.device} is not CUDA (CPU needs TRITON_INTERPRET=1)")
    if q_t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"dtype {q_t.dtype} not in float16/bfloat16/float32")
    if cache.d_k > 256 or cache.d_v > 256:
        reasons.append(f"head dims d_k={cache.d_k}, d_v={cache.d_v} exceed 256")
    if BLOCK_C * cache.config.d < cache.config.l:
        reasons.append(f"compression block l={cache.config.l} exceeds {BLOCK_C} strides")
    nb = -(-cache.capacity // cache.config.l_sel)
    if nb > MAX_BLOCKS:
        reasons.append(f"{nb} selection blocks exceed the in-register top-n limit "
                       f"{MAX_BLOCKS}")
    return reasons


def _interpreting() -> bool:
    from nsa.policy import read_flags

    return read_flags().triton_interpret


def _allocator(poison: bool):
    if poison:
        return lambda *shape, **kw: torch.full(shape, float("nan"), **kw)
    return lambda *shape, **kw: torch.empty(*shape, **kw)


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
    splits = triton.cdiv(ncap, BLOCK_C)
    nbcap = -(-cache.capacity // cfg.l_sel)
    n_wt = triton.cdiv(cfg.w, _p2(cfg.l_sel))
    npart = n_wt + cfg.n + splits
    nb_p = max(JT, triton.next_power_of_2(nbcap))
    ws = {
        "key": key,
        "pm": empty(B * H * npart * G, **f32),
        "pl": empty(B * H * npart * G, **f32),
        "po": empty(B * H * npart * G, dv, **f32),
        "cnt": torch.zeros(B * H * npart, device=dev, dtype=torch.int32),
        "ps": empty(B * H * 2 * G, nbcap, **f32),
        "sc": empty(B * H, nb_p, **f32),
        "idx": torch.full((B * H, cfg.n), -1, device=dev, dtype=torch.int32),
        "ticket": torch.zeros(B * H, device=dev, dtype=torch.int32),
        "reads": torch.zeros(B, H, 3, device=dev, dtype=torch.int64),
        "npart": npart, "nbcap": nbcap, "nb_p": nb_p,
    }
    if not poison:
        cache._triton_ws = ws
    return ws


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
    ws = _workspace(cache, G, poison)
    q = q_t.contiguous()
    out = _allocator(poison)(B, HQ, dv, device=q.device, dtype=q.dtype)
    use_cmp, use_sel, use_win = g_cmp is not None, g_sel is not None, g_win is not None
    # a static cache is read whole (captured graphs must not depend on host lengths)
    T_used = cache.capacity if cache.static else cache.max_length
    ncap = max(1, min(num_compressed(T_used, cfg.l, cfg.d), cache.k_cmp.shape[1]))
    splits = triton.cdiv(ncap, BLOCK_C) if (use_cmp or use_sel) else 0
    n_wt = triton.cdiv(cfg.w, LP) if use_win else 0
    npart = ws["npart"]
    jb = _p2((BLOCK_C * cfg.d) // cfg.l_sel + -(-cfg.l // cfg.l_sel) + 1, 16)
    kc, vc, kw, vw, ks, vs = (cache.k_cmp, cache.v_cmp, cache.k_win, cache.v_win,
                              cache.k_sel, cache.v_sel)
    # window tiles occupy slots [0, n_wt) only when the window branch is on
    n_wt_slots = triton.cdiv(cfg.w, LP)
    # float32 decode runs its dots as 3xTF32 like the prefill kernels (plain TF32 put the
    # cached decode of a float32 model ~1e-3 away from its teacher-forced forward)
    prec = dot_precision(q.dtype, q.device)
    if splits + n_wt:
        _dec_stage1[(B * H, n_wt + splits)](
            q, kc, vc, kw, vw, cache.lengths, ws["pm"], ws["pl"], ws["po"], ws["cnt"],
            ws["ps"], ws["sc"], ws["idx"], ws["ticket"],
            q.stride(0), q.stride(1),
            kc.stride(0), kc.stride(1), kc.stride(2),
            vc.stride(0), vc.stride(1), vc.stride(2),
            kw.stride(0), kw.stride(1), kw.stride(2),
            vw.stride(0), vw.stride(1), vw.stride(2),
            ncap, splits, ws["nbcap"], npart, scale,
            H=H, G=G, GP=GP, DK=DK, DV=DV, D_K=dk, D_V=dv,
            CMP_L=cfg.l, CMP_D=cfg.d, SEL_L=cfg.l_sel, BLOCK_C=BLOCK_C, JB=jb, LP=LP,
            W=cfg.w, N_WT=n_wt, SLOT_CMP=n_wt_slots + cfg.n, N_SEL=cfg.n,
            NP=_p2(cfg.n, 1), N_INIT=cfg.n_initial, N_LOCAL=cfg.n_local,
            NB_P=ws["nb_p"], JT=JT, SPC=SPC, DO_SELECT=use_sel, DOT_PREC=prec,
            num_warps=STAGE1_WARPS,
        )
    if use_sel:
        _dec_stage2[(B * H, cfg.n)](
            q, ks, vs, cache.lengths, ws["idx"], ws["pm"], ws["pl"], ws["po"], ws["cnt"],
            q.stride(0), q.stride(1),
            ks.stride(0), ks.stride(1), ks.stride(2),
            vs.stride(0), vs.stride(1), vs.stride(2),
            npart, scale,
            H=H, G=G, GP=GP, DK=DK, DV=DV, D_K=dk, D_V=dv,
            SEL_L=cfg.l_sel, LP=LP, N_SEL=cfg.n, SLOT_SEL=n_wt_slots, DOT_PREC=prec,
        )
    gates = [g if g is not None else q for g in (g_cmp, g_sel, g_win)]  # unused if None
    _dec_stage3[(B * HQ,)](
        ws["pm"], ws["pl"], ws["po"], ws["cnt"], gates[0], gates[1], gates[2], out,
        ws["reads"], cache.reads_total,
        out.stride(0), out.stride(1),
        next(g for g in (g_cmp, g_sel, g_win) if g is not None).stride(0),
        npart, splits,
        H=H, G=G, DV=DV, D_V=dv, N_WT=n_wt, SLOT_SEL=n_wt_slots, N_SEL=cfg.n,
        SLOT_CMP=n_wt_slots + cfg.n, PC=PC,
        CP=_p2(npart, 1), USE_CMP=use_cmp, USE_SEL=use_sel, USE_WIN=use_win,
        COUNT_CMP=use_cmp or use_sel,
    )
    reads = {}
    for i, (name, on) in enumerate((("cmp", use_cmp or use_sel), ("sel", use_sel),
                                    ("win", use_win))):
        if on:
            reads[name] = ws["reads"][..., i]
    idx = ws["idx"].view(B, H, cfg.n) if use_sel else None
    return out, reads, idx
