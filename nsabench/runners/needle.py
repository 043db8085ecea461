"""Mechanism needle: retrieval through NSA attention, no training (CLI.md, "Needle").

Per (length T, depth p) and trial, one haystack per KV head:

* keys: standard normal ``[T, d_k]`` noise; values: codes drawn at random from a
  codebook of ``codes`` unit vectors, orthonormal when codes <= d_v (the haystack
  "speaks" in codes too);
* the query, at the last position T - 1, is ``sqrt(d_k) * u`` for a random unit vector
  u, so a key's logit (scale 1/sqrt(d_k)) is its projection on u: noise keys have logit
  ~ N(0, 1);
* the needle: the full selection block at depth p (block round(p * (full blocks - 1)))
  has every key's component along u set to ``NEEDLE_LOGIT`` (the rest stays noise) and
  every value set to one code, the planted one;
* distractors (``distractors`` other blocks, each with its own wrong code), cycling over
  three kinds that each defeat a shortcut:
  ``half``  - half the block (l'/2 tokens) exactly as aligned as the needle: a selector
              that ranks blocks by their best compressed token ties it with the needle,
              only Eq. 9's overlap-weighted block score ranks the needle first; in the
              output it weighs half a needle;
  ``weak``  - the whole block aligned at WEAK_FRACTION of the needle's logit;
  ``spike`` - one token more aligned than any needle token (SPIKE_LOGIT): strong for
              dense attention, invisible to mean-pooled compressed scoring.

NSA runs :func:`nsa.nsa_attention` with its own compressed scoring (phi = mean via
:func:`nsa.compress_mean`, nothing learned) and top-n selection on the requested
backend; by default only the selection gate is on (``gates: sel``), so the planted code
can reach the output through the selected blocks alone. A trial is correct when the
output row of the last query is nearest (cosine) to the planted code; recall is the
fraction of haystacks whose needle block is in ``aux.block_indices`` of that query.
Dense attention (the same query over all T keys, softmax in float32) is the control.

Ablations show the test can fail: ``random_selection`` passes random block indices
(forced blocks plus random candidates) instead of the op's own selection; ``unaligned``
plants the code without aligning the needle keys (nothing marks the block: dense and
NSA fall to chance, 1/codes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nsa import nsa_attention
from nsa.backends import to_dtype
from nsa.ops.reference import compress_mean
from nsabench.runners.common import CaseSkip, all_finite, case_config, resolve_backend
from nsabench.suites import CaseSpec

NEEDLE_LOGIT = 10.0  # logit of every needle key for the needle's query (noise: N(0, 1))
WEAK_FRACTION = 0.9  # weak distractors: the whole block one logit below the needle
SPIKE_LOGIT = 12.0  # spike distractors: one token above every needle token
DISTRACTOR_KINDS = ("half", "weak", "spike")

@dataclass
class Haystack:
    q: Tensor  # [B, T, HQ, d_k]
    k: Tensor  # [B, T, H, d_k]
    v: Tensor  # [B, T, H, d_v]
    needle_block: Tensor  # [B] block index of the needle
    code: Tensor  # [B, H] planted code index per haystack
    codebook: Tensor  # [C, d_v], unit rows


def depth_block(depth: float, T: int, l_sel: int) -> int:
    """Selection block of the needle at depth in [0, 1]: among the full blocks of T tokens,
    0 at depth 0 and the last full one at depth 1."""
    full = T // l_sel
    return int(round(depth * (full - 1)))


def make_codebook(n_codes: int, d_v: int, seed: int, device: torch.device) -> Tensor:
    """n_codes unit rows: orthonormal when n_codes <= d_v (a mixture's nearest code is
    then its heaviest component, whatever the other components), random otherwise."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    c = torch.randn(max(n_codes, d_v), d_v, generator=gen, dtype=torch.float64)
    if n_codes <= d_v:
        c = torch.linalg.qr(c)[0][:, :n_codes].T.contiguous()
    c = c[:n_codes]
    return (c / c.norm(dim=-1, keepdim=True)).float().to(device)


