"""One launch of the selected forward per load path at T = 16k, for `ncu` to profile.

    ncu --clock-control none -k regex:_sel_fwd --section SpeedOfLight --section Occupancy \
        --section WarpStateStats python scripts/gpu_sel_ncu.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    import torch

    from nsa import NSAConfig
    from nsa.ops.compression import cmp_forward
    from nsa.ops.selection import sel_forward, select_topn

    T, HQ, H, D = int(os.environ.get("T", "16384")), 64, 4, 128
    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").to(torch.bfloat16)  # noqa: E731
    q, k, v = r(1, T, HQ, D), r(1, T, H, D), r(1, T, H, D)
    kc, vc = r(1, (T - 32) // 16 + 1, H, D), r(1, (T - 32) // 16 + 1, H, D)
    _, scores = cmp_forward(q, kc, vc, cfg, D ** -0.5)
    idx = select_topn(scores, T, kc.shape[1], cfg)
    for desc in (False, True):
        sel_forward(q, k, v, idx, cfg, D ** -0.5, use_desc=desc, mode="group")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
