"""NSAConfig: every rule raises ConfigError naming the field, the rule and the value."""

from __future__ import annotations

import math
import re

import pytest

from nsa import ConfigError, NSAConfig

POSITIVE = ("l", "d", "l_sel", "n", "w", "hidden_size", "n_heads", "n_kv_heads", "d_k", "d_v")


def test_defaults_are_the_paper_values():
    c = NSAConfig()
    assert (c.l, c.d, c.l_sel, c.n, c.n_initial, c.n_local, c.w) == (32, 16, 64, 16, 1, 2, 512)
    assert c.phi == "mlp"


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("name", POSITIVE)
@pytest.mark.parametrize("value", [0, -3, 2.0, True, "8", None])
def test_sizes_must_be_positive_integers(name, value):
    with pytest.raises(ConfigError, match=rf"NSAConfig\.{name} must be a positive integer, "
                                          rf"got {re.escape(repr(value))}"):
        NSAConfig(**{name: value})


@pytest.mark.parametrize("name", ["n_initial", "n_local"])
@pytest.mark.parametrize("value", [-1, 1.0, False])
def test_forced_block_counts_must_be_non_negative_integers(name, value):
    with pytest.raises(ConfigError, match=rf"NSAConfig\.{name} must be an integer >= 0, "
                                          rf"got {re.escape(repr(value))}"):
        NSAConfig(**{name: value})


def test_zero_forced_blocks_are_allowed():
    c = NSAConfig(n_initial=0, n_local=0, n=1)
    assert (c.n_initial, c.n_local, c.n) == (0, 0, 1)


def test_d_must_divide_l():
    with pytest.raises(ConfigError, match=r"NSAConfig\.d=12 must divide l=32 \(l % d = 8\)"):
        NSAConfig(l=32, d=12, l_sel=48)


def test_d_must_divide_l_sel():
    with pytest.raises(ConfigError,
                       match=r"NSAConfig\.d=16 must divide l_sel=40 \(l_sel % d = 8\)"):
        NSAConfig(l=32, d=16, l_sel=40)


@pytest.mark.parametrize("l,d,l_sel", [(32, 16, 64), (16, 16, 16), (64, 16, 32), (8, 1, 3)])
def test_block_shapes_allowed(l, d, l_sel):
    NSAConfig(l=l, d=d, l_sel=l_sel)  # l = l' = d and l > l' are allowed


def test_n_covers_forced_blocks():
    with pytest.raises(ConfigError, match=r"NSAConfig\.n=2 must be >= n_initial \+ n_local = "
                                          r"1 \+ 2 = 3"):
        NSAConfig(n=2, n_initial=1, n_local=2)
    assert NSAConfig(n=3, n_initial=1, n_local=2).n == 3


def test_query_heads_divisible_by_kv_heads():
    with pytest.raises(ConfigError, match=r"NSAConfig\.n_heads=6 \(HQ\) must be divisible by "
                                          r"n_kv_heads=4 \(H\); HQ % H = 2"):
        NSAConfig(n_heads=6, n_kv_heads=4)
    assert NSAConfig(n_heads=16, n_kv_heads=1).G == 16
    assert NSAConfig(n_heads=6, n_kv_heads=3).G == 2


@pytest.mark.parametrize("phi", ["linear", "MLP", "", None])
def test_phi_kind(phi):
    with pytest.raises(ConfigError,
                       match=rf"NSAConfig\.phi must be one of \('mlp', 'mean'\), "
                             rf"got {re.escape(repr(phi))}"):
        NSAConfig(phi=phi)
    assert NSAConfig(phi="mean").phi == "mean"


def test_d_k_even_with_rope():
    with pytest.raises(ConfigError, match=r"NSAConfig\.d_k=63 must be even when rope=True"):
        NSAConfig(d_k=63)
    assert NSAConfig(d_k=63, rope=False).d_k == 63


@pytest.mark.parametrize("value", [0, -1.0])
def test_rope_base_positive(value):
    with pytest.raises(ConfigError, match=rf"NSAConfig\.rope_base must be > 0, got {value!r}"):
        NSAConfig(rope_base=value)


@pytest.mark.parametrize("name", ["phi_hidden", "gate_hidden"])
@pytest.mark.parametrize("value", [0, -4, 2.5])
def test_optional_hidden_sizes(name, value):
    with pytest.raises(ConfigError, match=rf"NSAConfig\.{name} must be None or a positive "
                                          rf"integer, got {value!r}"):
        NSAConfig(**{name: value})


@pytest.mark.parametrize("value", [0.0, -0.5, math.nan])
def test_scale_positive_or_none(value):
    with pytest.raises(ConfigError, match=rf"NSAConfig\.scale must be None or > 0, "
                                          rf"got {re.escape(repr(value))}"):
        NSAConfig(scale=value)


def test_from_dict_rejects_unknown_keys_and_round_trips():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['block', 'stride'\]; known: "):
        NSAConfig.from_dict({"l": 32, "stride": 16, "block": 64})
    c = NSAConfig(l=16, d=8, l_sel=32, n=4, w=64, n_heads=8, n_kv_heads=2, phi="mean")
    assert NSAConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match=r"NSAConfig\.d=5 must divide l=16"):
        NSAConfig.from_dict({**c.to_dict(), "d": 5})


def test_replace_validates():
    c = NSAConfig()
    assert c.replace(w=64).w == 64
    with pytest.raises(ConfigError, match=r"NSAConfig\.w must be a positive integer, got 0"):
        c.replace(w=0)


def test_frozen():
    with pytest.raises(AttributeError):
        NSAConfig().l = 8  # type: ignore[misc]


def test_derived_sizes():
    c = NSAConfig(l=32, d=16, l_sel=64, d_k=192, d_v=128, n_heads=64, n_kv_heads=4)
    assert c.G == 16
    assert c.softmax_scale == 192 ** -0.5
    assert c.replace(scale=0.25).softmax_scale == 0.25
    assert c.phi_hidden_size == 2 * 192 and c.replace(phi_hidden=7).phi_hidden_size == 7
    for t in range(0, 300):
        want = 0 if t < 32 else (t - 32) // 16 + 1
        assert c.num_compressed(t) == want
        assert c.num_sel_blocks(t) == math.ceil(t / 64)
    # spec: N_cmp(t) visible to query t is num_compressed(t + 1); 65536 tokens -> 4095
    assert c.num_compressed(65536) == (65536 - 32) // 16 + 1 == 4095