def make_haystack(
    p: dict[str, Any], T: int, depths: list[float], seeds: list[int], codebook: Tensor,
    device: torch.device,
) -> Haystack:
    """One sequence per (depth, seed); each KV head of a sequence is its own haystack.
    The large noise tensors are drawn on the device (a generator seeded per sequence),
    the few placement decisions on the CPU."""
    H, G, dk = p["H"], p["G"], p["d_k"]
    ls = p["l_sel"]
    C = codebook.shape[0]
    full = T // ls
    B = len(depths)
    dtype = to_dtype(p["dtype"])
    q = torch.empty(B, T, H * G, dk, device=device, dtype=dtype)
    k = torch.empty(B, T, H, dk, device=device, dtype=dtype)
    v = torch.empty(B, T, H, codebook.shape[1], device=device, dtype=dtype)
    blocks, codes = [], []
    for b, (depth, seed) in enumerate(zip(depths, seeds, strict=True)):
        dgen = torch.Generator(device=device).manual_seed(seed)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        # queries other than the last one are not scored; they only have to be valid
        q[b] = torch.randn(T, H * G, dk, generator=dgen, device=device, dtype=dtype)
        kb = torch.randn(T, H, dk, generator=dgen, device=device)
        code_idx = torch.randint(0, C, (T, H), generator=dgen, device=device)
        u = torch.randn(H, dk, generator=gen)
        u = (u / u.norm(dim=-1, keepdim=True)).to(device)
        jn = depth_block(depth, T, ls)
        others = [j for j in range(full) if j != jn]
        planted = torch.randint(0, C, (H,), generator=gen).to(device)
        # the last query of each query head: its group's direction u, norm sqrt(d_k)
        q[b, T - 1] = (math.sqrt(dk) * u.repeat_interleave(G, dim=0)).to(dtype)

        def align(rows: slice, logit: float, kb=kb, u=u) -> None:
            # exact logit: the keys' component along u is replaced, the rest is noise
            kb[rows] += (logit - (kb[rows] * u).sum(-1, keepdim=True)) * u

        sl = slice(jn * ls, (jn + 1) * ls)
        if p["ablation"] != "unaligned":
            align(sl, NEEDLE_LOGIT)
        code_idx[sl] = planted
        n_dis = min(p["distractors"], len(others))
        order = torch.randperm(len(others), generator=gen)[:n_dis].tolist()
        # wrong codes per KV head: distinct from the planted one and from each other
        # (while the codebook lasts), so no two distractors add up against the needle
        shift = torch.stack([1 + torch.randperm(C - 1, generator=gen) for _ in range(H)],
                            1).to(device)
        for i, oi in enumerate(order):
            j = others[oi]
            kind = DISTRACTOR_KINDS[i % len(DISTRACTOR_KINDS)]
            code_idx[j * ls:(j + 1) * ls] = (planted + shift[i % (C - 1)]) % C
            if kind == "half":
                half = ls // 2
                start = j * ls + (half if torch.rand((), generator=gen) < 0.5 else 0)
                align(slice(start, start + half), NEEDLE_LOGIT)
            elif kind == "weak":
                align(slice(j * ls, (j + 1) * ls), WEAK_FRACTION * NEEDLE_LOGIT)
            else:
                pos = j * ls + int(torch.randint(0, ls, (), generator=gen))
                align(slice(pos, pos + 1), SPIKE_LOGIT)
        k[b] = kb.to(dtype)
        v[b] = codebook[code_idx].to(dtype)  # [T, H, d_v]
        blocks.append(jn)
        codes.append(planted)
    return Haystack(q=q, k=k, v=v, needle_block=torch.tensor(blocks, device=device),
                    code=torch.stack(codes), codebook=codebook)


def random_block_indices(seeds: list[int], T: int, H: int, cfg,
                         device: torch.device) -> Tensor:
    """Ablation: [B, T, H, n] indices, -1 everywhere but the last query, which gets the
    forced blocks (initial, local) and random other candidates: selection without scores.
    One generator per sequence (seeded from its haystack seed), so the picks do not
    depend on how sequences are batched."""
    ls, n = cfg.l_sel, cfg.n
    t = T - 1
    cur = t // ls
    forced = sorted({j for j in range(cfg.n_initial) if j <= cur}
                    | {cur - m for m in range(cfg.n_local) if cur - m >= 0})
    rest = [j for j in range(cur + 1) if j not in forced]
    idx = torch.full((len(seeds), T, H, n), -1, dtype=torch.int64)
    for b, seed in enumerate(seeds):
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        for h in range(H):
            pick = [rest[i] for i in torch.randperm(len(rest), generator=gen).tolist()]
            row = sorted((forced + pick)[:n])
            idx[b, t, h, :len(row)] = torch.tensor(row)
    return idx.to(device)


def nearest_code(o: Tensor, codebook: Tensor) -> Tensor:
    """o [..., d_v] -> index of the code with the highest cosine similarity."""
    o = o.float()
    o = o / o.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return (o @ codebook.float().T).argmax(-1)


def dense_last(q_last: Tensor, k: Tensor, v: Tensor, G: int, scale: float) -> Tensor:
    """Dense attention of the last query over all keys (all visible), float32:
    q_last [B, HQ, d_k], k/v [B, T, H, *] -> [B, HQ, d_v]."""
    B, HQ, dk = q_last.shape
    H = k.shape[2]
    qg = q_last.float().view(B, H, G, dk)
    s = torch.einsum("bhgd,bthd->bhgt", qg, k.float()) * scale
    o = torch.einsum("bhgt,bthd->bhgd", torch.softmax(s, dim=-1), v.float())
    return o.reshape(B, HQ, -1)


def haystack_seed(seed: int, T: int, depth: float, trial: int) -> int:
    return (seed * 1_000_003 + T * 10_007 + round(depth * 1e6) * 101 + trial) % (1 << 31)


