"""The ``triton`` backend of :func:`nsa.ops.nsa_attention`: NSA prefill forward in Triton.

Importing this module registers the backend. Kernels (each beside its launcher):

* :mod:`nsa.ops.compression`: compressed-branch flash attention that also writes the
  Eq. 9/10 group block scores (one fused program, or two passes; ``CMP_SCORE_MODE``);
* :mod:`nsa.ops.selection`: top-n selection on the GPU (no host sync) and the
  group-centric selected-block attention, whose epilogue fuses the gate combine;
* :mod:`nsa.ops.window`: sliding-window flash attention.

Launch order for one call: compressed branch (+ scores) -> top-n -> window -> selected
attention, which reads O_cmp and O_win and writes ``out = g_cmp*O_cmp + g_sel*O_sel +
g_win*O_win`` in q's dtype (bf16, fp16 or fp32). Without a selection branch the combine
is one elementwise PyTorch pass.

Forward only: when autograd is recording and any input requires grad, this backend runs
the reference (which has autograd) instead, until the backward kernels exist.
With ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (slow; for tests).
The SM 8.9 policy of :mod:`nsa.policy` is honoured: where it routes the selection branch
to the reference, that branch (scores, top-n, attention) runs in PyTorch and the other
branches still run here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa.config import NSAConfig
from nsa.ops import register_backend
from nsa.ops.compression import cmp_forward
from nsa.ops.compression.launch import score_layout_ok
from nsa.ops.reference import NSAAux, _dedup_indices, reference_nsa
from nsa.ops.selection import sel_forward, select_topn
from nsa.ops.window import win_forward

# "fused": both passes of the compressed kernel in one program; "two_pass": the
# log-sum-exp goes through memory to a second launch. Measured on an H200 (paper shape):
# equal within 2% at 32k-64k, fused 3-9% faster at 8k-16k and 13-17% at G = 4 and 1.
# See docs/perf-notes.md.
CMP_SCORE_MODE = "fused"

MAX_GROUP = 128  # one GQA group must fit the M dimension of one program


def triton_not_supported_reasons(
    device: torch.device | str, dtype: torch.dtype, d_k: int, d_v: int, G: int
) -> list[str]:
    """Why the Triton backend cannot run this case, one sentence each ([] = it can).

    Device (CUDA SM >= 8.0, or CPU under TRITON_INTERPRET=1), dtype (bf16, fp16, fp32),
    d_k (64, 128, 192, 256 or a power of two >= 16), d_v <= d_k, 1 <= G <= 128; on CPU
    (interpreter) no bfloat16.
    Routing policy (e.g. SM 8.9 selection) is not capability and is not checked here.
    """
    from nsa.backends import Shapes, not_supported_reasons

    reasons = not_supported_reasons("triton", device, dtype, Shapes(d_k=d_k, d_v=d_v, G=G))
    if torch.device(device).type == "cpu" and dtype == torch.bfloat16:
        reasons.append("bfloat16 on CPU: the Triton interpreter's tl.dot gives wrong results "
                       "for bfloat16 (use float32 or float16 there)")
    if G > MAX_GROUP:
        reasons.append(f"group size G={G} above the Triton kernels' maximum {MAX_GROUP}")
    if G < 1:
        reasons.append(f"group size G={G} must be >= 1")
    return reasons


def config_not_supported_reasons(cfg: NSAConfig) -> list[str]:
    """Why the Triton block-score kernel cannot serve this config ([] = it can).

    Needs l_sel / d a power of two and l <= l_sel + d (every paper/peer setting does).
    Only matters when selection scores are computed (no ``block_indices`` passed).
    """
    return score_layout_ok(cfg)


def _sel_on_triton(q: Tensor, d_k: int, d_v: int, G: int) -> bool:
    """Routing policy for the selection branch (e.g. SM 8.9 sends it to the reference)."""
    from nsa.backends import Shapes
    from nsa.policy import choose_branch

    choice = choose_branch("sel", q.device, q.dtype, Shapes(d_k=d_k, d_v=d_v, G=G),
                           requested="triton")
    return choice.backend == "triton"


def _combine(out_dtype: torch.dtype, *parts: tuple[Tensor | None, Tensor | None]) -> Tensor:
    """sum of g[..., None] * o over the (o, g) pairs present, in float32, cast once."""
    acc = None
    for o, g in parts:
        if o is None or g is None:
            continue
        term = o.float() * g.float().unsqueeze(-1)
        acc = term if acc is None else acc + term
    return acc.to(out_dtype)


def triton_nsa(
    q: Tensor,
    k_sel: Tensor | None,
    v_sel: Tensor | None,
    k_win: Tensor | None,
    v_win: Tensor | None,
    k_cmp: Tensor | None,
    v_cmp: Tensor | None,
    g_cmp: Tensor | None,
    g_sel: Tensor | None,
    g_win: Tensor | None,
    cfg: NSAConfig,
    scale: float,
    block_indices: Tensor | None = None,
    return_aux: bool = False,
) -> Tensor | tuple[Tensor, NSAAux]:
    """NSA prefill forward over positions 0..T-1 with the Triton kernels.

    Same signature, semantics and outputs as :func:`nsa.ops.reference.reference_nsa`
    (inputs already validated by ``nsa_attention``). ``block_indices`` [B, T, H, n], when
    given, are deduplicated and put in canonical order exactly like the reference does.
    Forward only: if autograd is on and any input requires grad, the reference runs
    instead (it has autograd); backward kernels come later.
    Raises ValueError listing the reasons when the kernels cannot run the case.
    """
    tensors = (q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp, g_cmp, g_sel, g_win)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return reference_nsa(q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp, g_cmp, g_sel,
                             g_win, cfg, scale, block_indices=block_indices,
                             return_aux=return_aux)
    B, T, HQ, d_k = q.shape
    H = next(x for x in (k_sel, k_win, k_cmp) if x is not None).shape[2]
    d_v = next(x for x in (v_sel, v_win, v_cmp) if x is not None).shape[-1]
    G = HQ // H
    need_scores = g_sel is not None and block_indices is None
    reasons = triton_not_supported_reasons(q.device, q.dtype, d_k, d_v, G)
    if need_scores:
        reasons += config_not_supported_reasons(cfg)
    if reasons:
        raise ValueError("nsa_attention(backend='triton') cannot run this case: "
                         + "; ".join(reasons))
    if T == 0:
        return reference_nsa(q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp, g_cmp, g_sel,
                             g_win, cfg, scale, block_indices=block_indices,
                             return_aux=return_aux)
    sel_triton = g_sel is not None and _sel_on_triton(q, d_k, d_v, G)

    o_cmp = scores = None
    if g_cmp is not None or (need_scores and sel_triton):
        o_cmp, scores = cmp_forward(q, k_cmp, v_cmp, cfg, scale, want_o=g_cmp is not None,
                                    want_scores=need_scores and sel_triton,
                                    mode=CMP_SCORE_MODE)
    o_win = win_forward(q, k_win, v_win, cfg.w, scale) if g_win is not None else None

    idx = o_sel = None
    if g_sel is None:
        out = _combine(q.dtype, (o_cmp, g_cmp), (o_win, g_win))
    elif sel_triton:
        if block_indices is None:
            idx = select_topn(scores, T, k_cmp.shape[1], cfg)
        else:
            nb = cfg.num_sel_blocks(T)
            canon = _dedup_indices(block_indices.long())
            idx = torch.where(canon < nb, canon, torch.full_like(canon, -1))
            idx = idx.to(torch.int32).contiguous()
        o_sel, out = sel_forward(
            q, k_sel, v_sel, idx, cfg, scale,
            o_branch=q.new_empty(B, T, HQ, d_v) if return_aux else None,
            g_sel=g_sel, o_cmp=o_cmp, g_cmp=g_cmp, o_win=o_win, g_win=g_win,
        )
    else:
        # routing policy keeps selection on the reference for this device
        sel_out, sel_aux = reference_nsa(q, k_sel, v_sel, None, None, k_cmp, v_cmp, None,
                                         g_sel, None, cfg, scale,
                                         block_indices=block_indices, return_aux=True)
        idx, o_sel = sel_aux.block_indices, sel_aux.o_sel
        ones = torch.ones_like(g_sel)
        out = _combine(q.dtype, (sel_out, ones), (o_cmp, g_cmp), (o_win, g_win))
    if not return_aux:
        return out
    aux = NSAAux(
        block_indices=None if idx is None else idx.long(),
        o_cmp=o_cmp if g_cmp is not None else None,
        o_sel=o_sel,
        o_win=o_win,
    )
    return out, aux


register_backend("triton", triton_nsa)

__all__ = [
    "CMP_SCORE_MODE",
    "config_not_supported_reasons",
    "triton_not_supported_reasons",
    "triton_nsa",
]
