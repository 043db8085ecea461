"""Each piece of nsa.ops.reference against the spec rule it implements (Eq. 7-12)."""

from __future__ import annotations

import pytest
import torch

from nsa import NSAConfig
from nsa.ops.reference import (
    block_scores,
    canonical_indices,
    cmp_attention,
    cmp_visible,
    compress_blocks,
    compress_mean,
    group_scores,
    masked_softmax,
    num_cmp_visible,
    num_compressed,
    overlap_matrix,
    select_blocks,
)
from tests.bruteforce import block_scores_bf, overlap, select_bf

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-12
EQ9_SHAPES = [(32, 16, 64), (16, 8, 16), (8, 8, 8), (64, 16, 32)]


# ----------------------------------------------------------------------------- Eq. 7, 8


@pytest.mark.parametrize("l,d", [(8, 4), (4, 4), (6, 2), (32, 16)])
@pytest.mark.parametrize("T", [1, 5, 6, 8, 31, 32, 33, 47])
def test_compress_mean_is_block_average(l, d, T, rng):
    x = torch.randn(2, T, 3, 5, generator=rng, dtype=torch.float64)
    y = compress_mean(x, l=l, d=d)
    N = 0 if T < l else (T - l) // d + 1
    assert y.shape == (2, N, 3, 5)
    assert num_compressed(T, l, d) == N == NSAConfig(l=l, d=d, l_sel=l).num_compressed(T)
    for i in range(N):
        want = sum(x[:, p] for p in range(i * d, i * d + l)) / l
        assert (y[:, i] - want).abs().max().item() < TOL
    blocks = compress_blocks(x, l, d)
    for i in range(N):
        assert torch.equal(blocks[:, i], x[:, i * d : i * d + l].permute(0, 2, 1, 3))


def test_compress_mean_rejects_bad_sizes():
    x = torch.zeros(1, 8, 1, 2)
    with pytest.raises(ValueError, match=r"d \| l.*l=6, d=4"):
        compress_mean(x, l=6, d=4)
    with pytest.raises(ValueError, match="l=0"):
        compress_mean(x, l=0, d=4)


@pytest.mark.parametrize("l,d", [(32, 16), (8, 4), (4, 4), (16, 2), (1, 1)])
def test_visibility_rule(l, d):
    """Compressed token i is visible to t iff i*d + l - 1 <= t; N_cmp(t) counts them."""
    T, N = 100, 120
    t = torch.arange(T)
    vis = cmp_visible(t, N, l, d)
    counts = num_cmp_visible(t, l, d)
    for tt in range(T):
        want = [i * d + l - 1 <= tt for i in range(N)]
        assert vis[tt].tolist() == want
        n_cmp = 0 if tt + 1 < l else (tt + 1 - l) // d + 1
        assert counts[tt].item() == n_cmp == sum(want)
        # the last visible token ends exactly at or before t: nothing after t is summarised
        if n_cmp:
            assert (n_cmp - 1) * d + l - 1 <= tt < n_cmp * d + l - 1


# ----------------------------------------------------------------------------- Eq. 9


@pytest.mark.parametrize("l,d,l_sel", EQ9_SHAPES + [(4, 2, 6), (12, 4, 8)])
def test_overlap_matrix_counts_shared_tokens(l, d, l_sel):
    N, nb = 40, 25
    M = overlap_matrix(N, nb, l, d, l_sel, dtype=torch.float64)
    assert M.shape == (N, nb)
    want = [[overlap(i, j, l, d, l_sel) for j in range(nb)] for i in range(N)]
    assert M.tolist() == want
    inside = [i for i in range(N) if i * d + l <= nb * l_sel]
    assert (M[inside].sum(1) == l).all()  # each raw token of a block lies in one sel block


@pytest.mark.parametrize("l,d,l_sel", EQ9_SHAPES)
def test_block_scores_equal_bruteforce_overlap(l, d, l_sel, rng):
    N, nb = 30, 12
    p = torch.rand(2, 3, N, generator=rng, dtype=torch.float64)
    p[..., N - 7 :] = 0  # not-yet-visible tokens carry zero probability
    got = block_scores(p, nb, l, d, l_sel)
    assert got.shape == (2, 3, nb)
    for a in range(2):
        for b in range(3):
            row = {i: v for i, v in enumerate(p[a, b].tolist()) if v}
            want = torch.tensor(block_scores_bf(row, nb, l, d, l_sel), dtype=torch.float64)
            assert (got[a, b] - want).abs().max().item() < TOL


def test_block_score_weights_paper_shape():
    """l=32, d=16, l'=64: block j weighs compressed tokens 4j-1 .. 4j+3 by 1,2,2,2,1
    (overlaps of 16, 32, 32, 32, 16 raw tokens, divided by d)."""
    l, d, l_sel, N, nb = 32, 16, 64, 30, 8
    W = block_scores(torch.eye(N, dtype=torch.float64), nb, l, d, l_sel)  # [N, nb]
    M = overlap_matrix(N, nb, l, d, l_sel, dtype=torch.float64)
    assert torch.equal(M, d * W)
    for j in range(nb):
        want = torch.zeros(N, dtype=torch.float64)
        for off, wgt in zip(range(-1, 4), (1, 2, 2, 2, 1), strict=True):
            if 0 <= 4 * j + off < N:
                want[4 * j + off] = wgt
        assert torch.equal(W[:, j], want), j


