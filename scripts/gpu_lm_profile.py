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
    ap.add_argument("--graph", action="store_true",
                    help="NSA only: profile CUDA-graph replays of the step instead (the GPU "
                         "kernels of one captured step and the replay time)")
    ap.add_argument("--no-pdl", action="store_true",
                    help="launch the decode kernels without programmatic dependent launch "
                         "(a PDL kernel's profiled time includes its wait for the previous one)")
    a = ap.parse_args()
    if a.no_pdl:
        from nsa.ops.decode import launch

        launch.PDL = False
    if a.graph:
        return graph_profile(a)
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


def graph_profile(a) -> None:
    """Kernels of one graph-captured decode step of the NSA tiny LM, and its replay time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from nsa import NSAConfig
    from nsa.graph import GraphedDecode
    from nsa.model import TinyLM

    cfg = NSAConfig(hidden_size=1024, n_heads=16, n_kv_heads=4, d_k=64, d_v=64)
    torch.manual_seed(0)
    m = TinyLM(cfg, n_layers=4, attention="nsa").cuda().to(torch.bfloat16).eval()
    prompt = torch.randint(0, 256, (1, a.context), device="cuda")
    caches = m.new_caches(1, max_len=a.context + 4 * a.steps + 128, static=True)
    with torch.no_grad():
        tok = m(prompt, caches=caches)[:, -1].argmax(-1)
        step = GraphedDecode(lambda x: m.decode(x, caches), caches)
        for _ in range(4 + 2 * cfg.d):  # both graphs (with and without phi) captured
            tok = step(tok).argmax(-1)
        torch.cuda.synchronize()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        ev[0].record()
        for _ in range(a.steps):
            step.graph.replay()
        ev[1].record()
        torch.cuda.synchronize()
        replay = ev[0].elapsed_time(ev[1]) / a.steps
        import time
        t0 = time.perf_counter()
        for _ in range(a.steps):
            tok = step(tok).argmax(-1)
        torch.cuda.synchronize()
        loop = (time.perf_counter() - t0) / a.steps * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(a.steps):
                step.graph.replay()
            torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name()}: NSA tiny LM, context {a.context}, graph replay "
          f"{replay:.3f} ms per step (GPU, back to back), generation loop {loop:.3f} ms per "
          f"token ({1e3 / loop:.0f} tokens/s)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40))


if __name__ == "__main__":
    main()
