"""Prefill: nsa_attention against dense causal SDPA (and flash-attn when importable) in
the same run, forward and forward+backward, plus each branch alone (forward).

Dense runs on the [B, HQ, T, D] layout with ``is_causal=True, enable_gqa=True``: query
and key lengths are equal, so the top-left causal alignment is the right one here.
Inputs are built outside the timed region; speedup = dense time / NSA time.

With ``fla: true`` it also times fla-core's ``parallel_nsa`` against NSA in the
configuration both support (see ``_fla_compare``); speedup vs fla = fla time / NSA time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from nsa import nsa_attention
from nsa.backends import to_dtype
from nsa.ops.reference import compress_mean
from nsabench.runners.common import (
    all_finite,
    bench,
    case_config,
    fla_parallel_nsa,
    fla_status,
    flash_attn_status,
    graph_bench,
    make_inputs,
    resolve_backend,
    speedup,
    timing_params,
)
from nsabench.suites import CaseSpec


def run(spec: CaseSpec, device: torch.device) -> dict[str, Any]:
    p = spec.params
    cfg = case_config(p)
    dtype = to_dtype(p["dtype"])
    backend, why = resolve_backend(p, device)
    T = p["T"]
    tp = timing_params(p)
    x = make_inputs(p, T, device, dtype, p["seed"])
    m: dict[str, Any] = {"backend": backend, "backend_reason": why}
    finite = True

    # NSA; compressed tokens are made once, outside the timed region (phi is the
    # caller's module, not the op)
    k_cmp = compress_mean(x.k_cmp_raw, cfg.l, cfg.d)
    v_cmp = compress_mean(x.v_cmp_raw, cfg.l, cfg.d)

    def nsa_args(gates=("cmp", "sel", "win"), src=x, kc=k_cmp, vc=v_cmp):
        return dict(q=src.q, k_sel=src.k_sel, v_sel=src.v_sel, k_win=src.k_win,
                    v_win=src.v_win, k_cmp=kc, v_cmp=vc,
                    g_cmp=src.g_cmp if "cmp" in gates else None,
                    g_sel=src.g_sel if "sel" in gates else None,
                    g_win=src.g_win if "win" in gates else None,
                    config=cfg, backend=backend)

    # dense: same selection-branch keys/values, [B, heads, T, D]
    qd = x.q.transpose(1, 2).contiguous()
    kd = x.k_sel.transpose(1, 2).contiguous()
    vd = x.v_sel.transpose(1, 2).contiguous()

    def dense_fwd(q=qd, k=kd, v=vd):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    fa_why = flash_attn_status(device, dtype)
    if fa_why is None and p["d_v"] != p["d_k"]:
        fa_why = "flash-attn needs d_v == d_k"
    m["flash_attn"] = "used" if fa_why is None else f"not used: {fa_why}"

    if "fwd" in p["modes"]:
        with torch.no_grad():
            out = nsa_attention(**nsa_args())
            finite = finite and all_finite(out)
            del out
            t = bench(lambda: nsa_attention(**nsa_args()), device, **tp)
            d = bench(dense_fwd, device, **tp)
            # per query head (B * HQ of them): how small groups compare with G = 16 at
            # the same T (PERF.md's G < 16 target)
            heads = p["B"] * p["H"] * p["G"]
            m.update(nsa_fwd_ms=t.ms, dense_fwd_ms=d.ms, speedup_fwd=speedup(d.ms, t.ms),
                     nsa_fwd_us_per_head=1e3 * t.ms / heads,
                     timer_fwd=t.timer, samples_fwd=t.n)
            if p["graph"] and device.type == "cuda" and backend == "triton":
                # the same call without the host: where the eager time is well above
                # this, the call is launch-bound and a CUDA graph would recover the rest
                g, why = graph_bench(lambda: nsa_attention(**nsa_args()), device, **tp)
                if g is None:
                    m["nsa_fwd_graph_error"] = why
                else:
                    m.update(nsa_fwd_graph_ms=g.ms, nsa_fwd_graph_us_per_head=1e3 * g.ms / heads)
            if fa_why is None:
                from flash_attn import flash_attn_func

                kf, vf = x.k_sel, x.v_sel
                fa = bench(lambda: flash_attn_func(x.q, kf, vf, causal=True), device, **tp)
                m.update(fa2_fwd_ms=fa.ms, speedup_fwd_vs_fa2=speedup(fa.ms, t.ms))

    if "fwd_bwd" in p["modes"]:
        try:
            finite = _fwd_bwd(m, p, x, cfg, nsa_args, dense_fwd, qd, kd, vd, device, dtype,
                              tp, fa_why) and finite
        except torch.OutOfMemoryError as exc:
            # recorded, not fatal: the forward numbers stay, the fwd+bwd thresholds then
            # read "not measured"
            m["fwd_bwd_error"] = _oom_text(exc)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if p["fla"]:
        fla_why = fla_status(device, dtype, p)
        m["fla"] = "used" if fla_why is None else f"not used: {fla_why}"
        if fla_why is None:
            finite = _fla_compare(m, p, x, cfg, backend, device, dtype, tp) and finite

    if p["branches"]:
        with torch.no_grad():
            for b in ("cmp", "sel", "win"):
                t = bench(lambda b=b: nsa_attention(**nsa_args(gates=(b,))), device, **tp)
                m[f"{b}_fwd_ms"] = t.ms
    m["finite"] = finite
    return m


def _oom_text(exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"out of memory: {first.split('. GPU')[0][:120]}"


def _short_error(exc: BaseException) -> str:
    """"RuntimeError: first line" (at most about 200 characters)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return _oom_text(exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def _fla_compare(m, p, x, cfg, backend, device, dtype, tp) -> bool:
    """fla-core's parallel_nsa against NSA in the configuration both support, timed into
    ``m``; returns whether NSA's outputs (and gradients) are finite.

    Both sides take the same q, one raw k/v (the selection branch's; the compression
    branch mean-pools it) and the gates g_cmp, g_sel; no sliding window. fla pools inside
    its call, so NSA's ``compress_mean`` runs inside the timed call too. Forward+backward
    is ``torch.autograd.grad`` over (q, k, v, g_cmp, g_sel) with the same random dout. An
    fla failure is recorded as ``fla_error`` and ends the fla timings; NSA's stay."""
    parallel_nsa = fla_parallel_nsa()
    scale = cfg.scale if cfg.scale is not None else p["d_k"] ** -0.5
    det = bool(p.get("deterministic", False))
    finite = True

    def nsa_nowin(q, k, v, gc, gs, **kw):
        kc = compress_mean(k, cfg.l, cfg.d)
        vc = compress_mean(v, cfg.l, cfg.d)
        return nsa_attention(q, k, v, None, None, kc, vc, gc, gs, None, config=cfg,
                             scale=scale, backend=backend, **kw)

    def fla(q, k, v, gc, gs):
        return parallel_nsa(q, k, v, g_cmp=gc, g_slc=gs, g_swa=None, block_counts=cfg.n,
                            block_size=cfg.l_sel, window_size=0, scale=scale)

    def fla_failed(exc: BaseException) -> None:
        m["fla_error"] = _short_error(exc)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    args = (x.q, x.k_sel, x.v_sel, x.g_cmp, x.g_sel)
    if "fwd" in p["modes"]:
        with torch.no_grad():
            out = nsa_nowin(*args)
            finite = finite and all_finite(out)
            del out
            t = bench(lambda: nsa_nowin(*args), device, **tp)
            m["nsa_nowin_fwd_ms"] = t.ms
            try:
                out = fla(*args)
                m["fla_finite"] = all_finite(out)
                del out
                f = bench(lambda: fla(*args), device, **tp)
                m.update(fla_fwd_ms=f.ms, speedup_fwd_vs_fla=speedup(f.ms, t.ms))
            except Exception as exc:  # recorded, not fatal: NSA's numbers stay
                fla_failed(exc)

    if "fwd_bwd" in p["modes"]:
        leaves = tuple(a.detach().requires_grad_(True) for a in args)
        gen = torch.Generator(device=device).manual_seed(p["seed"] + 2)
        do = torch.randn(x.q.shape[:-1] + (p["d_v"],), generator=gen, device=device,
                         dtype=dtype)

        def nsa_fb():
            return torch.autograd.grad(nsa_nowin(*leaves, deterministic=det), leaves, do)

        def fla_fb():
            return torch.autograd.grad(fla(*leaves), leaves, do)

        try:
            grads = nsa_fb()
            finite = finite and all_finite(*grads)
            del grads
            t = bench(nsa_fb, device, **tp)
            m["nsa_nowin_fwd_bwd_ms"] = t.ms
        except torch.OutOfMemoryError as exc:
            m["nsa_nowin_fwd_bwd_error"] = _oom_text(exc)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return finite
        if "fla_error" not in m:
            try:
                grads = fla_fb()
                m["fla_finite"] = m.get("fla_finite", True) and all_finite(*grads)
                del grads
                f = bench(fla_fb, device, **tp)
                m.update(fla_fwd_bwd_ms=f.ms, speedup_fwd_bwd_vs_fla=speedup(f.ms, t.ms))
            except Exception as exc:
                fla_failed(exc)
    return finite


def _peak_gib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    res = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del res
    return round(peak / 2**30, 3)


def _fwd_bwd(m, p, x, cfg, nsa_args, dense_fwd, qd, kd, vd, device, dtype, tp,
             fa_why) -> bool:
    """Forward+backward of NSA, dense (and flash-attn) timed into ``m``; returns whether
    NSA's gradients are finite."""
    leaves = x.leaves()
    kc = compress_mean(leaves.k_cmp_raw, cfg.l, cfg.d).detach().requires_grad_(True)
    vc = compress_mean(leaves.v_cmp_raw, cfg.l, cfg.d).detach().requires_grad_(True)
    args = nsa_args(src=leaves, kc=kc, vc=vc)
    inputs = [leaves.q, leaves.k_sel, leaves.v_sel, leaves.k_win, leaves.v_win, kc, vc,
              leaves.g_cmp, leaves.g_sel, leaves.g_win]
    gen = torch.Generator(device=device).manual_seed(p["seed"] + 1)
    do = torch.randn(x.q.shape[:-1] + (p["d_v"],), generator=gen, device=device, dtype=dtype)

    det = bool(p.get("deterministic", False))

    def nsa_fb():
        out = nsa_attention(**args, deterministic=det)
        return torch.autograd.grad(out, inputs, do)

    grads = nsa_fb()
    finite = all_finite(*grads)
    del grads
    dq, dk, dv = (t.detach().requires_grad_(True) for t in (qd, kd, vd))
    ddo = do.transpose(1, 2).contiguous()

    def dense_fb():
        out = dense_fwd(dq, dk, dv)
        return torch.autograd.grad(out, (dq, dk, dv), ddo)

    if device.type == "cuda":
        # memory one forward+backward adds on top of its inputs (activations, saved
        # tensors, workspaces, the gradients it returns), GiB
        m.update(nsa_fwd_bwd_peak_gib=_peak_gib(nsa_fb), dense_fwd_bwd_peak_gib=_peak_gib(dense_fb))
    m["deterministic"] = det

    t = bench(nsa_fb, device, **tp)
    d = bench(dense_fb, device, **tp)
    m.update(nsa_fwd_bwd_ms=t.ms, dense_fwd_bwd_ms=d.ms, speedup_fwd_bwd=speedup(d.ms, t.ms),
             timer_fwd_bwd=t.timer, samples_fwd_bwd=t.n)
    if fa_why is None:
        from flash_attn import flash_attn_func

        fq, fk, fv = (t_.detach().requires_grad_(True) for t_ in (x.q, x.k_sel, x.v_sel))

        def fa_fb():
            out = flash_attn_func(fq, fk, fv, causal=True)
            return torch.autograd.grad(out, (fq, fk, fv), do)

        fa = bench(fa_fb, device, **tp)
        m.update(fa2_fwd_bwd_ms=fa.ms, speedup_fwd_bwd_vs_fa2=speedup(fa.ms, t.ms))
    return finite
