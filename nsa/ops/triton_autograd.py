"""Autograd glue of the Triton backend: custom ops ``nsa::triton_fwd`` / ``nsa::triton_bwd``.

The forward and backward are registered with :func:`torch.library.custom_op`, so
``torch.compile`` sees each as one opaque node (no graph break inside the op) and
:func:`torch.library.register_autograd` connects them. Eager calls skip the dispatcher:
inference launches the kernels directly and training uses an equivalent
``torch.autograd.Function`` (see :func:`nsa_triton_op`). NSAConfig travels as the int list
``[l, d, l_sel, n, n_initial, n_local, w]``. Branches that are off travel as None
inputs and come back as 0-element outputs (custom ops return tensors only).

Backward math (per branch x in cmp, sel, win; out = sum_x g_x * O_x):
``r_x = rowsum(dout * O_x)`` gives the gate gradient ``dg_x = r_x`` and the softmax term
``Delta_x = g_x * r_x``; the branch kernels take ``dO_x = g_x * dout`` on the fly. The
three branches add their dQ to one float32 buffer. The block-score/top-n path carries no
gradient (the indices are discrete); the compressed branch gets its full gradient
through O_cmp, and k_cmp/v_cmp pass it on to phi in the module.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from nsa.config import NSAConfig

CFG_FIELDS = ("l", "d", "l_sel", "n", "n_initial", "n_local", "w")


# tests set NaN: the dQ buffer is not zeroed, so the first branch's kernel must write
# every row of it
DQ_FILL: float | None = None


def _cfg_list(cfg: NSAConfig) -> list[int]:
    return [int(getattr(cfg, f)) for f in CFG_FIELDS]


def _cfg_from(vals: list[int]) -> NSAConfig:
    return NSAConfig(**dict(zip(CFG_FIELDS, vals, strict=True)))


def _none(x: Tensor) -> Tensor | None:
    return None if x.numel() == 0 and x.dim() == 1 else x


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _eager_real(x: Tensor) -> bool:
    """True outside torch.compile tracing for a real tensor (not fake, meta or wrapped by
    a torch.func transform)."""
    return (not torch.compiler.is_compiling() and x.device.type != "meta"
            and not is_fake(x) and not torch._C._functorch.is_functorch_wrapped_tensor(x))


def _fwd_impl(
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
    cfg: list[int],
    scale: float,
    save: bool,
    want_o_sel: bool,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward kernels (no autograd): (out, idx, o_cmp, o_sel, o_win, lse_cmp,
    lse_sel, lse_win); absent ones 0-element."""
    from nsa.ops.triton_backend import forward_kernels

    r = forward_kernels(q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp, g_cmp, g_sel, g_win,
                        block_indices, _cfg_from(cfg), scale, save, want_o_sel)
    return _op_outputs(q, r)


# the forward kernels as one opaque op for torch.compile (eager training calls _fwd_impl)
triton_fwd = torch.library.custom_op("nsa::triton_fwd", mutates_args=())(_fwd_impl)


def _op_outputs(q: Tensor, r: dict) -> tuple[Tensor, ...]:
    """forward_kernels' dict as the op's outputs: absent ones become fresh 0-element
    tensors (one allocation each: the op may return no tensor twice)."""
    idx = r["idx"] if r["idx"] is not None else q.new_empty(0, dtype=torch.int32)
    outs = [r[k] if r[k] is not None else q.new_empty(0) for k in ("o_cmp", "o_sel", "o_win")]
    lses = [r[k] if r[k] is not None else q.new_empty(0, dtype=torch.float32)
            for k in ("lse_cmp", "lse_sel", "lse_win")]
    return (r["out"], idx, *outs, *lses)


@triton_fwd.register_fake
def _triton_fwd_fake(q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp, g_cmp, g_sel, g_win,
                     block_indices, cfg, scale, save, want_o_sel, deterministic):
    B, T, HQ, _ = q.shape
    v_any = next(v for v in (v_sel, v_win, v_cmp) if v is not None)
    H, d_v = v_any.shape[2], v_any.shape[3]
    n = cfg[3]

    def o(on):
        return q.new_empty(B, T, HQ, d_v) if on else q.new_empty(0)

    def lse(on):
        return q.new_empty(B, HQ, T, dtype=torch.float32) if (on and save) else \
            q.new_empty(0, dtype=torch.float32)

    idx = (q.new_empty(B, T, H, n, dtype=torch.int32) if g_sel is not None
           else q.new_empty(0, dtype=torch.int32))
    return (q.new_empty(B, T, HQ, d_v), idx, o(g_cmp is not None),
            o(g_sel is not None and (save or want_o_sel)), o(g_win is not None),
            lse(g_cmp is not None), lse(g_sel is not None), lse(g_win is not None))


