"""The ``triton`` backend of :func:`nsa.ops.nsa_attention`: NSA prefill forward in Triton.

Importing this module registers the backend. Kernels (each beside its launcher):

* :mod:`nsa.ops.compression`: compressed-branch flash attention that also writes the
  Eq. 9/10 group block scores (one fused program, or two passes; ``CMP_SCORE_MODE``);
* :mod:`nsa.ops.selection`: top-n selection on the GPU (no host sync) and the
  group-centric selected-block attention, whose epilogue fuses the gate combine;
* :mod:`nsa.ops.window`: sliding-window flash attention.

Launch order for one call: compressed branch (+ scores) -> top-n -> selected attention,
which reads O_cmp and O_win and writes ``out = g_cmp*O_cmp + g_sel*O_sel + g_win*O_win``
in q's dtype (bf16, fp16 or fp32). The window branch runs in line after the compressed
one, or, while a CUDA graph is captured, on a side stream that the chain joins right
before that combine (``WINDOW_SIDE_STREAM``). Without a selection branch the combine is
one elementwise PyTorch pass.

Backward: :mod:`nsa.ops.triton_autograd` wraps the forward in the custom op
``nsa::triton_fwd`` (opaque to ``torch.compile``) whose backward launches the Triton
backward kernels (:mod:`nsa.ops.flashbwd` for the compressed and window branches,
:mod:`nsa.ops.selection.bwd_launch` for the selected branch).
On SM 9.0+ the kernels that stream key/value tiles read them by bulk tensor copy
(:mod:`nsa.ops.descriptors`; pointer loads elsewhere and where a tensor's layout does not
allow it), and the compressed kernel maps block scores on the tensor cores for G <= 4.
With ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (slow; for tests).
The SM 8.9 policy of :mod:`nsa.policy` is honoured: where it routes the selection branch
to the reference, that branch (scores, top-n, attention) runs in PyTorch and the other
branches still run here.
"""

from __future__ import annotations

import functools

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

