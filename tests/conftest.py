"""Shared fixtures: a seeded generator and a builder of fresh random NSA inputs.

Inputs are random normal (never zeros, which hide wrong masks and wrong gathers);
gates are uniform in (0.01, 0.99), strictly inside (0, 1), so every branch counts.
Nothing here queries a device at import time.
"""

from __future__ import annotations

import pytest
import torch

SEED = 20250218


def num_compressed(T: int, l: int, d: int) -> int:
    """Compressed tokens that exist after T raw tokens (spec: floor((T - l)/d) + 1, or 0)."""
    return 0 if T < l else (T - l) // d + 1


def build_inputs(gen: torch.Generator, cfg, B: int, T: int, HQ: int, H: int, d_k: int,
                 d_v: int, *, dtype: torch.dtype = torch.float64, device: str = "cpu",
                 n_cmp: int | None = None, extra_cmp: int = 0,
                 gates: tuple[str, ...] = ("cmp", "sel", "win"),
                 requires_grad: bool = False) -> dict[str, torch.Tensor | None]:
    """Keyword arguments for nsa_attention (all but config): q, k/v per branch, gates.

    k_cmp/v_cmp hold ``n_cmp`` compressed tokens (default: as many as T raw tokens make,
    plus ``extra_cmp`` that no query may ever see). Branches not in ``gates`` get None.
    """
    N = num_compressed(T, cfg.l, cfg.d) + extra_cmp if n_cmp is None else n_cmp

    def randn(*shape):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype,
                                                                      device=device)
        return x.requires_grad_(requires_grad)

    def gate():
        x = (0.01 + 0.98 * torch.rand(B, T, HQ, generator=gen, dtype=torch.float64))
        return x.to(dtype=dtype, device=device).requires_grad_(requires_grad)

    out = {
        "q": randn(B, T, HQ, d_k),
        "k_sel": randn(B, T, H, d_k), "v_sel": randn(B, T, H, d_v),
        "k_win": randn(B, T, H, d_k), "v_win": randn(B, T, H, d_v),
        "k_cmp": randn(B, N, H, d_k), "v_cmp": randn(B, N, H, d_v),
    }
    for branch in ("cmp", "sel", "win"):
        out[f"g_{branch}"] = gate() if branch in gates else None
    return out


@pytest.fixture
def rng() -> torch.Generator:
    """A CPU generator with a fixed seed (fresh per test, so tests are order independent)."""
    return torch.Generator().manual_seed(SEED)


@pytest.fixture
def make_inputs(rng):
    """``make_inputs(cfg, B, T, HQ, H, d_k, d_v, **options)`` -> nsa_attention kwargs.

    See :func:`build_inputs` for the options; successive calls draw fresh values.
    """

    def make(cfg, B, T, HQ, H, d_k, d_v, **kwargs):
        return build_inputs(rng, cfg, B, T, HQ, H, d_k, d_v, **kwargs)

    return make


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread: the oracle-sized tensors are tiny, and on a busy
    2-core machine waking a thread pool costs more than the work (10 ms per matmul)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
