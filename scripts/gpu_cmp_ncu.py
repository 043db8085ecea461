"""Launches of the compressed forward for `ncu` to profile: attention alone (pass 1), then
attention with the block scores (both passes, fused), paper shape at T (default 32k).

    ncu --clock-control none -k regex:_cmp_fwd --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section SchedulerStats python scripts/gpu_cmp_ncu.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    import torch

    from nsa import NSAConfig, compress_mean
    from nsa.ops.compression import cmp_forward

    T, HQ, H, D = int(os.environ.get("T", "32768")), 64, 4, 128
    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").to(torch.bfloat16)  # noqa: E731
    q = r(1, T, HQ, D)
    kc, vc = compress_mean(r(1, T, H, D), cfg.l, cfg.d), compress_mean(r(1, T, H, D), cfg.l,
                                                                       cfg.d)
    for scores in (False, True):
        cmp_forward(q, kc, vc, cfg, D ** -0.5, want_scores=scores)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
