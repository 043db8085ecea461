"""The decode step's prologue (nsa.ops.decode.decode_append): one Triton launch for RoPE
and every cache write, under TRITON_INTERPRET=1, against the reference path (torch RoPE +
NSACache.append) step by step: rotated queries, every cache buffer, lengths, compressed
tokens from an order-sensitive phi; uniform, ragged and static caches; and the module's
fused decode (one projection GEMM) against its unfused decode."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nsa import NSAConfig  # noqa: E402
from nsa.cache import NSACache  # noqa: E402
from nsa.module import Compressor, NSAAttention, rope_inv_freq  # noqa: E402
from nsa.ops.decode import DECODE_COLUMNS, decode_append  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU kernel tests need TRITON_INTERPRET=1")

BUFFERS = ("k_sel", "v_sel", "k_win", "v_win", "k_raw", "v_raw", "k_cmp", "v_cmp",
           "lengths")


def columns(cfg: NSAConfig, shared: bool) -> tuple[dict[str, int], int]:
    """Column offsets of a z row (q, then k/v per branch, or one shared pair) and its width."""
    HQ, H, dk, dv = cfg.n_heads, cfg.n_kv_heads, cfg.d_k, cfg.d_v
    cols, off = {"q": 0}, HQ * dk
    for b in (("cmp",) if shared else ("cmp", "sel", "win")):
        for kv, D in (("k", dk), ("v", dv)):
            for br in (("cmp", "sel", "win") if shared else (b,)):
                cols[f"{kv}_{br}"] = off
            off += H * D
    return cols, off + 5  # trailing columns the prologue must ignore (the gate's)


def twin_caches(cfg: NSAConfig, lens: list[int], dtype: torch.dtype, static: bool):
    """Two identical caches prefilled to ``lens`` (ragged when they differ), phi = an
    order-sensitive MLP (a position embedding per block slot)."""
    torch.manual_seed(5)
    phi_k, phi_v = Compressor(cfg, cfg.d_k).to(dtype), Compressor(cfg, cfg.d_v).to(dtype)
    P = max(lens)
    B, H = len(lens), cfg.n_kv_heads
    raw = [torch.randn(B, P, H, D, dtype=dtype) for D in (cfg.d_k, cfg.d_v) * 3]
    caches = []
    for _ in range(2):
        c = NSACache(cfg, B, dtype=dtype, max_len=P + 40 if static else None, static=static,
                     initial_capacity=P + 2,  # small: the steps must grow it
                     compress=lambda k, v: (phi_k(k), phi_v(v)))
        c.prefill(*raw, lengths=None if len(set(lens)) == 1 else lens)
        caches.append(c)
    return caches


def assert_same_cache(a: NSACache, b: NSACache, step: int) -> None:
    assert a.max_length == b.max_length, step
    for name in BUFFERS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape, (name, step)
        torch.testing.assert_close(x, y, rtol=2e-6, atol=2e-6, msg=f"{name} step {step}")


CASES = [
    # (config overrides, lengths, static)
    (dict(l=8, d=4, l_sel=16, n=3, w=20), [13, 13], False),  # uniform: due on the host
    (dict(l=8, d=4, l_sel=16, n=3, w=20), [5, 13, 9], False),  # ragged: due per sequence
    (dict(l=8, d=4, l_sel=16, n=3, w=20), [11, 6], True),  # static (graph-captured)
    (dict(l=16, d=8, l_sel=16, n=3, w=12, n_heads=3, n_kv_heads=3, d_k=6, d_v=10), [17], False),
    (dict(l=8, d=8, l_sel=8, n=3, w=8, rope=False, n_heads=8, n_kv_heads=2), [7, 7], False),
]


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("over,lens,static", CASES,
                         ids=lambda v: str(v) if not isinstance(v, dict) else
                         ",".join(f"{k}={x}" for k, x in v.items()))
def test_append_kernel_equals_reference_step_by_step(over, lens, static, shared):
    cfg = NSAConfig(**{**dict(hidden_size=32, n_heads=4, n_kv_heads=2, d_k=8, d_v=6), **over})
    tri, ref = twin_caches(cfg, lens, torch.float32, static)
    cols, F = columns(cfg, shared)
    inv = rope_inv_freq(cfg.d_k, cfg.rope_base, torch.float32, "cpu") if cfg.rope else None
    torch.manual_seed(7)
    for step in range(cfg.l + cfg.d + 2):  # crosses at least two emission points
        z = torch.randn(len(lens), F)
        q_t = decode_append(z, cols, tri, inv, backend="triton")
        q_r = decode_append(z, cols, ref, inv, backend="reference")
        torch.testing.assert_close(q_t, q_r, rtol=2e-6, atol=2e-6, msg=f"q step {step}")
        assert_same_cache(tri, ref, step)
    assert tri.num_cmp >= 2 and not torch.isnan(tri.k_cmp).any()


def test_append_kernel_fp16_and_rotation_against_rope_formula():
    """fp16 buffers; the rotated query equals q * cos + rotate_half(q) * sin at the
    sequence's position, written out independently of nsa.module."""
    cfg = NSAConfig(l=8, d=4, l_sel=16, n=3, w=20, hidden_size=32, n_heads=4, n_kv_heads=2,
                    d_k=8, d_v=6)
    tri, ref = twin_caches(cfg, [9, 4], torch.float16, False)
    cols, F = columns(cfg, False)
    inv = rope_inv_freq(cfg.d_k, cfg.rope_base, torch.float16, "cpu")
    z = torch.randn(2, F, dtype=torch.float16)
    pos = tri.lengths.clone()
    q = decode_append(z, cols, tri, inv, backend="triton")
    decode_append(z, cols, ref, inv, backend="reference")
    x = z[:, :cfg.n_heads * cfg.d_k].view(2, cfg.n_heads, cfg.d_k).double()
    ang = pos.double()[:, None, None] * inv.double()
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    half = cfg.d_k // 2
    want = x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin
    torch.testing.assert_close(q.double(), want, rtol=2e-3, atol=2e-3)
    for name in BUFFERS:
        torch.testing.assert_close(getattr(tri, name), getattr(ref, name), rtol=1e-3,
                                   atol=1e-3, msg=name)


