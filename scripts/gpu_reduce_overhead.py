"""Small prefill calls eagerly and under torch.compile(mode="reduce-overhead").

    python scripts/gpu_reduce_overhead.py
    python scripts/gpu_reduce_overhead.py --cases 16384:1,16384:2,8192:16

Paper shape but for the group size (H=4, HQ=4G, d=128, bf16, n=16, w=512). For each
(T, G): the NSA forward eagerly, compiled with mode="reduce-overhead" (inductor's CUDA
graphs around the op: the host's Python and launches leave the timed path), and replayed
from our own CUDA graph (`nsa prefill`'s graph column); dense SDPA eagerly, as
`nsa prefill` times it (`enable_gqa=True`). Two timings
each: do_bench's median (ms) and back-to-back calls (wall ms per call over 50 queued
calls, the rate a loop of such calls gets when the host is the bottleneck). The compiled
output is checked bit for bit against the eager one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def per_call(fn, n: int = 50) -> float:
    """Wall ms per call of n calls queued back to back (synchronised before and after)."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="16384:1,16384:2,16384:4,8192:16,16384:16",
                    help="comma list of T:G")
    args = ap.parse_args()
    import gpu_check_forward as cf  # scripts/ is sys.path[0] when run as a script
    import torch

    from nsa import NSAConfig

    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    H, d = 4, 128
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| T | G | NSA eager do_bench | NSA compiled do_bench | NSA own graph | NSA eager "
          "per call | NSA compiled per call | dense eager do_bench | dense / NSA eager | "
          "dense / NSA compiled |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        T, G = map(int, case.split(":"))
        row = time_case(cf, cfg, T, H, G, d)
        print(f"| {T} | {G} | {row['e']:.3f} | {row['c']:.3f} | {row['g']:.3f} | "
              f"{row['ep']:.3f} | {row['cp']:.3f} | {row['de']:.3f} | "
              f"{row['de'] / row['e']:.2f}x | {row['de'] / row['c']:.2f}x |", flush=True)


def time_case(cf, cfg, T: int, H: int, G: int, d: int) -> dict[str, float]:
    """One (T, G) row: eager, compiled and graph-replayed NSA, dense SDPA (ms)."""
    import torch
    import torch.nn.functional as F

    from nsa import nsa_attention

    inp = cf.make(T, H * G, H, d, d, cfg, torch.bfloat16)

    def fn(**x):
        return nsa_attention(**x, config=cfg, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    # dense as `nsa prefill` runs it: [B, HQ, T, D], the KV heads shared by enable_gqa
    q, k, v = (inp[n].transpose(1, 2) for n in ("q", "k_sel", "v_sel"))
    with torch.no_grad():
        want = fn(**inp)
        for _ in range(3):
            got = compiled(**inp)
        assert torch.equal(got, want), f"T={T} G={G}: compiled output differs"

        def eager():
            return fn(**inp)

        def comp():
            return compiled(**inp)

        def dense():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True,  # equal lengths
                                                  enable_gqa=True)

        return dict(e=cf.bench(eager), c=cf.bench(comp), g=cf.graph_bench(eager),
                    ep=per_call(eager), cp=per_call(comp), de=cf.bench(dense))

if __name__ == "__main__":
    main()
