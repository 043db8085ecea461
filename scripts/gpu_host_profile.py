"""Host (CPU) time of one NSA call: where the Python and the launches spend it.

    python scripts/gpu_host_profile.py --T 16384 --G 1
    python scripts/gpu_host_profile.py --T 65536 --G 4 --mode fwd+bwd

Paper shape but for the group size (H=4, HQ=4G, d=128, bf16). Prints the median wall
time of a call that only queues work (the GPU is synchronised before, not after), the
GPU time of the same call, and torch.profiler's CPU-side table (self CPU time) of ten
queued calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--G", type=int, default=1)
    ap.add_argument("--mode", default="fwd", choices=["fwd", "fwd+bwd"])
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--split", action="store_true",
                    help="also the host per call with Triton's launches skipped, and with "
                         "Triton not called at all (kernels stubbed: outputs not computed)")
    ap.add_argument("--cprofile", action="store_true",
                    help="also cProfile's table (internal time) of 50 queued calls")
    args = ap.parse_args()
    import gpu_check_forward as cf  # scripts/ is sys.path[0] when run as a script
    import torch
    from torch.profiler import ProfilerActivity, profile

    from nsa import NSAConfig, nsa_attention

    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    H, d = 4, 128
    inp = cf.make(args.T, H * args.G, H, d, d, cfg, torch.bfloat16)
    if args.mode == "fwd+bwd":
        for k in ("q", "k_sel", "v_sel", "k_win", "v_win", "k_cmp", "v_cmp"):
            inp[k].requires_grad_(True)
        dout = torch.randn_like(inp["q"])

    def call():
        out = nsa_attention(**inp, config=cfg, backend="triton")
        if args.mode == "fwd+bwd":
            out.backward(dout)
        return out

    def host_walls(n):
        """CPU time to queue one call, n times, each after the GPU went idle (ms)."""
        ws = []
        for _ in range(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            call()
            ws.append(1e3 * (time.perf_counter() - t0))
        return ws

    for _ in range(3):
        call()
    walls = host_walls(20)
    gpu = cf.bench(call)
    # GPU work alone: the same call replayed from a CUDA graph
    graph = cf.graph_bench(call) if args.mode == "fwd" else float("nan")
    print(f"GPU: {torch.cuda.get_device_name()}; T={args.T} G={args.G} {args.mode}: "
          f"host per call {statistics.median(walls):.3f} ms (min {min(walls):.3f}), "
          f"do_bench {gpu:.3f} ms, graph replay {graph:.3f} ms", flush=True)
    if args.split:
        from triton.runtime.jit import JITFunction

        def host_ms():
            return statistics.median(host_walls(30))

        real_run = JITFunction.run
        # warmup=True: binding, specialisation and the cache lookup, but no launch
        JITFunction.run = lambda self, *a, grid, warmup, **k: real_run(self, *a, grid=grid,
                                                                       warmup=True, **k)
        no_launch = host_ms()
        JITFunction.run = lambda self, *a, grid, warmup, **k: None
        no_triton = host_ms()
        JITFunction.run = real_run
        full = host_ms()
        print(f"host per call: {full:.3f} ms; Triton's launches skipped {no_launch:.3f} ms; "
              f"Triton not called {no_triton:.3f} ms (launches {full - no_launch:.3f}, "
              f"Triton's Python {no_launch - no_triton:.3f}, the rest {no_triton:.3f})",
              flush=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            call()
    torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            call()
        torch.cuda.synchronize()
    print("GPU kernels of ten calls:")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows,
                                    max_name_column_width=60))
    if args.cprofile:
        cprofile_tables(call, 50, args.rows)


def cprofile_tables(call, n: int, rows: int) -> None:
    """cProfile's tables (internal, then cumulative time; ``rows`` lines each) of n
    queued calls of ``call``."""
    import cProfile
    import pstats

    import torch

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        call()
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(rows)
    pstats.Stats(pr).sort_stats("cumulative").print_stats(rows)


if __name__ == "__main__":
    main()