def test_append_rejects_bad_input_and_leaves_the_cache_alone():
    cfg = NSAConfig(l=8, d=4, l_sel=16, n=3, w=20, hidden_size=32, n_heads=4, n_kv_heads=2,
                    d_k=8, d_v=6)
    cache, _ = twin_caches(cfg, [10, 10], torch.float32, False)
    before = {n: getattr(cache, n).clone() for n in BUFFERS}
    cols, F = columns(cfg, False)
    inv = rope_inv_freq(cfg.d_k, cfg.rope_base, torch.float32, "cpu")
    z = torch.randn(2, F)
    with pytest.raises(ValueError, match=r"z must be \[B=2, F\]"):
        decode_append(z[:1], cols, cache, inv, backend="triton")
    with pytest.raises(ValueError, match="float64"):
        decode_append(z.double(), cols, cache, inv, backend="triton")
    with pytest.raises(ValueError, match="columns lacks 'v_win'"):
        decode_append(z, {k: v for k, v in cols.items() if k != "v_win"}, cache, inv)
    with pytest.raises(ValueError, match=r"columns\['v_win'\]"):
        decode_append(z, {**cols, "v_win": F - 3}, cache, inv)
    with pytest.raises(ValueError, match="rope_inv_freq must be"):
        decode_append(z, cols, cache, inv[:2], backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        decode_append(z, cols, cache, inv, backend="fast")
    for n in BUFFERS:
        assert torch.equal(getattr(cache, n), before[n]), n
    assert cache.max_length == 10 and set(DECODE_COLUMNS) == set(cols)


@pytest.mark.parametrize("over,static", [(dict(), False), (dict(share_kv=True, phi="mean"), True),
                                         (dict(rope=False), False)],
                         ids=["mlp", "shared-mean-static", "no-rope"])
def test_module_fused_decode_equals_unfused(monkeypatch, over, static):
    """NSAAttention.decode through one projection GEMM + the append kernel equals its
    eight-projection path in float32, outputs and caches, over steps that emit compressed
    tokens; the fused weights follow an in-place update. The attention step itself runs
    on the reference for speed here (test_triton_decode runs the module on the kernels)."""
    import nsa.module

    real = nsa.module.nsa_decode
    monkeypatch.setattr(nsa.module, "nsa_decode",
                        lambda *a, **k: real(*a, **{**k, "backend": "reference"}))
    torch.manual_seed(2)
    cfg = NSAConfig(**{**dict(l=8, d=4, l_sel=16, n=3, w=20, hidden_size=32, n_heads=4,
                              n_kv_heads=2, d_k=16, d_v=16), **over})
    m = NSAAttention(cfg, backend="triton")
    w_sel = m.k_proj["shared" if cfg.share_kv else "sel"].weight
    torch.nn.init.normal_(m.gate[-1].weight, std=0.5)
    x = torch.randn(2, 19 + 10, cfg.hidden_size)
    caches, outs = [], []
    for fused in (True, False):
        m.fused_decode = fused
        cache = m.new_cache(2, max_len=40 if static else None, static=static)
        with torch.no_grad():
            m.prefill(x[:, :19], cache)
            ys = []
            for i in range(19, 29):
                if i == 24:  # an optimizer-like in-place update mid-generation
                    w_sel.mul_(1.5)
                ys.append(m.decode(x[:, i:i + 1], cache))
            w_sel.div_(1.5)
        caches.append(cache)
        outs.append(torch.cat(ys, 1))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert_same_cache(caches[0], caches[1], -1)
    assert m._fused is not None  # the fused path ran


@pytest.mark.parametrize("fused", [True, False])
def test_emission_hints_of_graphed_decode_change_nothing(monkeypatch, fused):
    """GraphedDecode captures a uniform batch's step twice (with and without phi) and
    replays the one nsa.graph.emission_key names; stepping a static cache with those hints
    gives what the unhinted step (phi every step, device-side due) gives. A ragged cache
    gets no hint."""
    import nsa.module
    from nsa.graph import emission_key, set_emit_hints

    real = nsa.module.nsa_decode
    monkeypatch.setattr(nsa.module, "nsa_decode",
                        lambda *a, **k: real(*a, **{**k, "backend": "reference"}))
    torch.manual_seed(6)
    cfg = NSAConfig(l=8, d=4, l_sel=16, n=3, w=20, hidden_size=32, n_heads=4, n_kv_heads=2,
                    d_k=16, d_v=16)
    m = NSAAttention(cfg, backend="triton")
    m.fused_decode = fused
    x = torch.randn(2, 13 + 12, cfg.hidden_size)
    caches, outs, keys = [], [], []
    for hinted in (True, False):
        cache = m.new_cache(2, max_len=40, static=True)
        with torch.no_grad():
            m.prefill(x[:, :13], cache)
            ys = []
            for i in range(13, 25):
                key = emission_key([cache])
                if hinted:
                    keys.append(key[0])
                    set_emit_hints([cache], key)
                ys.append(m.decode(x[:, i:i + 1], cache))
                set_emit_hints([cache], None)
        caches.append(cache)
        outs.append(torch.cat(ys, 1))
    assert sum(keys) == 3  # tokens 16, 20, 24 complete a compression block
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert_same_cache(caches[0], caches[1], -1)
    ragged = m.new_cache(2, max_len=40, static=True)
    with torch.no_grad():
        m.prefill(x[:, :13], ragged, lengths=[13, 9])
    assert emission_key([ragged, caches[0]]) == (None, (26 - 8) % 4 == 0)


def test_fused_weight_tracks_in_place_updates():
    cfg = NSAConfig(l=8, d=4, l_sel=16, n=3, w=20, hidden_size=32, n_heads=4, n_kv_heads=2,
                    d_k=16, d_v=16)
    m = NSAAttention(cfg, backend="triton")
    assert m.decode_weights_token() is None  # nothing built yet
    w, bias, cols, g = m._decode_projection()
    assert torch.equal(w[cols["k_win"]:cols["k_win"] + 32], m.k_proj["win"].weight)
    assert torch.equal(bias[g:], m.gate[0].bias) and not bias[:g].any()
    token = m.decode_weights_token()
    assert token == m.decode_weights_token()
    with torch.no_grad():
        m.v_proj["cmp"].weight.add_(1.0)
    assert m.decode_weights_token() != token  # a captured graph would be stale now
    w2 = m._decode_projection()[0]
    assert torch.equal(w2[cols["v_cmp"]:cols["v_cmp"] + 32], m.v_proj["cmp"].weight)
