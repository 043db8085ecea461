"""Per-kernel CUDA time of one NSA decode step (torch.profiler), paper shape, bf16, and
the CUDA-graph replay time of the whole step, for launch variants (see
gpu_decode_bench.set_variant).

    python scripts/gpu_decode_profile.py auto t1 st2
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from nsa import NSAConfig  # noqa: E402
from nsa.cache import NSACache  # noqa: E402
from nsa.ops.decode import launch, nsa_decode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check_forward import graph_bench  # noqa: E402
from gpu_decode_bench import KNOBS, set_variant  # noqa: E402


def one(S: int, B: int, gates: str = "cmp,sel,win") -> str:
    cfg = NSAConfig(n_heads=64, n_kv_heads=4, d_k=128, d_v=128)
    cache = NSACache(cfg, B, device="cuda", dtype=torch.bfloat16, max_len=S)
    cache.prefill(*(torch.randn(B, S, 4, 128, device="cuda", dtype=torch.bfloat16)
                    for _ in range(6)))
    q = torch.randn(B, 64, 128, device="cuda", dtype=torch.bfloat16)
    g = [torch.rand(B, 64, device="cuda", dtype=torch.bfloat16) if name in gates else None
         for name in ("cmp", "sel", "win")]
    run = lambda: nsa_decode(q, cache, *g, backend="triton")  # noqa: E731
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            run()
        torch.cuda.synchronize()
    parts = []
    for ev in prof.key_averages():
        us = ev.device_time
        if ev.key.startswith("_dec"):
            parts.append(f"{ev.key[5:]}={us:.1f}")
    t = graph_bench(run) * 1e3
    return f"graph {t:6.1f} us  " + " ".join(sorted(parts))


def main() -> None:
    print(torch.cuda.get_device_name())
    default = tuple(getattr(launch, k) for k in KNOBS), dict(launch.WARPS)
    for v in sys.argv[1:] or ["auto"]:
        set_variant(v, default)
        for S, B in ((4096, 1), (65536, 1), (4096, 16), (65536, 16)):
            print(f"{v:<10} S={S:<6} B={B:<3} "
                  f"{one(S, B, os.environ.get('GATES', 'cmp,sel,win'))}", flush=True)
    set_variant("auto", default)


if __name__ == "__main__":
    main()
