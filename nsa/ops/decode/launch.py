"""Raw launcher of the Triton decode kernels (no validation: nsa_decode validates)."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from nsa.cache import NSACache
from nsa.config import NSAConfig
from nsa.ops.decode.kernels import (
    _dec_attn_kernel,
    _dec_cmp_kernel,
    _dec_combine_kernel,
    _dec_select_kernel,
)
from nsa.ops.reference import num_compressed

BLOCK_C = 64  # compressed tokens per cmp split


def _p2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def decode_not_supported_reasons(q_t: Tensor, cache: NSACache) -> list[str]:
    """Why the Triton decode kernels cannot run this step (empty list: they can)."""
    reasons = []
    if not (q_t.is_cuda or q_t.device.type == "cpu" and _interpreting()):
        reasons.append(f"device {q_t.device} is not CUDA (CPU needs TRITON_INTERPRET=1)")
    if q_t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"dtype {q_t.dtype} not in float16/bfloat16/float32")
    if cache.d_k > 256 or cache.d_v > 256:
        reasons.append(f"head dims d_k={cache.d_k}, d_v={cache.d_v} exceed 256")
    nb = -(-cache.capacity // cache.config.l_sel)
    if nb > 8192:
        reasons.append(f"{nb} selection blocks exceed the in-register top-n limit 8192")
    return reasons


def _interpreting() -> bool:
    from nsa.policy import read_flags

    return read_flags().triton_interpret


def _allocator(poison: bool):
    if poison:
        return lambda *shape, **kw: torch.full(shape, float("nan"), **kw)
    return lambda *shape, **kw: torch.empty(*shape, **kw)


def triton_decode(
    q_t: Tensor, cache: NSACache, g_cmp: Tensor | None, g_sel: Tensor | None,
    g_win: Tensor | None, cfg: NSAConfig, scale: float, poison: bool = False,
) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
    """Returns (out [B, HQ, d_v], reads {branch: [B, H] int64}, block indices [B, H, n]).

    ``poison`` fills the output and every scratch buffer with NaN (tests: an element a
    kernel fails to write then shows up)."""
    B, HQ, dk = q_t.shape
    H, dv = cache.H, cache.d_v
    G = HQ // H
    GP, DK, DV = _p2(G), _p2(dk), _p2(dv)
    dev = q_t.device
    q = q_t.contiguous()
    T_used = cache.capacity if cache.static else cache.max_length
    ncap = cache.k_cmp.shape[1] if cache.static else num_compressed(T_used, cfg.l, cfg.d)
    ncap = max(1, min(ncap, cache.k_cmp.shape[1]))
    nbcap = -(-T_used // cfg.l_sel)
    use_cmp, use_sel, use_win = g_cmp is not None, g_sel is not None, g_win is not None
    need_cmp = use_cmp or use_sel
    f32 = {"device": dev, "dtype": torch.float32}
    empty = _allocator(poison)
    out = empty(B, HQ, dv, device=dev, dtype=q_t.dtype)
    reads = torch.zeros(B * H, 3, device=dev, dtype=torch.int32)
    idx = torch.full((B * H, cfg.n), -1, device=dev, dtype=torch.int32)
    oc = empty(B * H * G, dv, **f32)
    splits = triton.cdiv(ncap, BLOCK_C)
    cntc = torch.zeros(B * H, splits, device=dev, dtype=torch.int32)
    ks, vs, kc, vc, kw, vw = (cache.k_sel, cache.v_sel, cache.k_cmp, cache.v_cmp,
                              cache.k_win, cache.v_win)
    if need_cmp:
        S = empty(B * H * G, ncap, **f32)
        pm = empty(B * H * splits * G, **f32)
        pl = empty(B * H * splits * G, **f32)
        po = empty(B * H * splits * G, dv, **f32)
        _dec_cmp_kernel[(B * H, splits)](
            q, kc, vc, cache.lengths, S, pm, pl, po, cntc,
            q.stride(0), q.stride(1),
            kc.stride(0), kc.stride(1), kc.stride(2),
            vc.stride(0), vc.stride(1), vc.stride(2),
            ncap, splits, scale,
            H=H, G=G, GP=GP, DK=DK, DV=DV, D_K=dk, D_V=dv,
            CMP_L=cfg.l, CMP_D=cfg.d, BLOCK_C=BLOCK_C,
        )
        _dec_select_kernel[(B * H,)](
            S, pm, pl, po, cache.lengths, oc, idx,
            ncap, splits, nbcap,
            H=H, G=G, GP=GP, DV=DV, D_V=dv,
            CMP_L=cfg.l, CMP_D=cfg.d, SEL_L=cfg.l_sel,
            N_SEL=cfg.n, NP=_p2(cfg.n, 1), N_INIT=cfg.n_initial, N_LOCAL=cfg.n_local,
            NB_P=_p2(nbcap), DO_SELECT=use_sel,
        )
    LP = _p2(cfg.l_sel)
    nsu = cfg.n if use_sel else 0
    n_wt = triton.cdiv(cfg.w, LP) if use_win else 0
    nunits = nsu + n_wt
    pm = empty(max(1, B * H * nunits * G), **f32)
    pl = empty(max(1, B * H * nunits * G), **f32)
    po = empty(max(1, B * H * nunits * G), dv, **f32)
    cnt = torch.zeros(B * H, max(1, nunits), device=dev, dtype=torch.int32)
    if nunits:
        _dec_attn_kernel[(B * H, nunits)](
            q, ks, vs, kw, vw, cache.lengths, idx, pm, pl, po, cnt,
            q.stride(0), q.stride(1),
            ks.stride(0), ks.stride(1), ks.stride(2),
            vs.stride(0), vs.stride(1), vs.stride(2),
            kw.stride(0), kw.stride(1), kw.stride(2),
            vw.stride(0), vw.stride(1), vw.stride(2),
            max(1, nunits), scale,
            H=H, G=G, GP=GP, DK=DK, DV=DV, D_K=dk, D_V=dv,
            SEL_L=cfg.l_sel, LP=LP, N_SEL=cfg.n, NSU=nsu, W=cfg.w,
        )
    gdummy = next(g for g in (g_cmp, g_sel, g_win) if g is not None)
    gates = [(g if g is not None else gdummy).contiguous() for g in (g_cmp, g_sel, g_win)]
    _dec_combine_kernel[(B * H,)](
        oc, pm, pl, po, cnt, cntc, gates[0], gates[1], gates[2], out, reads,
        out.stride(0), out.stride(1), gates[0].stride(0),
        max(1, nunits), n_wt, splits,
        H=H, G=G, GP=GP, DV=DV, D_V=dv, NSU=nsu,
        USE_CMP=use_cmp, USE_WIN=use_win, COUNT_CMP=need_cmp,
    )
    r = reads.view(B, H, 3).long()
    rd = {}
    if need_cmp:
        rd["cmp"] = r[..., 0]
    if use_sel:
        rd["sel"] = r[..., 1]
    if use_win:
        rd["win"] = r[..., 2]
    return out, rd, (idx.view(B, H, cfg.n).long() if use_sel else None)
