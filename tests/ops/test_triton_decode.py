"""Triton decode kernels (TRITON_INTERPRET=1 on CPU) against the reference decode step:
mixed sequence lengths around multiples of l, d, l' and w, several group sizes, branch
subsets, fp32/fp16, outputs and scratch poisoned with NaN, read counters and indices."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nsa import NSAConfig  # noqa: E402
from nsa.cache import NSACache  # noqa: E402
from nsa.ops.decode import nsa_decode  # noqa: E402
from nsa.ops.decode.launch import triton_decode  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU kernel tests need TRITON_INTERPRET=1")


def poison_unused_rows(cache: NSACache, cfg: NSAConfig) -> None:
    """NaN in every cache row no sequence may read yet (past its tokens, past its
    compressed tokens, window slots not yet written): a kernel that loads such a row and
    only masks it afterwards (0 * NaN) shows up."""
    from nsa.ops.reference import num_compressed

    for b, n in enumerate(cache.lengths.tolist()):
        nc = num_compressed(n, cfg.l, cfg.d)
        for name, lo in (("k_sel", n), ("v_sel", n), ("k_cmp", nc), ("v_cmp", nc),
                         ("k_win", n), ("v_win", n)):
            getattr(cache, name)[b, lo:] = float("nan")


def run_steps(cfg: NSAConfig, lens: list[int], steps: int, dtype: torch.dtype, HQ: int,
              gates=(True, True, True), static: bool = False, seed: int = 0,
              poison: bool = False):
    """Ragged prefill, then `steps` decode steps comparing triton with the reference.
    ``poison``: NaN in the cache rows no sequence may read (:func:`poison_unused_rows`)."""
    torch.manual_seed(seed)
    B, H, dk, dv = len(lens), cfg.n_kv_heads, cfg.d_k, cfg.d_v
    P = max(lens)
    cache = NSACache(cfg, B, dtype=dtype, initial_capacity=16,
                     max_len=P + steps if static else None, static=static)
    raw = [torch.randn(B, P, H, D, dtype=dtype) for D in (dk, dv, dk, dv, dk, dv)]
    cache.prefill(*raw, lengths=torch.tensor(lens))
    scale = dk ** -0.5
    worst = 0.0
    for _ in range(steps):
        cache.append(*(torch.randn(B, H, D, dtype=dtype) for D in (dk, dv, dk, dv, dk, dv)))
        if poison:
            poison_unused_rows(cache, cfg)
        q = torch.randn(B, HQ, dk, dtype=dtype)
        g = [torch.rand(B, HQ, dtype=dtype) if on else None for on in gates]
        # the reference in float64 on the same (rounded) inputs is the oracle
        ref, ref_idx = nsa_decode(q.double(), _as64(cache), *(x if x is None else x.double()
                                                              for x in g),
                                  backend="reference", return_indices=True)
        ref_reads = dict(_as64(cache).last_reads)
        out, reads, idx = triton_decode(q, cache, *g, cfg, scale, poison=True)
        assert not out.isnan().any()
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        worst = max(worst, rel)
        if gates[1]:
            assert torch.equal(idx, ref_idx), "selected blocks differ from the reference"
        assert reads.keys() == ref_reads.keys()
        for k in reads:
            assert torch.equal(reads[k], ref_reads[k]), f"{k} reads differ"
        _as64.cache = None
    return worst


def _as64(cache: NSACache) -> NSACache:
    """A float64 copy of the cache (memoised per step)."""
    if getattr(_as64, "cache", None) is None:
        _as64.cache = cache.as_dtype(torch.float64)
    return _as64.cache


TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype,G,H", [(torch.float32, 1, 2), (torch.float32, 3, 1),
                                       (torch.float32, 16, 1), (torch.float16, 4, 2)])
def test_decode_kernel_matches_reference(dtype, G, H):
    cfg = NSAConfig(l=8, d=4, l_sel=16, n=5, w=20, n_heads=G * H, n_kv_heads=H, d_k=16,
                    d_v=32 if G == 3 else 16)
    # lengths just below/at/above multiples of l, d, l' and w, one very short, and one with
    # more blocks than n (n = 5 leaves 2 picks to the group's block scores)
    lens = [7, 16, 21, 33, 2, 120]
    worst = run_steps(cfg, lens, steps=2, dtype=dtype, HQ=G * H)
    assert worst < TOL[dtype], worst


def test_decode_kernel_paper_blocks_and_branch_subsets():
    cfg = NSAConfig(l=32, d=16, l_sel=64, n=4, w=96, n_heads=4, n_kv_heads=2, d_k=16, d_v=16)
    lens = [31, 64, 97, 200]
    assert run_steps(cfg, lens, 2, torch.float32, 4) < 1e-5
    for gates in [(True, False, False), (False, True, False), (False, False, True)]:
        assert run_steps(cfg, lens[2:], 1, torch.float32, 4, gates=gates) < 1e-5, gates


def test_decode_kernel_block_scores_by_overlap_dot(monkeypatch):
    """The overlap-matrix dot path of p1's block scores (SUM_SCORES off), which configs
    the per-block sums do not support take, on configs that take the sums by default."""
    from nsa.ops.decode import launch

    monkeypatch.setattr(launch, "SUM_SCORES", False)
    # tiles of 64 compressed tokens cover 256 raw tokens here: 300 spans two tiles, so the
    # weights built once are used at a tile offset too; n = 6 leaves 3 picks to the scores
    cfg = NSAConfig(l=8, d=4, l_sel=16, n=6, w=20, n_heads=6, n_kv_heads=2, d_k=16, d_v=16)
    assert launch.sum_scores_supported(cfg)
    assert run_steps(cfg, [21, 300], 2, torch.float32, 6) < 1e-5


@pytest.mark.parametrize("lens,chunk", [([21, 300], None), ([2100, 45], None),
                                        ([300, 45], 4)])
def test_decode_top_n_by_bitonic_top_k(monkeypatch, lens, chunk):
    """p2's and p3's picks by Triton's top-k network (the GPU default; the interpreter
    takes the serial reductions): the reference's blocks, with n = 6 below the 8-slot
    pick buffer, and (2100 tokens: 132 blocks of 16) over two chunks of candidates. With
    chunks of 4 blocks, fewer than the 8 pick slots (as chunks of 128 blocks are for
    n > 128), p2 cannot take the network and picks by the reductions."""
    from nsa.ops.decode import launch

    monkeypatch.setattr(launch, "TOPK", True)
    if chunk:
        monkeypatch.setattr(launch, "_chunk_blocks", lambda nbcap: chunk)
    cfg = NSAConfig(l=8, d=4, l_sel=16, n=6, w=20, n_heads=4, n_kv_heads=2, d_k=16, d_v=16)
    assert run_steps(cfg, lens, 1, torch.float32, 4) < 1e-5


def test_decode_kernel_blocks_not_aligned_to_tiles():
    """l' = 3d: a tile of compressed tokens (64 d raw tokens) does not start on a block
    boundary, so the Eq. 9 weights differ from tile to tile (the aligned case builds them
    once); a window and cache long enough for several tiles of compressed tokens."""
    cfg = NSAConfig(l=8, d=4, l_sel=12, n=5, w=20, n_heads=4, n_kv_heads=2, d_k=16, d_v=16)
    assert (64 * cfg.d) % cfg.l_sel != 0
    from nsa.ops.decode import launch

    assert not launch.sum_scores_supported(cfg)
    assert run_steps(cfg, [300, 517, 45], 2, torch.float32, 4) < 1e-5


def test_decode_kernel_static_cache_uses_capacity_wide_grids():
    cfg = NSAConfig(l=8, d=8, l_sel=8, n=4, w=8, n_local=1, n_heads=4, n_kv_heads=2,
                    d_k=16, d_v=16)  # l = l' = d
    assert run_steps(cfg, [5, 9, 17], 2, torch.float32, 4, static=True) < 1e-5


def test_auto_backend_on_cpu_is_reference_and_triton_can_be_asked_for():
    cfg = NSAConfig(l=8, d=4, l_sel=16, n=3, w=20, n_heads=4, n_kv_heads=2, d_k=16, d_v=16)
    cache = NSACache(cfg, 1, dtype=torch.float32)
    cache.prefill(*(torch.randn(1, 40, 2, 16) for _ in range(6)))
    q, g = torch.randn(1, 4, 16), torch.rand(1, 4)
    a = nsa_decode(q, cache, g, g, g)  # auto: CPU -> reference
    b = nsa_decode(q, cache, g, g, g, backend="triton")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_module_decode_on_triton_matches_the_reference_module():
    """NSAAttention with backend="triton" (Triton prefill and decode kernels under the
    interpreter) against the same weights on the reference backend, ragged batch."""
    from nsa.module import NSAAttention

    torch.manual_seed(3)
    cfg = NSAConfig(l=16, d=8, l_sel=16, n=3, w=24, hidden_size=32, n_heads=4, n_kv_heads=2,
                    d_k=16, d_v=16, phi="mean")
    ref = NSAAttention(cfg, backend="reference")
    torch.nn.init.normal_(ref.gate[-1].weight, std=0.5)
    tri = NSAAttention(cfg, backend="triton")
    tri.load_state_dict(ref.state_dict())
    lens = torch.tensor([20, 33])
    x = torch.randn(2, 33 + 4, cfg.hidden_size)
    outs = []
    for m in (ref, tri):
        cache = m.new_cache(2, max_len=40)
        with torch.no_grad():
            y0 = m.prefill(x[:, :33], cache, lengths=lens)
            steps = [m.decode(torch.stack([x[b, int(lens[b]) + i] for b in range(2)])[:, None],
                              cache) for i in range(4)]
        outs.append((y0, torch.cat(steps, 1), cache.total_reads))
    (y0r, dr, rr), (y0t, dt, rt) = outs
    for b, P in enumerate(lens.tolist()):
        torch.testing.assert_close(y0t[b, :P], y0r[b, :P], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dt, dr, rtol=1e-4, atol=1e-5)
    for k in rr:
        assert torch.equal(rt[k], rr[k]), k


@pytest.mark.parametrize("many", [False, True])
def test_decode_kernel_multi_tile_splits(monkeypatch, many):
    """Compressed splits of one tile and of two tiles (online softmax across tiles, block
    scores per tile, the last split partly past the visible tokens), and one or four
    selected blocks per program: small tiles make several per sequence."""
    from nsa.ops.decode import launch

    monkeypatch.setattr(launch, "BLOCK_C", 16)
    # both are chosen from the work per SM: force each choice
    monkeypatch.setattr(launch, "TILES_PER_SM", 0 if many else 10**6)
    monkeypatch.setattr(launch, "SPLIT_TILES", 2)
    monkeypatch.setattr(launch, "SEL_PER_SM", 0 if many else 10**6)
    cfg = NSAConfig(l=8, d=4, l_sel=16, n=6, w=20, n_heads=4, n_kv_heads=2, d_k=16, d_v=16)
    # 300 tokens -> 74 compressed -> 5 tiles of 16 (three splits of 2 tiles, one partial)
    assert run_steps(cfg, [300, 151, 64], steps=2, dtype=torch.float32, HQ=4) < 1e-5


@pytest.mark.parametrize("desc", [False, True])
def test_decode_kernels_never_read_rows_past_a_sequence(monkeypatch, desc):
    """NaN in every cache row a sequence may not read yet, with pointer loads and with
    tensor-descriptor loads (which fetch whole tiles and must zero such rows); ragged
    lengths, a window ring not yet full, multi-tile splits and 4 blocks per program."""
    from nsa.ops import descriptors
    from nsa.ops.decode import launch

    made = []
    monkeypatch.setattr(descriptors, "USE_DESC", desc)
    monkeypatch.setattr(launch, "kv_desc", lambda *a: made.append(1) or descriptors.kv_desc(*a))
    monkeypatch.setattr(launch, "BLOCK_C", 16)
    monkeypatch.setattr(launch, "TILES_PER_SM", 0)
    monkeypatch.setattr(launch, "SPLIT_TILES", 2)
    monkeypatch.setattr(launch, "SEL_PER_SM", 0)
    cfg = NSAConfig(l=8, d=4, l_sel=16, n=6, w=40, n_heads=6, n_kv_heads=2, d_k=16, d_v=32)
    assert run_steps(cfg, [150, 13, 64], steps=2, dtype=torch.float32, HQ=6,
                     poison=True) < 1e-5
    assert bool(made) == desc


def test_decode_reasons_name_what_the_kernels_cannot_take():
    """Configurations the decode kernels cannot run are refused with the reason, and
    backend="triton" raises it instead of computing something else."""
    from nsa.ops.decode.launch import decode_not_supported_reasons

    ok = NSAConfig(l=8, d=4, l_sel=16, n=3, w=20, n_heads=4, n_kv_heads=2, d_k=16, d_v=16)
    cache = NSACache(ok, 1, dtype=torch.float32)
    q = torch.randn(1, 4, 16)
    assert decode_not_supported_reasons(q, cache) == []
    assert any("float64" in r for r in decode_not_supported_reasons(q.double(), cache))
    # d = 1: a block of l' = 64 plus l = 32 spans more than two tiles of 64 tokens
    wide = NSAConfig(l=32, d=1, l_sel=64, n=3, w=20, n_heads=4, n_kv_heads=2, d_k=16, d_v=16)
    wcache = NSACache(wide, 1, dtype=torch.float32)
    reasons = decode_not_supported_reasons(q, wcache)
    assert any("l'=64" in r and "d=1" in r for r in reasons), reasons
    wcache.prefill(*(torch.randn(1, 70, 2, 16) for _ in range(6)))
    g = torch.rand(1, 4)
    with pytest.raises(ValueError, match="l'=64"):
        nsa_decode(q, wcache, g, g, g, backend="triton")


@pytest.mark.parametrize("version, forced, want", [
    ("3.6.0", None, True), ("3.5.1", None, True), ("3.5.0+git1a2b", None, True),
    ("3.4.0", None, False),  # its gdc_* calls do not compile inside a jit function
    ("3.4.0", True, True), ("3.6.0", False, False), (None, None, True),
])
def test_programmatic_dependent_launch_needs_a_triton_that_compiles_it(monkeypatch, version,
                                                                       forced, want):
    """The decode kernels' PDL launch options on an SM 9.0 device: on by default only with
    Triton >= 3.5; the PDL switch still forces either way; never on a CPU tensor."""
    import nsa.backends as backends
    from nsa.backends import DeviceInfo
    from nsa.ops.decode import launch

    h100 = DeviceInfo("cuda", 0, "NVIDIA H100 80GB HBM3", (9, 0), 132)
    monkeypatch.setattr(launch, "device_info", lambda device: h100)
    monkeypatch.setattr(backends, "module_version", lambda module: version)
    monkeypatch.setattr(launch, "PDL", forced)
    launch.pdl_supported.cache_clear()
    try:
        got = launch._chain(torch.device("cuda", 0))
        assert got == ({"PDL": True, "launch_pdl": True} if want else {})
        assert launch._chain(torch.device("cpu")) == {}
    finally:
        launch.pdl_supported.cache_clear()
