"""Gradients of ``nsa_attention(backend="triton")`` (TRITON_INTERPRET=1 on CPU) against
the reference's autograd in float64.

What is checked, for loss = sum(out * dout) with a fixed random dout (never zeros/ones):

* the gradient of every input (q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp, g_cmp, g_sel,
  g_win) against the reference's, computed in float64 from the same rounded values, by
  ||g - g_ref|| / ||g_ref||: fp32 below 1e-4 (the kernels compute in fp32), fp16 below
  1e-2. Group sizes 1, 3, 4, 16 with H = 1 or 2, batch 1 and 2, T not a multiple of any
  block size (and T < l: no compressed token at all), the paper's blocks l=32, d=16,
  l'=64 with small n and w, and l = l' = d = 16; d_k 16 and 32, d_v < d_k.
* selection: the reference's own block indices (float64) are passed to both runs, so
  near-ties cannot make the runs attend to different blocks. One test lets the kernels
  select on inputs with peaked scores (raw keys x3 before phi = mean) and requires
  their indices to equal the reference's before comparing gradients.
* each gate None in turn (that branch's k/v get no gradient, or an all-zero one, as in
  the reference, where they take no part); g_sel alone with given indices and no
  k_cmp/v_cmp; given indices with duplicates, -1 and blocks in the future.
* compressed tokens no query may see (N larger than T makes) get exactly zero gradient.
* no NaN/inf in outputs or gradients, and every input that takes part has a ``.grad``.
* ``deterministic=True``: two backward passes give bitwise-equal gradients, equal within
  1e-4 to the default (atomic) mode.
* the module: ``NSAAttention(cfg, backend="triton")`` against the same weights on the
  reference backend, every parameter gradient within 1e-4.
* every test starts the shared float32 dQ buffer as NaN (it is not zeroed: the first
  branch's dQ kernel writes it, the others add).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nsa import NSAConfig, compress_mean, nsa_attention  # noqa: E402
from nsa.module import NSAAttention  # noqa: E402
from tests.conftest import build_inputs, num_compressed  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="CPU kernel tests need TRITON_INTERPRET=1"),
    pytest.mark.usefixtures("single_thread"),
]

TOL = {torch.float32: 1e-4, torch.float16: 1e-2}
PAPER = dict(l=32, d=16, l_sel=64)  # the paper's block sizes (with small n, w below)
EQUAL = dict(l=16, d=16, l_sel=16)  # l = l' = d
ARGS = ("q", "k_sel", "v_sel", "k_win", "v_win", "k_cmp", "v_cmp", "g_cmp", "g_sel", "g_win")
BRANCH_KV = {"cmp": ("k_cmp", "v_cmp"), "sel": ("k_sel", "v_sel"), "win": ("k_win", "v_win")}


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "NaN/inf in a tensor under test"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def cast(inp: dict, dtype: torch.dtype) -> dict:
    return {k: None if x is None else x.detach().to(dtype) for k, x in inp.items()}


def forward_backward(inp: dict, cfg: NSAConfig, dout: torch.Tensor, backend: str, **kw):
    """(out, aux or None, {name: grad or None}) of loss = sum(out * dout) on fresh leaves."""
    x = {k: None if v is None else v.detach().clone().requires_grad_(True)
         for k, v in inp.items()}
    res = nsa_attention(**x, config=cfg, backend=backend, **kw)
    out, aux = res if kw.get("return_aux") else (res, None)
    assert out.requires_grad, "output is not attached to the autograd graph"
    ct = torch.float64 if out.dtype == torch.float64 else torch.float32
    (out.to(ct) * dout.to(ct)).sum().backward()
    return out.detach(), aux, {k: None if v is None else v.grad for k, v in x.items()}


def reference(inp: dict, cfg: NSAConfig, dout: torch.Tensor, **kw):
    """The float64 reference on the same (rounded) values, with its aux (block indices)."""
    return forward_backward(cast(inp, torch.float64), cfg, dout.double(), "reference",
                            return_aux=True, **kw)


def check_grads(got: dict, want: dict, dtype: torch.dtype, tol: float) -> dict:
    """Every gradient within ``tol``; inputs the reference gives no (or a zero) gradient
    must get None or exact zeros. Returns the relative errors."""
    errs = {}
    for name in ARGS:
        g, w = got[name], want[name]
        if w is None or not w.any():
            assert g is None or (g == 0).all(), f"{name}: gradient where the reference has none"
            continue
        assert g is not None, f"{name}: no gradient (.grad is None)"
        assert g.dtype == dtype, (name, g.dtype)
        errs[name] = rel(g, w)
    bad = {k: f"{e:.2e}" for k, e in errs.items() if not e < tol}
    assert not bad, f"relative gradient errors above {tol}: {bad}"
    return errs


@pytest.fixture(autouse=True)
def _poisoned_dq(monkeypatch):
    import nsa.ops.triton_autograd as TA

    monkeypatch.setattr(TA, "DQ_FILL", float("nan"))


def make(rng, cfg, B, T, H, G, dk, dv, dtype, gates=("cmp", "sel", "win"), extra_cmp=2,
         peaked=False):
    """(inputs in dtype, dout in dtype). ``peaked``: compressed keys/values are phi = mean
    of raw keys scaled x3 / of v_sel, so selection scores have clear winners."""
    inp = build_inputs(rng, cfg, B, T, G * H, H, dk, dv, dtype=torch.float64, gates=gates,
                       extra_cmp=extra_cmp)
    if peaked:
        k = torch.randn(B, T, H, dk, generator=rng, dtype=torch.float64) * 3.0
        inp["k_cmp"] = compress_mean(k, cfg.l, cfg.d)
        inp["v_cmp"] = compress_mean(inp["v_sel"], cfg.l, cfg.d)
    dout = torch.randn(B, T, G * H, dv, generator=rng, dtype=torch.float64)
    return cast(inp, dtype), dout.to(dtype)


def assert_unseen_cmp_grads_zero(grads: dict, cfg: NSAConfig, T: int) -> None:
    """Compressed tokens past the last one T raw tokens make are invisible to every query."""
    N = num_compressed(T, cfg.l, cfg.d)
    for name in ("k_cmp", "v_cmp"):
        g = grads[name]
        if g is not None:
            assert g.shape[1] > N
            assert (g[:, N:] == 0).all(), f"{name}: gradient on compressed tokens no query sees"


# ----------------------------------------------------------------------------- every input


# blocks, (n, n_initial, n_local, w), B, T, H, G, d_k, d_v
CASES = [
    (PAPER, (3, 1, 1, 40), 1, 150, 2, 1, 32, 16),  # G = 1, H = 2, d_v < d_k
    (PAPER, (3, 1, 1, 40), 2, 83, 1, 3, 16, 16),  # batch 2, -1 slots (n > blocks)
    (PAPER, (2, 1, 0, 40), 1, 150, 1, 4, 32, 32),  # a free slot: not always own block
    (PAPER, (3, 1, 1, 40), 1, 83, 1, 16, 16, 16),  # G = 16
    (EQUAL, (4, 1, 2, 32), 1, 83, 2, 3, 32, 16),  # l = l' = d, H = 2, d_v < d_k
]


@pytest.mark.parametrize("blocks,sel,B,T,H,G,dk,dv", CASES)
def test_grads_of_every_input_fp32(blocks, sel, B, T, H, G, dk, dv, rng):
    n, ni, nl, w = sel
    cfg = NSAConfig(n=n, n_initial=ni, n_local=nl, w=w, **blocks)
    inp, dout = make(rng, cfg, B, T, H, G, dk, dv, torch.float32)
    ref, raux, want = reference(inp, cfg, dout)
    out, _, got = forward_backward(inp, cfg, dout, "triton", block_indices=raux.block_indices)
    assert out.dtype == torch.float32
    assert rel(out, ref) < TOL[torch.float32]
    check_grads(got, want, torch.float32, TOL[torch.float32])
    assert_unseen_cmp_grads_zero(got, cfg, T)


@pytest.mark.parametrize("case,dq_atomic,det", [(0, True, False), (1, False, False),
                                                (3, True, True), (4, True, False)])
def test_grads_of_the_block_centric_selected_path(case, dq_atomic, det, rng, monkeypatch):
    """Mode "block" (the GPU default for G <= 8) in both directions: the forward's output
    and log-sum-exps come from its merge, the selected dQ from the key-centric dK/dV
    kernel (float32 atomics, or per-slot partials summed in order: ``dq_atomic=False``
    and deterministic mode). Partial buffers start as NaN."""
    import nsa.ops.selection.bwd_launch as SB
    import nsa.ops.selection.launch as SL

    monkeypatch.setattr(SL, "SEL_MODE", "block")
    monkeypatch.setattr(SL, "PARTIAL_FILL", float("nan"))
    monkeypatch.setattr(SB, "DQ_ATOMIC", dq_atomic)
    calls = []
    monkeypatch.setattr(SB, "_sel_bwd_dq_kernel", calls)  # the group dQ must not run
    blocks, (n, ni, nl, w), B, T, H, G, dk, dv = CASES[case]
    cfg = NSAConfig(n=n, n_initial=ni, n_local=nl, w=w, **blocks)
    inp, dout = make(rng, cfg, B, T, H, G, dk, dv, torch.float32)
    ref, raux, want = reference(inp, cfg, dout)
    out, _, got = forward_backward(inp, cfg, dout, "triton", block_indices=raux.block_indices,
                                   deterministic=det)
    assert rel(out, ref) < TOL[torch.float32]
    check_grads(got, want, torch.float32, TOL[torch.float32])


@pytest.mark.parametrize("mode", ["block", "group"])
def test_grads_with_64_bit_sort_keys(mode, rng, monkeypatch):
    """The inverted indices' keys turn int64 where (blocks + 1) * T * n passes 2^31
    (T ~ 370k at l' = 64): with the bound lowered, both selected paths run on int64 keys
    and must give the same gradients."""
    import nsa.ops.selection.bwd_launch as SB
    import nsa.ops.selection.launch as SL

    monkeypatch.setattr(SL, "SEL_MODE", mode)
    monkeypatch.setattr(SL, "KEY32_LIMIT", 64)
    keys, inv = [], []
    real, real_inv = SL.entries_by_block, SB.inverted_index
    monkeypatch.setattr(SL, "entries_by_block",
                        lambda *a, **k: keys.append(real(*a, **k)) or keys[-1])
    monkeypatch.setattr(SB, "inverted_index",
                        lambda *a, **k: inv.append(real_inv(*a, **k)) or inv[-1])
    blocks, (n, ni, nl, w), B, T, H, G, dk, dv = CASES[1]
    cfg = NSAConfig(n=n, n_initial=ni, n_local=nl, w=w, **blocks)
    inp, dout = make(rng, cfg, B, T, H, G, dk, dv, torch.float32)
    ref, raux, want = reference(inp, cfg, dout)
    out, _, got = forward_backward(inp, cfg, dout, "triton", block_indices=raux.block_indices)
    if mode == "block":
        assert keys and keys[0][0].dtype == torch.int64
    assert inv and inv[0][0].dtype == torch.int64
    assert rel(out, ref) < TOL[torch.float32]
    check_grads(got, want, torch.float32, TOL[torch.float32])


@pytest.mark.parametrize("blocks,sel,B,T,H,G,dk,dv", [
    (PAPER, (3, 1, 1, 64), 1, 130, 1, 4, 32, 16),
])
def test_grads_of_every_input_fp16(blocks, sel, B, T, H, G, dk, dv, rng):
    n, ni, nl, w = sel
    cfg = NSAConfig(n=n, n_initial=ni, n_local=nl, w=w, **blocks)
    inp, dout = make(rng, cfg, B, T, H, G, dk, dv, torch.float16)
    ref, raux, want = reference(inp, cfg, dout)
    out, _, got = forward_backward(inp, cfg, dout, "triton", block_indices=raux.block_indices)
    assert out.dtype == torch.float16
    assert rel(out, ref) < TOL[torch.float16]
    check_grads(got, want, torch.float16, TOL[torch.float16])
    assert_unseen_cmp_grads_zero(got, cfg, T)


@pytest.mark.parametrize("case,dtype", [(0, torch.float32), (3, torch.float32),
                                        (4, torch.float16)])
def test_grads_with_descriptor_loads(case, dtype, rng, monkeypatch):
    """Every kernel that can reads its streamed tiles by tensor descriptor: the forward's
    compressed, window and selected kernels and the dQ kernels of all three branches."""
    import nsa.ops.descriptors as D
    import nsa.ops.flashbwd.launch as FB
    import nsa.ops.selection.bwd_launch as SB
    import nsa.ops.selection.launch as SF
    import nsa.ops.window.launch as WF

    made = []
    build = D.kv_desc

    def spy(tag):
        def kv(x, rows, block_rows, tile):
            made.append(tag)
            return build(x, rows, block_rows, tile)
        return kv

    monkeypatch.setattr(D, "USE_DESC", True)
    for mod, tag in ((D, "cmp"), (SF, "sel"), (SB, "sel_dq"), (WF, "win"), (FB, "flash_dq")):
        monkeypatch.setattr(mod, "kv_desc", spy(tag))
    blocks, (n, ni, nl, w), B, T, H, G, dk, dv = CASES[case]
    cfg = NSAConfig(n=n, n_initial=ni, n_local=nl, w=w, **blocks)
    inp, dout = make(rng, cfg, B, T, H, G, dk, dv, dtype)
    inp = {k: (x.contiguous() if torch.is_tensor(x) else x) for k, x in inp.items()}
    ref, raux, want = reference(inp, cfg, dout)
    out, _, got = forward_backward(inp, cfg, dout, "triton", block_indices=raux.block_indices)
    # (the flash dK/dV kernel's q/dout rows stay on pointer loads unless asked for)
    assert set(made) == {"cmp", "sel", "sel_dq", "win", "flash_dq"}, sorted(set(made))
    assert rel(out, ref) < TOL[dtype]
    check_grads(got, want, dtype, TOL[dtype])


def flash_inputs(rng, mask, B, T, H, G, d):
    """q, k, v, dout of one flash branch (mask 0: k/v are compressed tokens, phi = mean)."""
    q = torch.randn(B, T, G * H, d, generator=rng)
    k, v = torch.randn(B, T, H, d, generator=rng), torch.randn(B, T, H, d, generator=rng)
    if mask == 0:
        k, v = compress_mean(k, 32, 16), compress_mean(v, 32, 16)
    return q, k, v, torch.randn(B, T, G * H, d, generator=rng)


@pytest.mark.parametrize("mask,G", [(0, 4), (1, 1), (1, 16)])
def test_flash_backward_descriptor_rows_equal_pointer_rows(mask, G, rng):
    """The flash dK/dV kernel's q/dout rows by descriptor give the pointer path's dK, dV;
    a group size that is not a power of two is refused, by name."""
    from nsa.ops.flashbwd import MASK_CMP, flash_backward
    from nsa.ops.window import win_forward

    B, T, H, d = 2, 150, 1, 16
    q, k, v, dout = flash_inputs(rng, mask, B, T, H, G, d)
    gate = torch.rand(B, T, G * H, generator=rng)
    lse = torch.empty(B, G * H, T)
    if mask == MASK_CMP:
        from nsa.ops.compression import cmp_forward

        o, _ = cmp_forward(q, k, v, NSAConfig(**PAPER), 0.25, want_scores=False, lse=lse)
    else:
        o = win_forward(q, k, v, 40, 0.25, lse=lse)
    delta = (gate * (dout * o).sum(-1)).contiguous()
    res = []
    for rows in (False, True):
        dq = torch.zeros(q.shape)
        dk, dv = flash_backward(q, k, v, dout, gate, lse, delta, dq, 0.25, mask=mask, w=40,
                                cmp_l=32, cmp_d=16, use_desc=rows, use_desc_rows=rows)
        res.append((dq, dk, dv))
    for a, b in zip(*res, strict=True):
        assert torch.isfinite(a).all() and rel(b, a) < 1e-6
    with pytest.raises(ValueError, match="G = 3"):
        q3 = torch.randn(B, T, 3 * H, d, generator=rng)
        flash_backward(q3, k, v, q3, q3[..., 0].contiguous(), lse[:, :3], q3[..., 0].contiguous(),
                       torch.zeros(q3.shape), 0.25, mask=mask, w=40, cmp_l=32, cmp_d=16,
                       use_desc_rows=True)


@pytest.mark.parametrize("mask", [0, 1])
def test_flash_backward_takes_a_strided_half_precision_gate(mask, rng):
    """The kernels load the gate as float32 (``gate_f32``): a gate in another dtype and
    with gaps in its strides (a slice of a wider tensor) gives the dQ, dK, dV of the same
    values passed as a contiguous float32 tensor."""
    from nsa.ops.flashbwd import flash_backward

    B, T, H, G, d = 2, 150, 1, 3, 16
    q, k, v, dout = flash_inputs(rng, mask, B, T, H, G, d)
    wide = torch.rand(B, T, G * H, 2, generator=rng).to(torch.float16)
    gate = wide[..., 1]  # strides (2*T*G*H, 2*G*H, 2)
    lse = torch.randn(B, G * H, T, generator=rng) + 4.0  # any finite lse: a linear map
    r = torch.randn(B, T, G * H, generator=rng)
    runs = []
    for g in (gate, gate.float().contiguous()):
        delta = torch.empty_strided(g.shape, g.stride()).copy_(g.float() * r)
        dq = torch.full(q.shape, float("nan"))
        dk, dv = flash_backward(q, k, v, dout, g, lse, delta, dq, 0.25, mask=mask, w=40,
                                cmp_l=32, cmp_d=16, accumulate_dq=False)
        runs.append((dq, dk, dv))
    for a, b in zip(*runs, strict=True):
        assert torch.isfinite(a).all() and rel(a, b) < 1e-6


@pytest.mark.parametrize("mask,G", [(0, 3), (1, 2)])
def test_flash_backward_does_not_depend_on_the_query_chunk(mask, G, rng):
    """dK/dV are summed over per-chunk partials (compressed: absolute position ranges;
    window: from each key tile's first row): chunk lengths that split tiles, positions
    and groups anywhere give the same dQ, dK, dV as one chunk covering everything."""
    from nsa.ops.flashbwd import flash_backward

    B, T, H, d = 1, 150, 2, 16
    q, k, v, dout = flash_inputs(rng, mask, B, T, H, G, d)
    gate = torch.rand(B, T, G * H, generator=rng)
    lse = torch.randn(B, G * H, T, generator=rng) + 4.0
    delta = torch.randn(B, T, G * H, generator=rng)
    runs = []
    for chunk in (T, 7, 33, 64):
        dq = torch.full(q.shape, float("nan"))
        dk, dv = flash_backward(q, k, v, dout, gate, lse, delta, dq, 0.25, mask=mask, w=40,
                                cmp_l=32, cmp_d=16, accumulate_dq=False, q_chunk=chunk)
        runs.append((dq, dk, dv))
    for run in runs[1:]:
        for a, b in zip(run, runs[0], strict=True):
            assert torch.isfinite(a).all() and rel(a, b) < 1e-5


def test_flash_dq_of_two_branches_in_one_kernel(rng, monkeypatch):
    """flash_dq with the compressed and window branches in one launch gives the sum of each
    branch's own dQ; with ``accumulate_dq`` and ``out`` it adds the float32 buffer (left
    as it was) and stores the total in out's dtype; lse layouts that differ run as two
    launches with the same result; without a float32 buffer (dq=None) out alone receives
    the same, paired or not; bad arguments are refused by name."""
    from nsa.ops.flashbwd import MASK_CMP, MASK_WIN, FlashBranch, flash_dq

    B, T, H, G, d = 2, 100, 2, 3, 16
    q, kw, vw, dout = flash_inputs(rng, MASK_WIN, B, T, H, G, d)
    kc = compress_mean(torch.randn(B, T, H, d, generator=rng), 32, 16)
    vc = compress_mean(torch.randn(B, T, H, d, generator=rng), 32, 16)

    def branch(k, v, mask, lse=None):
        gate = torch.rand(B, T, G * H, generator=rng)
        lse = torch.randn(B, G * H, T, generator=rng) + 4.0 if lse is None else lse
        return FlashBranch(k, v, gate, lse, torch.randn(B, T, G * H, generator=rng), mask,
                           w=40, cmp_l=32, cmp_d=16)

    cmp, win = branch(kc, vc, MASK_CMP), branch(kw, vw, MASK_WIN)
    one = []
    for br in (cmp, win):
        dq = torch.full(q.shape, float("nan"))
        flash_dq(q, dout, dq, 0.25, [br], accumulate_dq=False)
        assert torch.isfinite(dq).all()
        one.append(dq)
    both = torch.full(q.shape, float("nan"))
    flash_dq(q, dout, both, 0.25, [cmp, win], accumulate_dq=False)
    assert rel(both, one[0] + one[1]) < 1e-5

    base = torch.randn(q.shape, generator=rng)
    buf, out = base.clone(), torch.full(q.shape, float("nan"), dtype=torch.float16)
    flash_dq(q, dout, buf, 0.25, [win, cmp], accumulate_dq=True, out=out)
    assert torch.equal(buf, base)
    assert rel(out.float(), base + one[0] + one[1]) < 2e-3  # float16 rounding of the sum

    # the window's lse as a slice of a wider tensor: other strides, two launches
    wide = torch.randn(B, G * H + 1, T, generator=rng)
    wide[:, 1:] = win.lse
    win_t = win._replace(lse=wide[:, 1:])
    assert win_t.lse.stride() != cmp.lse.stride()
    split = torch.full(q.shape, float("nan"))
    flash_dq(q, dout, split, 0.25, [cmp, win_t], accumulate_dq=False)
    assert rel(split, both) < 1e-6

    # no float32 buffer (nothing to add): out alone, paired and in two launches
    import nsa.ops.flashbwd.launch as FL

    for pair in (True, False):
        monkeypatch.setattr(FL, "PAIR_DQ", pair)
        alone = torch.full(q.shape, float("nan"))
        flash_dq(q, dout, None, 0.25, [cmp, win], accumulate_dq=False, out=alone)
        assert rel(alone, both) < 1e-6
    with pytest.raises(ValueError, match="dq=None needs out"):
        flash_dq(q, dout, None, 0.25, [cmp], accumulate_dq=False)
    with pytest.raises(ValueError, match="1 or 2 branches"):
        flash_dq(q, dout, both, 0.25, [cmp, win, cmp], accumulate_dq=False)
    with pytest.raises(ValueError, match="different masks"):
        flash_dq(q, dout, both, 0.25, [win, win], accumulate_dq=False)
    with pytest.raises(ValueError, match="out must have dq's shape"):
        flash_dq(q, dout, both, 0.25, [cmp], accumulate_dq=False, out=out[:, :7])


def test_grads_shorter_than_one_compressed_block(rng):
    """T < l: no compressed token is visible (O_cmp = 0): g_cmp's gradient is 0, k_cmp/v_cmp
    (only tokens no query may see) get none; the other branches are unaffected."""
    cfg = NSAConfig(n=3, n_initial=1, n_local=1, w=16, **PAPER)
    T = 27
    inp, dout = make(rng, cfg, 1, T, 1, 2, 16, 16, torch.float32, extra_cmp=2)
    assert inp["k_cmp"].shape[1] == 2
    ref, raux, want = reference(inp, cfg, dout)
    out, _, got = forward_backward(inp, cfg, dout, "triton", block_indices=raux.block_indices)
    assert rel(out, ref) < 1e-4
    check_grads(got, want, torch.float32, 1e-4)
    assert got["g_cmp"] is not None and (got["g_cmp"] == 0).all()


# ----------------------------------------------------------------------------- split head dim


# d_k as two tiles (nsa.ops.compression.launch.head_dim_split): 48 = 32 + 16 columns, 40 =
# 32 + 16 with the second tile's last 8 columns masked. Same columns as CASES.
SPLIT_CASES = [
    (PAPER, (3, 1, 1, 40), 1, 150, 2, 1, 48, 16),  # G = 1, H = 2, d_v < d_k
    (PAPER, (3, 1, 1, 40), 2, 83, 1, 3, 40, 32),  # batch 2, masked second tile
    (EQUAL, (4, 1, 2, 32), 1, 67, 1, 16, 48, 32),  # l = l' = d, G = 16
]


def admit_head_dim(monkeypatch) -> None:
    """Let nsa_attention(backend="triton") take d_k = 48 / 40 on the CPU: the routing lists
    the model head dims (64, 128, 192, 256, powers of two); these are the interpreter-sized
    stand-ins of 192's split (128 + 64), routed as their one-tile width (64) would be."""
    import nsa.ops.triton_backend as TB
    from nsa.ops.compression.launch import head_dim_tile

    real = TB._routing
    monkeypatch.setattr(TB, "_routing",
                        lambda q, d_k, d_v, G: real(q, head_dim_tile(d_k), d_v, G))


def spy_split(monkeypatch) -> list[int]:
    """Record the head dims the backward launchers split (flashbwd and selection); admits
    them (:func:`admit_head_dim`)."""
    import nsa.ops.flashbwd.launch as FB
    import nsa.ops.selection.bwd_launch as SB
    from nsa.ops.compression.launch import head_dim_split

    admit_head_dim(monkeypatch)
    seen = []
    for mod in (FB, SB):
        monkeypatch.setattr(mod, "head_dim_split",
                            lambda d, _r=head_dim_split: seen.append(d) or _r(d))
    return seen


@pytest.mark.parametrize("blocks,sel,B,T,H,G,dk,dv", SPLIT_CASES)
def test_grads_with_a_split_head_dim_fp32(blocks, sel, B, T, H, G, dk, dv, rng, monkeypatch):
    """The backward kernels with q/k columns as two tiles (DK + DK2: every product over
    d_k the sum of two, dQ/dK stored per tile): every input's gradient against the float64
    reference, selected dQ group-centric."""
    from nsa.ops.compression.launch import head_dim_split

    assert head_dim_split(dk) == (32, 16)
    seen = spy_split(monkeypatch)
    n, ni, nl, w = sel
    cfg = NSAConfig(n=n, n_initial=ni, n_local=nl, w=w, **blocks)
    inp, dout = make(rng, cfg, B, T, H, G, dk, dv, torch.float32)
    ref, raux, want = reference(inp, cfg, dout)
    out, _, got = forward_backward(inp, cfg, dout, "triton", block_indices=raux.block_indices)
    assert seen and set(seen) == {dk}
    assert rel(out, ref) < TOL[torch.float32]
    check_grads(got, want, torch.float32, TOL[torch.float32])
    assert_unseen_cmp_grads_zero(got, cfg, T)


@pytest.mark.parametrize("case,dq_atomic,det", [(0, True, False), (1, False, False),
                                                (1, True, True)])
def test_grads_of_the_block_centric_selected_path_with_a_split_head_dim(case, dq_atomic, det,
                                                                         rng, monkeypatch):
    """Mode "block" with d_k as two tiles: the key-centric kernel's dQ atomics / per-slot
    partials (NaN-poisoned) and its deterministic dK partials per column range, summed by
    the reduce kernels per tile."""
    import nsa.ops.selection.bwd_launch as SB
    import nsa.ops.selection.launch as SL

    monkeypatch.setattr(SL, "SEL_MODE", "block")
    monkeypatch.setattr(SL, "PARTIAL_FILL", float("nan"))
    monkeypatch.setattr(SB, "DQ_ATOMIC", dq_atomic)
    monkeypatch.setattr(SB, "_sel_bwd_dq_kernel", [])  # the group dQ must not run
    seen = spy_split(monkeypatch)
    blocks, (n, ni, nl, w), B, T, H, G, dk, dv = SPLIT_CASES[case]
    cfg = NSAConfig(n=n, n_initial=ni, n_local=nl, w=w, **blocks)
    inp, dout = make(rng, cfg, B, T, H, G, dk, dv, torch.float32)
    ref, raux, want = reference(inp, cfg, dout)
    out, _, got = forward_backward(inp, cfg, dout, "triton", block_indices=raux.block_indices,
                                   deterministic=det)
    assert seen and set(seen) == {dk}
    assert rel(out, ref) < TOL[torch.float32]
    check_grads(got, want, torch.float32, TOL[torch.float32])


@pytest.mark.parametrize("case", [0, 1])
def test_grads_with_descriptor_loads_and_a_split_head_dim(case, rng, monkeypatch):
    """Descriptors forced on: at d_k = 48 the dQ kernels read the keys' second tile through
    a descriptor of its own (a [1, rows, 1, 16] box loaded at column 32); at d_k = 40 (the
    two tiles cover 48 columns) they fall back to pointer loads. Gradients as the
    reference's either way."""
    import nsa.ops.descriptors as D
    import nsa.ops.flashbwd.launch as FB
    import nsa.ops.selection.bwd_launch as SB

    made = []
    build = D.kv_desc

    def spy(tag):
        def kv(x, rows, block_rows, tile):
            made.append((tag, tile))
            return build(x, rows, block_rows, tile)
        return kv

    admit_head_dim(monkeypatch)
    monkeypatch.setattr(D, "USE_DESC", True)
    for mod, tag in ((SB, "sel_dq"), (FB, "flash_dq")):
        monkeypatch.setattr(mod, "kv_desc", spy(tag))
    blocks, (n, ni, nl, w), B, T, H, G, dk, dv = SPLIT_CASES[case]
    cfg = NSAConfig(n=n, n_initial=ni, n_local=nl, w=w, **blocks)
    inp, dout = make(rng, cfg, B, T, H, G, dk, dv, torch.float32)
    inp = {k: (x.contiguous() if torch.is_tensor(x) else x) for k, x in inp.items()}
    ref, raux, want = reference(inp, cfg, dout)
    out, _, got = forward_backward(inp, cfg, dout, "triton", block_indices=raux.block_indices)
    if dk == 48:
        assert {(t, c) for t in ("sel_dq", "flash_dq") for c in (32, 16, dv)} == set(made)
    else:
        assert made == []
    assert rel(out, ref) < TOL[torch.float32]
    check_grads(got, want, torch.float32, TOL[torch.float32])


@pytest.mark.parametrize("mask,G", [(0, 4), (1, 2)])
def test_flash_backward_split_head_dim_descriptors_equal_pointers(mask, G, rng):
    """d_k = 48 as two tiles: the flash dK/dV kernel's q rows and the dQ kernel's key tiles
    by descriptors (a second descriptor per tensor for columns 32..47) give the pointer
    loads' dQ, dK, dV; at d_k = 40 descriptors are refused, by name."""
    from nsa.ops.flashbwd import MASK_CMP, flash_backward

    B, T, H, dk, dv = 2, 150, 1, 48, 32
    q = torch.randn(B, T, G * H, dk, generator=rng)
    k, v = torch.randn(B, T, H, dk, generator=rng), torch.randn(B, T, H, dv, generator=rng)
    if mask == MASK_CMP:
        k, v = compress_mean(k, 32, 16), compress_mean(v, 32, 16)
    dout = torch.randn(B, T, G * H, dv, generator=rng)
    gate = torch.rand(B, T, G * H, generator=rng)
    lse = torch.randn(B, G * H, T, generator=rng) + 4.0  # any finite lse: a linear map
    delta = torch.randn(B, T, G * H, generator=rng)
    res = []
    for desc in (False, True):
        dq = torch.full(q.shape, float("nan"))
        dk_, dv_ = flash_backward(q, k, v, dout, gate, lse, delta, dq, 0.25, mask=mask, w=40,
                                  cmp_l=32, cmp_d=16, accumulate_dq=False, use_desc=desc,
                                  use_desc_rows=desc)
        res.append((dq, dk_, dv_))
    for a, b in zip(*res, strict=True):
        assert torch.isfinite(a).all() and rel(b, a) < 1e-6
    with pytest.raises(ValueError, match="head dim 40"):
        flash_backward(q[..., :40], k[..., :40], v, dout, gate, lse, delta,
                       torch.zeros(q[..., :40].shape), 0.25, mask=mask, w=40, cmp_l=32,
                       cmp_d=16, use_desc=True)



# ----------------------------------------------------------------------------- selection


@pytest.mark.parametrize("blocks,sel,T,H,G,dk,gates", [
    (PAPER, (2, 1, 0, 40), 150, 1, 2, 32, ("cmp", "sel", "win")),
    (EQUAL, (4, 1, 1, 32), 100, 1, 3, 16, ("cmp", "sel", "win")),
    # g_cmp None: the compressed branch only scores blocks and gets no gradient
    (PAPER, (2, 1, 0, 40), 150, 2, 2, 16, ("sel", "win")),
])
def test_grads_with_the_kernels_own_selection(blocks, sel, T, H, G, dk, gates, rng):
    n, ni, nl, w = sel
    cfg = NSAConfig(n=n, n_initial=ni, n_local=nl, w=w, **blocks)
    inp, dout = make(rng, cfg, 1, T, H, G, dk, dk, torch.float32, gates=gates, extra_cmp=0,
                     peaked=True)
    ref, raux, want = reference(inp, cfg, dout)
    out, aux, got = forward_backward(inp, cfg, dout, "triton", return_aux=True)
    # peaked scores: no near-tie, so the fp32 selection must equal the float64 one
    assert torch.equal(aux.block_indices, raux.block_indices)
    assert rel(out, ref) < 1e-4
    check_grads(got, want, torch.float32, 1e-4)
    if "cmp" not in gates:
        assert want["k_cmp"] is None and want["v_cmp"] is None  # scores carry no gradient


# ----------------------------------------------------------------------------- branches


@pytest.mark.parametrize("gates", [("sel", "win"), ("cmp", "win"), ("cmp", "sel"), ("cmp",),
                                   ("win",)])
def test_grads_with_branches_disabled(gates, rng):
    cfg = NSAConfig(n=3, n_initial=1, n_local=1, w=40, **PAPER)
    T, H, G, dk, dv = 100, 1, 3, 32, 16
    inp, dout = make(rng, cfg, 1, T, H, G, dk, dv, torch.float32, gates=gates)
    # with g_sel, the reference selects from the compressed branch (even if g_cmp is None)
    ref, raux, want = reference(inp, cfg, dout)
    out, _, got = forward_backward(inp, cfg, dout, "triton", block_indices=raux.block_indices)
    assert rel(out, ref) < 1e-4
    check_grads(got, want, torch.float32, 1e-4)
    for branch, names in BRANCH_KV.items():
        if branch not in gates:
            assert got[f"g_{branch}"] is None
            for name in names:
                assert want[name] is None, name  # the reference does not touch them
                assert got[name] is None or (got[name] == 0).all(), name
        else:
            for name in names:
                assert got[name] is not None and got[name].any(), name


def test_grads_selection_only_with_given_indices_and_no_compressed_inputs(rng):
    """g_sel alone, block indices given (duplicates, -1 anywhere, blocks in the future,
    any order), k_cmp/v_cmp None. Rows whose every block lies in the future read nothing:
    output 0, and no NaN may leak into any gradient."""
    cfg = NSAConfig(n=4, n_initial=1, n_local=1, w=32, **EQUAL)
    T, H, G, dk, dv = 100, 2, 2, 16, 16
    inp, dout = make(rng, cfg, 1, T, H, G, dk, dv, torch.float32, gates=("sel",))
    inp["k_cmp"] = inp["v_cmp"] = None
    nb = cfg.num_sel_blocks(T)
    idx = torch.randint(-1, nb, (1, T, H, cfg.n), generator=rng)
    idx[..., 1] = idx[..., 0]
    idx[:, :3] = torch.tensor([nb - 1, -1, nb - 2, -1])  # the first rows: future only
    ref, raux, want = reference(inp, cfg, dout, block_indices=idx)
    out, aux, got = forward_backward(inp, cfg, dout, "triton", block_indices=idx,
                                     return_aux=True)
    assert torch.equal(aux.block_indices, raux.block_indices)
    assert (out[:, :3] == 0).all()
    assert rel(out, ref) < 1e-4
    check_grads(got, want, torch.float32, 1e-4)
    assert (got["q"][:, :3] == 0).all() and (got["g_sel"][:, :3] == 0).all()


# ----------------------------------------------------------------------------- determinism


def test_deterministic_grads_are_bitwise_reproducible(rng):
    """Under the interpreter programs run one after another, so this mostly checks the
    keyword's wiring; the GPU suite checks bitwise reproducibility where atomics race."""
    cfg = NSAConfig(n=3, n_initial=1, n_local=1, w=40, **PAPER)
    T, H, G, dk, dv = 90, 1, 4, 32, 16
    inp, dout = make(rng, cfg, 1, T, H, G, dk, dv, torch.float32, peaked=True)
    out1, _, g1 = forward_backward(inp, cfg, dout, "triton", deterministic=True)
    out2, _, g2 = forward_backward(inp, cfg, dout, "triton", deterministic=True)
    assert torch.equal(out1, out2)
    for name in ARGS:
        assert g1[name] is not None, name
        assert torch.equal(g1[name], g2[name]), f"{name}: deterministic grads differ"
    out0, _, g0 = forward_backward(inp, cfg, dout, "triton")
    assert rel(out1, out0) < 1e-4
    check_grads(g1, g0, torch.float32, 1e-4)


@pytest.mark.parametrize("aux", [False, True])
def test_eager_training_skips_the_custom_ops_with_the_same_grads(aux, rng, monkeypatch):
    """Eager training runs the kernels through an autograd.Function (host time): its
    output and every gradient equal the custom ops' bit for bit, and neither op is
    called; with the aux outputs requested too (their gradients are never formed, not
    even as zeros)."""
    import nsa.ops.triton_autograd as TA

    cfg = NSAConfig(n=3, n_initial=1, n_local=1, w=40, **PAPER)
    inp, dout = make(rng, cfg, 1, 100, 1, 2, 16, 16, torch.float32, peaked=True)
    calls = []
    for name in ("triton_fwd", "triton_bwd"):
        real = getattr(torch.ops.nsa, name)
        monkeypatch.setattr(torch.ops.nsa, name,
                            lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a),
                            raising=False)
    unused = []
    real_backward = TA._EagerTritonNSA.backward
    monkeypatch.setattr(TA._EagerTritonNSA, "backward", staticmethod(
        lambda ctx, d, *rest: unused.extend(rest) or real_backward(ctx, d, *rest)))
    out, _, grads = forward_backward(inp, cfg, dout, "triton", return_aux=aux)
    assert calls == []
    # the auxiliary outputs' gradients are not materialised as zeros
    assert len(unused) == 7 and all(x is None for x in unused)
    monkeypatch.setattr(TA, "_eager_real", lambda x: False)
    out_op, _, grads_op = forward_backward(inp, cfg, dout, "triton", return_aux=aux)
    assert calls == ["triton_fwd", "triton_bwd"]
    assert torch.equal(out, out_op)
    for name in ARGS:
        assert (grads[name] is None) == (grads_op[name] is None), name
        assert grads[name] is None or torch.equal(grads[name], grads_op[name]), name


