"""Parity: one backend in one dtype against the float64 reference, forward and gradients.

The measured forward runs without autograd recording (so it reaches the backend's
forward kernels) and takes the float64 reference's block indices (so the error is
numerical error, not a near-tie flipping a block); the backend's own selection is
compared with the reference's separately (``sel_match``, the fraction of equal
indices), and its free-running output error is reported as ``rel_err_free``. Gradients
come from autograd through whatever path the backend takes when inputs require grad;
dk and dv include the compressed tokens' gradients.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nsa import nsa_attention
from nsa.backends import to_dtype
from nsa.ops.reference import compress_mean
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

NAMES = ("q", "k_sel", "v_sel", "k_win", "v_win", "k_cmp", "v_cmp", "g_cmp", "g_sel", "g_win")
GRAD_GROUPS = {
    "dq": ("q",),
    "dk": ("k_sel", "k_win", "k_cmp"),
    "dv": ("v_sel", "v_win", "v_cmp"),
    "dgates": ("g_cmp", "g_sel", "g_win"),
}


def run(spec: CaseSpec, device: torch.device) -> dict[str, Any]:
    p = spec.params
    cfg = case_config(p)
    dtype = to_dtype(p["dtype"])
    backend, why = resolve_backend(p, device)
    base = make_inputs(p, p["T"], device, dtype, p["seed"])
    # compressed tokens via phi = mean, made once in the measured dtype: the backend and
    # the float64 oracle get exactly the same op inputs (upcast for the oracle)
    inputs = {n: getattr(base, n) for n in NAMES if hasattr(base, n)}
    inputs["k_cmp"] = compress_mean(base.k_cmp_raw, cfg.l, cfg.d)
    inputs["v_cmp"] = compress_mean(base.v_cmp_raw, cfg.l, cfg.d)
    x = {n: t.detach().requires_grad_(True) for n, t in inputs.items()}
    ref = {n: t.detach().double().requires_grad_(True) for n, t in inputs.items()}

    out_ref, aux_ref = nsa_attention(**ref, config=cfg, backend="reference", return_aux=True)
    idx_ref = aux_ref.block_indices
    # forward errors without autograd recording too: with grad the Triton backend runs
    # its custom op (same kernels, saving for the backward); both paths are measured
    with torch.no_grad():
        out_free, aux = nsa_attention(**inputs, config=cfg, backend=backend, return_aux=True)
        out_fwd = nsa_attention(**inputs, config=cfg, block_indices=idx_ref, backend=backend)

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
        out = nsa_attention(**x, config=cfg, block_indices=idx_ref, backend=backend)
        gen = torch.Generator(device=device).manual_seed(p["seed"] + 1)
        do = torch.randn(out_ref.shape, generator=gen, device=device, dtype=torch.float64)
        got = dict(zip(NAMES, torch.autograd.grad(out, [x[n] for n in NAMES], do.to(dtype)),
                       strict=True))
        want = dict(zip(NAMES, torch.autograd.grad(out_ref, [ref[n] for n in NAMES], do),
                        strict=True))
        for gname, members in GRAD_GROUPS.items():
            m[f"{gname}_rel_err"] = rel_err(cat_flat([got[k] for k in members]),
                                            cat_flat([want[k] for k in members]))
        errs = [m[f"{k}_rel_err"] for k in GRAD_GROUPS]
        m["grad_rel_err"] = math.nan if any(map(math.isnan, errs)) else max(errs)
        finite = finite and all_finite(out, *got.values())
    m["finite"] = finite
    return m
