"""The reference op against the spec: brute-force oracle, dense oracle, causality, grads.

Everything is compared in float64 with max-abs-error thresholds of 1e-10 (the two
implementations only differ in summation order). The oracle (tests/bruteforce.py) is
written from NSA-SPEC.md and imports nothing from nsa.ops.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nsa import NSAConfig, nsa_attention
from nsa.ops.reference import dense_attention, nsa_chunk, reference_nsa
from tests.bruteforce import brute_nsa, indices_as_sets, select_bf

pytestmark = pytest.mark.usefixtures("single_thread")

BACKEND = "reference"
TOL = 1e-10
ARGS = ("q", "k_sel", "v_sel", "k_win", "v_win", "k_cmp", "v_cmp", "g_cmp", "g_sel", "g_win")


def cfg_of(**kw) -> NSAConfig:
    return NSAConfig(**kw)


def run_op(inp, cfg, **kw):
    return nsa_attention(**inp, config=cfg, backend=BACKEND, return_aux=True, **kw)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_canonical(idx: torch.Tensor) -> None:
    """Ascending distinct block indices with every -1 slot last, per row."""
    for row in idx.reshape(-1, idx.shape[-1]).tolist():
        used = [j for j in row if j >= 0]
        assert row == used + [-1] * (len(row) - len(used)), row
        assert used == sorted(set(used)), row


def assert_matches_brute(out, aux, bf, *, check_indices=True) -> None:
    assert max_err(out, bf.out) < TOL
    for name in ("o_cmp", "o_sel", "o_win"):
        ref, want = getattr(aux, name), getattr(bf, name)
        assert (ref is None) == (want is None), name
        if want is not None:
            assert max_err(ref, want) < TOL, name
    if check_indices and bf.indices is not None:
        assert aux.block_indices is not None
        assert_canonical(aux.block_indices)
        assert indices_as_sets(aux.block_indices) == bf.indices


def dense_oracle(q, k, v, q_pos, k_pos, scale=None, window=None):
    """Dense softmax attention with an explicit boolean mask [Tq, S] (GQA: head h -> h // G).

    Never ``is_causal=True``: query and key positions are given, so one query row against
    many keys is aligned by position, not by row number (LESSONS trap 1).
    """
    q, k, v = q.double(), k.double(), v.double()
    G = q.shape[2] // k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    kk, vv = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q, kk) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bhts,bshd->bthd", p, vv)


# ----------------------------------------------------------------------------- cases
# (id, config, B, T, HQ, H, d_k, d_v, build options, selection must bite)
CASES = [
    ("paper-scaled", dict(l=8, d=4, l_sel=16, n=4, n_initial=1, n_local=2, w=24),
     2, 103, 4, 2, 12, 8, {}, True),
    ("paper-blocks", dict(l=32, d=16, l_sel=64, n=3, n_initial=1, n_local=2, w=100),
     1, 333, 2, 1, 8, 6, {}, True),
    ("l=l'=d,G=1", dict(l=8, d=8, l_sel=8, n=3, n_initial=1, n_local=1, w=16),
     2, 77, 3, 3, 6, 5, {}, True),
    ("G=4", dict(l=4, d=2, l_sel=8, n=3, n_initial=1, n_local=1, w=10),
     1, 61, 8, 2, 6, 7, {}, True),
    ("G=16", dict(l=8, d=4, l_sel=8, n=3, n_initial=1, n_local=1, w=9),
     1, 45, 16, 1, 4, 4, {}, True),
    ("no-forced", dict(l=8, d=4, l_sel=8, n=2, n_initial=0, n_local=0, w=5),
     2, 59, 2, 1, 5, 3, {}, True),
    ("many-forced", dict(l=4, d=2, l_sel=4, n=6, n_initial=2, n_local=3, w=7),
     1, 57, 4, 2, 6, 4, {}, True),
    ("only-forced", dict(l=8, d=4, l_sel=8, n=3, n_initial=1, n_local=2, w=8),
     1, 50, 2, 1, 4, 6, {}, True),
    ("l>l'", dict(l=16, d=4, l_sel=8, n=3, n_initial=0, n_local=1, w=6),
     1, 67, 2, 1, 6, 4, {}, True),
    ("T<l,no-cmp-tokens", dict(l=16, d=2, l_sel=2, n=2, n_initial=1, n_local=0, w=4),
     2, 11, 2, 1, 4, 3, {}, True),
    ("N-exceeds-visible", dict(l=8, d=4, l_sel=16, n=4, n_initial=1, n_local=2, w=24),
     1, 70, 2, 1, 4, 5, {"extra_cmp": 5}, True),
    ("w=1", dict(l=4, d=4, l_sel=4, n=2, n_initial=1, n_local=1, w=1),
     1, 30, 2, 2, 3, 5, {}, True),
    ("T=1", dict(l=4, d=2, l_sel=4, n=1, n_initial=0, n_local=1, w=3),
     2, 1, 2, 1, 3, 2, {}, False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_full_op_matches_bruteforce(case, make_inputs):
    _, kw, B, T, HQ, H, dk, dv, opts, bites = case
    cfg = cfg_of(**kw)
    inp = make_inputs(cfg, B, T, HQ, H, dk, dv, **opts)
    out, aux = run_op(inp, cfg)
    assert out.shape == (B, T, HQ, dv) and out.dtype == torch.float64
    assert aux.block_indices.shape == (B, T, H, cfg.n)
    bf = brute_nsa(**inp, cfg=cfg)
    assert_matches_brute(out, aux, bf)
    if bites:  # the case really exercises top-n selection (more candidates than n)
        assert (T - 1) // cfg.l_sel + 1 > cfg.n


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
def test_low_precision_inputs_keep_their_dtype(dtype, tol, make_inputs):
    """Half/single inputs give outputs of the same dtype, close to the float64 oracle at
    that dtype's resolution (selection held to the oracle's: near-ties may flip in low
    precision, which the spec allows)."""
    cfg = cfg_of(l=8, d=4, l_sel=8, n=3, n_initial=1, n_local=1, w=10)
    inp64 = make_inputs(cfg, 1, 50, 4, 2, 8, 8)
    inp = {k: v.to(dtype) for k, v in inp64.items()}
    bf = brute_nsa(**{k: v.double() for k, v in inp.items()}, cfg=cfg)
    idx = torch.full((1, 50, 2, cfg.n), -1, dtype=torch.long)
    for (b, t, g), chosen in bf.indices.items():
        idx[b, t, g, : len(chosen)] = torch.tensor(chosen)
    out, aux = run_op(inp, cfg, block_indices=idx)
    assert out.dtype == dtype and aux.o_sel.dtype == dtype
    assert max_err(out, bf.out) < tol


def test_all_zero_scores_tie_to_lowest_blocks(make_inputs):
    """T < l: no compressed token is visible, every score is 0; ties go to lower blocks."""
    cfg = cfg_of(l=16, d=2, l_sel=2, n=3, n_initial=0, n_local=1, w=4)
    inp = make_inputs(cfg, 1, 11, 2, 1, 4, 3)
    assert inp["k_cmp"].shape[1] == 0
    _, aux = run_op(inp, cfg)
    for t in range(11):
        cur = t // 2
        want = list(range(cur + 1)) if cur + 1 <= cfg.n else [0, 1, cur]
        got = [j for j in aux.block_indices[0, t, 0].tolist() if j >= 0]
        assert got == want, (t, got, want)
    assert aux.o_cmp.abs().max().item() == 0.0  # O_cmp = 0 with nothing visible


@pytest.mark.parametrize("branch", ["cmp", "sel", "win"])
def test_single_branch_matches_bruteforce(branch, make_inputs):
    cfg = cfg_of(l=8, d=4, l_sel=16, n=3, n_initial=1, n_local=1, w=20)
    inp = make_inputs(cfg, 2, 90, 4, 2, 6, 5, gates=(branch,))
    out, aux = run_op(inp, cfg)
    bf = brute_nsa(**inp, cfg=cfg)
    assert_matches_brute(out, aux, bf)
    if branch != "sel":
        assert aux.block_indices is None
    for other in {"cmp", "sel", "win"} - {branch}:
        assert getattr(aux, f"o_{other}") is None
    # the gated output is exactly gate * branch output
    g = inp[f"g_{branch}"]
    assert max_err(out, g.unsqueeze(-1) * getattr(aux, f"o_{branch}")) < TOL


def _precomputed_indices(gen, B, T, H, n, l_sel):
    """Rows of [cur, cur (duplicate), -1, random ...] shuffled; random may be a future block."""
    nb = -(-T // l_sel)
    idx = torch.randint(-1, nb, (B, T, H, n), generator=gen)
    cur = (torch.arange(T) // l_sel)[None, :, None].expand(B, T, H)
    idx[..., 0] = cur
    idx[..., 1] = cur
    idx[..., 2] = -1
    perm = torch.argsort(torch.rand(B, T, H, n, generator=gen), dim=-1)
    return torch.gather(idx, -1, perm)


@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_precomputed_block_indices(idx_dtype, rng, make_inputs):
    cfg = cfg_of(l=8, d=4, l_sel=8, n=5, n_initial=1, n_local=1, w=12)
    B, T, HQ, H = 2, 53, 4, 2
    inp = make_inputs(cfg, B, T, HQ, H, 6, 5)
    idx = _precomputed_indices(rng, B, T, H, cfg.n, cfg.l_sel).to(idx_dtype)
    assert (idx == -1).any() and (idx[..., 1:] == idx[..., :1]).any()
    out, aux = run_op(inp, cfg, block_indices=idx)
    bf = brute_nsa(**inp, cfg=cfg, block_indices=idx)
    assert_matches_brute(out, aux, bf)
    # the compressed branch is not needed for selection once indices are given
    no_cmp = dict(inp, k_cmp=None, v_cmp=None, g_cmp=None)
    out2, aux2 = run_op(no_cmp, cfg, block_indices=idx)
    assert_matches_brute(out2, aux2, brute_nsa(**no_cmp, cfg=cfg, block_indices=idx))


def test_duplicate_index_counts_once(make_inputs):
    """A block listed twice is attended once: same result as listing it once."""
    cfg = cfg_of(l=4, d=4, l_sel=4, n=3, n_initial=1, n_local=1, w=4)
    inp = make_inputs(cfg, 1, 16, 2, 1, 4, 3, gates=("sel",))
    t = torch.arange(16)
    once = torch.stack([t // 4, torch.full_like(t, -1), torch.full_like(t, -1)], -1)
    twice = torch.stack([t // 4, t // 4, torch.zeros_like(t)], -1)
    twice_no0 = torch.stack([t // 4, t // 4, t // 4], -1)
    out_once, _ = run_op(inp, cfg, block_indices=once[None, :, None])
    out_twice, aux = run_op(inp, cfg, block_indices=twice_no0[None, :, None])
    assert max_err(out_once, out_twice) < TOL
    assert (aux.block_indices[..., 1:] == -1).all()
    out_b, _ = run_op(inp, cfg, block_indices=twice[None, :, None])
    bf = brute_nsa(**inp, cfg=cfg, block_indices=twice[None, :, None])
    assert max_err(out_b, bf.out) < TOL


def test_shared_kv_across_branches(make_inputs):
    cfg = cfg_of(l=8, d=4, l_sel=8, n=3, n_initial=1, n_local=1, w=10)
    inp = make_inputs(cfg, 1, 40, 2, 1, 4, 4)
    inp["k_win"], inp["v_win"] = inp["k_sel"], inp["v_sel"]
    out, aux = run_op(inp, cfg)
    assert_matches_brute(out, aux, brute_nsa(**inp, cfg=cfg))


def test_scale_argument_and_config_scale(make_inputs):
    inp_cfg = cfg_of(l=8, d=4, l_sel=8, n=3, n_initial=1, n_local=1, w=10)
    inp = make_inputs(inp_cfg, 1, 40, 2, 1, 4, 4)
    out, aux = run_op(inp, inp_cfg, scale=0.37)
    assert_matches_brute(out, aux, brute_nsa(**inp, cfg=inp_cfg, scale=0.37))
    cfg = inp_cfg.replace(scale=1.9)
    out, aux = run_op(inp, cfg)
    assert_matches_brute(out, aux, brute_nsa(**inp, cfg=cfg, scale=1.9))


@pytest.mark.parametrize("chunk", [1, 7])
def test_query_chunking_is_invisible(chunk, make_inputs):
    """reference_nsa's query chunks (window slices per chunk) change nothing."""
    cfg = cfg_of(l=8, d=4, l_sel=8, n=3, n_initial=1, n_local=1, w=9)
    inp = make_inputs(cfg, 2, 45, 4, 2, 4, 5)
    out, aux = reference_nsa(*(inp[a] for a in ARGS), cfg, 0.5, return_aux=True,
                             chunk_size=chunk)
    assert_matches_brute(out, aux, brute_nsa(**inp, cfg=cfg, scale=0.5))


