"""GPU checks of the Triton prefill forward (run on a CUDA machine:
``python -m pytest -m gpu tests/gpu``).

bf16 (and fp16, fp32) outputs of ``nsa_attention(backend="triton")`` against the float64
reference on the same rounded inputs, by ||out - ref|| / ||ref||: bf16/fp16 must stay
below 1e-2 (they land around 1e-3..5e-3), fp32 (3xTF32 dots) below 1e-4. Group sizes 1, 2,
4, 8, 16 at d_k = 128, head dims 64, 192 (d_v = 128) and 256, T not a multiple of any
block size. Outputs are compared with the reference's own block indices passed in
(selection under bf16 rounding may legitimately reorder near-ties); the kernel's own
selection must agree with the reference on nearly every slot, and top-n on given scores
must agree exactly.
"""

from __future__ import annotations

import os

import pytest
import torch

from nsa import NSAConfig, compress_mean, nsa_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="TRITON_INTERPRET=1 would run the kernels interpreted; run "
                              "`pytest -m gpu tests/gpu` in its own process"),
]

CFG = NSAConfig(l=32, d=16, l_sel=64, n=8, n_initial=1, n_local=2, w=256)


def inputs(T, H, G, dk, dv, dtype, seed=0, cfg=CFG):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, device="cuda") * scale).to(dtype)

    HQ = G * H
    k_raw = r(1, T, H, dk, scale=3.0)  # peaked compressed scores: selection has clear winners
    v_sel = r(1, T, H, dv)
    return dict(
        q=r(1, T, HQ, dk), k_sel=r(1, T, H, dk), v_sel=v_sel, k_win=r(1, T, H, dk),
        v_win=r(1, T, H, dv), k_cmp=compress_mean(k_raw, cfg.l, cfg.d),
        v_cmp=compress_mean(v_sel, cfg.l, cfg.d),
        **{f"g_{b}": torch.rand(1, T, HQ, generator=g, device="cuda").to(dtype)
           for b in ("cmp", "sel", "win")},
    )


