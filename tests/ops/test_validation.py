"""nsa_attention rejects bad input with an error that names the offending argument."""

from __future__ import annotations

import pytest
import torch

from nsa import NSAConfig, nsa_attention

CFG = NSAConfig(l=4, d=2, l_sel=4, n=2, n_initial=1, n_local=1, w=4)
B, T, HQ, H, DK, DV = 2, 9, 4, 2, 4, 3
NB = -(-T // CFG.l_sel)  # 3 selection blocks


@pytest.fixture
def good(make_inputs):
    inp = make_inputs(CFG, B, T, HQ, H, DK, DV)
    inp["block_indices"] = None
    return inp


def call(inp, **kw):
    args = dict(inp)
    args.update(kw)
    args.setdefault("config", CFG)
    args.setdefault("backend", "reference")
    return nsa_attention(**args)


def _drop_dim(name):
    return lambda g: {name: g[name][..., 0]}


def _add_dim(name):
    return lambda g: {name: g[name].unsqueeze(-1)}


def _idx():
    return torch.zeros(B, T, H, CFG.n, dtype=torch.long)


# (id, argument changes given the good inputs, exception, message regex)
CASES = [
    # ranks, every argument
    *[(f"rank-{a}", _drop_dim(a), ValueError,
       rf"{a} must be 4-D .*got shape")
      for a in ("q", "k_sel", "v_sel", "k_win", "v_win", "k_cmp", "v_cmp")],
    *[(f"rank5-{a}", _add_dim(a), ValueError,
       rf"{a} must be 4-D")
      for a in ("k_sel", "v_cmp")],
    *[(f"rank-{a}", _add_dim(a), ValueError,
       rf"{a} must be 3-D \[B, T, HQ\]")
      for a in ("g_cmp", "g_sel", "g_win")],
    ("rank-block_indices", lambda g: {"block_indices": torch.zeros(B, T, H, dtype=torch.long)},
     ValueError, r"block_indices must be 4-D \[B, T, H, n\]"),
    # types
    ("type-q", lambda g: {"q": g["q"].tolist()}, TypeError, r"q must be a torch.Tensor"),
    ("type-k_sel", lambda g: {"k_sel": g["k_sel"].numpy()}, TypeError,
     r"k_sel must be a torch.Tensor"),
    ("type-config", lambda g: {"config": CFG.to_dict()}, TypeError,
     r"config must be an NSAConfig"),
    # shapes
    ("batch-k_sel", lambda g: {"k_sel": g["k_sel"][:1]}, ValueError,
     r"batch of k_sel .* must equal q's batch B=2"),
    ("batch-v_cmp", lambda g: {"v_cmp": g["v_cmp"][:1]}, ValueError, r"v_cmp .*B=2"),
    ("tokens-v_win", lambda g: {"v_win": g["v_win"][:, :-1]}, ValueError,
     r"k_win/v_win must hold T=9 tokens like q, got 9 and 8"),
    ("tokens-k_sel", lambda g: {"k_sel": g["k_sel"][:, :-2]}, ValueError,
     r"k_sel/v_sel must hold T=9"),
    ("tokens-cmp", lambda g: {"v_cmp": g["v_cmp"][:, :-1]}, ValueError,
     r"k_cmp and v_cmp must hold the same number of compressed tokens"),
    ("dk-k_win", lambda g: {"k_win": torch.cat([g["k_win"], g["k_win"][..., :1]], -1)},
     ValueError, r"k_win head dim must equal q's d_k=4, got 5"),
    ("dk-k_cmp", lambda g: {"k_cmp": g["k_cmp"][..., :2]}, ValueError,
     r"k_cmp head dim must equal q's d_k=4, got 2"),
    ("heads-k_win-vs-v_win", lambda g: {"k_win": g["k_win"][:, :, :1]}, ValueError,
     r"k_win and v_win must have the same number of KV heads, got 1 and 2"),
    ("heads-cmp-vs-sel", lambda g: {"k_cmp": g["k_cmp"][:, :, :1], "v_cmp": g["v_cmp"][:, :, :1]},
     ValueError, r"k_cmp has 1 KV heads, other branches have H=2"),
    ("dv-v_win", lambda g: {"v_win": torch.cat([g["v_win"], g["v_win"]], -1)}, ValueError,
     r"v_win has d_v=6, other branches have d_v=3"),
    ("HQ-not-divisible", lambda g: {"q": g["q"][:, :, :3], "g_cmp": g["g_cmp"][..., :3],
                                    "g_sel": g["g_sel"][..., :3], "g_win": g["g_win"][..., :3]},
     ValueError, r"q's HQ=3 query heads must be divisible by the H=2 KV heads"),
    ("gate-shape-g_sel", lambda g: {"g_sel": g["g_sel"][..., :3]}, ValueError,
     r"g_sel must have shape \[B, T, HQ\] = \(2, 9, 4\), got \(2, 9, 3\)"),
    ("gate-shape-g_win-T", lambda g: {"g_win": g["g_win"][:, :5]}, ValueError,
     r"g_win must have shape \[B, T, HQ\]"),
    # devices ("meta" stands in for a second device)
    ("device-k_win", lambda g: {"k_win": g["k_win"].to("meta")}, ValueError,
     r"k_win is on meta, q is on cpu"),
    ("device-v_cmp", lambda g: {"v_cmp": g["v_cmp"].to("meta")}, ValueError,
     r"v_cmp is on meta, q is on cpu"),
    ("device-g_cmp", lambda g: {"g_cmp": g["g_cmp"].to("meta")}, ValueError,
     r"g_cmp is on meta, q is on cpu"),
    ("device-block_indices", lambda g: {"block_indices": _idx().to("meta")}, ValueError,
     r"block_indices is on meta, q is on cpu"),
    # dtypes
    ("dtype-v_sel", lambda g: {"v_sel": g["v_sel"].float()}, TypeError,
     r"v_sel has dtype torch.float32, q has torch.float64"),
    ("dtype-k_cmp", lambda g: {"k_cmp": g["k_cmp"].half()}, TypeError,
     r"k_cmp has dtype torch.float16"),
    ("dtype-q-int", lambda g: {"q": g["q"].long()}, TypeError,
     r"q must be a floating tensor, got dtype torch.int64"),
    ("dtype-g_win-int", lambda g: {"g_win": (g["g_win"] > 0.5).long()}, TypeError,
     r"g_win has dtype torch.int64, q has torch.float64"),
    ("dtype-g_cmp-float32", lambda g: {"g_cmp": g["g_cmp"].float()}, TypeError,
     r"g_cmp has dtype torch.float32, q has torch.float64"),
    # a gated branch without its keys/values
    ("missing-k_win", lambda g: {"k_win": None}, ValueError,
     r"k_win and v_win are required when the win branch is computed"),
    ("missing-v_sel", lambda g: {"v_sel": None}, ValueError,
     r"k_sel and v_sel are required when the sel branch is computed"),
    ("missing-v_cmp", lambda g: {"v_cmp": None}, ValueError,
     r"k_cmp and v_cmp are required when the cmp branch is computed"),
    ("missing-cmp-for-selection", lambda g: {"k_cmp": None, "v_cmp": None, "g_cmp": None},
     ValueError, r"k_cmp and v_cmp are required .*selection scores come from the compressed"),
    ("all-gates-None", lambda g: {"g_cmp": None, "g_sel": None, "g_win": None}, ValueError,
     r"at least one of g_cmp, g_sel, g_win must be a tensor"),
    # block indices
    ("block_indices-too-big", lambda g: {"block_indices": _idx() + NB}, ValueError,
     r"block_indices values must lie in \[-1, 3\) .*max 3"),
    ("block_indices-below-minus-1", lambda g: {"block_indices": _idx() - 2}, ValueError,
     r"block_indices values must lie in \[-1, 3\) .*min -2"),
    ("block_indices-float", lambda g: {"block_indices": _idx().double()}, TypeError,
     r"block_indices must be an integer tensor, got torch.float64"),
    ("block_indices-bool", lambda g: {"block_indices": _idx().bool()}, TypeError,
     r"block_indices must be an integer tensor, got torch.bool"),
    ("block_indices-shape", lambda g: {"block_indices": torch.zeros(B, T, H + 1, 2,
                                                                     dtype=torch.long)},
     ValueError, r"block_indices must be \[B, T, H, n\] = \(2, 9, 2, 2\), got \(2, 9, 3, 2\)"),
    ("block_indices-slots", lambda g: {"block_indices": torch.zeros(B, T, H, 3,
                                                                     dtype=torch.long)},
     ValueError, r"block_indices must be \[B, T, H, n\] = \(2, 9, 2, 2\), got \(2, 9, 2, 3\)"),
    # backend
    ("backend-unknown", lambda g: {"backend": "bogus"}, ValueError,
     r"backend must be one of \[.*'reference'.*\], got 'bogus'"),
]


@pytest.mark.parametrize("change,exc,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_with_named_argument(good, change, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(good, **change(good))


def test_case_table_covers_every_argument():
    ids = " ".join(c[0] for c in CASES)
    for name in ("q", "k_sel", "v_sel", "k_win", "v_win", "k_cmp", "v_cmp", "g_cmp", "g_sel",
                 "g_win", "block_indices", "backend", "config"):
        assert name in ids, name


def test_skipped_branches_need_no_tensors(good):
    """Branches whose gate is None need no keys/values; given block indices, neither does
    the compressed branch."""
    out = call(good, g_cmp=None, g_sel=None, k_sel=None, v_sel=None, k_cmp=None, v_cmp=None)
    assert out.shape == (B, T, HQ, DV)
    out = call(good, g_cmp=None, k_cmp=None, v_cmp=None, k_win=None, v_win=None, g_win=None,
               block_indices=_idx())
    assert out.shape == (B, T, HQ, DV)
    idx = _idx() - 1  # all -1 but block 0 in slot 0: valid
    idx[..., 0] = 0
    assert call(good, block_indices=idx).shape == (B, T, HQ, DV)
    assert call(good, block_indices=idx.to(torch.int32)).shape == (B, T, HQ, DV)

