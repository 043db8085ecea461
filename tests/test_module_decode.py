"""NSAAttention, NSACache and nsa_decode: causality, decode parity, read counters,
gradients, and failure behaviour (LESSONS traps 2, 3, 4, 5 at module level)."""

from __future__ import annotations

import pytest
import torch

from nsa import NSAConfig
from nsa.cache import CacheError, NSACache
from nsa.module import NSAAttention
from nsa.ops.decode import nsa_decode

SMALL = dict(hidden_size=32, n_heads=4, n_kv_heads=2, d_k=8, d_v=6)


def make_module(seed: int = 0, **overrides) -> NSAAttention:
    torch.manual_seed(seed)
    cfg = NSAConfig(**{**dict(l=8, d=4, l_sel=16, n=3, w=20), **SMALL, **overrides})
    m = NSAAttention(cfg, backend="reference").double()
    # zero-init gates are all 0.5; random last layer makes the branches' mix matter
    torch.nn.init.normal_(m.gate[-1].weight, std=0.5)
    torch.nn.init.normal_(m.gate[-1].bias, std=0.5)
    return m


def decode_all(m: NSAAttention, x: torch.Tensor, P: int, **cache_kw):
    cache = m.new_cache(x.shape[0], **cache_kw)
    y0 = m.prefill(x[:, :P], cache)
    steps = []
    reads = []
    for i in range(P, x.shape[1]):
        steps.append(m.decode(x[:, i : i + 1], cache))
        reads.append({k: v.clone() for k, v in cache.last_reads.items()})
    return y0, torch.cat(steps, dim=1), cache, reads