def test_group_shares_blocks_chosen_by_group_score(make_inputs):
    """Eq. 10: the heads of a group attend to the blocks of the summed score.

    Per-head top-n differs from the group choice somewhere (checked), so a backend that
    selected per query head would fail the o_sel comparison.
    """
    cfg = cfg_of(l=4, d=2, l_sel=4, n=3, n_initial=1, n_local=1, w=4)
    B, T, HQ, H = 1, 48, 8, 2
    G = HQ // H
    inp = make_inputs(cfg, B, T, HQ, H, 4, 3, gates=("sel",))
    out, aux = run_op(inp, cfg)
    bf = brute_nsa(**inp, cfg=cfg)
    assert indices_as_sets(aux.block_indices) == bf.indices
    assert max_err(aux.o_sel, bf.o_sel) < TOL
    differ = [(t, h) for t in range(T) for h in range(HQ)
              if select_bf(bf.p_sel[0, t, h], t, cfg.l_sel, cfg.n, cfg.n_initial, cfg.n_local)
              != bf.indices[0, t, h // G]]
    assert differ, "test is not discriminative: per-head and group selections coincide"
    t, h = differ[0]
    per_head = select_bf(bf.p_sel[0, t, h], t, cfg.l_sel, cfg.n, cfg.n_initial, cfg.n_local)
    wrong = torch.full((B, T, H, cfg.n), -1, dtype=torch.long)
    wrong[0, t, h // G, : len(per_head)] = torch.tensor(per_head)
    o_wrong = brute_nsa(**inp, cfg=cfg, block_indices=wrong, queries=[t]).o_sel
    assert max_err(aux.o_sel[0, t, h], o_wrong[0, t, h]) > 1e-6


def test_forced_blocks_in_every_row_with_more_than_n_candidates(make_inputs):
    cfg = cfg_of(l=4, d=2, l_sel=4, n=5, n_initial=2, n_local=2, w=4)
    inp = make_inputs(cfg, 2, 64, 2, 2, 4, 3, gates=("sel",))
    _, aux = run_op(inp, cfg)
    sets = indices_as_sets(aux.block_indices)
    rows_checked = 0
    for (_, t, _), chosen in sets.items():
        cur, n_cand = t // cfg.l_sel, t // cfg.l_sel + 1
        if n_cand <= cfg.n:
            assert chosen == tuple(range(n_cand))
            continue
        rows_checked += 1
        assert {0, 1, cur, cur - 1} <= set(chosen), (t, chosen)
        assert len(chosen) == cfg.n and max(chosen) == cur
    assert rows_checked > 0


# ----------------------------------------------------------------------------- dense


def test_window_branch_equals_dense_when_w_covers_T(make_inputs):
    T = 37
    cfg = cfg_of(l=8, d=4, l_sel=8, n=2, n_initial=1, n_local=1, w=T)
    inp = make_inputs(cfg, 2, T, 6, 2, 5, 7, gates=("win",))
    inp["g_win"] = torch.ones_like(inp["g_win"])
    out = nsa_attention(**inp, config=cfg, backend=BACKEND)
    pos = torch.arange(T)
    want = dense_oracle(inp["q"], inp["k_win"], inp["v_win"], pos, pos)
    assert max_err(out, want) < TOL
    assert max_err(dense_attention(inp["q"], inp["k_win"], inp["v_win"]), want) < TOL


def test_window_branch_equals_banded_dense(make_inputs):
    T, w = 41, 6
    cfg = cfg_of(l=8, d=4, l_sel=8, n=2, n_initial=1, n_local=1, w=w)
    inp = make_inputs(cfg, 1, T, 4, 2, 5, 3, gates=("win",))
    _, aux = run_op(inp, cfg)
    pos = torch.arange(T)
    want = dense_oracle(inp["q"], inp["k_win"], inp["v_win"], pos, pos, window=w)
    assert max_err(aux.o_win, want) < TOL


@pytest.mark.parametrize("blocks", [(8, 4, 16), (4, 4, 4)], ids=["l'=16", "l=l'=d"])
def test_selection_branch_equals_dense_when_all_blocks_selected(blocks, make_inputs):
    l, d, l_sel = blocks
    T = 45
    n = -(-T // l_sel)  # n * l' >= T: every candidate is selected
    cfg = cfg_of(l=l, d=d, l_sel=l_sel, n=n, n_initial=1, n_local=1, w=4)
    inp = make_inputs(cfg, 2, T, 4, 1, 6, 3, gates=("sel",))
    inp["g_sel"] = torch.ones_like(inp["g_sel"])
    out, aux = run_op(inp, cfg)
    pos = torch.arange(T)
    want = dense_oracle(inp["q"], inp["k_sel"], inp["v_sel"], pos, pos)
    assert max_err(out, want) < TOL
    assert indices_as_sets(aux.block_indices) == {
        (b, t, 0): tuple(range(t // l_sel + 1)) for b in range(2) for t in range(T)}


def test_dense_attention_reference_matches_oracle(make_inputs):
    cfg = cfg_of()
    inp = make_inputs(cfg, 2, 33, 4, 2, 6, 5)
    pos = torch.arange(33)
    want = dense_oracle(inp["q"], inp["k_sel"], inp["v_sel"], pos, pos, scale=0.3)
    got = dense_attention(inp["q"], inp["k_sel"], inp["v_sel"], scale=0.3)
    assert max_err(got, want) < TOL


# ----------------------------------------------------------------------------- LESSONS


def _one_query(inp, cfg, t, scale, *, win_keys=None):
    """The reference's decode-style call: one query at absolute position t."""
    B = inp["q"].shape[0]
    T = inp["k_sel"].shape[1]
    q_pos = torch.full((B, 1), t)
    if win_keys is None:
        k_win, v_win = inp["k_win"][:, : t + 1], inp["v_win"][:, : t + 1]
        k_pos = torch.arange(t + 1).expand(B, -1)
    else:
        k_win, v_win, k_pos = win_keys
    sl = lambda x: x[:, t : t + 1]
    assert t < T
    return nsa_chunk(sl(inp["q"]), q_pos, inp["k_sel"][:, : t + 1], inp["v_sel"][:, : t + 1],
                     k_win, v_win, k_pos, inp["k_cmp"], inp["v_cmp"], sl(inp["g_cmp"]),
                     sl(inp["g_sel"]), sl(inp["g_win"]), cfg, scale, want_branches=True)


def test_trap1_one_query_decode_call_is_not_key0(make_inputs):
    """LESSONS trap 1: a one-query call must not collapse onto key 0's value."""
    cfg = cfg_of(l=8, d=4, l_sel=8, n=3, n_initial=1, n_local=1, w=16)
    B, T, HQ, H, dk, dv = 2, 96, 4, 2, 8, 6
    G = HQ // H
    inp = make_inputs(cfg, B, T, HQ, H, dk, dv)
    t = T - 1
    scale = dk ** -0.5
    r = _one_query(inp, cfg, t, scale)
    bf = brute_nsa(**inp, cfg=cfg, queries=[t])
    assert max_err(r.out[:, 0], bf.out[:, t]) < TOL
    assert indices_as_sets(r.block_indices) == {
        (b, 0, g): bf.indices[b, t, g] for b in range(B) for g in range(H)}
    full = nsa_attention(**inp, config=cfg, backend=BACKEND)
    assert max_err(r.out[:, 0], full[:, t]) < TOL
    for branch in ("cmp", "sel", "win"):
        v0 = inp[f"v_{branch}"][:, 0].repeat_interleave(G, dim=1)  # [B, HQ, dv]
        o = getattr(r, f"o_{branch}")[:, 0]
        assert (o - v0).abs().amax(-1).min().item() > 1e-3, branch
    degenerate = sum(inp[f"g_{b}"][:, t, :, None]
                     * inp[f"v_{b}"][:, 0].repeat_interleave(G, dim=1)
                     for b in ("cmp", "sel", "win"))
    assert (r.out[:, 0] - degenerate).abs().amax(-1).min().item() > 1e-3


def test_trap1_dense_one_query_row_many_keys(rng):
    """LESSONS trap 1: one query row against T keys, aligned by position, not row number."""
    B, T, HQ, H, dk, dv = 1, 50, 2, 1, 8, 5
    q = torch.randn(B, 1, HQ, dk, generator=rng, dtype=torch.float64)
    k = torch.randn(B, T, H, dk, generator=rng, dtype=torch.float64)
    v = torch.randn(B, T, H, dv, generator=rng, dtype=torch.float64)
    pos = torch.arange(T)
    got = dense_oracle(q, k, v, pos[-1:], pos)
    # written out for the last row: softmax over all T keys
    s = torch.einsum("bqhd,bshd->bhqs", q, k.expand(B, T, HQ, dk)) * dk ** -0.5
    want = torch.einsum("bhqs,bshd->bqhd", torch.softmax(s, -1), v.expand(B, T, HQ, dv))
    assert max_err(got, want) < TOL
    # the same row inside a full causal computation (reference and oracle)
    qq = torch.randn(B, T, HQ, dk, generator=rng, dtype=torch.float64)
    qq[:, -1:] = q
    assert max_err(dense_attention(qq, k, v)[:, -1:], got) < TOL
    # the degenerate top-left aligned call sees only key 0; the oracle must not agree
    bad = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.expand(B, T, HQ, dk).transpose(1, 2),
        v.expand(B, T, HQ, dv).transpose(1, 2), is_causal=True).transpose(1, 2)
    assert max_err(bad, v[:, :1].expand(B, 1, HQ, dv)) < TOL
    assert max_err(got, bad) > 1e-3


def test_trap2_one_query_with_ring_buffer_window(rng, make_inputs):
    """LESSONS trap 2: window keys given as a rotated ring buffer with empty slots and
    positions explicit: only keys in [t-w+1, t] count, future slots never leak."""
    cfg = cfg_of(l=8, d=4, l_sel=8, n=3, n_initial=1, n_local=1, w=10)
    B, T = 1, 60
    inp = make_inputs(cfg, B, T, 2, 1, 4, 3)
    for t in (3, 9, 10, 37, T - 1):
        keys = list(range(max(0, t - cfg.w + 1), t + 1))
        cap = cfg.w + 3  # spare slots: -1 (empty) and one holding a future token
        kw = torch.randn(B, cap, 1, 4, generator=rng, dtype=torch.float64)
        vw = torch.randn(B, cap, 1, 3, generator=rng, dtype=torch.float64)
        kpos = torch.full((B, cap), -1)
        slots = [(s + t) % cap for s in range(len(keys))]
        for s, p in zip(slots, keys, strict=True):
            kw[:, s], vw[:, s], kpos[:, s] = inp["k_win"][:, p], inp["v_win"][:, p], p
        free = [s for s in range(cap) if s not in slots]
        if t + 1 < T:
            kpos[:, free[0]] = t + 1  # a future token left in the buffer
        r = _one_query(inp, cfg, t, 0.5, win_keys=(kw, vw, kpos))
        bf = brute_nsa(**inp, cfg=cfg, scale=0.5, queries=[t])
        assert max_err(r.out[:, 0], bf.out[:, t]) < TOL, t


CAUSAL_CFG = dict(l=8, d=4, l_sel=16, n=3, n_initial=1, n_local=1, w=12)


@pytest.mark.parametrize("t", [0, 6, 7, 8, 15, 16, 31, 47, 50, 68])
def test_trap2_causality_outputs_and_indices(t, rng, make_inputs):
    """LESSONS traps 2 and 3: changing anything at positions > t (and every compressed
    token not visible at t) changes no output and no selection index at positions <= t."""
    cfg = cfg_of(**CAUSAL_CFG)
    B, T, HQ, H = 2, 70, 4, 2
    inp = make_inputs(cfg, B, T, HQ, H, 6, 5)
    out, aux = run_op(inp, cfg)
    pert = {}
    for name, x in inp.items():
        y = x.clone()
        if name in ("k_cmp", "v_cmp"):
            N = x.shape[1]
            hidden = [i for i in range(N) if i * cfg.d + cfg.l - 1 > t]
            y[:, hidden] = 10 * torch.randn(y[:, hidden].shape, generator=rng,
                                            dtype=y.dtype)
        elif name.startswith("g_"):
            y[:, t + 1 :] = torch.rand(y[:, t + 1 :].shape, generator=rng, dtype=y.dtype)
        else:
            y[:, t + 1 :] = 10 * torch.randn(y[:, t + 1 :].shape, generator=rng,
                                             dtype=y.dtype)
        pert[name] = y
    out2, aux2 = run_op(pert, cfg)
    s = slice(0, t + 1)
    assert torch.equal(out[:, s], out2[:, s])
    for name in ("o_cmp", "o_sel", "o_win"):
        assert torch.equal(getattr(aux, name)[:, s], getattr(aux2, name)[:, s]), name
    assert torch.equal(aux.block_indices[:, s], aux2.block_indices[:, s])
    if t + 1 < T:  # the perturbation is real: the future does move
        assert not torch.equal(out[:, t + 1 :], out2[:, t + 1 :])


def test_trap3_invisible_compressed_tokens_do_not_steer_selection(rng, make_inputs):
    """LESSONS trap 3: importance scores use only visible compressed tokens.

    Compressed tokens not yet visible at t are replaced by huge keys aligned with q;
    had they leaked into p_cmp they would dominate the scores. Nothing at t may move,
    while the same change applied to visible tokens does move the selection.
    """
    cfg = cfg_of(l=8, d=4, l_sel=8, n=3, n_initial=1, n_local=1, w=8)
    B, T, HQ, H = 1, 72, 2, 1
    inp = make_inputs(cfg, B, T, HQ, H, 4, 3, gates=("cmp", "sel"))
    out, aux = run_op(inp, cfg)
    changed_any = False
    for t in (20, 40, 63, 70):
        N = inp["k_cmp"].shape[1]
        hidden = [i for i in range(N) if i * cfg.d + cfg.l - 1 > t]
        seen = [i for i in range(N) if i * cfg.d + cfg.l - 1 <= t]
        assert hidden and seen
        for which, ok_to_change in ((hidden, False), (seen, True)):
            k_cmp = inp["k_cmp"].clone()
            k_cmp[:, which] = 50 * inp["q"][:, t, :1].unsqueeze(1) + torch.randn(
                k_cmp[:, which].shape, generator=rng, dtype=k_cmp.dtype)
            out2, aux2 = run_op(dict(inp, k_cmp=k_cmp), cfg)
            same_out = torch.equal(out[:, t], out2[:, t])
            same_idx = torch.equal(aux.block_indices[:, t], aux2.block_indices[:, t])
            if not ok_to_change:
                assert same_out and same_idx, t
            else:
                assert not same_out, t
                changed_any |= not same_idx
    assert changed_any, "selection never reacted to visible compressed tokens"


# ----------------------------------------------------------------------------- gradients


GRAD_CFG = dict(l=4, d=2, l_sel=4, n=2, n_initial=1, n_local=1, w=3)


def test_gradcheck_all_inputs(make_inputs):
    """Gradients of every continuous input (q, all K/V, compressed tokens, all gates).

    Selection indices carry no gradient; gradcheck's finite differences must not flip a
    selection, so the reference's own indices are passed in and held fixed.
    """
    cfg = cfg_of(**GRAD_CFG)
    inp = make_inputs(cfg, 1, 11, 2, 1, 4, 3, requires_grad=True)
    _, aux = run_op(inp, cfg)
    idx = aux.block_indices
    assert (idx[0, -1] >= 0).sum() == cfg.n and (idx[0, -1] == 0).any()  # top-n bites

    def f(*xs):
        return nsa_attention(*xs, config=cfg, block_indices=idx, backend=BACKEND)

    assert torch.autograd.gradcheck(f, tuple(inp[a] for a in ARGS), eps=1e-6, atol=1e-8,
                                    rtol=1e-6)


def test_gradients_do_not_flow_through_selection(make_inputs):
    """Computing the selection internally gives the same gradients as passing its result:
    the top-n choice is a constant for autograd (paper, spec 'Training')."""
    cfg = cfg_of(**GRAD_CFG)
    inp = make_inputs(cfg, 2, 23, 4, 2, 4, 3, requires_grad=True)
    xs = tuple(inp[a] for a in ARGS)
    out, aux = run_op(inp, cfg)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    g1 = torch.autograd.grad((out * w).sum(), xs)
    out2 = nsa_attention(**inp, config=cfg, block_indices=aux.block_indices, backend=BACKEND)
    g2 = torch.autograd.grad((out2 * w).sum(), xs)
    for name, a, b in zip(ARGS, g1, g2, strict=True):
        assert max_err(a, b) < TOL, name
    # the compressed keys still get a gradient (through O_cmp), not through selection
    assert g1[ARGS.index("k_cmp")].abs().max() > 0
    no_cmp_gate = dict(inp, g_cmp=None)
    out3 = nsa_attention(**no_cmp_gate, config=cfg, backend=BACKEND)
    g3 = torch.autograd.grad(out3.sum(), (inp["k_cmp"], inp["q"]), allow_unused=True)
    assert g3[0] is None or g3[0].abs().max().item() == 0.0
    assert math.isfinite(g3[1].abs().max().item())