@pytest.mark.parametrize("d", [1, 3, 4, 16])
def test_block_scores_identity_when_l_equals_lsel_equals_d(d, rng):
    p = torch.rand(5, 17, generator=rng, dtype=torch.float64)
    got = block_scores(p, 17, d, d, d)
    assert (got - p).abs().max().item() < 1e-15
    assert torch.equal(overlap_matrix(17, 17, d, d, d, dtype=torch.float64),
                       d * torch.eye(17, dtype=torch.float64))


def test_candidate_without_visible_compressed_token_scores_zero(rng):
    """Scores come from visible compressed tokens only; a block none of them overlaps has
    score exactly 0 (the reference's softmax gives 0, never a small leak)."""
    cfg = NSAConfig(l=16, d=4, l_sel=4, n=2, n_initial=1, n_local=1)
    B, H, G, T, dk = 1, 1, 2, 40, 4
    N = num_compressed(T, cfg.l, cfg.d)
    qg = torch.randn(B, H, G, T, dk, generator=rng, dtype=torch.float64)
    k = torch.randn(B, N, H, dk, generator=rng, dtype=torch.float64)
    v = torch.randn(B, N, H, 3, generator=rng, dtype=torch.float64)
    pos = torch.arange(T)[None]
    _, p, vis = cmp_attention(qg, k, v, pos, cfg, 0.5)
    assert (p.masked_select(~vis.expand_as(p)) == 0).all()
    nb = -(-T // cfg.l_sel)
    s = group_scores(block_scores(p, nb, cfg.l, cfg.d, cfg.l_sel))  # [B, H, T, nb]
    zero_cases = 0
    for t in range(T):
        for j in range(t // cfg.l_sel + 1):
            seen = [i for i in range(N) if i * cfg.d + cfg.l - 1 <= t
                    and overlap(i, j, cfg.l, cfg.d, cfg.l_sel)]
            if not seen:
                assert s[0, 0, t, j].item() == 0.0, (t, j)
                zero_cases += 1
            else:
                assert s[0, 0, t, j].item() > 0, (t, j)
    assert zero_cases > 10


# ----------------------------------------------------------------------------- Eq. 10


def test_group_scores_sum_heads_of_a_group(rng):
    p = torch.rand(2, 3, 4, 5, 6, generator=rng, dtype=torch.float64)  # [B, H, G, Tq, nb]
    got = group_scores(p)
    assert got.shape == (2, 3, 5, 6)
    want = p[:, :, 0] + p[:, :, 1] + p[:, :, 2] + p[:, :, 3]
    assert (got - want).abs().max().item() < TOL


# ----------------------------------------------------------------------------- Eq. 11, 12


def _rows(idx: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(j for j in r if j >= 0) for r in idx.reshape(-1, idx.shape[-1]).tolist()]


SEL_CFGS = [
    dict(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2),
    dict(l=8, d=4, l_sel=8, n=4, n_initial=1, n_local=2),
    dict(l=8, d=4, l_sel=8, n=3, n_initial=0, n_local=0),
    dict(l=4, d=2, l_sel=4, n=5, n_initial=2, n_local=3),
    dict(l=4, d=2, l_sel=4, n=3, n_initial=3, n_local=0),
]


@pytest.mark.parametrize("kw", SEL_CFGS, ids=lambda kw: "n{n}-i{n_initial}-l{n_local}".format(**kw))
def test_select_blocks_matches_bruteforce(kw, rng):
    cfg = NSAConfig(**kw)
    T = 40 * cfg.l_sel // 4 + 3
    nb = -(-T // cfg.l_sel)
    B, H = 2, 2
    pos = torch.arange(T)[None].expand(B, -1)
    scores = torch.rand(B, H, T, nb, generator=rng, dtype=torch.float64)
    idx = select_blocks(scores, pos, cfg)
    assert idx.shape == (B, H, T, cfg.n) and idx.dtype == torch.int64
    got = _rows(idx)
    k = 0
    for b in range(B):
        for h in range(H):
            for t in range(T):
                want = select_bf(scores[b, h, t].tolist(), t, cfg.l_sel, cfg.n, cfg.n_initial,
                                 cfg.n_local)
                assert got[k] == want, (b, h, t)
                k += 1
    assert torch.equal(idx, canonical_indices(idx))


@pytest.mark.parametrize("kw", SEL_CFGS, ids=lambda kw: "n{n}-i{n_initial}-l{n_local}".format(**kw))
def test_forced_blocks_present_whatever_their_score(kw, rng):
    """Forced initial and local blocks are chosen even when they score lowest; future
    blocks are never chosen even when they score highest."""
    cfg = NSAConfig(**kw)
    T = 30 * cfg.l_sel
    nb = -(-T // cfg.l_sel)
    pos = torch.arange(T)[None]
    j = torch.arange(nb)
    cur = (pos // cfg.l_sel)[:, None, :, None]
    forced = (j < cfg.n_initial) | ((cur - j >= 0) & (cur - j < cfg.n_local))
    scores = 1 + torch.rand(1, 1, T, nb, generator=rng, dtype=torch.float64)
    scores = torch.where(forced, torch.zeros_like(scores), scores)
    scores = torch.where(j * cfg.l_sel > pos[:, None, :, None], 100.0, scores)
    rows = _rows(select_blocks(scores, pos, cfg))
    checked = 0
    for t, chosen in enumerate(rows):
        n_cand = t // cfg.l_sel + 1
        assert max(chosen) * cfg.l_sel <= t
        if n_cand <= cfg.n:
            assert chosen == tuple(range(n_cand))
            continue
        checked += 1
        c = t // cfg.l_sel
        want_forced = set(range(cfg.n_initial)) | {c - m for m in range(cfg.n_local)}
        assert want_forced <= set(chosen), (t, chosen)
        assert len(chosen) == cfg.n
    assert checked > 0


def test_select_blocks_ties_go_to_lower_index():
    cfg = NSAConfig(l=4, d=2, l_sel=4, n=4, n_initial=1, n_local=1)
    t = 39  # block 9 holds t; candidates 0..9; forced {0, 9}; two free slots
    nb = 10
    pos = torch.tensor([[t]])

    def pick(vals):
        s = torch.tensor(vals, dtype=torch.float64).view(1, 1, 1, nb)
        return _rows(select_blocks(s, pos, cfg))[0]

    assert pick([0.0] * nb) == (0, 1, 2, 9)
    assert pick([0.5] * nb) == (0, 1, 2, 9)
    assert pick([0, 0.1, 0.3, 0.2, 0.3, 0.3, 0.1, 0.3, 0, 0]) == (0, 2, 4, 9)
    assert pick([0, 0.1, 0.2, 0.2, 0.2, 0.9, 0.1, 0.2, 0, 0]) == (0, 2, 5, 9)
    assert pick([0, 0, 0, 0, 0, 0, 0, 0.7, 0.7, 0]) == (0, 7, 8, 9)
    # the same rule through the oracle
    assert select_bf([0, 0.1, 0.3, 0.2, 0.3, 0.3, 0.1, 0.3, 0, 0], t, 4, 4, 1, 1) == (0, 2, 4, 9)
    # equal scores in float32 and with many rows: deterministic, repeatable
    s = torch.full((2, 3, 50, 13), 0.25)
    pos = torch.arange(50)[None].expand(2, -1)
    a, b = select_blocks(s, pos, cfg), select_blocks(s.clone(), pos, cfg)
    assert torch.equal(a, b)
    for t, row in enumerate(_rows(a[0, 0])):
        assert row == select_bf([0.25] * 13, t, 4, 4, 1, 1)


def test_select_blocks_fewer_candidates_than_n_and_decode_positions(rng):
    """Rows with at most n candidates take them all (padded with -1), including when the
    score tensor has fewer blocks than n; q_pos may be any position per sequence."""
    cfg = NSAConfig(l=8, d=4, l_sel=8, n=6, n_initial=1, n_local=2)
    scores = torch.rand(2, 1, 1, 3, generator=rng, dtype=torch.float64)  # 3 blocks < n
    idx = select_blocks(scores, torch.tensor([[5], [23]]), cfg)
    assert idx.shape == (2, 1, 1, 6)
    assert idx[0, 0, 0].tolist() == [0, -1, -1, -1, -1, -1]
    assert idx[1, 0, 0].tolist() == [0, 1, 2, -1, -1, -1]
    scores = torch.rand(2, 1, 1, 40, generator=rng, dtype=torch.float64)
    pos = torch.tensor([[100], [319]])
    rows = _rows(select_blocks(scores, pos, cfg))
    for b, t in enumerate((100, 319)):
        assert rows[b] == select_bf(scores[b, 0, 0].tolist(), t, 8, 6, 1, 2)


def test_canonical_indices(rng):
    idx = torch.randint(-1, 9, (3, 4, 7), generator=rng)
    got = canonical_indices(idx)
    for r_in, r_out in zip(idx.reshape(-1, 7).tolist(), got.reshape(-1, 7).tolist(),
                           strict=True):
        used = sorted(j for j in r_in if j >= 0)
        assert r_out == used + [-1] * (7 - len(used))


def test_masked_softmax_empty_row_is_zero_and_differentiable(rng):
    s = torch.randn(3, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 5, [False] * 5, [True, False, True, False, False]])
    p = masked_softmax(s, mask)
    assert torch.equal(p[1], torch.zeros(5, dtype=torch.float64))
    assert (p[0] - torch.softmax(s[0], -1)).abs().max().item() < TOL
    assert (p[2, [0, 2]] - torch.softmax(s[2, [0, 2]], -1)).abs().max().item() < TOL
    assert (p[2, [1, 3, 4]] == 0).all()
    (p * torch.randn(3, 5, generator=rng, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(s.grad).all() and (s.grad[1] == 0).all()
