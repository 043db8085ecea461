"""Decode: one NSA decode step against dense SDPA decode at context length S.

The cache is filled with S - 1 prefilled tokens plus one appended token (one real
decode step), then ``nsa_decode`` for the newest token is timed (on CUDA as CUDA-graph
replays, for both sides, plus eager times for reference); dense attention is
one query row over the S cached keys, keys sliced to S and no ``is_causal`` (with one
query row, is_causal=True would align the mask top-left and see only key 0).

Tokens read come from ``cache.last_reads``, counted by the op from what it actually
used; bytes per sequence = sum over KV heads of tokens x (d_k + d_v) x element size.
Dense reads all S tokens of every KV head.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from nsa.backends import to_dtype
from nsa.ops.reference import compress_mean, nsa_chunk
from nsabench.runners.common import (
    CaseSkip,
    all_finite,
    bench,
    case_config,
    flash_attn_status,
    graphed,
    rel_err,
    resolve_backend,
    speedup,
    timing_params,
)
from nsabench.suites import CaseSpec


def spec_tokens_max(S: int, cfg) -> int:
    """Spec upper bound of tokens one decode step may read at position t = S - 1:
    N_cmp(t) + min(n * l', t + 1) + min(w, t + 1) (NSA-SPEC.md, Decode)."""
    t = S - 1
    n_cmp = 0 if t + 1 < cfg.l else (t + 1 - cfg.l) // cfg.d + 1
    return n_cmp + min(cfg.n * cfg.l_sel, t + 1) + min(cfg.w, t + 1)


def run(spec: CaseSpec, device: torch.device) -> dict[str, Any]:
    try:
        from nsa.cache import NSACache
        from nsa.ops.decode import nsa_decode
    except ImportError as exc:
        raise CaseSkip(f"decode API not available: {exc}") from None
    p = spec.params
    cfg = case_config(p)
    dtype = to_dtype(p["dtype"])
    backend, why = resolve_backend(p, device)
    tp = timing_params(p)
    S, B, H, G, dk, dv = p["S"], p["B"], p["H"], p["G"], p["d_k"], p["d_v"]
    HQ = H * G
    gen = torch.Generator(device=device).manual_seed(p["seed"])

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    raw = {name: randn(B, S, H, dk if name.startswith("k") else dv)
           for name in ("k_sel", "v_sel", "k_win", "v_win", "k_cmp_raw", "v_cmp_raw")}
    q_t = randn(B, HQ, dk)
    gates = [0.01 + 0.98 * torch.rand(B, HQ, generator=gen, device=device, dtype=dtype)
             for _ in range(3)]

    cache = NSACache(cfg, batch=B, n_kv_heads=H, d_k=dk, d_v=dv, max_len=S, device=device,
                     dtype=dtype)
    order = ("k_sel", "v_sel", "k_win", "v_win", "k_cmp_raw", "v_cmp_raw")
    if S > 1:
        cache.prefill(*(raw[n][:, : S - 1] for n in order))
    cache.append(*(raw[n][:, S - 1] for n in order))
    if cache.length != S:
        raise RuntimeError(f"cache holds {cache.length} tokens after the step, expected {S}")

    def step():
        return nsa_decode(q_t, cache, *gates, cfg, backend=backend)

    try:
        with torch.no_grad():
            out, idx = nsa_decode(q_t, cache, *gates, cfg, backend=backend, return_indices=True)
    except ValueError as exc:
        if "backend" in str(exc):
            raise CaseSkip(f"nsa_decode cannot use backend {backend}: {exc}") from None
        raise
    reads = {k: v.detach().clone() for k, v in cache.last_reads.items()}
    m: dict[str, Any] = {"backend": backend, "backend_reason": why}

    # dense decode: one query over S cached keys; [B, heads, S, D] layout, keys sliced to S
    kd = raw["k_sel"].transpose(1, 2).contiguous()
    vd = raw["v_sel"].transpose(1, 2).contiguous()
    qd = q_t[:, :, None, :]

    def dense():
        return F.scaled_dot_product_attention(qd, kd[:, :, :S], vd[:, :, :S], enable_gqa=True)

    with torch.no_grad():
        t = bench(graphed(step, device), device, **tp)
        d = bench(graphed(dense, device), device, **tp)
        timer = t.timer + (" over CUDA-graph replays" if device.type == "cuda" else "")
        m.update(nsa_ms=t.ms, dense_ms=d.ms, speedup=speedup(d.ms, t.ms), timer=timer,
                 samples=t.n)
        if device.type == "cuda":  # what a caller without graphs pays (launches, Python)
            te = bench(step, device, **tp)
            de = bench(dense, device, **tp)
            m.update(nsa_eager_ms=te.ms, dense_eager_ms=de.ms,
                     speedup_eager=speedup(de.ms, te.ms))
    fa_why = flash_attn_status(device, dtype)
    if fa_why is None and dk != dv:
        fa_why = "flash-attn needs d_v == d_k"
    m["flash_attn"] = "used" if fa_why is None else f"not used: {fa_why}"
    if fa_why is None:
        from flash_attn import flash_attn_with_kvcache

        kf, vf = raw["k_sel"], raw["v_sel"]
        lens = torch.full((B,), S, dtype=torch.int32, device=device)
        with torch.no_grad():
            fa = bench(lambda: flash_attn_with_kvcache(q_t[:, None], kf, vf, cache_seqlens=lens),
                       device, **tp)
        m.update(fa2_ms=fa.ms, speedup_vs_fa2=speedup(fa.ms, t.ms))

    # what was read, as counted by the op
    es = torch.finfo(dtype).bits // 8
    per_head = sum(reads.values())  # [B, H] tokens
    for b_name, r in reads.items():
        m[f"{b_name}_tokens"] = r.double().mean().item()
    m["nsa_tokens"] = per_head.double().mean().item()
    m["dense_tokens"] = S
    m["nsa_bytes"] = (per_head.double().sum(dim=1) * (dk + dv) * es).mean().item()
    m["dense_bytes"] = float(S * H * (dk + dv) * es)
    m["read_fraction"] = m["nsa_bytes"] / m["dense_bytes"]
    m["spec_tokens_max"] = spec_tokens_max(S, cfg)
    m["read_vs_spec"] = per_head.max().item() / m["spec_tokens_max"]

    finite = all_finite(out)
    if p["check"]:
        # the float64 oracle gets the op's inputs: raw tokens upcast, and the compressed
        # tokens as the cache made them (phi = mean in the cache's dtype), so a rounding
        # difference in phi cannot flip a near-tie block choice
        c = lambda x: x.double()  # noqa: E731
        q_pos = torch.full((B, 1), S - 1, device=device, dtype=torch.long)
        pos = torch.arange(S, device=device)[None].expand(B, -1)
        r = nsa_chunk(
            c(q_t)[:, None], q_pos, c(raw["k_sel"]), c(raw["v_sel"]), c(raw["k_win"]),
            c(raw["v_win"]), pos, c(compress_mean(raw["k_cmp_raw"], cfg.l, cfg.d)),
            c(compress_mean(raw["v_cmp_raw"], cfg.l, cfg.d)),
            *(c(g)[:, None] for g in gates), cfg, dk ** -0.5,
        )
        m["rel_err"] = rel_err(out, r.out[:, 0])
        if idx is not None and r.block_indices is not None:
            m["sel_match"] = (idx.to(r.block_indices.device).long()
                              == r.block_indices[:, 0]).double().mean().item()
    m["finite"] = finite
    return m
