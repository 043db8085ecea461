"""The tiny LM: cached decode equals the full forward for NSA and dense attention, it
trains, and bad arguments are named."""

from __future__ import annotations

import pytest
import torch

from nsa import NSAConfig
from nsa.model import TinyLM

CFG = NSAConfig(l=8, d=4, l_sel=16, n=3, w=20, hidden_size=32, n_heads=4, n_kv_heads=2,
                d_k=8, d_v=8)


@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_cached_decode_equals_forward(attention):
    torch.manual_seed(0)
    m = TinyLM(CFG, n_layers=2, attention=attention, backend="reference").double()
    tok = torch.randint(0, 256, (2, 57))
    full = m(tok)
    caches = m.new_caches(2)
    pre = m(tok[:, :30], caches=caches)
    torch.testing.assert_close(pre, full[:, :30], rtol=0, atol=1e-10)
    steps = torch.stack([m.decode(tok[:, 30 + i], caches) for i in range(27)], dim=1)
    torch.testing.assert_close(steps, full[:, 30:], rtol=0, atol=1e-10)
    # greedy generation continues from the prompt with the same logits
    gen = m.generate(tok[:, :30], 3)
    assert torch.equal(gen[:, 0], full[:, 29].argmax(-1))


@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_loss_decreases_on_a_repeating_text(attention):
    torch.manual_seed(1)
    m = TinyLM(CFG, n_layers=1, attention=attention, backend="reference")
    text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 3))[None]
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = m.loss(text)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first


def test_bad_arguments():
    with pytest.raises(ValueError, match="attention must be 'nsa' or 'dense', got 'sparse'"):
        TinyLM(CFG, attention="sparse")
    with pytest.raises(ValueError, match="n_layers must be positive"):
        TinyLM(CFG, n_layers=0)
    with pytest.raises(ValueError, match=r"tokens must be an int tensor \[B, T\]"):
        TinyLM(CFG)(torch.zeros(2, 3, 4, dtype=torch.long))