@pytest.mark.parametrize("share_kv", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_projections_share_one_rope_table_and_match_rope_per_tensor(share_kv, dtype):
    """_project computes the rotary table once for q and every key (and, with share_kv,
    one key/value projection for the three branches): bit-identical to rope() applied to
    each projection on its own, for prefill positions [T] and decode positions [B, 1]."""
    from nsa.module import rope

    m = make_module(3, share_kv=share_kv).to(dtype)
    c = m.config
    B, T = 2, 11
    x = torch.randn(B, T, c.hidden_size, dtype=dtype)
    for pos, xs in ((torch.arange(T), x), (torch.tensor([[5], [9]]), x[:, :1])):
        got = m._project(xs, pos)
        n = xs.shape[1]
        want_q = rope(m.q_proj(xs).view(B, n, c.n_heads, c.d_k), pos, c.rope_base)
        assert torch.equal(got["q"], want_q)
        for b in ("cmp", "sel", "win"):
            key = "shared" if share_kv else b
            k = rope(m.k_proj[key](xs).view(B, n, c.n_kv_heads, c.d_k), pos, c.rope_base)
            assert torch.equal(got[f"k_{b}"], k), b
            assert torch.equal(got[f"v_{b}"], m.v_proj[key](xs).view(B, n, c.n_kv_heads,
                                                                     c.d_v)), b


# ---------------------------------------------------------------- decode parity (trap 4)

CONFIGS = [
    dict(l=8, d=4, l_sel=16, n=3, w=20),  # overlapping compression blocks
    dict(l=8, d=8, l_sel=8, n=4, w=8, n_local=1),  # l = l' = d
    dict(l=16, d=8, l_sel=32, n=3, w=24, n_initial=2, n_local=1),
    dict(l=8, d=4, l_sel=16, n=3, w=20, share_kv=True, phi="mean"),
    dict(l=8, d=4, l_sel=16, n=3, w=20, n_heads=8, n_kv_heads=1),  # G = 8
    dict(l=8, d=4, l_sel=16, n=3, w=20, n_heads=3, n_kv_heads=3, d_k=6, d_v=10),  # G = 1
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_prefill_then_decode_equals_longer_prefill(cfg):
    m = make_module(**cfg)
    c = m.config
    torch.manual_seed(1)
    total = 2 * c.l_sel + c.w + 3
    x = torch.randn(2, total, c.hidden_size, dtype=torch.float64)
    full = m(x)
    # one long decode from P=1 crosses every boundary of l, d, l' and w as k grows;
    # short runs start just below, at and above each boundary (k = l + 1 covers an emission)
    runs = [(1, total - 1)] + [
        (P, c.l + 1) for P in sorted({c.l - 1, c.l, c.l + 1, c.l_sel - 1, c.l_sel,
                                      c.l_sel + 1, c.w - 1, c.w, c.w + 1})
    ]
    for P, k in runs:
        y0, dec, cache, _ = decode_all(m, x[:, : P + k], P, initial_capacity=4)
        assert cache.length == P + k
        torch.testing.assert_close(y0, full[:, :P], rtol=0, atol=1e-12)
        torch.testing.assert_close(dec, full[:, P : P + k], rtol=0, atol=1e-12,
                                   msg=lambda s, P=P: f"P={P}: {s}")


def test_prefill_state_equals_stepwise_state():
    """Prefill of P tokens leaves every buffer as P append() calls would."""
    m = make_module()
    torch.manual_seed(2)
    x = torch.randn(2, 45, m.config.hidden_size, dtype=torch.float64)
    a = m.new_cache(2, initial_capacity=8)
    m.prefill(x, a)
    b = m.new_cache(2, initial_capacity=8)
    m.prefill(x[:, :1], b)
    for i in range(1, 45):
        m.decode(x[:, i : i + 1], b)
    assert a.length == b.length == 45 and a.num_cmp == b.num_cmp == (45 - 8) // 4 + 1
    n = a.num_cmp
    for name in ("k_sel", "v_sel"):
        torch.testing.assert_close(getattr(a, name)[:, :45], getattr(b, name)[:, :45],
                                   rtol=0, atol=1e-12)
    for name in ("k_cmp", "v_cmp"):
        torch.testing.assert_close(getattr(a, name)[:, :n], getattr(b, name)[:, :n],
                                   rtol=0, atol=1e-12)
    for name in ("k_win", "v_win", "k_raw", "v_raw"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- read counters (trap 5)


def test_read_counters_count_what_was_read():
    """Counters follow the indices actually used, not a formula: check them against the
    tokens of the returned blocks, and against N_cmp + selected + window for the defaults."""
    torch.manual_seed(3)
    cfg = NSAConfig(hidden_size=32, n_heads=4, n_kv_heads=2, d_k=8, d_v=8)  # paper blocks
    B, H, HQ = 2, 2, 4
    P = 1300
    cache = NSACache(cfg, B, device="cpu", dtype=torch.float64, initial_capacity=256)
    raw = lambda T, D: torch.randn(B, T, H, D, dtype=torch.float64)  # noqa: E731
    cache.prefill(raw(P, 8), raw(P, 8), raw(P, 8), raw(P, 8), raw(P, 8), raw(P, 8))
    for _step in range(40):
        tok = [torch.randn(B, H, 8, dtype=torch.float64) for _ in range(6)]
        cache.append(*tok)
        t = cache.length - 1
        g = torch.rand(B, HQ, dtype=torch.float64)
        _, idx = nsa_decode(torch.randn(B, HQ, 8, dtype=torch.float64), cache, g, g, g,
                            return_indices=True)
        r = cache.last_reads
        n_cmp = (t + 1 - cfg.l) // cfg.d + 1
        assert torch.equal(r["cmp"], torch.full((B, H), n_cmp))
        assert torch.equal(r["win"], torch.full((B, H), min(cfg.w, t + 1)))
        # selected tokens: every slot's block, tokens at positions <= t
        blk_tokens = torch.clamp(t + 1 - idx.clamp(min=0) * cfg.l_sel, 0, cfg.l_sel)
        expect_sel = torch.where(idx >= 0, blk_tokens, 0).sum(-1)
        assert torch.equal(r["sel"], expect_sel)
        assert (idx >= 0).sum(-1).eq(cfg.n).all()
        # defaults: current block partial, all other selected blocks full
        assert torch.equal(r["sel"], torch.full((B, H), (cfg.n - 1) * cfg.l_sel
                                                + (t % cfg.l_sel) + 1))
        assert int(r["cmp"][0, 0] + r["sel"][0, 0] + r["win"][0, 0]) <= (
            n_cmp + cfg.n * cfg.l_sel + cfg.w)
    assert torch.equal(cache.total_reads["win"], torch.full((B, H), 40 * cfg.w))


def test_read_counter_follows_a_partial_selection():
    """Early positions read fewer tokens than the formula's n*l': the counter must say so."""
    m = make_module()
    torch.manual_seed(4)
    x = torch.randn(1, 12, m.config.hidden_size, dtype=torch.float64)
    _, _, cache, reads = decode_all(m, x, 5)
    for i, r in enumerate(reads):
        t = 5 + i
        assert torch.equal(r["sel"], torch.full((1, 2), t + 1))  # block 0 only, t+1 tokens
        assert torch.equal(r["win"], torch.full((1, 2), min(20, t + 1)))
        assert torch.equal(r["cmp"], torch.full((1, 2), max(0, (t + 1 - 8) // 4 + 1)))


# ---------------------------------------------------------------- causality (traps 2, 3)


@pytest.mark.parametrize("cfg", CONFIGS[:3] + CONFIGS[4:5])
def test_module_causality_outputs_and_indices(cfg):
    m = make_module(**cfg)
    c = m.config
    torch.manual_seed(5)
    T = 3 * c.l_sel + 7
    x = torch.randn(2, T, c.hidden_size, dtype=torch.float64)
    y, aux = m(x, return_aux=True)
    for t in (c.l - 1, c.l_sel, T // 2, T - 2):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 3
        y2, aux2 = m(x2, return_aux=True)
        assert torch.equal(y[:, : t + 1], y2[:, : t + 1]), f"output at <= {t} moved"
        assert torch.equal(aux.block_indices[:, : t + 1], aux2.block_indices[:, : t + 1])
        assert not torch.equal(y[:, t + 1 :], y2[:, t + 1 :])


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("overrides", [{}, {"phi": "mean"}, {"share_kv": True}])
def test_every_parameter_gets_gradient(overrides):
    torch.manual_seed(6)
    cfg = NSAConfig(**{**dict(l=8, d=4, l_sel=16, n=3, w=20), **SMALL, **overrides})
    m = NSAAttention(cfg, backend="reference").double()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(2, 70, cfg.hidden_size, dtype=torch.float64)
    target = torch.randn(2, 70, cfg.hidden_size, dtype=torch.float64)
    # step 1: the gate's zero-initialised last layer gets a gradient (its input layer
    # cannot yet: the zero weights block it, by the spec's design)
    loss = (m(x) - target).pow(2).mean()
    loss.backward()
    assert m.gate[-1].weight.grad.abs().sum() > 0
    assert torch.allclose(torch.sigmoid(m.gate(x)), torch.full((2, 70, 12), 0.5,
                                                               dtype=torch.float64))
    opt.step()
    opt.zero_grad()
    # step 2: every parameter, phi's and the gate's included
    (m(x) - target).pow(2).mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


# ---------------------------------------------------------------- failures leave no trace


def snapshot(cache: NSACache) -> dict:
    names = ("k_sel", "v_sel", "k_cmp", "v_cmp", "k_win", "v_win", "k_raw", "v_raw")
    return {"length": cache.length, **{n: getattr(cache, n).clone() for n in names}}


def assert_same(a: dict, b: dict) -> None:
    assert a["length"] == b["length"]
    for k in a:
        if k != "length":
            assert a[k].shape == b[k].shape and torch.equal(a[k].nan_to_num(7.0),
                                                            b[k].nan_to_num(7.0)), k


def test_decode_past_capacity_without_growth_raises_and_changes_nothing():
    m = make_module()
    x = torch.randn(1, 12, m.config.hidden_size, dtype=torch.float64)
    cache = m.new_cache(1, max_len=11)
    m.prefill(x[:, :11], cache)
    before = snapshot(cache)
    with pytest.raises(CacheError, match="capacity 11 tokens .*max_len.* exceeded"):
        m.decode(x[:, 11:12], cache)
    assert_same(before, snapshot(cache))


def test_bad_append_raises_naming_the_argument_and_changes_nothing():
    cfg = NSAConfig(l=8, d=4, l_sel=16, n=3, w=20, **SMALL)
    cache = NSACache(cfg, 2, dtype=torch.float64, initial_capacity=4)
    ok = lambda D: torch.randn(2, 2, D, dtype=torch.float64)  # noqa: E731
    for _ in range(7):  # next append emits a compressed token
        cache.append(ok(8), ok(6), ok(8), ok(6), ok(8), ok(6))
    before = snapshot(cache)
    with pytest.raises(CacheError, match=r"v_win must have shape \(2, 2, 6\), got \(2, 2, 5\)"):
        cache.append(ok(8), ok(6), ok(8), ok(5), ok(8), ok(6))
    with pytest.raises(CacheError, match="k_cmp_raw has dtype torch.float32"):
        cache.append(ok(8), ok(6), ok(8), ok(6), ok(8).float(), ok(6))
    with pytest.raises(CacheError, match="k_sel must be 3-D"):
        cache.append(ok(8)[None], ok(6), ok(8), ok(6), ok(8), ok(6))
    assert_same(before, snapshot(cache))
    cache.append(ok(8), ok(6), ok(8), ok(6), ok(8), ok(6))
    assert cache.length == 8 and cache.num_cmp == 1


def test_cache_grows_by_doubling_and_keeps_contents():
    cfg = NSAConfig(l=8, d=4, l_sel=16, n=3, w=20, **SMALL)
    cache = NSACache(cfg, 1, dtype=torch.float64, initial_capacity=4)
    ks = []
    caps = set()
    for _ in range(100):
        k = torch.randn(1, 2, 8, dtype=torch.float64)
        ks.append(k)
        cache.append(k, torch.randn(1, 2, 6, dtype=torch.float64), k,
                     torch.randn(1, 2, 6, dtype=torch.float64), k,
                     torch.randn(1, 2, 6, dtype=torch.float64))
        caps.add(cache.capacity)
    assert caps == {16, 32, 64, 128}  # whole selection blocks (l_sel=16), then doubling
    assert torch.equal(cache.k_sel[:, :100], torch.stack(ks, dim=1))


def test_prefill_into_nonempty_cache_and_decode_errors():
    m = make_module()
    x = torch.randn(2, 10, m.config.hidden_size, dtype=torch.float64)
    cache = m.new_cache(2)
    m.prefill(x, cache)
    with pytest.raises(CacheError, match="already holds 10 tokens"):
        m.prefill(x, cache)
    with pytest.raises(ValueError, match="one token per sequence, got T=2"):
        m.decode(x[:, :2], cache)
    with pytest.raises(ValueError, match=r"x must be \[B, T, hidden_size=32\]"):
        m(torch.randn(2, 10, 31, dtype=torch.float64))
    with pytest.raises(ValueError, match="x_t batch 1 != cache batch 2"):
        m.decode(x[:1, :1], cache)
    q = torch.randn(2, 4, 8, dtype=torch.float64)
    g = torch.rand(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"g_sel must have shape \[B, HQ\]"):
        nsa_decode(q, cache, g, g[:, :3], g)
    with pytest.raises(ValueError, match="q_t d_k=7 != cache d_k=8"):
        nsa_decode(q[..., :7], cache, g, g, g)
    with pytest.raises(ValueError, match="the cache is empty"):
        nsa_decode(q, m.new_cache(2), g, g, g)
    with pytest.raises(CacheError, match="max_len must be None or a positive int"):
        m.new_cache(2, max_len=0)


# ---------------------------------------------------------------- ragged and static


@pytest.mark.parametrize("static", [False, True])
def test_ragged_batch_decode_equals_each_sequence_alone(static):
    """Sequences of different lengths in one batch: each sees only its own tokens, with
    lengths straddling multiples of l, d, l' and w; static (graph-safe) caches agree."""
    m = make_module()
    c = m.config
    torch.manual_seed(7)
    lens = [c.l - 1, c.l_sel + 1, c.w, 2]  # 7, 17, 20, 2
    K = c.l + 2
    x = torch.randn(len(lens), max(lens) + K, c.hidden_size, dtype=torch.float64)
    full = m(x)  # row b's prefix is sequence b (causal: padding after it changes nothing)
    cache = m.new_cache(len(lens), max_len=max(lens) + K if static else None,
                        initial_capacity=4, static=static)
    y0 = m.prefill(x[:, : max(lens)], cache, lengths=torch.tensor(lens))
    for b, P in enumerate(lens):
        torch.testing.assert_close(y0[b, :P], full[b, :P], rtol=0, atol=1e-12)
    for i in range(K):
        step_in = torch.stack([x[b, P + i] for b, P in enumerate(lens)])[:, None]
        y = m.decode(step_in, cache)
        want = torch.stack([full[b, P + i] for b, P in enumerate(lens)])[:, None]
        torch.testing.assert_close(y, want, rtol=0, atol=1e-12, msg=lambda s, i=i: f"step {i}: {s}")
        t = torch.tensor(lens) + i
        assert torch.equal(cache.lengths, t + 1)
        assert torch.equal(cache.last_reads["win"][:, 0], torch.clamp(t + 1, max=c.w))
        n_cmp = torch.where(t + 1 < c.l, 0, (t + 1 - c.l) // c.d + 1)
        assert torch.equal(cache.last_reads["cmp"][:, 0], n_cmp)


def test_ragged_prefill_rejects_bad_lengths():
    m = make_module()
    x = torch.randn(2, 10, m.config.hidden_size, dtype=torch.float64)
    with pytest.raises(CacheError, match=r"lengths must lie in \[1, P=10\], got min 0 max 3"):
        m.prefill(x, m.new_cache(2), lengths=torch.tensor([0, 3]))
    with pytest.raises(CacheError, match=r"lengths must have shape \(2,\), got \(3,\)"):
        m.prefill(x, m.new_cache(2), lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(CacheError, match="static=True .* needs max_len"):
        m.new_cache(2, static=True)


def test_as_dtype_copies_tokens_and_leaves_the_cache_alone():
    """The float64 oracle copy: same tokens cast, same lengths, own read counters; a
    decode on the copy changes nothing in the original."""
    cfg = NSAConfig(l=8, d=4, l_sel=16, n=3, w=20, n_heads=4, n_kv_heads=2, d_k=16, d_v=16)
    cache = NSACache(cfg, 2, dtype=torch.float32)
    cache.prefill(*(torch.randn(2, 40, 2, 16) for _ in range(6)), lengths=torch.tensor([40, 29]))
    c64 = cache.as_dtype(torch.float64)
    for name in ("k_sel", "v_sel", "k_cmp", "v_cmp", "k_win", "v_win", "k_raw", "v_raw"):
        a, b = getattr(cache, name), getattr(c64, name)
        assert b.dtype == torch.float64 and torch.equal(b, a.double()), name
    assert c64.dtype == torch.float64 and torch.equal(c64.lengths, cache.lengths)
    before = cache.reads_total.clone()
    q, g = torch.randn(2, 4, 16, dtype=torch.float64), torch.rand(2, 4, dtype=torch.float64)
    nsa_decode(q, c64, g, g, g)
    assert c64.reads_total.sum() > 0 and torch.equal(cache.reads_total, before)
    assert cache.k_sel.dtype == torch.float32
