"""A few NSA decode steps (paper shape, bf16) for `ncu` to profile one step's kernels.

    S=65536 B=16 ncu --clock-control none -k regex:_dec_p --launch-skip 12 --launch-count 4 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section LaunchStats python scripts/gpu_decode_ncu.py

The first three steps warm up (and compile); the fourth is the one to profile (with four
kernels per step, skip 12 launches). S: context length, B: batch (environment).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    import torch

    from nsa import NSAConfig
    from nsa.cache import NSACache
    from nsa.ops.decode import nsa_decode

    S, B = int(os.environ.get("S", "65536")), int(os.environ.get("B", "16"))
    cfg = NSAConfig(n_heads=64, n_kv_heads=4, d_k=128, d_v=128)
    cache = NSACache(cfg, B, device="cuda", dtype=torch.bfloat16, max_len=S)
    cache.prefill(*(torch.randn(B, S, 4, 128, device="cuda", dtype=torch.bfloat16)
                    for _ in range(6)))
    q = torch.randn(B, 64, 128, device="cuda", dtype=torch.bfloat16)
    g = [torch.rand(B, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    for _ in range(4):
        nsa_decode(q, cache, *g, backend="triton")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
