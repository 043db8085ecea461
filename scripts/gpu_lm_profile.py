"""Profile a few eager decode steps of the tiny LM (dense or NSA) at a long context: the
top operators by CPU and CUDA time, to see where an eager step goes.

    python scripts/gpu_lm_profile.py --attention dense --context 32768
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from nsa import NSAConfig
    from nsa.model import TinyLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--attention", default="dense")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cprofile", action="store_true",
                    help="also cProfile's table (internal time) of the same steps")
    a = ap.parse_args()
    cfg = NSAConfig(hidden_size=1024, n_heads=16, n_kv_heads=4, d_k=64, d_v=64)
    torch.manual_seed(0)
    m = TinyLM(cfg, n_layers=4, attention=a.attention).cuda().to(torch.bfloat16).eval()
    prompt = torch.randint(0, 256, (1, a.context), device="cuda")
    caches = m.new_caches(1, max_len=a.context + a.steps * 4 + 8)
    with torch.no_grad():
        tok = m(prompt, caches=caches)[:, -1].argmax(-1)
        for _ in range(3):
            tok = m.decode(tok, caches).argmax(-1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(a.steps):
                tok = m.decode(tok, caches).argmax(-1)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8))
    if a.cprofile:
        import cProfile
        import pstats
        import time

        with torch.no_grad():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                tok = m.decode(tok, caches).argmax(-1)
            torch.cuda.synchronize()
            print(f"eager step {1e3 * (time.perf_counter() - t0) / a.steps:.3f} ms "
                  f"({a.attention}, {torch.cuda.get_device_name()})")
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(a.steps):
                tok = m.decode(tok, caches).argmax(-1)
            torch.cuda.synchronize()
            pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(30)
        pstats.Stats(pr).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
