"""Brute-force NSA oracle, written from shared/design/NSA-SPEC.md alone.

Deliberately independent of ``nsa.ops``: nothing here imports the reference, so a
mistake copied into both cannot hide. One Python loop per (batch, query, KV head),
float64, index sets built from Python ints. Slow by design; keep T small.

Rules implemented (spec sections in brackets):
- compressed token i covers raw [i*d, i*d+l) and is visible to t iff i*d + l - 1 <= t
  [Eq. 7, 8]; with no visible token O_cmp = 0 and every block score is 0;
- p_sel[j] = sum_i p_cmp[i] * overlap(i, j) / d, overlap counted token by token [Eq. 9];
- group score = sum over the G query heads of the group [Eq. 10];
- candidates j*l' <= t; at most n candidates -> all; else forced initial 0..n_initial-1
  and local floor(t/l') - m (m < n_local), then highest score, ties to the lower index
  [Eq. 11, 12];
- selected attention over the union of selected tokens at positions <= t; window
  attention over [max(0, t-w+1), t]; gated sum [Eq. 5].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache

import torch
from torch import Tensor


@cache
def overlap(i: int, j: int, l: int, d: int, l_sel: int) -> int:
    """Raw tokens shared by compressed block [i*d, i*d+l) and selection block j, counted."""
    return sum(1 for x in range(i * d, i * d + l) if j * l_sel <= x < (j + 1) * l_sel)


def visible_cmp(t: int, N: int, l: int, d: int) -> list[int]:
    """Compressed tokens (among the N given) a query at position t may see."""
    return [i for i in range(N) if i * d + l - 1 <= t]


def block_scores_bf(p_cmp: dict[int, float], n_blocks: int, l: int, d: int, l_sel: int
                    ) -> list[float]:
    """Eq. 9 for one query/head: p_cmp maps visible compressed token -> probability."""
    return [sum(p * overlap(i, j, l, d, l_sel) for i, p in p_cmp.items()) / d
            for j in range(n_blocks)]


def select_bf(scores: list[float], t: int, l_sel: int, n: int, n_initial: int, n_local: int
              ) -> tuple[int, ...]:
    """Eq. 11/12 for one query and one KV group; returns the chosen blocks ascending."""
    cands = [j for j in range(len(scores)) if j * l_sel <= t]
    if len(cands) <= n:
        return tuple(cands)
    cur = t // l_sel
    forced = {j for j in range(n_initial)} | {cur - m for m in range(n_local)}
    forced &= set(cands)
    rest = sorted((j for j in cands if j not in forced), key=lambda j: (-scores[j], j))
    return tuple(sorted(forced | set(rest[: n - len(forced)])))


def _attend(qv: Tensor, K: Tensor, V: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Softmax attention of one query over the rows of K/V; no key -> zeros."""
    if K.shape[0] == 0:
        return V.new_zeros(V.shape[-1]), V.new_zeros(0)
    s = (K @ qv) * scale
    p = torch.exp(s - s.max())
    p = p / p.sum()
    return p @ V, p


@dataclass
class BruteResult:
    out: Tensor  # [B, T, HQ, d_v]
    o_cmp: Tensor | None = None
    o_sel: Tensor | None = None
    o_win: Tensor | None = None
    # (b, t, g) -> ascending tuple of selected blocks (None when selection is not computed)
    indices: dict[tuple[int, int, int], tuple[int, ...]] | None = None
    # (b, t, h) -> {compressed token: p_cmp}; (b, t, h) -> per-head block scores (Eq. 9)
    p_cmp: dict[tuple[int, int, int], dict[int, float]] = field(default_factory=dict)
    p_sel: dict[tuple[int, int, int], list[float]] = field(default_factory=dict)
    # (b, t, g) -> group block scores (Eq. 10)
    scores: dict[tuple[int, int, int], list[float]] = field(default_factory=dict)


