"""GPU checks of the Triton prefill backward (run on a CUDA machine:
``python -m pytest -m gpu tests/gpu``).

Gradients of every input (q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp, g_cmp, g_sel, g_win)
of loss = sum(out * dout), dout fixed and random, from ``nsa_attention(backend="triton")``
against the reference's autograd in float64 on the same rounded inputs, by
||g - g_ref|| / ||g_ref||. Thresholds: bf16 below 2e-2 (the forward suite uses 1e-2 for
outputs; gradients sum more rounded terms), fp32 below 1e-3 (the dots run as 3xTF32 on
the GPU; the CPU suite holds fp32 to 1e-4). The reference's own block indices are passed
to both runs (bf16 scores may legitimately reorder near-ties); one test lets the kernels
select and compares against the reference run on the kernels' indices. Paper blocks
NSAConfig(l=32, d=16, l_sel=64, n=8, n_initial=1, n_local=2, w=256), T not a multiple of
any block size, group sizes 1, 2, 4, 8, 16 at d_k = d_v = 128, head dims (192, 128) and
(64, 64). No NaN/inf anywhere.

Also: ``deterministic=True`` gives bitwise-equal gradients across two runs (T=4096, G=16,
H=4, d=128, bf16); ``torch.compile`` of a small TinyLM on the triton backend (and with
fullgraph=True), in float32 so that only the compilation can make a difference (bf16
rounding of differently fused projections would swamp it), gives the eager loss and
gradients within 1e-3, and so does mode="reduce-overhead" (inductor's CUDA graphs, no
skip), whose replays of the functional op equal the eager output bit for bit; at the
paper shape
T=16384 (HQ=64, H=4, d=128, n=16, w=512, bf16) forward + backward has finite gradients
and a peak memory below inputs + gradients + what the op holds by design (the output,
three saved branch outputs, a float32 dQ: 6 q-sized bf16 tensors) + 0.25 x one float32
[T, T/16] score matrix per query head (the intermediate that must never exist).
"""

from __future__ import annotations

import copy
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
PAPER = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
ARGS = ("q", "k_sel", "v_sel", "k_win", "v_win", "k_cmp", "v_cmp", "g_cmp", "g_sel", "g_win")
TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-3}


