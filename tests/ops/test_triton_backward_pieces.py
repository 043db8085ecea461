"""Pieces of the Triton backward tested alone (CPU; rowdots run under TRITON_INTERPRET=1).

* ``inverted_index``: the (block, position) pairs of a selection regrouped by block and
  cut into segments: every valid pair lands in exactly one segment of its block, in
  position order, no segment is longer than asked, unused segments are marked, and the
  per-block segment ranges are consecutive.
* ``branch_rowdots``: rowsum(dout * O_x) in float32 for one to three outputs, against
  float64, with a head dim that is not a power of two.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nsa.ops.flashbwd import branch_rowdots  # noqa: E402
from nsa.ops.reference import canonical_indices  # noqa: E402
from nsa.ops.selection.bwd_launch import inverted_index  # noqa: E402


def random_selection(gen, B, T, H, n, l_sel):
    """Canonical indices: per row up to n distinct causal blocks (ascending, -1 last)."""
    nb = -(-T // l_sel)
    idx = torch.full((B, T, H, n), -1, dtype=torch.int64)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                cand = torch.randperm(t // l_sel + 1, generator=gen)[:n]
                k = int(torch.randint(1, n + 1, (1,), generator=gen))
                idx[b, t, h, : min(k, len(cand))] = cand[:k]
    return canonical_indices(idx).to(torch.int32), nb


@pytest.mark.parametrize("seg_len", [1, 3, 16, 1000])
def test_inverted_index_covers_every_pair_once(seg_len):
    gen = torch.Generator().manual_seed(5)
    B, T, H, n, L = 2, 57, 2, 3, 8
    idx, nb = random_selection(gen, B, T, H, n, L)
    keys, seg_blk, seg_lo, seg_hi, seg_first, seg_count = inverted_index(idx, T, nb, seg_len)
    s_max = seg_blk.shape[-1]
    assert s_max == -(-(T * n) // seg_len) + nb
    for b in range(B):
        for h in range(H):
            want = {(int(j), t) for t in range(T) for j in idx[b, t, h] if j >= 0}
            got = []
            last_end = {}
            for s in range(s_max):
                j = int(seg_blk[b, h, s])
                lo, hi = int(seg_lo[b, h, s]), int(seg_hi[b, h, s])
                if j >= nb:
                    assert lo == hi == 0, "unused segment with entries"
                    continue
                assert 0 < hi - lo <= seg_len
                ts = [int(k) - j * T for k in keys[b, h, lo:hi]]
                assert all(0 <= t < T for t in ts) and ts == sorted(ts)
                if j in last_end:
                    assert lo == last_end[j], "segments of a block must be consecutive"
                last_end[j] = hi
                got += [(j, t) for t in ts]
            assert len(got) == len(set(got)) and set(got) == want
            for j in range(nb):
                first, count = int(seg_first[b, h, j]), int(seg_count[b, h, j])
                assert all(int(seg_blk[b, h, s]) == j for s in range(first, first + count))
                n_pairs = sum(1 for (jj, _t) in want if jj == j)
                assert count == -(-n_pairs // seg_len)


@pytest.mark.parametrize("n_out", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_branch_rowdots_match_float64(n_out, dtype):
    gen = torch.Generator().manual_seed(n_out)
    shape = (2, 37, 3, 24)  # head dim 24: padded to 32 inside the kernel
    dout = torch.randn(shape, generator=gen).to(dtype)
    outs = [torch.randn(shape, generator=gen).to(dtype) for _ in range(n_out)]
    got = branch_rowdots(dout, outs)
    assert len(got) == n_out
    for o, r in zip(outs, got, strict=True):
        ref = (dout.double() * o.double()).sum(-1)
        assert r.dtype == torch.float32 and r.shape == ref.shape
        assert torch.allclose(r.double(), ref, rtol=1e-5, atol=1e-5)


def test_branch_rowdots_rejects_four_outputs():
    x = torch.randn(1, 2, 1, 16)
    with pytest.raises(ValueError, match="at most 3"):
        branch_rowdots(x, [x, x, x, x])