# ----------------------------------------------------------------------------- module


def test_module_parameter_grads_match_the_reference_module():
    """NSAAttention (phi = "mlp", RoPE, gate MLP) on the triton backend against the same
    weights on the reference backend. n * l' >= T: every causal block is selected, so the
    fp32 scores of the two backends cannot choose differently."""
    torch.manual_seed(5)
    cfg = NSAConfig(l=16, d=8, l_sel=32, n=3, n_initial=1, n_local=2, w=24, hidden_size=32,
                    n_heads=4, n_kv_heads=2, d_k=16, d_v=16, phi="mlp")
    ref = NSAAttention(cfg, backend="reference")
    torch.nn.init.normal_(ref.gate[-1].weight, std=0.5)  # zero at init: no gate gradient
    torch.nn.init.normal_(ref.gate[-1].bias, std=0.5)
    tri = NSAAttention(cfg, backend="triton")
    tri.load_state_dict(ref.state_dict())
    B, T = 2, 70
    x = torch.randn(B, T, cfg.hidden_size)
    dy = torch.randn(B, T, cfg.hidden_size)
    ys = []
    for m in (ref, tri):
        y = m(x)
        (y * dy).sum().backward()
        ys.append(y.detach())
    assert rel(ys[1], ys[0]) < 1e-4
    grads = {n: (pr.grad, pt.grad) for (n, pr), (_, pt)
             in zip(ref.named_parameters(), tri.named_parameters(), strict=True)}
    errs = {}
    for name, (gr, gt) in grads.items():
        assert gt is not None, f"{name}: no gradient on the triton module"
        if name == "phi_k.fc2.bias":
            # shifts every compressed key of a row by the same q.b: softmax-invariant, so its
            # true gradient is 0 and both backends hold rounding noise only
            scale = grads["phi_k.fc2.weight"][0].norm()
            assert gt.norm() < 1e-4 * scale and gr.norm() < 1e-4 * scale
            continue
        assert gr is not None and gr.any(), f"{name}: no reference gradient"
        errs[name] = rel(gt, gr)
    bad = {k: f"{e:.2e}" for k, e in errs.items() if not e < 1e-4}
    assert not bad, bad


def test_compile_fullgraph_takes_the_routing_as_a_constant(monkeypatch):
    """torch.compile(fullgraph=True) of a model on the Triton backend: Dynamo must not
    trace into the routing checks (capability, installed modules, policy), whose module
    lookups it refuses under fullgraph (seen with torch 2.11 on the GPU); the answer is
    computed once, eagerly, as a constant of the graph. Compiled and eager forwards
    agree."""
    import nsa.ops.triton_backend as TB
    from nsa.model import TinyLM

    real = TB._routing_for

    def untraced(*args):
        # a no-op when run as Python; a graph break, so an error under fullgraph=True,
        # where Dynamo traces it
        torch._dynamo.graph_break()
        return real(*args)

    monkeypatch.setattr(TB, "_routing_for", untraced)
    cfg = NSAConfig(l=8, d=4, l_sel=16, n=3, w=20, hidden_size=64, n_heads=4, n_kv_heads=2,
                    d_k=16, d_v=16)
    torch._dynamo.reset()
    torch.manual_seed(2)
    m = TinyLM(cfg, n_layers=1, backend="triton")
    tok = torch.randint(0, 256, (2, 41))
    eager = m(tok)
    compiled = torch.compile(m, fullgraph=True, backend="eager")(tok)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)