def rel(a, b) -> float:
    assert not torch.isnan(a).any()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(T, H, G, dk, dv, dtype, tol):
    inp = inputs(T, H, G, dk, dv, dtype)
    ref, raux = nsa_attention(**{k: v.double() for k, v in inp.items()}, config=CFG,
                              backend="reference", return_aux=True)
    out, aux = nsa_attention(**inp, config=CFG, backend="triton",
                             block_indices=raux.block_indices, return_aux=True)
    errs = {"out": rel(out, ref)}
    for name in ("o_cmp", "o_sel", "o_win"):
        errs[name] = rel(getattr(aux, name), getattr(raux, name))
    print(f"T={T} H={H} G={G} d_k={dk} d_v={dv} {dtype}: " +
          " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    assert all(e < tol for e in errs.values()), errs
    # the kernels' own selection (bf16 scores) against the float64 one
    out2, aux2 = nsa_attention(**inp, config=CFG, backend="triton", return_aux=True)
    agree = (aux2.block_indices == raux.block_indices).float().mean().item()
    assert agree > 0.95, agree
    assert not torch.isnan(out2).any()
    return errs


@pytest.mark.parametrize("G", [1, 2, 4, 8, 16])
def test_bf16_group_sizes(G):
    check(T=1531, H=2, G=G, dk=128, dv=128, dtype=torch.bfloat16, tol=1e-2)


@pytest.mark.parametrize("dk,dv", [(64, 64), (192, 128), (256, 256)])
def test_bf16_head_dims(dk, dv):
    check(T=1100, H=2, G=4, dk=dk, dv=dv, dtype=torch.bfloat16, tol=1e-2)


def test_fp16_and_fp32():
    check(T=777, H=2, G=3, dk=128, dv=128, dtype=torch.float16, tol=1e-2)
    check(T=777, H=1, G=4, dk=64, dv=64, dtype=torch.float32, tol=1e-4)


def test_paper_shape_slice_bf16():
    """Paper heads and blocks (HQ=64, H=4, d=128, n=16, w=512) on a short sequence."""
    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    inp = inputs(2111, 4, 16, 128, 128, torch.bfloat16, seed=1, cfg=cfg)
    ref, raux = nsa_attention(**{k: v.double() for k, v in inp.items()}, config=cfg,
                              backend="reference", return_aux=True)
    out = nsa_attention(**inp, config=cfg, backend="triton", block_indices=raux.block_indices)
    assert rel(out, ref) < 1e-2


def test_topn_on_gpu_equals_reference_on_tied_scores():
    from nsa.ops.reference import select_blocks
    from nsa.ops.selection import select_topn

    cfg = NSAConfig(l=16, d=16, l_sel=16, n=16, n_initial=1, n_local=2, w=64)
    B, H, T = 2, 3, 3001
    nb = cfg.num_sel_blocks(T)
    g = torch.Generator(device="cuda").manual_seed(3)
    s = (torch.rand(B, H, T, nb, generator=g, device="cuda") * 4).floor() / 4
    t = torch.arange(T, device="cuda")[:, None]
    s = torch.where(torch.arange(nb, device="cuda")[None, :] * 16 <= t, s, torch.zeros_like(s))
    out = torch.full((B, T, H, cfg.n), -7, dtype=torch.int32, device="cuda")
    select_topn(s, T, (T - 16) // 16 + 1, cfg, out=out)
    pos = torch.arange(T, device="cuda").unsqueeze(0).expand(B, -1)
    want = select_blocks(s.double(), pos, cfg).permute(0, 2, 1, 3)
    assert torch.equal(out.long(), want)


@pytest.mark.parametrize("G,branches", [(1, "csw"), (16, "csw"), (4, "cw"), (16, "sw")])
def test_window_side_stream_matches_in_line(G, branches, monkeypatch):
    """The window branch on its side stream gives the in-line outputs bit for bit: eager
    (forced on, from a caller's own stream), training gradients, and a CUDA graph replay
    (on by default while capturing: the side stream forks from the capture and joins it).
    A missing join would combine unwritten window rows."""
    import nsa.ops.triton_backend as TB

    inp = inputs(3001, 2, G, 128, 128, torch.bfloat16, seed=5)
    for b, name in (("c", "g_cmp"), ("s", "g_sel"), ("w", "g_win")):
        if b not in branches:
            inp[name] = None
    leaves = {k: v for k, v in inp.items() if v is not None}
    dout = torch.randn(1, 3001, 2 * G, 128, device="cuda").to(torch.bfloat16)

    def run():
        out = nsa_attention(**inp, config=CFG, backend="triton")
        ls = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
        # deterministic: the default sums the selected key/value gradients with atomics
        o = nsa_attention(**{**inp, **ls}, config=CFG, backend="triton", deterministic=True)
        grads = torch.autograd.grad(o, list(ls.values()), dout, allow_unused=True)
        return [out, *(g_ for g_ in grads if g_ is not None)]

    monkeypatch.setattr(TB, "WINDOW_SIDE_STREAM", False)
    want = run()
    monkeypatch.setattr(TB, "WINDOW_SIDE_STREAM", True)
    user = torch.cuda.Stream()
    user.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(user):
        for _ in range(3):
            got = run()
            assert len(got) == len(want)
            for i, (w, g_) in enumerate(zip(want, got, strict=True)):
                assert torch.equal(w, g_), f"output {i} of {len(want)} differs"
    torch.cuda.current_stream().wait_stream(user)
    # the default: in line for eager calls, the side stream inside a capture (the calls
    # above on a side stream were the warm-up)
    monkeypatch.setattr(TB, "WINDOW_SIDE_STREAM", None)
    assert TB._side_stream(torch.device("cuda")) is None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        assert TB._side_stream(torch.device("cuda")) is not None
        static = nsa_attention(**inp, config=CFG, backend="triton")
    for _ in range(3):
        static.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static, want[0])


def test_prefill_graph_timing_and_its_failure_path():
    """nsa prefill's CUDA-graph timing: a real NSA call is timed; a function that
    synchronises with the host cannot be captured, which is reported, and CUDA keeps
    working afterwards."""
    from nsabench.runners.common import graph_bench

    dev = torch.device("cuda")
    inp = inputs(2048, 2, 4, 128, 128, torch.bfloat16, seed=2)
    t, why = graph_bench(lambda: nsa_attention(**inp, config=CFG, backend="triton"), dev,
                         warmup=1, repeats=3, budget_s=2.0)
    assert why is None and t.ms > 0
    x = torch.randn(64, device="cuda")
    t, why = graph_bench(lambda: x.sum().item(), dev, warmup=1, repeats=3, budget_s=2.0)
    assert t is None and why
    out = nsa_attention(**inp, config=CFG, backend="triton")
    assert torch.isfinite(out).all()


def test_kernels_write_every_output_element():
    """Direct launches into NaN-filled outputs at an awkward length."""
    from nsa.ops.compression import cmp_forward
    from nsa.ops.window import win_forward

    T, H, G, d = 1777, 2, 8, 128
    inp = inputs(T, H, G, d, d, torch.bfloat16, seed=2)
    nan = lambda: torch.full((1, T, G * H, d), float("nan"), device="cuda",  # noqa: E731
                             dtype=torch.bfloat16)
    for mode in ("fused", "two_pass"):
        o = nan()
        cmp_forward(inp["q"], inp["k_cmp"], inp["v_cmp"], CFG, d ** -0.5, o=o, mode=mode)
        assert not o.isnan().any(), mode
    o = nan()
    win_forward(inp["q"], inp["k_win"], inp["v_win"], CFG.w, d ** -0.5, o=o)
    assert not o.isnan().any()


def selected_case(B, T, H, G, D, seed):
    """(generator, q, k, v in bf16, canonical int32 indices [B, T, H, n] from random
    scores, float64 O_sel of the reference) for the selected-branch kernel tests."""
    from nsa.ops import reference as R

    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").to(torch.bfloat16)  # noqa: E731
    q, k, v = r(B, T, G * H, D), r(B, T, H, D), r(B, T, H, D)
    s = torch.rand(B, H, T, CFG.num_sel_blocks(T), generator=g, device="cuda",
                   dtype=torch.float64)
    pos = torch.arange(T, device="cuda").unsqueeze(0).expand(B, -1)
    idx = R.select_blocks(s, pos, CFG)
    want, _ = R.sel_attention(R._to_groups(q.double(), H), k.double(), v.double(), idx, pos,
                              CFG, D ** -0.5)
    return g, q, k, v, idx.permute(0, 2, 1, 3).to(torch.int32).contiguous(), \
        R._from_groups(want)


@pytest.mark.parametrize("G", [16, 4])
def test_selected_kernels_pointer_and_descriptor_loads_agree(G):
    """Both load paths of the selected forward and dQ kernels, batch 2 (the descriptors'
    batch coordinate) and T not a multiple of the block: each within the bf16 band of
    float64, and within 1e-4 of each other."""
    from nsa.ops.selection import sel_forward
    from nsa.ops.selection.bwd_launch import sel_backward

    B, T, HQ, D = 2, 1531, 2 * G, 128
    g, q, k, v, idx32, want = selected_case(B, T, 2, G, D, seed=3)
    outs, dqs = [], []
    dout = torch.randn(B, T, HQ, D, generator=g, device="cuda").to(torch.bfloat16)
    gate = torch.rand(B, T, HQ, generator=g, device="cuda").to(torch.bfloat16)
    for desc in (False, True):
        o = torch.full((B, T, HQ, D), float("nan"), device="cuda", dtype=torch.bfloat16)
        lse = torch.empty(B, HQ, T, device="cuda", dtype=torch.float32)
        # the group-centric kernels (the ones with descriptor loads; G = 4 defaults to
        # the block-centric path)
        sel_forward(q, k, v, idx32, CFG, D ** -0.5, o_branch=o, lse=lse, use_desc=desc,
                    mode="group")
        assert rel(o, want) < 1e-2
        outs.append(o)
        delta = (gate.float() * (dout.float() * o.float()).sum(-1)).contiguous()
        dq = torch.zeros(B, T, HQ, D, device="cuda", dtype=torch.float32)
        sel_backward(q, k, v, idx32, dout, gate, lse, delta, dq, CFG, D ** -0.5,
                     dq_only=True, use_desc=desc, mode="group")
        assert torch.isfinite(dq).all()
        dqs.append(dq)
    assert rel(outs[1], outs[0]) < 1e-4
    assert rel(dqs[1], dqs[0]) < 1e-4


@pytest.mark.parametrize("G", [1, 4, 8])
def test_selected_forward_group_and_block_paths_agree(G):
    """The group-centric and block-centric selected forward (the default for G <= 8 on the
    GPU), batch 2 and T not a multiple of the block: each within the bf16 band of float64,
    their log-sum-exps within 1e-3 of each other; partial buffers start as NaN."""
    import nsa.ops.selection.launch as SL
    from nsa.ops.selection import sel_forward

    B, T, H, D = 2, 1531, 2, 128
    HQ = G * H
    _, q, k, v, idx32, want = selected_case(B, T, H, G, D, seed=5)
    assert SL.sel_forward_mode(q, D, H, CFG.n) == "block"
    lses = []
    SL.PARTIAL_FILL = float("nan")
    try:
        for mode in ("group", "block"):
            o = torch.full((B, T, HQ, D), float("nan"), device="cuda", dtype=torch.bfloat16)
            lse = torch.full((B, HQ, T), float("nan"), device="cuda", dtype=torch.float32)
            sel_forward(q, k, v, idx32, CFG, D ** -0.5, o_branch=o, lse=lse, mode=mode)
            assert rel(o, want) < 1e-2, mode
            lses.append(lse)
    finally:
        SL.PARTIAL_FILL = None
    assert torch.isfinite(lses[1]).all()
    assert (lses[1] - lses[0]).abs().max().item() < 1e-3


@pytest.mark.parametrize("G", [16, 4])
def test_compressed_window_and_flash_dq_pointer_and_descriptor_loads_agree(G):
    """The compressed (with block scores) and window forward kernels and the flash dQ
    kernel, each with pointer and with descriptor loads, batch 2 and T not a multiple of
    any tile: outputs within 1e-4 of each other, the forward outputs also within the bf16
    band of float64 (explicit masks in the reference)."""
    from nsa.ops import reference as R
    from nsa.ops.compression import cmp_forward
    from nsa.ops.flashbwd import MASK_WIN, flash_backward
    from nsa.ops.window import win_forward

    B, T, H, D = 2, 1531, 2, 128
    HQ = G * H
    g = torch.Generator(device="cuda").manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").to(torch.bfloat16)  # noqa: E731
    q, k, v = r(B, T, HQ, D), r(B, T, H, D), r(B, T, H, D)
    kc, vc = compress_mean(k, CFG.l, CFG.d), compress_mean(v, CFG.l, CFG.d)
    pos = torch.arange(T, device="cuda").unsqueeze(0).expand(B, -1)
    want_w, _ = R.win_attention(R._to_groups(q.double(), H), k.double(), v.double(), pos, pos,
                                CFG, D ** -0.5)
    want_w = R._from_groups(want_w)
    dout = r(B, T, HQ, D)
    gate = torch.rand(B, T, HQ, generator=g, device="cuda").to(torch.bfloat16)
    res = []
    for desc in (False, True):
        oc, _ = cmp_forward(q, kc, vc, CFG, D ** -0.5, use_desc=desc)
        lse = torch.empty(B, HQ, T, device="cuda", dtype=torch.float32)
        ow = win_forward(q, k, v, CFG.w, D ** -0.5, lse=lse, use_desc=desc)
        assert rel(ow, want_w) < 1e-2
        delta = (gate.float() * (dout.float() * ow.float()).sum(-1)).contiguous()
        dq = torch.zeros(B, T, HQ, D, device="cuda", dtype=torch.float32)
        flash_backward(q, k, v, dout, gate, lse, delta, dq, D ** -0.5, mask=MASK_WIN,
                       w=CFG.w, use_desc=desc, parts="dq")
        assert torch.isfinite(dq).all()
        res.append((oc, ow, dq))
    for a, b in zip(*res, strict=True):
        assert rel(b, a) < 1e-4


@pytest.mark.parametrize("T,by_position", [(16384, False), (32768, True), (3000, False)])
def test_entries_by_block_counting_sort_equals_torch_sort_on_gpu(T, by_position,
                                                                 monkeypatch):
    """The block index's counting sort (tiles ranked by tl.sort on the GPU) against
    torch.sort, on top-n indices of real block scores at the benchmark's sizes."""
    import nsa.ops.selection.launch as SL
    from nsa.ops.compression import cmp_forward
    from nsa.ops.selection import select_topn

    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    inp = inputs(T, 2, 1, 64, 64, torch.bfloat16, cfg=cfg)
    _, scores = cmp_forward(inp["q"], inp["k_cmp"], inp["v_cmp"], cfg, 64 ** -0.5)
    idx = select_topn(scores, T, inp["k_cmp"].shape[1], cfg)
    nb = cfg.num_sel_blocks(T)
    keys, off = SL.entries_by_block(idx, nb, by_position=by_position)
    monkeypatch.setattr(SL, "COUNT_INDEX_MAX_BYTES", 0)
    want_keys, want_off = SL.entries_by_block(idx, nb, by_position=by_position)
    assert torch.equal(off, want_off)
    assert torch.equal(keys, want_keys)