def _bwd_impl(
    dout: Tensor,
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
    idx: Tensor,
    o_cmp: Tensor,
    o_sel: Tensor,
    o_win: Tensor,
    lse_cmp: Tensor,
    lse_sel: Tensor,
    lse_win: Tensor,
    cfg: list[int],
    scale: float,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward kernels (no autograd): (dq, dk_sel, dv_sel, dk_win, dv_win, dk_cmp,
    dv_cmp, dg_cmp, dg_sel, dg_win); absent ones 0-element."""
    from nsa.ops.flashbwd import (
        MASK_CMP,
        MASK_WIN,
        FlashBranch,
        branch_rowdots,
        flash_backward,
        flash_dq,
    )
    from nsa.ops.selection.bwd_launch import sel_backward

    c = _cfg_from(cfg)
    dout = dout.contiguous()
    # float32 dQ of the selected branch (its kernel writes every row: no memset), added by
    # the flash branches' dQ kernel, which stores the final dQ; without a selected branch
    # that kernel only writes the final dQ, so no float32 buffer is needed
    dq = (torch.empty(q.shape, device=q.device, dtype=torch.float32) if g_sel is not None
          else None)
    if dq is not None and DQ_FILL is not None:
        dq.fill_(DQ_FILL)
    e = _empty(q)
    res = {k: e.clone() for k in ("dk_sel", "dv_sel", "dk_win", "dv_win", "dk_cmp", "dv_cmp",
                                  "dg_cmp", "dg_sel", "dg_win")}

    # r_x = rowsum(dout * O_x) for every branch present, dout read once
    present = [(name, o, g) for name, o, g in (("cmp", o_cmp, g_cmp), ("win", o_win, g_win),
                                               ("sel", o_sel, g_sel)) if g is not None]
    rows = dict(zip([p[0] for p in present], branch_rowdots(dout, [p[1] for p in present]),
                    strict=True))

    def prep(name: str, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # the kernels take the gate as float32 (flashbwd.launch.gate_f32 says why)
        r = rows[name]
        gate = g.float().contiguous()
        delta = gate * r
        return r.to(g.dtype), gate, delta

    # the selected branch first (its dQ kernel, or the key-centric kernel's atomics, writes
    # the float32 buffer); then the compressed and window dK/dV, and last one dQ kernel for
    # both flash branches that adds the buffer and stores the final dQ in q's dtype
    if g_sel is not None:
        res["dg_sel"], gate, delta = prep("sel", g_sel)
        res["dk_sel"], res["dv_sel"] = sel_backward(
            q, k_sel, v_sel, idx, dout, gate, lse_sel, delta, dq, c, scale,
            deterministic=deterministic, accumulate_dq=False)
    dq_out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    flash = []
    if g_cmp is not None:
        res["dg_cmp"], gate, delta = prep("cmp", g_cmp)
        if k_cmp is not None:
            res["dk_cmp"], res["dv_cmp"] = flash_backward(
                q, k_cmp, v_cmp, dout, gate, lse_cmp, delta, None, scale, mask=MASK_CMP,
                cmp_l=c.l, cmp_d=c.d, parts="dkdv")
            flash.append(FlashBranch(k_cmp, v_cmp, gate, lse_cmp, delta, MASK_CMP,
                                     cmp_l=c.l, cmp_d=c.d))
    if g_win is not None:
        res["dg_win"], gate, delta = prep("win", g_win)
        res["dk_win"], res["dv_win"] = flash_backward(
            q, k_win, v_win, dout, gate, lse_win, delta, None, scale, mask=MASK_WIN, w=c.w,
            parts="dkdv")
        flash.append(FlashBranch(k_win, v_win, gate, lse_win, delta, MASK_WIN, w=c.w))
    if flash:
        flash_dq(q, dout, dq, scale, flash, accumulate_dq=dq is not None, out=dq_out)
    elif dq is not None:
        dq_out.copy_(dq)
    else:
        dq_out.zero_()
    return (dq_out, res["dk_sel"], res["dv_sel"], res["dk_win"], res["dv_win"],
            res["dk_cmp"], res["dv_cmp"], res["dg_cmp"], res["dg_sel"], res["dg_win"])


# the backward kernels as one opaque op for torch.compile (eager training calls _bwd_impl)
triton_bwd = torch.library.custom_op("nsa::triton_bwd", mutates_args=())(_bwd_impl)


@triton_bwd.register_fake
def _triton_bwd_fake(dout, q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp, g_cmp, g_sel, g_win,
                     idx, o_cmp, o_sel, o_win, lse_cmp, lse_sel, lse_win, cfg, scale,
                     deterministic):
    def like(x, on=True):
        return torch.empty_like(x) if (x is not None and on) else q.new_empty(0)

    return (torch.empty_like(q), like(k_sel, g_sel is not None), like(v_sel, g_sel is not None),
            like(k_win, g_win is not None), like(v_win, g_win is not None),
            like(k_cmp, g_cmp is not None), like(v_cmp, g_cmp is not None),
            like(g_cmp), like(g_sel), like(g_win))


def _setup_context(ctx, inputs, output):
    (q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp, g_cmp, g_sel, g_win, _bi, cfg, scale, _save,
     _want, deterministic) = inputs
    out, idx, o_cmp, o_sel, o_win, lse_cmp, lse_sel, lse_win = output
    # the auxiliary outputs' gradients are never used: without this, autograd would form
    # zeros for each of them (3 GiB at 64k, G = 16) whenever out gets a gradient
    ctx.set_materialize_grads(False)
    ctx.cfg, ctx.scale, ctx.deterministic = cfg, scale, deterministic
    ctx.out_shape = out.shape
    ctx.present = [x is not None for x in (k_sel, v_sel, k_win, v_win, k_cmp, v_cmp,
                                           g_cmp, g_sel, g_win)]
    e = q.new_empty(0)
    ctx.save_for_backward(q, *(x if x is not None else e for x in (
        k_sel, v_sel, k_win, v_win, k_cmp, v_cmp, g_cmp, g_sel, g_win)),
        idx, o_cmp, o_sel, o_win, lse_cmp, lse_sel, lse_win)


def _backward(ctx, dout, *_unused, bwd=None):
    q, *rest = ctx.saved_tensors
    opt = [x if on else None for x, on in zip(rest[:9], ctx.present, strict=True)]
    idx, o_cmp, o_sel, o_win, lse_cmp, lse_sel, lse_win = rest[9:]
    if dout is None:  # only the aux outputs were used
        dout = q.new_zeros(ctx.out_shape)
    grads = (bwd or torch.ops.nsa.triton_bwd)(dout, q, *opt, idx, o_cmp, o_sel, o_win, lse_cmp,
                                               lse_sel, lse_win, ctx.cfg, ctx.scale,
                                               ctx.deterministic)
    dq, *g = grads
    # inputs that were None, or k_cmp/v_cmp used only for selection scores, get no gradient
    g = [_none(x) if on else None for x, on in zip(g, ctx.present, strict=True)]
    return (dq, *g, None, None, None, None, None, None)


torch.library.register_autograd("nsa::triton_fwd", _backward, setup_context=_setup_context)


class _EagerTritonNSA(torch.autograd.Function):
    """Eager training without the custom ops: the same kernels, context and backward as
    ``nsa::triton_fwd`` with :func:`_backward`, but no dispatcher round trip (schema
    binding and alias checks of 16 and 21 arguments cost ~0.8 ms of CPU per
    forward+backward). torch.compile and other tracing take the custom ops."""

    @staticmethod
    def forward(ctx, *inputs):
        outs = _fwd_impl(*inputs)
        _setup_context(ctx, inputs, outs)
        return outs

    @staticmethod
    def backward(ctx, dout, *_unused):
        return _backward(ctx, dout, bwd=_bwd_impl)


def nsa_triton_op(
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
    *,
    save: bool,
    want_o_sel: bool,
    deterministic: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Run ``nsa::triton_fwd``; returns (out, idx, o_cmp, o_sel, o_win) with None for
    branches that are off. ``save``: keep what the backward needs (autograd recording).

    Eager calls (not tracing, real tensors) skip the custom ops, which exist for
    torch.compile and whose dispatch (schema binding, alias checks) costs host time on
    every call: inference calls the kernels directly, training goes through
    :class:`_EagerTritonNSA` (same kernels, same backward)."""
    eager = _eager_real(q)
    if not save and eager:
        from nsa.ops.triton_backend import forward_kernels

        r = forward_kernels(q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp, g_cmp, g_sel,
                            g_win, block_indices, cfg, scale, False, want_o_sel)
        return r["out"], r["idx"], r["o_cmp"], r["o_sel"], r["o_win"]
    args = (q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp, g_cmp, g_sel, g_win, block_indices,
            _cfg_list(cfg), float(scale), save, want_o_sel, deterministic)
    if eager:
        out, idx, o_cmp, o_sel, o_win, *_ = _EagerTritonNSA.apply(*args)
    else:
        out, idx, o_cmp, o_sel, o_win, *_ = torch.ops.nsa.triton_fwd(*args)
    return (out, idx if g_sel is not None else None, o_cmp if g_cmp is not None else None,
            o_sel if g_sel is not None and o_sel.numel() else None,
            o_win if g_win is not None else None)