def inputs(T, H, G, dk, dv, dtype, seed=0, cfg=CFG, B=1):
    """(nsa_attention inputs, dout), random normal on cuda, rounded to ``dtype``."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, device="cuda") * scale).to(dtype)

    HQ = G * H
    k_raw = r(B, T, H, dk, scale=3.0)  # peaked compressed scores: selection has clear winners
    v_sel = r(B, T, H, dv)
    inp = dict(
        q=r(B, T, HQ, dk), k_sel=r(B, T, H, dk), v_sel=v_sel, k_win=r(B, T, H, dk),
        v_win=r(B, T, H, dv), k_cmp=compress_mean(k_raw, cfg.l, cfg.d),
        v_cmp=compress_mean(v_sel, cfg.l, cfg.d),
        **{f"g_{b}": (0.01 + 0.98 * torch.rand(B, T, HQ, generator=g, device="cuda")).to(dtype)
           for b in ("cmp", "sel", "win")},
    )
    return inp, r(B, T, HQ, dv)


def rel(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all(), "NaN/inf in a tensor under test"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fwd_bwd(inp, cfg, dout, backend, **kw):
    """(out, aux or None, {name: grad}) of loss = sum(out * dout) on fresh leaves."""
    x = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
    res = nsa_attention(**x, config=cfg, backend=backend, **kw)
    out, aux = res if kw.get("return_aux") else (res, None)
    ct = torch.float64 if out.dtype == torch.float64 else torch.float32
    (out.to(ct) * dout.to(ct)).sum().backward()
    return out.detach(), aux, {k: v.grad for k, v in x.items()}


def reference(inp, cfg, dout, **kw):
    return fwd_bwd({k: v.double() for k, v in inp.items()}, cfg, dout.double(), "reference",
                   return_aux=True, **kw)


def compare(got, want, dtype, tol, label) -> dict:
    errs = {}
    for name in ARGS:
        assert got[name] is not None, f"{name}: no gradient"
        assert got[name].dtype == dtype, (name, got[name].dtype)
        errs[name] = rel(got[name], want[name])
    print(f"{label}: " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    bad = {k: f"{e:.2e}" for k, e in errs.items() if not e < tol}
    assert not bad, f"{label}: gradient errors above {tol}: {bad}"
    return errs


def check(T, H, G, dk, dv, dtype, cfg=CFG, seed=0):
    tol = TOL[dtype]
    inp, dout = inputs(T, H, G, dk, dv, dtype, seed=seed, cfg=cfg)
    ref, raux, want = reference(inp, cfg, dout)
    out, _, got = fwd_bwd(inp, cfg, dout, "triton", block_indices=raux.block_indices)
    assert out.dtype == dtype
    e_out = rel(out, ref)
    assert e_out < tol, e_out
    label = f"T={T} H={H} G={G} d_k={dk} d_v={dv} {dtype}"
    compare(got, want, dtype, tol, label)
    del want, ref
    torch.cuda.empty_cache()


@pytest.mark.parametrize("G", [1, 2, 4, 8, 16])
def test_bf16_grads_group_sizes(G):
    check(T=2000, H=2, G=G, dk=128, dv=128, dtype=torch.bfloat16)


@pytest.mark.parametrize("dk,dv", [(192, 128), (64, 64)])
def test_bf16_grads_head_dims(dk, dv):
    check(T=2000, H=2, G=4, dk=dk, dv=dv, dtype=torch.bfloat16)


def test_fp32_and_fp16_grads():
    check(T=777, H=1, G=4, dk=64, dv=64, dtype=torch.float32)
    check(T=777, H=2, G=3, dk=128, dv=128, dtype=torch.float16)


def test_bf16_grads_with_the_kernels_own_selection():
    """No block_indices: the kernels select (bf16 scores); the float64 reference is run on
    the indices the kernels chose, so the gradients must agree whatever near-ties did."""
    T, H, G, d = 2000, 2, 16, 128
    inp, dout = inputs(T, H, G, d, d, torch.bfloat16, seed=4)
    out, aux, got = fwd_bwd(inp, CFG, dout, "triton", return_aux=True)
    ref, raux, want = reference(inp, CFG, dout, block_indices=aux.block_indices)
    assert torch.equal(raux.block_indices, aux.block_indices)
    assert rel(out, ref) < TOL[torch.bfloat16]
    compare(got, want, torch.bfloat16, TOL[torch.bfloat16], "own selection")
    # and the kernels' selection agrees with the float64 one on nearly every slot
    _, faux = nsa_attention(**{k: v.double() for k, v in inp.items()}, config=CFG,
                            backend="reference", return_aux=True)
    agree = (faux.block_indices == aux.block_indices).float().mean().item()
    assert agree > 0.95, agree


@pytest.mark.parametrize("gates", [("cmp", "win"), ("win",), ("cmp",)])
def test_bf16_grads_without_the_selected_branch(gates):
    """No selected branch: no float32 dQ buffer; the flash dQ kernel stores dQ in q's dtype
    (both flash branches in one kernel, or one alone). Branches that are off get no
    gradient on their gate, keys or values."""
    T, H, G, d = 2000, 2, 16, 128
    inp, dout = inputs(T, H, G, d, d, torch.bfloat16, seed=6)
    for b in ("cmp", "sel", "win"):
        if b not in gates:
            inp[f"g_{b}"] = None
    kv = {"cmp": ("k_cmp", "v_cmp"), "sel": ("k_sel", "v_sel"), "win": ("k_win", "v_win")}
    leaves = {k: v for k, v in inp.items() if v is not None}
    x64 = {k: v.double().requires_grad_(True) for k, v in leaves.items()}
    ref = nsa_attention(**inp | x64, config=CFG, backend="reference")
    (ref * dout.double()).sum().backward()
    x = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    out = nsa_attention(**inp | x, config=CFG, backend="triton")
    (out.float() * dout.float()).sum().backward()
    assert rel(out, ref) < TOL[torch.bfloat16]
    for name in leaves:
        off = any(name in kv[b] or name == f"g_{b}" for b in ("cmp", "sel", "win")
                  if b not in gates)
        if off:
            g = x[name].grad
            assert g is None or (g == 0).all(), name
            continue
        assert x[name].grad is not None and x[name].grad.dtype == torch.bfloat16, name
        err = rel(x[name].grad, x64[name].grad)
        assert err < TOL[torch.bfloat16], (gates, name, err)


# ----------------------------------------------------------------------------- determinism


def test_deterministic_grads_are_bitwise_equal():
    T, H, G, d = 4096, 4, 16, 128
    inp, dout = inputs(T, H, G, d, d, torch.bfloat16, seed=5, cfg=PAPER)
    runs = [fwd_bwd(inp, PAPER, dout, "triton", deterministic=True) for _ in range(2)]
    (o1, _, g1), (o2, _, g2) = runs
    assert torch.equal(o1, o2)
    for name in ARGS:
        assert torch.isfinite(g1[name]).all(), name
        assert torch.equal(g1[name], g2[name]), f"{name}: deterministic gradients differ"
    # the default (atomic) mode computes the same gradients up to summation order
    _, _, g0 = fwd_bwd(inp, PAPER, dout, "triton")
    for name in ARGS:
        assert rel(g0[name], g1[name]) < TOL[torch.bfloat16], name
    same = [name for name in ARGS if torch.equal(g0[name], g1[name])]
    print(f"default mode bitwise equal to deterministic for: {same}")


# ----------------------------------------------------------------------------- compile


def tiny_lm():
    from nsa.model import TinyLM

    cfg = NSAConfig(l=32, d=16, l_sel=64, n=8, n_initial=1, n_local=2, w=256, hidden_size=256,
                    n_heads=8, n_kv_heads=2, d_k=64, d_v=64)
    torch.manual_seed(0)
    model = TinyLM(cfg, n_layers=2, backend="triton")
    for blk in model.blocks:  # the gate's last layer starts at zero: give it a gradient path
        torch.nn.init.normal_(blk.attn.gate[-1].weight, std=0.1)
    return model.cuda()  # float32: compiled vs eager differ by compilation only


def loss_and_grads(model, tokens):
    """Next-token loss through ``model(...)`` (TinyLM.loss would bypass the compiled
    wrapper) and the gradients by parameter name (without the compile wrapper's prefix)."""
    model.zero_grad(set_to_none=True)
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             tokens[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad
                           for n, p in model.named_parameters()}


def check_compiled(fullgraph: bool, mode: str | None = None):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = tiny_lm()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=fullgraph, mode=mode)
    g = torch.Generator(device="cuda").manual_seed(6)
    # T - 1 = 500 <= n * l' = 512: every causal block is selected, so rounding differences
    # between the compiled and eager projections cannot change the selection
    tokens = torch.randint(0, 256, (2, 501), generator=g, device="cuda")
    l_e, g_e = loss_and_grads(eager, tokens)
    for _ in range(3):  # later calls run the cached compiled graph (and replay CUDA graphs)
        torch.compiler.cudagraph_mark_step_begin()
        l_c, g_c = loss_and_grads(compiled, tokens)
    if mode == "reduce-overhead":
        # the forward and the backward ran as CUDA graphs: nothing made inductor skip them
        assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert torch.isfinite(l_c)
    assert abs(l_c.item() - l_e.item()) / abs(l_e.item()) < 1e-3, (l_c.item(), l_e.item())
    assert g_c.keys() == g_e.keys()
    errs = {}
    for name, ge in g_e.items():
        gc = g_c[name]
        assert ge is not None and gc is not None, f"{name}: no gradient"
        assert torch.isfinite(gc).all(), f"{name}: NaN/inf in the compiled gradient"
        if name.endswith("phi_k.fc2.bias"):
            # shifts every compressed key of a row by the same q.b: softmax-invariant, so its
            # true gradient is 0 and both hold rounding noise only
            scale = g_e[name.replace(".bias", ".weight")].float().norm()
            assert gc.float().norm() < 1e-2 * scale and ge.float().norm() < 1e-2 * scale, name
            continue
        if ge.float().norm() == 0:
            assert gc.float().norm() == 0, name
            continue
        errs[name] = rel(gc, ge)
    print(f"fullgraph={fullgraph} mode={mode}: loss eager {l_e.item():.4f} compiled "
          f"{l_c.item():.4f}, max grad rel err {max(errs.values()):.2e}")
    bad = {k: f"{e:.2e}" for k, e in errs.items() if not e < 1e-3}
    assert not bad, bad


