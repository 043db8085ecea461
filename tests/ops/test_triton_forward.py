"""Triton prefill kernels (TRITON_INTERPRET=1 on CPU) against the float64 reference.

Every kernel is launched directly on small shapes (T not a multiple of any block size,
several G including 1 and 3, l = l' = d and the paper's l=32, d=16, l'=64 with small n
and w), outputs poisoned with NaN (or -7 for indices) so an unwritten element fails, and
compared by ||out - ref|| / ||ref|| with the reference computed in float64 on the same
rounded inputs: fp32 below 1e-4, fp16 below 1e-2. Selection is checked where it cannot
depend on near-ties: top-n on given scores (with many exact ties) must equal
``reference.select_blocks``; end to end, indices must equal the reference's on every row
whose n-th and (n+1)-th free scores are clearly apart, and outputs are compared with
the reference's own indices passed in. Then the public op with backend="triton".
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nsa import NSAConfig, compress_mean, nsa_attention  # noqa: E402
from nsa.ops import BACKENDS  # noqa: E402
from nsa.ops import reference as R  # noqa: E402
from nsa.ops.compression import cmp_forward  # noqa: E402
from nsa.ops.selection import sel_forward, select_topn  # noqa: E402
from nsa.ops.triton_backend import (  # noqa: E402
    config_not_supported_reasons,
    triton_not_supported_reasons,
)
from nsa.ops.window import win_forward  # noqa: E402
from tests.conftest import build_inputs  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="CPU kernel tests need TRITON_INTERPRET=1"),
    pytest.mark.usefixtures("single_thread"),
]

TOL = {torch.float32: 1e-4, torch.float16: 1e-2}
PAPER = dict(l=32, d=16, l_sel=64)  # the paper's block sizes (with small n, w below)
EQUAL = dict(l=16, d=16, l_sel=16)  # l = l' = d: the setting public kernels use
ARGS = ("q", "k_sel", "v_sel", "k_win", "v_win", "k_cmp", "v_cmp", "g_cmp", "g_sel", "g_win")


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert not torch.isnan(out).any(), "NaN in the output (an element was not written?)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def nan_like(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


def rand(gen, *shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def readable(T: int, N: int, cfg: NSAConfig) -> torch.Tensor:
    """[T, nb] score entries selection may read: candidates j*l' <= t that can hold a
    visible compressed token (the others are 0 by definition and never stored)."""
    nb = cfg.num_sel_blocks(T)
    t = torch.arange(T)[:, None]
    j = torch.arange(nb)[None, :]
    nvis = R.num_cmp_visible(torch.arange(T), cfg.l, cfg.d).clamp(max=N)[:, None]
    return (j * (cfg.l_sel // cfg.d) - (cfg.l // cfg.d - 1) < nvis) & (j * cfg.l_sel <= t)


def ref_cmp(q, kc, vc, H, cfg, scale):
    """(o_cmp [B,T,HQ,dv], group scores [B,H,T,nb]) in float64."""
    B, T = q.shape[:2]
    pos = torch.arange(T).unsqueeze(0).expand(B, -1)
    o, p, _ = R.cmp_attention(R._to_groups(q.double(), H), kc.double(), vc.double(), pos, cfg,
                              scale)
    scores = R.group_scores(R.block_scores(p, cfg.num_sel_blocks(T), cfg.l, cfg.d, cfg.l_sel))
    return R._from_groups(o), scores


# ----------------------------------------------------------------------------- compressed


# block_n = 16 gives several key tiles, so scores cross tile boundaries (the carried tail)
@pytest.mark.parametrize("blocks,G,H,T,dk,dv,dtype,mode,block_n,desc", [
    (PAPER, 3, 2, 403, 32, 16, torch.float32, "fused", 16, False),
    (PAPER, 3, 1, 403, 32, 16, torch.float32, "two_pass", 16, False),
    (PAPER, 3, 2, 203, 32, 16, torch.float32, "fused", None, False),
    (EQUAL, 1, 2, 150, 16, 16, torch.float32, "fused", None, False),
    (PAPER, 4, 1, 330, 32, 32, torch.float16, "fused", 16, False),
    (dict(l=32, d=8, l_sel=32), 2, 1, 181, 32, 32, torch.float32, "two_pass", 16, False),
    # key/value tiles through tensor descriptors
    (PAPER, 3, 2, 403, 32, 16, torch.float32, "fused", 16, True),
    (PAPER, 3, 1, 403, 32, 16, torch.float32, "two_pass", 16, True),
    (PAPER, 4, 1, 330, 32, 32, torch.float16, "fused", 16, True),
    # block scores as a tensor-core product (fp16 hi/lo split of P, overlap matrix)
    (PAPER, 3, 2, 403, 32, 16, torch.float32, "fused", 16, "dot"),
    (PAPER, 16, 1, 290, 32, 16, torch.float32, "two_pass", None, "dot"),
    (PAPER, 4, 1, 330, 32, 32, torch.float16, "fused", 16, "dot"),
    (EQUAL, 1, 2, 150, 16, 16, torch.float32, "fused", None, "dot"),
    (dict(l=32, d=8, l_sel=32), 2, 1, 181, 32, 32, torch.float32, "fused", 16, "dot"),
    # head dims as two tiles (head_dim_split): 48 = 32 + 16, 40 = 32 + 16 masked
    (PAPER, 3, 2, 403, 48, 16, torch.float32, "fused", 16, False),
    (PAPER, 3, 2, 403, 48, 16, torch.float32, "fused", 16, True),
    (PAPER, 4, 1, 330, 40, 32, torch.float16, "two_pass", 16, False),
    (PAPER, 3, 1, 290, 48, 32, torch.float32, "fused", None, "dot"),
])
def test_cmp_kernel_outputs_and_block_scores(blocks, G, H, T, dk, dv, dtype, mode, block_n,
                                             desc, rng):
    cfg = NSAConfig(n=4, w=32, **blocks)
    B, HQ = 1, G * H
    q = rand(rng, B, T, HQ, dk, dtype=dtype)
    # 3 compressed tokens more than T makes: no query may ever see them
    N = R.num_compressed(T, cfg.l, cfg.d) + 3
    kc, vc = rand(rng, B, N, H, dk, dtype=dtype, scale=2.0), rand(rng, B, N, H, dv, dtype=dtype)
    scale = dk ** -0.5
    nb = cfg.num_sel_blocks(T)
    o = nan_like((B, T, HQ, dv), dtype)
    scores = torch.full((B, H, T, nb), float("nan"), dtype=torch.float32)
    cmp_forward(q, kc, vc, cfg, scale, o=o, scores=scores, mode=mode, block_n=block_n,
                use_desc=desc is True, score_dot=desc == "dot")
    o_ref, s_ref = ref_cmp(q, kc, vc, H, cfg, scale)
    assert rel(o, o_ref) < TOL[dtype]
    mask = readable(T, N, cfg)
    got, want = scores[..., mask], s_ref[..., mask]
    assert not torch.isnan(got).any(), "a block score selection reads was never written"
    assert rel(got, want) < TOL[dtype]
    assert (got - want).abs().max() < 1e-5 if dtype == torch.float32 else True


def test_cmp_fused_and_two_pass_write_the_same_scores(rng):
    cfg = NSAConfig(n=4, w=32, **PAPER)
    T, H, G, dk = 170, 1, 2, 32
    q = rand(rng, 1, T, G * H, dk)
    N = R.num_compressed(T, cfg.l, cfg.d)
    kc, vc = rand(rng, 1, N, H, dk), rand(rng, 1, N, H, dk)
    outs = [cmp_forward(q, kc, vc, cfg, 0.2, mode=m) for m in ("fused", "two_pass")]
    mask = readable(T, N, cfg)
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1][..., mask], outs[1][1][..., mask])


def test_cmp_scores_only_skips_the_value_pass(rng):
    cfg = NSAConfig(n=4, w=32, **PAPER)
    T, H, G, dk = 120, 1, 3, 16
    q = rand(rng, 1, T, G * H, dk)
    N = R.num_compressed(T, cfg.l, cfg.d)
    kc, vc = rand(rng, 1, N, H, dk), rand(rng, 1, N, H, dk)
    o, scores = cmp_forward(q, kc, vc, cfg, 0.25, want_o=False)
    assert o is None
    mask = readable(T, N, cfg)
    assert rel(scores[..., mask], ref_cmp(q, kc, vc, H, cfg, 0.25)[1][..., mask]) < 1e-5


# ----------------------------------------------------------------------------- top-n


@pytest.mark.parametrize("cfg_kw,T,levels", [
    (dict(n=4, n_initial=1, n_local=2, **PAPER), 610, 0),
    (dict(n=4, n_initial=1, n_local=2, **PAPER), 610, 3),  # many exact ties
    (dict(n=5, n_initial=0, n_local=1, **EQUAL), 301, 4),
    (dict(n=3, n_initial=1, n_local=0, **PAPER), 520, 5),  # the newest blocks are free
    (dict(n=3, n_initial=1, n_local=2, **EQUAL), 333, 2),  # no free slot
    (dict(n=24, n_initial=2, n_local=3, **EQUAL), 250, 2),  # more slots than blocks
])
def test_topn_equals_reference_select_blocks(cfg_kw, T, levels, rng, tile=None):
    cfg = NSAConfig(w=32, **cfg_kw)
    B, H = 1, 2
    N = R.num_compressed(T, cfg.l, cfg.d)
    nb = cfg.num_sel_blocks(T)
    s = torch.rand(B, H, T, nb, generator=rng, dtype=torch.float64)
    if levels:
        s = (s * levels).floor() / levels  # exact ties: the lower block index must win
    mask = readable(T, N, cfg)
    ref_scores = torch.where(mask, s, torch.zeros_like(s))
    # entries selection must not read are NaN: reading one would change the result
    given = torch.where(mask, s, torch.full_like(s, float("nan"))).float()
    pos = torch.arange(T).unsqueeze(0).expand(B, -1)
    want = R.select_blocks(ref_scores.float().double(), pos, cfg).permute(0, 2, 1, 3)
    out = torch.full((B, T, H, cfg.n), -7, dtype=torch.int32)
    select_topn(given, T, N, cfg, out=out, **(tile or {}))
    assert torch.equal(out.long(), want)


@pytest.mark.parametrize("cfg_kw,T,levels", [
    (dict(n=16, n_initial=1, n_local=2, l=8, d=8, l_sel=8), 300, 3),  # two chunks
    (dict(n=4, n_initial=0, n_local=1, l=8, d=8, l_sel=8), 290, 0),
])
def test_topn_gpu_tile_equals_reference(cfg_kw, T, levels, rng):
    """The GPU's tile (4 rows, chunks of 32 blocks): the interpreter's default is wider."""
    test_topn_equals_reference_select_blocks(cfg_kw, T, levels, rng,
                                             tile=dict(rows=4, chunk=32, warps=1))


def test_topn_treats_negative_zero_as_zero():
    cfg = NSAConfig(n=3, n_initial=0, n_local=1, w=32, **EQUAL)
    T = 80
    s = torch.zeros(1, 1, T, 5)
    s[..., 1] = -0.0
    s[..., 3] = -0.0
    out = select_topn(s, T, 5, cfg)
    pos = torch.arange(T).unsqueeze(0)
    want = R.select_blocks(s.double(), pos, cfg).permute(0, 2, 1, 3)
    assert torch.equal(out.long(), want)


# ----------------------------------------------------------------------------- selected


def ref_indices(rng, B, H, T, cfg) -> torch.Tensor:
    """Canonical indices [B, H, T, n] from random scores (the reference's selection)."""
    s = torch.rand(B, H, T, cfg.num_sel_blocks(T), generator=rng, dtype=torch.float64)
    pos = torch.arange(T).unsqueeze(0).expand(B, -1)
    return R.select_blocks(s, pos, cfg)


@pytest.mark.parametrize("blocks,G,H,T,dk,dv,dtype,pp,desc", [
    (PAPER, 1, 2, 211, 32, 16, torch.float32, None, False),  # 16 positions/program (union)
    (PAPER, 3, 1, 190, 32, 32, torch.float32, None, False),  # 4 positions, padded heads
    (PAPER, 16, 1, 97, 32, 32, torch.float32, None, False),  # one position per program
    (PAPER, 16, 1, 97, 16, 16, torch.float16, 2, False),  # union path with G = 16
    (EQUAL, 2, 1, 150, 16, 16, torch.float16, None, False),
    (PAPER, 4, 1, 130, 32, 32, torch.float32, 1, False),  # small G, one position/program
    # key/value tiles through tensor descriptors: rows past T arrive as zeros
    (PAPER, 16, 2, 97, 32, 32, torch.float32, None, True),
    (PAPER, 3, 1, 150, 16, 32, torch.float16, None, True),
    (EQUAL, 2, 2, 101, 32, 16, torch.float32, 2, True),
    # head dims as two tiles (head_dim_split): 48 = 32 + 16, 40 = 32 + 16 masked
    (PAPER, 16, 2, 97, 48, 32, torch.float32, None, False),
    (PAPER, 16, 2, 97, 48, 32, torch.float32, None, True),
    (PAPER, 3, 1, 190, 40, 16, torch.float16, None, False),  # union path
])
def test_sel_kernel_against_reference(blocks, G, H, T, dk, dv, dtype, pp, desc, rng):
    cfg = NSAConfig(n=4, w=32, **blocks)
    B, HQ = 1, G * H
    q, k, v = rand(rng, B, T, HQ, dk, dtype=dtype), rand(rng, B, T, H, dk, dtype=dtype), \
        rand(rng, B, T, H, dv, dtype=dtype)
    idx = ref_indices(rng, B, H, T, cfg)
    scale = dk ** -0.5
    pos = torch.arange(T).unsqueeze(0).expand(B, -1)
    want, _ = R.sel_attention(R._to_groups(q.double(), H), k.double(), v.double(), idx, pos,
                              cfg, scale)
    o = nan_like((B, T, HQ, dv), dtype)
    sel_forward(q, k, v, idx.permute(0, 2, 1, 3).to(torch.int32).contiguous(), cfg, scale,
                o_branch=o, positions_per_program=pp, use_desc=desc)
    assert rel(o, R._from_groups(want)) < TOL[dtype]


def test_sel_kernels_take_smaller_key_tiles_for_tuning(rng):
    """``block_n`` / ``dq_block_n`` (tuning runs): a block in 16- or 32-key dots gives the
    reference's output and the default's dQ; other sizes are refused by name."""
    from nsa.ops.selection.bwd_launch import sel_backward

    cfg = NSAConfig(n=4, w=32, **PAPER)
    B, T, H, G, d = 1, 97, 1, 16, 16
    q, k, v = rand(rng, B, T, H * G, d), rand(rng, B, T, H, d), rand(rng, B, T, H, d)
    idx = ref_indices(rng, B, H, T, cfg)
    pos = torch.arange(T).unsqueeze(0).expand(B, -1)
    want, _ = R.sel_attention(R._to_groups(q.double(), H), k.double(), v.double(), idx, pos,
                              cfg, 0.2)
    ix = idx.permute(0, 2, 1, 3).to(torch.int32).contiguous()
    lse = torch.empty(B, H * G, T)
    sel_forward(q, k, v, ix, cfg, 0.2, lse=lse, mode="group")
    dout, gate = rand(rng, B, T, H * G, d), torch.rand(B, T, H * G, generator=rng)
    delta = rand(rng, B, T, H * G)
    dqs = []
    for bn in (None, 16):
        o = nan_like((B, T, H * G, d), torch.float32)
        sel_forward(q, k, v, ix, cfg, 0.2, o_branch=o, mode="group", block_n=bn or 32)
        assert rel(o, R._from_groups(want)) < TOL[torch.float32]
        dq = torch.full(q.shape, float("nan"))
        sel_backward(q, k, v, ix, dout, gate, lse, delta, dq, cfg, 0.2, accumulate_dq=False,
                     dq_only=True, mode="group", dq_block_n=bn)
        dqs.append(dq)
    assert rel(dqs[1], dqs[0]) < TOL[torch.float32]
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16, got 24"):
        sel_forward(q, k, v, ix, cfg, 0.2, mode="group", block_n=24)
    with pytest.raises(ValueError, match="dq_block_n must be a power of two >= 16, got 8"):
        sel_backward(q, k, v, ix, dout, gate, lse, delta, dqs[0], cfg, 0.2, dq_only=True,
                     mode="group", dq_block_n=8)


def test_sel_kernel_refuses_descriptors_it_cannot_build(rng):
    cfg = NSAConfig(n=4, w=32, **PAPER)
    q = rand(rng, 1, 70, 2, 24)
    k, v = rand(rng, 1, 70, 1, 24), rand(rng, 1, 70, 1, 24)  # 24 is not a power of two
    idx = ref_indices(rng, 1, 1, 70, cfg).permute(0, 2, 1, 3).to(torch.int32).contiguous()
    with pytest.raises(ValueError, match="k: head dim 24"):
        sel_forward(q, k, v, idx, cfg, 0.2, use_desc=True)


def test_descriptor_loads_default_off_the_gpu_and_obey_the_override(rng, monkeypatch):
    import nsa.ops.descriptors as sl

    k, v = rand(rng, 1, 70, 1, 32), rand(rng, 1, 70, 1, 32)
    monkeypatch.setattr(sl, "USE_DESC", None)
    assert sl.resolve_desc("t", None, k, v, 32, 32) is False  # CPU: no bulk copies
    assert sl.resolve_desc("t", True, k, v, 32, 32) is True
    monkeypatch.setattr(sl, "USE_DESC", True)
    assert sl.resolve_desc("t", None, k, v, 32, 32) is True
    assert sl.resolve_desc("t", False, k, v, 32, 32) is False
    odd = rand(rng, 1, 70, 1, 40)[..., :24]  # strides of 40 fp32: 160 B, head dim 24
    assert sl.resolve_desc("t", None, odd, v, 32, 32) is False  # silently the pointer path
    assert "not a power of two" in " ".join(sl.desc_problems(odd, 32))


# blocks, B, G, H, T, dk, dv, dtype, seg_len, grouped: the block-centric path (entries
# grouped by block by the counting sort, or sorted, per-block partials, merge), ranges of
# seg_len entries that span several blocks
BLOCK_CASES = [
    (PAPER, 1, 1, 2, 211, 32, 16, torch.float32, 16, False),  # G = 1, d_v < d_k
    (PAPER, 2, 3, 1, 150, 32, 32, torch.float32, 7, True),  # batch 2, padded heads, odd ranges
    (dict(l=32, d=16, l_sel=128), 1, 2, 1, 300, 16, 16, torch.float32, 16, True),  # 2 sub-tiles
    (EQUAL, 1, 16, 1, 70, 16, 16, torch.float16, 16, False),  # G = 16, l = l' = d
    (PAPER, 1, 4, 2, 150, 32, 32, torch.float16, 64, True),
    # head dims as two tiles (head_dim_split): 48 = 32 + 16, 40 = 32 + 16 masked, and the
    # second tile over 2 key sub-tiles
    (PAPER, 1, 3, 1, 150, 48, 32, torch.float32, 7, True),
    (PAPER, 1, 2, 1, 150, 40, 16, torch.float16, 16, True),
    (dict(l=32, d=16, l_sel=128), 1, 2, 1, 300, 48, 16, torch.float32, 16, True),
]


@pytest.mark.parametrize("blocks,B,G,H,T,dk,dv,dtype,seg,counting", BLOCK_CASES)
def test_sel_block_path_against_reference(blocks, B, G, H, T, dk, dv, dtype, seg, counting,
                                          rng, monkeypatch):
    """Block-centric selected attention against float64, and its log-sum-exps against the
    group-centric kernel's; the partial buffers start as NaN, so a slot the merge reads
    without a kernel writing it (an unused -1 slot) shows. The index comes from the
    counting sort or from torch.sort (``counting``). The block kernel runs with and
    without gathering the next step's query rows ahead (same outputs, bit for bit)."""
    import nsa.ops.selection.launch as SL

    monkeypatch.setattr(SL, "PARTIAL_FILL", float("nan"))
    monkeypatch.setattr(SL, "COUNT_INDEX_MAX_BYTES", 1 << 28 if counting else 0)
    sorts = []
    real_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *a, **k: sorts.append(1) or real_sort(*a, **k))
    cfg = NSAConfig(n=4, w=32, **blocks)
    HQ = G * H
    q, k, v = rand(rng, B, T, HQ, dk, dtype=dtype), rand(rng, B, T, H, dk, dtype=dtype), \
        rand(rng, B, T, H, dv, dtype=dtype)
    idx = ref_indices(rng, B, H, T, cfg)
    assert (idx < 0).any(), "no unused slot: the NaN partials would not be tested"
    scale = dk ** -0.5
    pos = torch.arange(T).unsqueeze(0).expand(B, -1)
    want, _ = R.sel_attention(R._to_groups(q.double(), H), k.double(), v.double(), idx, pos,
                              cfg, scale)
    idx32 = idx.permute(0, 2, 1, 3).to(torch.int32).contiguous()
    lses, outs = [], []
    for mode, prefetch in (("block", True), ("block", False), ("group", None)):
        monkeypatch.setattr(SL, "BLOCK_PREFETCH", prefetch)
        o, lse = nan_like((B, T, HQ, dv), dtype), nan_like((B, HQ, T), torch.float32)
        sel_forward(q, k, v, idx32, cfg, scale, o_branch=o, lse=lse, mode=mode, seg_len=seg)
        assert rel(o, R._from_groups(want)) < TOL[dtype], (mode, prefetch)
        if mode == "block" and prefetch:
            assert len(sorts) == (0 if counting else 1)
        lses.append(lse)
        outs.append(o)
    assert torch.isfinite(lses[0]).all()
    assert torch.equal(outs[0], outs[1]) and torch.equal(lses[0], lses[1])
    assert (lses[0] - lses[2]).abs().max() < 1e-4