def brute_nsa(q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp, g_cmp, g_sel, g_win, cfg,
              *, scale: float | None = None, block_indices: Tensor | None = None,
              queries: list[int] | None = None) -> BruteResult:
    """NSA per the spec. cfg: any object with l, d, l_sel, n, n_initial, n_local, w.

    Tensors as in nsa_attention ([B, T, HQ, d_k] etc.); computed in float64. ``queries``
    restricts the loop to some positions (other output rows stay 0).
    """
    l, d, ls, w = cfg.l, cfg.d, cfg.l_sel, cfg.w
    f = lambda x: None if x is None else x.detach().to(torch.float64)
    q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp, g_cmp, g_sel, g_win = map(
        f, (q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp, g_cmp, g_sel, g_win))
    B, T, HQ, dk = q.shape
    H = next(x for x in (k_sel, k_win, k_cmp) if x is not None).shape[2]
    dv = next(x for x in (v_sel, v_win, v_cmp) if x is not None).shape[3]
    assert HQ % H == 0
    G = HQ // H
    scale = 1.0 / math.sqrt(dk) if scale is None else scale
    N = 0 if k_cmp is None else k_cmp.shape[1]
    n_blocks = -(-T // ls)
    need_scores = g_cmp is not None or (g_sel is not None and block_indices is None)

    res = BruteResult(out=q.new_zeros(B, T, HQ, dv))
    zeros = lambda: q.new_zeros(B, T, HQ, dv)
    res.o_cmp = zeros() if g_cmp is not None else None
    res.o_sel = zeros() if g_sel is not None else None
    res.o_win = zeros() if g_win is not None else None
    res.indices = {} if g_sel is not None else None

    for b in range(B):
        for t in (range(T) if queries is None else queries):
            vis = visible_cmp(t, N, l, d)
            for g in range(H):
                heads = range(g * G, (g + 1) * G)
                if need_scores:
                    group = [0.0] * n_blocks
                    for h in heads:
                        o, p = _attend(q[b, t, h], k_cmp[b, vis, g], v_cmp[b, vis, g], scale)
                        if g_cmp is not None:
                            res.o_cmp[b, t, h] = o
                        res.p_cmp[b, t, h] = dict(zip(vis, p.tolist(), strict=True))
                        ps = block_scores_bf(res.p_cmp[b, t, h], n_blocks, l, d, ls)
                        res.p_sel[b, t, h] = ps
                        group = [a + c for a, c in zip(group, ps, strict=True)]
                    res.scores[b, t, g] = group
                if g_sel is not None:
                    if block_indices is None:
                        chosen = select_bf(res.scores[b, t, g], t, ls, cfg.n, cfg.n_initial,
                                           cfg.n_local)
                    else:
                        chosen = tuple(sorted({int(j) for j in block_indices[b, t, g].tolist()
                                               if j >= 0}))
                    res.indices[b, t, g] = chosen
                    keys = sorted({x for j in chosen for x in range(j * ls, (j + 1) * ls)
                                   if x <= t})
                    for h in heads:
                        res.o_sel[b, t, h] = _attend(q[b, t, h], k_sel[b, keys, g],
                                                     v_sel[b, keys, g], scale)[0]
                if g_win is not None:
                    keys = list(range(max(0, t - w + 1), t + 1))
                    for h in heads:
                        res.o_win[b, t, h] = _attend(q[b, t, h], k_win[b, keys, g],
                                                     v_win[b, keys, g], scale)[0]
                for h in heads:
                    o = q.new_zeros(dv)
                    for gate, branch in ((g_cmp, res.o_cmp), (g_sel, res.o_sel),
                                         (g_win, res.o_win)):
                        if gate is not None:
                            o = o + gate[b, t, h] * branch[b, t, h]
                    res.out[b, t, h] = o
    return res


def indices_as_sets(block_indices: Tensor) -> dict[tuple[int, int, int], tuple[int, ...]]:
    """[B, T, H, n] index tensor (-1 = unused) -> {(b, t, g): ascending distinct blocks}."""
    B, T, H, _ = block_indices.shape
    rows = block_indices.tolist()
    return {(b, t, g): tuple(sorted({j for j in rows[b][t][g] if j >= 0}))
            for b in range(B) for t in range(T) for g in range(H)}