# The window branch on a second CUDA stream, overlapping the compressed -> top-n ->
# selected chain (True / False force it on CUDA; None: only while a CUDA graph is being
# captured). H200: 1-1.5% less GPU time at 16k, within noise at 8k and 64k, but the fork
# and join cost the host ~0.1 ms per eager call, which launch-bound small calls pay in
# full (16k, G = 1: 0.685 -> 0.78 ms by do_bench). See docs/perf-notes.md, v10.
WINDOW_SIDE_STREAM: bool | None = None
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The side stream of ``device`` for the window branch (one per device, kept), or None
    where the window runs in line (not CUDA; WINDOW_SIDE_STREAM False, or None outside a
    CUDA graph capture). The side stream waits for an event of the caller's stream and is
    joined back before the call returns, so a capture sees a fork and a join."""
    if device.type != "cuda" or WINDOW_SIDE_STREAM is False:
        return None
    if WINDOW_SIDE_STREAM is None and not torch.cuda.is_current_stream_capturing():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SIDE_STREAMS.get(index)
    if stream is None:
        stream = _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


def triton_not_supported_reasons(
    device: torch.device | str, dtype: torch.dtype, d_k: int, d_v: int, G: int,
    flags=None,
) -> list[str]:
    """Why the Triton backend cannot run this case, one sentence each ([] = it can).

    Device (CUDA SM >= 8.0, or CPU under TRITON_INTERPRET=1), dtype (bf16, fp16, fp32),
    d_k (64, 128, 192, 256 or a power of two >= 16), d_v <= d_k, 1 <= G <= 128; on CPU
    (interpreter) no bfloat16.
    Routing policy (e.g. SM 8.9 selection) is not capability and is not checked here.
    """
    from nsa.backends import Shapes, not_supported_reasons

    reasons = not_supported_reasons("triton", device, dtype, Shapes(d_k=d_k, d_v=d_v, G=G),
                                    flags=flags)
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


def _routing(q: Tensor, d_k: int, d_v: int, G: int) -> tuple[tuple[str, ...], bool]:
    """(why the kernels cannot run, whether the routing policy keeps the selection branch
    on Triton; e.g. SM 8.9 sends it to the reference) for q's device and dtype. Both
    depend only on these sizes, the device and the routing flags, so they are computed
    once per combination: every call used to spend ~0.1 ms of host time here."""
    return _routing_now(q.device, q.dtype, d_k, d_v, G)


@torch.compiler.assume_constant_result
def _routing_now(device: torch.device, dtype: torch.dtype, d_k: int, d_v: int,
                 G: int) -> tuple[tuple[str, ...], bool]:
    """:func:`_routing_for` with the routing flags read now. Under torch.compile the
    answer is a constant of the traced graph, computed when it is traced: Dynamo would
    otherwise trace into the capability checks, whose module lookups (importlib) it
    refuses under fullgraph=True, and it cannot pass the flags object through to a
    constant function unchanged."""
    from nsa.policy import read_flags

    return _routing_for(device, dtype, d_k, d_v, G, read_flags())


@functools.lru_cache(maxsize=256)
def _routing_for(device: torch.device, dtype: torch.dtype, d_k: int, d_v: int, G: int,
                 flags) -> tuple[tuple[str, ...], bool]:
    from nsa.backends import Shapes
    from nsa.policy import choose_branch

    reasons = tuple(triton_not_supported_reasons(device, dtype, d_k, d_v, G, flags))
    choice = choose_branch("sel", device, dtype, Shapes(d_k=d_k, d_v=d_v, G=G), flags=flags,
                           requested="triton")
    return reasons, choice.backend == "triton"


def _combine(out_dtype: torch.dtype, *parts: tuple[Tensor | None, Tensor | None]) -> Tensor:
    """sum of g[..., None] * o over the (o, g) pairs present, in float32, cast once."""
    acc = None
    for o, g in parts:
        if o is None or g is None:
            continue
        term = o.float() * g.float().unsqueeze(-1)
        acc = term if acc is None else acc + term
    return acc.to(out_dtype)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
    deterministic: bool = False,
) -> Tensor | tuple[Tensor, NSAAux]:
    """NSA prefill over positions 0..T-1 with the Triton kernels, forward and backward.

    Same signature, semantics and outputs as :func:`nsa.ops.reference.reference_nsa`
    (inputs already validated by ``nsa_attention``). ``block_indices`` [B, T, H, n], when
    given, are deduplicated and put in canonical order exactly like the reference does.
    When autograd records (an input requires grad), the call goes through the custom op
    ``nsa::triton_fwd`` whose backward runs the Triton backward kernels
    (:mod:`nsa.ops.triton_autograd`); ``deterministic=True`` makes the selected branch's
    key/value gradients bitwise reproducible (ordered partial sums instead of atomics).
    The aux branch outputs carry no gradient on this backend.
    Raises ValueError listing the reasons when the kernels cannot run the case.
    """
    B, T, HQ, d_k = q.shape
    H = next(x for x in (k_sel, k_win, k_cmp) if x is not None).shape[2]
    d_v = next(x for x in (v_sel, v_win, v_cmp) if x is not None).shape[-1]
    G = HQ // H
    need_scores = g_sel is not None and block_indices is None
    reasons, sel_triton = _routing(q, d_k, d_v, G)
    reasons = list(reasons)
    if need_scores:
        reasons += config_not_supported_reasons(cfg)
    if reasons:
        raise ValueError("nsa_attention(backend='triton') cannot run this case: "
                         + "; ".join(reasons))
    tensors = (q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp, g_cmp, g_sel, g_win)
    sel_triton = g_sel is not None and sel_triton
    grad = _needs_grad(*tensors)
    if T == 0 or (g_sel is not None and not sel_triton and grad):
        # nothing to launch, or the routing policy keeps selection on the reference for
        # this device while autograd records: the reference (with autograd) runs it all
        return reference_nsa(q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp, g_cmp, g_sel,
                             g_win, cfg, scale, block_indices=block_indices,
                             return_aux=return_aux)
    if g_sel is not None and not sel_triton:
        return _forward_sel_reference(q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp, g_cmp,
                                      g_sel, g_win, cfg, scale, block_indices, return_aux)
    from nsa.ops.triton_autograd import nsa_triton_op

    out, idx, o_cmp, o_sel, o_win = nsa_triton_op(
        q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp, g_cmp, g_sel, g_win, block_indices,
        cfg, scale, save=grad, want_o_sel=return_aux,
        deterministic=deterministic,
    )
    if not return_aux:
        return out
    aux = NSAAux(
        block_indices=None if idx is None else idx.long(),
        o_cmp=None if o_cmp is None else o_cmp.detach(),
        o_sel=None if o_sel is None else o_sel.detach(),
        o_win=None if o_win is None else o_win.detach(),
    )
    return out, aux


def forward_kernels(
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
    block_indices: Tensor | None,
    cfg: NSAConfig,
    scale: float,
    save: bool,
    want_o_sel: bool,
) -> dict[str, Tensor | None]:
    """Launch the forward kernels (no autograd). Keys: out, idx (int32 [B, T, H, n]),
    o_cmp, o_sel, o_win ([B, T, HQ, d_v]; o_sel only with ``save`` or ``want_o_sel``) and,
    with ``save``, lse_cmp/lse_sel/lse_win (base-2, float32 [B, HQ, T]) for the backward.
    Branches that are off give None."""
    B, T, HQ, _ = q.shape
    d_v = next(x for x in (v_sel, v_win, v_cmp) if x is not None).shape[-1]
    need_scores = g_sel is not None and block_indices is None

    def lse_buf(on: bool) -> Tensor | None:
        return torch.empty(B, HQ, T, device=q.device, dtype=torch.float32) if on else None

    lse_cmp = lse_buf(save and g_cmp is not None)
    lse_sel = lse_buf(save and g_sel is not None)
    lse_win = lse_buf(save and g_win is not None)
    o_cmp = scores = None
    # the window branch depends on nothing the others compute: in a CUDA graph it runs on
    # a side stream beside the compressed -> top-n -> selected chain, which waits for it
    # only right before the launch that combines the branches (WINDOW_SIDE_STREAM)
    side = (_side_stream(q.device) if g_win is not None and (g_cmp is not None or need_scores
                                                             or g_sel is not None) else None)
    o_win = join_win = None
    if side is not None:
        main = torch.cuda.current_stream(q.device)
        inputs_ready = main.record_event()
        o_win = q.new_empty(B, T, HQ, d_v)
    if g_cmp is not None or need_scores:
        o_cmp, scores = cmp_forward(q, k_cmp, v_cmp, cfg, scale, want_o=g_cmp is not None,
                                    want_scores=need_scores, lse=lse_cmp,
                                    mode=CMP_SCORE_MODE)
    if side is not None:
        side.wait_event(inputs_ready)  # q, k, v as they were before the compressed branch
        with torch.cuda.stream(side):
            win_forward(q, k_win, v_win, cfg.w, scale, o=o_win, lse=lse_win)

        def join_win() -> None:
            main.wait_stream(side)
    elif g_win is not None:
        o_win = win_forward(q, k_win, v_win, cfg.w, scale, lse=lse_win)
    idx = o_sel = None
    if g_sel is None:
        if join_win is not None:
            join_win()
        out = _combine(q.dtype, (o_cmp, g_cmp), (o_win, g_win))
    else:
        if block_indices is None:
            idx = select_topn(scores, T, k_cmp.shape[1], cfg)
        else:
            nb = cfg.num_sel_blocks(T)
            canon = _dedup_indices(block_indices.long())
            idx = torch.where(canon < nb, canon, torch.full_like(canon, -1))
            idx = idx.to(torch.int32).contiguous()
        o_sel, out = sel_forward(
            q, k_sel, v_sel, idx, cfg, scale,
            o_branch=q.new_empty(B, T, HQ, d_v) if (save or want_o_sel) else None,
            g_sel=g_sel, o_cmp=o_cmp, g_cmp=g_cmp, o_win=o_win, g_win=g_win, lse=lse_sel,
            before_combine=join_win,
        )
    return dict(out=out, idx=idx, o_cmp=o_cmp, o_sel=o_sel, o_win=o_win,
                lse_cmp=lse_cmp, lse_sel=lse_sel, lse_win=lse_win)


def _forward_sel_reference(q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp, g_cmp, g_sel, g_win,
                           cfg, scale, block_indices, return_aux):
    """Inference where the routing policy keeps the selection branch on the reference:
    compressed and window branches in Triton, selection (scores, top-n, attention) in
    PyTorch."""
    o_cmp = None
    if g_cmp is not None:
        o_cmp, _ = cmp_forward(q, k_cmp, v_cmp, cfg, scale, want_o=True, want_scores=False)
    o_win = win_forward(q, k_win, v_win, cfg.w, scale) if g_win is not None else None
    sel_out, sel_aux = reference_nsa(q, k_sel, v_sel, None, None, k_cmp, v_cmp, None,
                                     g_sel, None, cfg, scale,
                                     block_indices=block_indices, return_aux=True)
    ones = torch.ones_like(g_sel)
    out = _combine(q.dtype, (sel_out, ones), (o_cmp, g_cmp), (o_win, g_win))
    if not return_aux:
        return out
    return out, NSAAux(block_indices=sel_aux.block_indices.long(), o_cmp=o_cmp,
                       o_sel=sel_aux.o_sel, o_win=o_win)


register_backend("triton", triton_nsa)

__all__ = [
    "CMP_SCORE_MODE",
    "forward_kernels",
    "config_not_supported_reasons",
    "triton_not_supported_reasons",
    "triton_nsa",
]