def test_torch_compile_matches_eager():
    check_compiled(fullgraph=False)


def test_torch_compile_fullgraph_matches_eager():
    check_compiled(fullgraph=True)


def test_torch_compile_reduce_overhead_trains_as_eager():
    """mode="reduce-overhead": inductor's CUDA graphs around the op, forward and backward
    (the window branch on its side stream inside the capture), the eager loss and grads."""
    check_compiled(fullgraph=True, mode="reduce-overhead")


@pytest.mark.parametrize("G", [1, 16])
def test_reduce_overhead_forward_replays_the_eager_output(G):
    """The functional op under torch.compile(mode="reduce-overhead"), no autograd: CUDA
    graphs recorded and replayed (no skip), each replay bit for bit the eager output of the
    inputs of that call (new values in the same shapes: the replay reads them)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    T, H, d = 4096, 4, 128

    def fn(**inp):
        return nsa_attention(**inp, config=PAPER, backend="triton")

    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for seed in (1, 1, 1, 2, 3):
            inp, _ = inputs(T, H, G, d, d, torch.bfloat16, seed=seed, cfg=PAPER)
            want = fn(**inp)
            got = compiled(**inp).clone()  # the graph's buffer: the next replay overwrites it
            assert torch.isfinite(got).all()
            assert torch.equal(got, want), (seed, rel(got, want))
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


# ----------------------------------------------------------------------------- long


def test_paper_shape_16k_finite_grads_and_bounded_memory():
    T, H, G, d, B = 16384, 4, 16, 128, 1
    HQ = G * H
    torch.cuda.synchronize()
    pre = torch.cuda.memory_allocated()  # whatever earlier tests left alive
    inp, dout = inputs(T, H, G, d, d, torch.bfloat16, seed=7, cfg=PAPER, B=B)
    x = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = nsa_attention(**x, config=PAPER, backend="triton")
    out.backward(dout)  # no float32 copies of out or dout: the peak is the op's own
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - pre
    assert torch.isfinite(out).all()
    for name in ARGS:
        assert x[name].grad is not None, name
        assert torch.isfinite(x[name].grad).all(), f"{name}: NaN/inf in the gradient"
    grad_bytes = sum(v.numel() * v.element_size() for v in x.values())
    qsize = x["q"].numel() * x["q"].element_size()  # one [B, T, HQ, d] bf16 tensor
    # what the op legitimately holds: the output and the three branch outputs the forward
    # saves (4 x qsize), the float32 dQ accumulator (2 x qsize); anything close to one
    # float32 [T, T/16] score matrix per query head on top of that is what must not exist
    dense = B * HQ * T * (T // 16) * 4
    held = base - pre  # everything alive before the call (inputs, dout, their copies)
    bound = held + grad_bytes + 6 * qsize + 0.25 * dense
    gib = 2.0 ** 30
    print(f"T={T} HQ={HQ} H={H}: peak {peak / gib:.2f} GiB (inputs {(base - pre) / gib:.2f} "
          f"GiB before the call; bound {bound / gib:.2f} GiB = held {held / gib:.2f} + "
          f"grads {grad_bytes / gib:.2f} + 6 x {qsize / gib:.2f} + 0.25 x {dense / gib:.2f})")
    assert peak < bound, (peak, bound)


@pytest.mark.parametrize("G,desc", [(16, True), (4, False), (1, True)])
def test_flash_dq_of_both_flash_branches_in_one_kernel(G, desc):
    """The compressed and window dQ in one kernel (``flash_dq`` with both branches, bf16,
    batch 2, T not a multiple of any tile, the forwards' own log-sum-exps) equals the two
    branches launched apart, within float32 summation order; the final bf16 dQ it stores
    with ``out`` equals the float32 sum rounded."""
    import nsa.ops.flashbwd.launch as FL
    from nsa.ops.compression import cmp_forward
    from nsa.ops.flashbwd import MASK_CMP, MASK_WIN, FlashBranch, flash_dq
    from nsa.ops.window import win_forward

    B, T, H, D = 2, 1531, 2, 128
    HQ = G * H
    g = torch.Generator(device="cuda").manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").to(torch.bfloat16)  # noqa: E731
    q, k, v, dout = r(B, T, HQ, D), r(B, T, H, D), r(B, T, H, D), r(B, T, HQ, D)
    kc, vc = compress_mean(r(B, T, H, D), CFG.l, CFG.d), compress_mean(r(B, T, H, D), CFG.l,
                                                                       CFG.d)
    lse_c = torch.empty(B, HQ, T, device="cuda", dtype=torch.float32)
    lse_w = torch.empty_like(lse_c)
    oc, _ = cmp_forward(q, kc, vc, CFG, D ** -0.5, want_scores=False, lse=lse_c)
    ow = win_forward(q, k, v, CFG.w, D ** -0.5, lse=lse_w)
    branches = []
    for kk, vv, o, lse, mask in ((kc, vc, oc, lse_c, MASK_CMP), (k, v, ow, lse_w, MASK_WIN)):
        gate = torch.rand(B, T, HQ, generator=g, device="cuda")
        delta = (gate * (dout.float() * o.float()).sum(-1)).contiguous()
        branches.append(FlashBranch(kk, vv, gate, lse, delta, mask, w=CFG.w, cmp_l=CFG.l,
                                    cmp_d=CFG.d))
    runs = []
    for pair in (True, False):
        FL.PAIR_DQ = pair
        try:
            dq = torch.full((B, T, HQ, D), float("nan"), device="cuda")
            flash_dq(q, dout, dq, D ** -0.5, branches, accumulate_dq=False, use_desc=desc)
        finally:
            FL.PAIR_DQ = True
        assert torch.isfinite(dq).all()
        runs.append(dq)
    assert ((runs[0] - runs[1]).norm() / runs[1].norm()).item() < 1e-5
    base = torch.randn(B, T, HQ, D, generator=g, device="cuda")
    buf, out = base.clone(), torch.full_like(q, float("nan"))
    flash_dq(q, dout, buf, D ** -0.5, branches, accumulate_dq=True, out=out, use_desc=desc)
    assert torch.equal(buf, base)
    want = base + runs[0]
    assert ((out.float() - want).norm() / want.norm()).item() < 4e-3  # bf16 rounding