@pytest.mark.parametrize("counting", [True, False])
def test_entries_by_block_lists_every_used_slot_once_by_block(rng, monkeypatch, counting):
    import nsa.ops.selection.launch as SL

    monkeypatch.setattr(SL, "COUNT_INDEX_MAX_BYTES", 1 << 28 if counting else 0)
    cfg = NSAConfig(n=5, w=32, **PAPER)
    B, H, T = 2, 3, 333
    nb = cfg.num_sel_blocks(T)
    idx = ref_indices(rng, B, H, T, cfg).permute(0, 2, 1, 3).to(torch.int32).contiguous()
    keys, off = SL.entries_by_block(idx, nb)
    E = T * cfg.n
    assert keys.shape == (B, H, E) and off.shape == (B, H, nb + 1)
    assert off.dtype == torch.int32 and (keys[..., 1:] > keys[..., :-1]).all()
    for b in range(B):
        for h in range(H):
            used = idx[b, :, h] >= 0
            assert off[b, h, nb] == used.sum()
            for c in (0, 1, nb // 2, nb - 1):
                ent = keys[b, h, off[b, h, c]:off[b, h, c + 1]] - c * E
                t, j = ent // cfg.n, ent % cfg.n
                assert torch.equal(idx[b, t, h, j], torch.full_like(t, c, dtype=torch.int32))
                assert (idx[b, :, h] == c).sum() == ent.numel()


@pytest.mark.parametrize("key32_limit", [2**31, 64])
@pytest.mark.parametrize("by_position", [False, True])
def test_entries_by_block_counting_sort_equals_torch_sort(rng, monkeypatch, key32_limit,
                                                          by_position):
    """The counting sort (per-tile histograms, cumulative sum, rank inside the tile) gives
    exactly torch.sort's keys and offsets: int32 and int64 keys (bound lowered), entry
    and position keys, tiles cut inside a position's slots (n = 5) and a last tile cut
    short, and a tile where one block takes many entries (block 0, the unused slots)."""
    import nsa.ops.selection.launch as SL

    monkeypatch.setattr(SL, "KEY32_LIMIT", key32_limit)
    for n, B, H, T, idx_src in ((5, 2, 3, 333, "ref"), (5, 1, 2, 1500, "ref"),
                                (16, 1, 1, 40, "ref"), (3, 1, 2, 200, "dup")):
        cfg = NSAConfig(n=n, w=32, **PAPER)
        nb = cfg.num_sel_blocks(T)
        if idx_src == "ref":
            idx = ref_indices(rng, B, H, T, cfg)
        else:  # every row the same blocks: long runs of one bin inside each tile
            row = torch.tensor([0, nb // 2, -1])
            idx = row.expand(B, H, T, n).clone()
        idx = idx.permute(0, 2, 1, 3).to(torch.int32).contiguous()
        monkeypatch.setattr(SL, "COUNT_INDEX_MAX_BYTES", 1 << 28)
        monkeypatch.setattr(SL, "INDEX_TABLE_FILL", -5)
        keys, off = SL.entries_by_block(idx, nb, by_position=by_position)
        monkeypatch.setattr(SL, "INDEX_TABLE_FILL", None)
        monkeypatch.setattr(SL, "COUNT_INDEX_MAX_BYTES", 0)
        want_keys, want_off = SL.entries_by_block(idx, nb, by_position=by_position)
        assert keys.dtype == want_keys.dtype == (torch.int32 if key32_limit > 64
                                                 else torch.int64)
        assert torch.equal(off, want_off), (n, T)
        assert torch.equal(keys, want_keys), (n, T)


def test_entries_by_block_counting_sort_ranks_by_sort_too(rng, monkeypatch):
    """The GPU's counts and ranks inside a tile (run lengths of the tile's sorted bins, and
    of its sorted (bin, entry) keys) give the same keys as torch.sort; tiny, as the
    interpreter sorts element by element. The count table starts as garbage, so a bin
    left unwritten shows."""
    import nsa.ops.selection.launch as SL

    cfg = NSAConfig(n=5, w=32, **PAPER)
    T, nb = 90, cfg.num_sel_blocks(90)
    ref = ref_indices(rng, 1, 1, T, cfg)
    dup = torch.tensor([0, 1, -1, -1, -1]).expand(1, 1, T, 5)  # long runs of two bins
    monkeypatch.setattr(SL, "COUNT_INDEX_TILE", 256)  # 2 tiles, the last one cut short
    monkeypatch.setattr(SL, "INDEX_TABLE_FILL", 777)  # every count must be written
    for idx in (ref, dup):
        idx = idx.permute(0, 2, 1, 3).to(torch.int32).contiguous()
        monkeypatch.setattr(SL, "COUNT_INDEX_MAX_BYTES", 0)
        want_keys, want_off = SL.entries_by_block(idx, nb)
        monkeypatch.setattr(SL, "COUNT_INDEX_MAX_BYTES", 1 << 28)
        monkeypatch.setattr(SL, "COUNT_INDEX_SORT", True)
        keys, off = SL.entries_by_block(idx, nb)
        monkeypatch.setattr(SL, "COUNT_INDEX_SORT", None)
        assert torch.equal(off, want_off) and torch.equal(keys, want_keys)


def test_sel_mode_is_checked_and_chosen_by_group_size_and_memory(rng, monkeypatch):
    import nsa.ops.selection.launch as SL

    cfg = NSAConfig(n=4, w=32, **PAPER)
    q, k, v = rand(rng, 1, 70, 2, 16), rand(rng, 1, 70, 1, 16), rand(rng, 1, 70, 1, 16)
    idx = ref_indices(rng, 1, 1, 70, cfg).permute(0, 2, 1, 3).to(torch.int32).contiguous()
    with pytest.raises(ValueError, match="mode must be one of .*'blocks'"):
        sel_forward(q, k, v, idx, cfg, 0.2, mode="blocks")
    assert SL.sel_forward_mode(q, 16, 1, 4) == "group"  # CPU interpreter: group by default
    monkeypatch.setattr(SL, "SEL_MODE", "block")
    assert SL.sel_forward_mode(q, 16, 1, 4) == "block"
    assert SL.sel_forward_mode(q, 16, 1, 4, "group") == "group"
    assert SL.auto_sel_mode(8, True, 1 << 20) == "block"
    assert SL.auto_sel_mode(16, True, 1 << 20) == "group"
    assert SL.auto_sel_mode(1, True, SL.SEL_BLOCK_MAX_PARTIAL_BYTES + 1) == "group"
    assert SL.auto_sel_mode(1, False, 1 << 20) == "group"
    monkeypatch.setattr(SL, "SEL_MODE", None)
    monkeypatch.setenv("NSA_SEL_MODE", "block")
    assert SL.sel_forward_mode(q, 16, 1, 4) == "block"
    monkeypatch.setenv("NSA_SEL_MODE", "fast")
    with pytest.raises(ValueError, match="NSA_SEL_MODE must be one of"):
        sel_forward(q, k, v, idx, cfg, 0.2)


@pytest.mark.parametrize("dtype,mode", [(torch.float32, "group"), (torch.float16, "group"),
                                        (torch.float32, "block")])
def test_sel_kernel_fuses_the_gate_combine(dtype, mode, rng):
    cfg = NSAConfig(n=3, w=32, **PAPER)
    B, T, H, G, dk, dv = 1, 140, 1, 2, 32, 32
    HQ = G * H
    q, k, v = rand(rng, B, T, HQ, dk, dtype=dtype), rand(rng, B, T, H, dk, dtype=dtype), \
        rand(rng, B, T, H, dv, dtype=dtype)
    idx = ref_indices(rng, B, H, T, cfg)
    g = [torch.rand(B, T, HQ, generator=rng).to(dtype) for _ in range(3)]
    oc, ow = rand(rng, B, T, HQ, dv, dtype=dtype), rand(rng, B, T, HQ, dv, dtype=dtype)
    ob, out = nan_like((B, T, HQ, dv), dtype), nan_like((B, T, HQ, dv), dtype)
    sel_forward(q, k, v, idx.permute(0, 2, 1, 3).to(torch.int32).contiguous(), cfg, 0.2,
                o_branch=ob, out=out, g_sel=g[0], o_cmp=oc, g_cmp=g[1], o_win=ow, g_win=g[2],
                mode=mode)
    pos = torch.arange(T).unsqueeze(0).expand(B, -1)
    o_sel, _ = R.sel_attention(R._to_groups(q.double(), H), k.double(), v.double(), idx, pos,
                               cfg, 0.2)
    o_sel = R._from_groups(o_sel)
    want = sum(x.double() * gg.double()[..., None] for x, gg in ((o_sel, g[0]), (oc, g[1]),
                                                                  (ow, g[2])))
    assert rel(ob, o_sel) < TOL[dtype]
    assert rel(out, want) < TOL[dtype]


# ----------------------------------------------------------------------------- window


@pytest.mark.parametrize("G,H,T,w,dk,dv,dtype,bm,bn,desc", [
    (3, 2, 203, 37, 32, 16, torch.float32, None, None, False),
    (1, 1, 250, 64, 32, 32, torch.float32, None, None, False),  # w a multiple of the tile
    (4, 1, 150, 1, 16, 16, torch.float32, 16, 16, False),  # only the token itself
    (16, 1, 130, 1000, 32, 32, torch.float16, None, None, False),  # w >= T: dense causal
    (2, 1, 190, 50, 16, 16, torch.float16, 32, 16, False),
    # key/value tiles through tensor descriptors
    (3, 2, 203, 37, 32, 16, torch.float32, None, None, True),
    (2, 1, 190, 50, 16, 16, torch.float16, 32, 16, True),
    # head dims as two tiles (head_dim_split): 48 = 32 + 16, 40 = 32 + 16 masked
    (3, 2, 203, 37, 48, 32, torch.float32, None, None, False),
    (3, 2, 203, 37, 48, 32, torch.float32, None, None, True),
    (2, 1, 190, 50, 40, 16, torch.float16, 32, 16, False),
])
def test_win_kernel_against_reference(G, H, T, w, dk, dv, dtype, bm, bn, desc, rng):
    B, HQ = 1, G * H
    q, k, v = rand(rng, B, T, HQ, dk, dtype=dtype), rand(rng, B, T, H, dk, dtype=dtype), \
        rand(rng, B, T, H, dv, dtype=dtype)
    scale = dk ** -0.5
    pos = torch.arange(T).unsqueeze(0).expand(B, -1)
    want, _ = R.win_attention(R._to_groups(q.double(), H), k.double(), v.double(), pos, pos,
                              NSAConfig(w=w), scale)
    o = nan_like((B, T, HQ, dv), dtype)
    win_forward(q, k, v, w, scale, o=o, block_m=bm, block_n=bn, use_desc=desc)
    assert rel(o, R._from_groups(want)) < TOL[dtype]


# ----------------------------------------------------------------------------- the op


def op_inputs(rng, cfg, T, H, G, dk, dv, dtype, gates=("cmp", "sel", "win")):
    inp = build_inputs(rng, cfg, 1, T, G * H, H, dk, dv, dtype=torch.float64, gates=gates)
    # compressed keys from the raw keys (phi = mean), scaled so scores are peaked
    k = torch.randn(1, T, H, dk, generator=rng, dtype=torch.float64) * 3.0
    inp["k_cmp"] = compress_mean(k, cfg.l, cfg.d)
    inp["v_cmp"] = compress_mean(inp["v_sel"], cfg.l, cfg.d)
    return {name: None if x is None else x.to(dtype) for name, x in inp.items()}


def clear_rows(inp, cfg, gap=1e-5) -> torch.Tensor:
    """[B, T, H] rows whose selection cannot flip under rounding: the last free block taken
    and the first one left out differ by more than ``gap`` in the float64 reference."""
    q, kc, vc = inp["q"], inp["k_cmp"], inp["v_cmp"]
    B, T, HQ, _ = q.shape
    H = kc.shape[2]
    _, s = ref_cmp(q, kc, vc, H, cfg, q.shape[-1] ** -0.5)
    nb = s.shape[-1]
    t = torch.arange(T)[:, None]
    j = torch.arange(nb)[None, :]
    cur = t // cfg.l_sel
    forced = (j < cfg.n_initial) | ((cur - j >= 0) & (cur - j < cfg.n_local))
    free = (j <= cur) & ~forced
    k = cfg.n - cfg.n_initial - cfg.n_local
    ranked = torch.where(free, s, torch.full_like(s, -1.0)).sort(-1, descending=True).values
    if k == 0 or nb <= k:
        return torch.ones(B, T, H, dtype=torch.bool)
    gap_ok = (ranked[..., k - 1] - ranked[..., k]) > gap
    all_taken = free.sum(-1) <= k  # every free candidate is selected: nothing can flip
    return (gap_ok | all_taken).permute(0, 2, 1)


@pytest.mark.parametrize("blocks,n,w,T,H,G,dk,dv,dtype,mode", [
    (PAPER, 4, 48, 237, 1, 3, 32, 16, torch.float32, None),
    (EQUAL, 4, 40, 150, 1, 1, 16, 16, torch.float32, None),
    (PAPER, 3, 64, 200, 1, 4, 32, 32, torch.float16, None),
    (EQUAL, 5, 24, 133, 1, 2, 32, 32, torch.float16, None),
    # the block-centric selected path (the GPU default for G <= 8) end to end
    (PAPER, 4, 48, 237, 1, 3, 32, 16, torch.float32, "block"),
    (EQUAL, 5, 24, 133, 2, 2, 32, 32, torch.float16, "block"),
    # the paper's d_k = 192: two head-dim tiles (128 + 64) in the compressed, window and
    # group kernels (the block path pads to 256)
    (PAPER, 3, 40, 150, 1, 2, 192, 16, torch.float32, None),
    (PAPER, 3, 40, 150, 1, 2, 192, 16, torch.float32, "block"),
])
def test_op_matches_reference(blocks, n, w, T, H, G, dk, dv, dtype, mode, rng, monkeypatch):
    import nsa.ops.selection.launch as SL

    monkeypatch.setattr(SL, "SEL_MODE", mode)
    cfg = NSAConfig(n=n, w=w, **blocks)
    inp = op_inputs(rng, cfg, T, H, G, dk, dv, dtype)
    out, aux = nsa_attention(**inp, config=cfg, backend="triton", return_aux=True)
    ref, raux = nsa_attention(**{k: None if x is None else x.double() for k, x in inp.items()},
                              config=cfg, backend="reference", return_aux=True)
    assert out.dtype == dtype and aux.block_indices.dtype == torch.int64
    assert aux.block_indices.shape == raux.block_indices.shape
    for name in ("o_cmp", "o_win"):
        assert rel(getattr(aux, name), getattr(raux, name)) < TOL[dtype], name
    if dtype == torch.float32:
        rows = clear_rows(inp, cfg)
        assert rows.float().mean() > 0.9, "too few rows clear of near-ties to test selection"
        assert torch.equal(aux.block_indices[rows], raux.block_indices[rows])
        if torch.equal(aux.block_indices, raux.block_indices):
            assert rel(out, ref) < TOL[dtype]
            assert rel(aux.o_sel, raux.o_sel) < TOL[dtype]
    # with the reference's indices passed in, the whole output must match
    out2, aux2 = nsa_attention(**inp, config=cfg, backend="triton",
                               block_indices=raux.block_indices, return_aux=True)
    assert rel(out2, ref) < TOL[dtype]
    assert rel(aux2.o_sel, raux.o_sel) < TOL[dtype]
    assert torch.equal(aux2.block_indices, raux.block_indices)


@pytest.mark.parametrize("mode", ["group", "block"])
def test_op_canonicalises_given_indices_like_the_reference(mode, rng, monkeypatch):
    import nsa.ops.selection.launch as SL

    monkeypatch.setattr(SL, "SEL_MODE", mode)
    cfg = NSAConfig(n=5, w=32, **EQUAL)
    T, H, G, dk = 120, 1, 2, 16
    inp = op_inputs(rng, cfg, T, H, G, dk, dk, torch.float32, gates=("sel",))
    nb = cfg.num_sel_blocks(T)
    # duplicates, -1 anywhere, future blocks, any order
    idx = torch.randint(-1, nb, (1, T, H, cfg.n), generator=rng)
    idx[..., 1] = idx[..., 0]
    out, aux = nsa_attention(**inp, config=cfg, backend="triton", block_indices=idx,
                             return_aux=True)
    ref, raux = nsa_attention(**{k: None if x is None else x.double() for k, x in inp.items()},
                              config=cfg, backend="reference", block_indices=idx,
                              return_aux=True)
    assert torch.equal(aux.block_indices, raux.block_indices)
    # rows whose every given block lies in the future see nothing: output 0 in both
    assert rel(out, ref) < 1e-4


@pytest.mark.parametrize("gates", [("sel",), ("cmp", "win"), ("win",), ("cmp",),
                                   ("sel", "win")])
def test_op_branch_subsets(gates, rng):
    cfg = NSAConfig(n=3, w=40, **PAPER)
    T, H, G, dk = 150, 1, 2, 16
    inp = op_inputs(rng, cfg, T, H, G, dk, dk, torch.float32, gates=gates)
    ref, raux = nsa_attention(**{k: None if x is None else x.double() for k, x in inp.items()},
                              config=cfg, backend="reference", return_aux=True)
    out = nsa_attention(**inp, config=cfg, backend="triton",
                        block_indices=raux.block_indices if "sel" in gates else None)
    assert rel(out, ref) < 1e-4


@pytest.mark.parametrize("gates", [("cmp", "sel", "win"), ("cmp", "win")])
def test_inference_calls_the_kernels_directly_with_the_op_results(gates, rng, monkeypatch):
    """Eager inference skips the custom op (host time); its outputs and aux equal the op
    path's bit for bit. A call that records autograd skips it too (an equivalent
    autograd.Function; the backward tests compare its gradients with the op's)."""
    import nsa.ops.triton_autograd as TA

    cfg = NSAConfig(n=3, w=40, **PAPER)
    inp = op_inputs(rng, cfg, 150, 1, 2, 16, 16, torch.float32, gates=gates)
    ops = []
    real_op = torch.ops.nsa.triton_fwd
    monkeypatch.setattr(torch.ops.nsa, "triton_fwd",
                        lambda *a: ops.append(1) or real_op(*a), raising=False)
    direct, daux = nsa_attention(**inp, config=cfg, backend="triton", return_aux=True)
    assert ops == []
    monkeypatch.setattr(TA, "_eager_real", lambda x: False)
    via_op, oaux = nsa_attention(**inp, config=cfg, backend="triton", return_aux=True)
    assert ops == [1]
    assert torch.equal(direct, via_op)
    for f in ("block_indices", "o_cmp", "o_sel", "o_win"):
        a, b = getattr(daux, f), getattr(oaux, f)
        assert (a is None) == (b is None), f
        assert a is None or torch.equal(a, b), f
    monkeypatch.undo()
    q = inp["q"].clone().requires_grad_(True)
    ops.clear()
    monkeypatch.setattr(torch.ops.nsa, "triton_fwd",
                        lambda *a: ops.append(1) or real_op(*a), raising=False)
    out = nsa_attention(**{**inp, "q": q}, config=cfg, backend="triton")
    assert ops == [] and out.requires_grad
    assert torch.equal(out.detach(), direct)


def test_op_shorter_than_one_compressed_block(rng):
    """T < l: no compressed token exists, O_cmp = 0 and selection keeps the forced blocks."""
    cfg = NSAConfig(n=4, w=16, **PAPER)
    inp = op_inputs(rng, cfg, 27, 1, 2, 16, 16, torch.float32)
    assert inp["k_cmp"].shape[1] == 0
    out, aux = nsa_attention(**inp, config=cfg, backend="triton", return_aux=True)
    ref, raux = nsa_attention(**{k: None if x is None else x.double() for k, x in inp.items()},
                              config=cfg, backend="reference", return_aux=True)
    assert torch.equal(aux.block_indices, raux.block_indices)
    assert rel(out, ref) < 1e-4 and torch.count_nonzero(aux.o_cmp) == 0


# ----------------------------------------------------------------------------- routing


def test_backend_is_registered_and_explains_what_it_cannot_run():
    assert "triton" in BACKENDS
    assert triton_not_supported_reasons("cpu", torch.float32, 64, 64, 4) == []
    assert any("float64" in r for r in triton_not_supported_reasons("cpu", torch.float64,
                                                                     64, 64, 4))
    assert any("bfloat16" in r for r in triton_not_supported_reasons("cpu", torch.bfloat16,
                                                                      64, 64, 4))
    assert any("G=200" in r for r in triton_not_supported_reasons("cpu", torch.float32,
                                                                   64, 64, 200))
    assert any("d_v" in r for r in triton_not_supported_reasons("cpu", torch.float32,
                                                                 64, 128, 1))
    assert config_not_supported_reasons(NSAConfig(**PAPER)) == []
    assert config_not_supported_reasons(NSAConfig(l=128, d=16, l_sel=64))  # l > l' + d


def test_unsupported_config_needs_given_indices(rng):
    cfg = NSAConfig(l=128, d=16, l_sel=64, n=3, w=16)
    inp = op_inputs(rng, cfg, 200, 1, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="block-score"):
        nsa_attention(**inp, config=cfg, backend="triton")
    ref, raux = nsa_attention(**{k: None if x is None else x.double() for k, x in inp.items()},
                              config=cfg, backend="reference", return_aux=True)
    out = nsa_attention(**inp, config=cfg, backend="triton", block_indices=raux.block_indices)
    assert rel(out, ref) < 1e-4


def test_inputs_requiring_grad_run_the_reference_with_autograd(rng):
    cfg = NSAConfig(n=3, w=16, **EQUAL)
    inp = op_inputs(rng, cfg, 40, 1, 2, 16, 16, torch.float32)
    inp["q"].requires_grad_(True)
    out = nsa_attention(**inp, config=cfg, backend="triton")
    assert out.grad_fn is not None
    out.sum().backward()
    assert inp["q"].grad is not None and torch.isfinite(inp["q"].grad).all()


def test_policy_can_keep_selection_on_the_reference(rng, monkeypatch):
    """Where routing sends the selection branch to the reference (SM 8.9), the other
    branches still run in Triton and the result is the same."""
    import nsa.ops.triton_backend as tb

    monkeypatch.setattr(tb, "_routing", lambda *a: ((), False))
    cfg = NSAConfig(n=3, w=40, **PAPER)
    inp = op_inputs(rng, cfg, 140, 1, 2, 16, 16, torch.float32)
    ref, raux = nsa_attention(**{k: None if x is None else x.double() for k, x in inp.items()},
                              config=cfg, backend="reference", return_aux=True)
    out, aux = nsa_attention(**inp, config=cfg, backend="triton", return_aux=True)
    assert torch.equal(aux.block_indices, raux.block_indices)
    assert rel(out, ref) < 1e-4 and rel(aux.o_sel, raux.o_sel) < 1e-4


def test_routing_is_memoised_per_environment(monkeypatch):
    """The forward's capability/policy answer is computed once per (device, dtype, sizes,
    routing flags): changing a routing variable changes the answer at the next call."""
    import nsa.ops.triton_backend as tb

    q = torch.zeros(1, 4, 2, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    off, _ = tb._routing(q, 16, 16, 1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    on, sel = tb._routing(q, 16, 16, 1)
    assert any("TRITON_INTERPRET" in r for r in off) and on == () and sel
    assert tb._routing(q.half(), 16, 16, 1) == ((), True)
    assert any("bfloat16" in r for r in tb._routing(q.bfloat16(), 16, 16, 1)[0])
    assert any("G=200" in r for r in tb._routing(q, 16, 16, 200)[0])


def test_window_side_stream_switch_is_ignored_off_cuda(rng, monkeypatch):
    """WINDOW_SIDE_STREAM=True (force the window onto a side CUDA stream) must not touch
    CUDA for CPU tensors: the window runs in line and the output is the in-line one."""
    import nsa.ops.triton_backend as tb

    cfg = NSAConfig(n=3, w=40, **PAPER)
    inp = op_inputs(rng, cfg, 140, 1, 2, 16, 16, torch.float32)
    want = nsa_attention(**inp, config=cfg, backend="triton")
    monkeypatch.setattr(tb, "WINDOW_SIDE_STREAM", True)
    assert tb._side_stream(torch.device("cpu")) is None
    assert torch.equal(nsa_attention(**inp, config=cfg, backend="triton"), want)
