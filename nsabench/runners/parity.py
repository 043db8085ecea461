"""Parity: one backend in one dtype against the float64 reference, forward and gradients.

The measured forward runs without autograd recording (so it reaches the backend's
forward kernels) and takes the float64 reference's block indices (so the error is
numerical error, not a near-tie flipping a block); the backend's own selection is
compared with the reference's separately (``sel_match``, the fraction of equal
indices), and its free-running output error is reported as ``rel_err_free``. Gradients
come from autograd through whatever path the backend takes when inputs require grad.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nsa import nsa_attention
from nsa.backends import to_dtype
from nsabench.runners.common import (
    all_finite,
    case_config,
    cat_flat,
    make_inputs,
    max_abs_err,
    rel_err,
    resolve_backend,
)
from nsabench.suites import CaseSpec


def run(spec: CaseSpec, device: torch.device) -> dict[str, Any]:
    p = spec.params
    cfg = case_config(p)
    dtype = to_dtype(p["dtype"])
    backend, why = resolve_backend(p, device)
    T = p["T"]
    base = make_inputs(p, T, device, dtype, p["seed"])
    x = base.leaves()
    ref = base.leaves(torch.float64)  # same values, upcast: the error is the backend's own

    out_ref, aux_ref = nsa_attention(**ref.op_args(cfg), backend="reference", return_aux=True)
    idx_ref = aux_ref.block_indices
    # forward errors without autograd recording: a backend may take another path when
    # inputs require grad (the Triton forward-only kernels fall back to the reference),
    # and the forward parity must reach the kernel
    with torch.no_grad():
        out_free, aux = nsa_attention(**base.op_args(cfg), backend=backend, return_aux=True)
        out_fwd = nsa_attention(**base.op_args(cfg), block_indices=idx_ref, backend=backend)

    m: dict[str, Any] = {
        "backend": backend,
        "backend_reason": why,
        "rel_err": rel_err(out_fwd, out_ref),
        "max_abs_err": max_abs_err(out_fwd, out_ref),
        "rel_err_free": rel_err(out_free, out_ref),
        "sel_match": (aux.block_indices == idx_ref).double().mean().item(),
    }
    finite = all_finite(out_fwd, out_free)
    if p["grad"]:
        out = nsa_attention(**x.op_args(cfg), block_indices=idx_ref, backend=backend)
        gen = torch.Generator(device=device).manual_seed(p["seed"] + 1)
        do = torch.randn(out_ref.shape, generator=gen, device=device, dtype=torch.float64)
        names = x.NAMES
        got = torch.autograd.grad(out, x.tensors(), do.to(dtype))
        want = torch.autograd.grad(out_ref, ref.tensors(), do)
        g = dict(zip(names, got, strict=True))
        w = dict(zip(names, want, strict=True))
        groups = {
            "dq": ["q"],
            "dk": ["k_sel", "k_win", "k_cmp_raw"],
            "dv": ["v_sel", "v_win", "v_cmp_raw"],
            "dgates": ["g_cmp", "g_sel", "g_win"],
        }
        for gname, members in groups.items():
            m[f"{gname}_rel_err"] = rel_err(cat_flat([g[k] for k in members]),
                                            cat_flat([w[k] for k in members]))
        errs = [m[f"{k}_rel_err"] for k in groups]
        m["grad_rel_err"] = math.nan if any(map(math.isnan, errs)) else max(errs)
        finite = finite and all_finite(out, *got)
    m["finite"] = finite
    return m