def depth_list(p: dict[str, Any]) -> list[float]:
    depths = [float(x) for x in p["depths"]]
    bad = [x for x in depths if not 0.0 <= x <= 1.0]
    if bad:
        raise ValueError(f"needle depths must lie in [0, 1], got {bad}")
    return depths


def run(spec: CaseSpec, device: torch.device) -> dict[str, Any]:
    p = spec.params
    cfg = case_config(p)
    T, H, G = p["T"], p["H"], p["G"]
    if T // cfg.l_sel < 2:
        raise CaseSkip(f"haystack T={T} holds fewer than 2 full selection blocks "
                       f"(l_sel={cfg.l_sel})")
    if p["codes"] < 2:
        raise ValueError(f"needle codes must be >= 2, got {p['codes']}")
    candidates = (T - 1) // cfg.l_sel + 1
    if p["ablation"] == "random_selection" and cfg.n >= candidates:
        raise CaseSkip(f"at T={T} every block is selected (n={cfg.n} >= {candidates} "
                       f"blocks): random selection equals NSA's own, so this ablation "
                       f"cannot fail here")
    backend, why = resolve_backend(p, device)
    depths = depth_list(p)
    trials = p["trials"]
    codebook = make_codebook(p["codes"], p["d_v"], p["seed"], device)
    jobs = [(di, tr) for di in range(len(depths)) for tr in range(trials)]
    # per-depth tallies
    acc = torch.zeros(len(depths), dtype=torch.float64)
    dense_acc = torch.zeros(len(depths), dtype=torch.float64)
    recall = torch.zeros(len(depths), dtype=torch.float64)
    finite = True
    scale = cfg.softmax_scale
    gates = p["gates"]
    for start in range(0, len(jobs), p["B"]):
        chunk = jobs[start:start + p["B"]]
        # seeds independent of the batch size: one per (seed, T, depth, trial)
        seeds = [haystack_seed(p["seed"], T, depths[di], tr) for di, tr in chunk]
        hs = make_haystack(p, T, [depths[di] for di, _ in chunk], seeds, codebook, device)
        Bc = len(chunk)
        k_cmp = compress_mean(hs.k, cfg.l, cfg.d)
        v_cmp = compress_mean(hs.v, cfg.l, cfg.d)
        ones = torch.ones(Bc, T, H * G, device=device, dtype=hs.q.dtype)
        if gates == "sel":
            g_cmp, g_sel, g_win = None, ones, None
        else:
            g_cmp = g_sel = g_win = ones / 3
        bidx = None
        if p["ablation"] == "random_selection":
            bidx = random_block_indices(seeds, T, H, cfg, device)
        with torch.no_grad():
            out, aux = nsa_attention(hs.q, hs.k, hs.v, hs.k, hs.v, k_cmp, v_cmp,
                                     g_cmp, g_sel, g_win, config=cfg, block_indices=bidx,
                                     backend=backend, return_aux=True)
            o_last = out[:, T - 1]  # [B, HQ, d_v]
            d_last = dense_last(hs.q[:, T - 1], hs.k, hs.v, G, scale)
        finite = finite and all_finite(o_last, d_last)
        want = hs.code.repeat_interleave(G, dim=1)  # [B, HQ]
        ok = (nearest_code(o_last, codebook) == want).double().mean(dim=1).cpu()
        dok = (nearest_code(d_last, codebook) == want).double().mean(dim=1).cpu()
        sel = aux.block_indices[:, T - 1]  # [B, H, n]
        hit = (sel == hs.needle_block[:, None, None]).any(-1).double().mean(dim=1).cpu()
        for i, (di, _) in enumerate(chunk):
            acc[di] += ok[i]
            dense_acc[di] += dok[i]
            recall[di] += hit[i]
        del hs, out, aux, k_cmp, v_cmp
    acc, dense_acc, recall = acc / trials, dense_acc / trials, recall / trials
    per_depth = [{"depth": d, "block": depth_block(d, T, cfg.l_sel),
                  "accuracy": float(acc[i]), "dense_accuracy": float(dense_acc[i]),
                  "recall": float(recall[i])} for i, d in enumerate(depths)]
    n_blocks = cfg.num_sel_blocks(T)
    return {
        "backend": backend, "backend_reason": why,
        "accuracy": float(acc.mean()), "dense_accuracy": float(dense_acc.mean()),
        "recall": float(recall.mean()), "worst_depth_accuracy": float(acc.min()),
        "chance": 1.0 / p["codes"],
        "haystacks": trials * H * len(depths),
        "selected_fraction": min(1.0, cfg.n / n_blocks),
        "distractors_placed": min(p["distractors"], T // cfg.l_sel - 1),
        "needle_logit": NEEDLE_LOGIT, "weak_logit": WEAK_FRACTION * NEEDLE_LOGIT,
        "spike_logit": SPIKE_LOGIT,
        "per_depth": per_depth,
        "finite": finite,
    }
