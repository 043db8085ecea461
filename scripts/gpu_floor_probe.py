"""Hardware floors the speed targets are checked against, measured on this GPU.

    python scripts/gpu_floor_probe.py

Prints, each from the card it runs on:
- the read rate of a plain streaming kernel over a buffer that fits in L2 (re-read many
  times) and over one that does not (HBM);
- the GPU time of CUDA-graph replays of 1, 2 and 4 empty kernels launched one after the
  other (the launch floor of a step of that many dependent kernels), with and without
  programmatic dependent launch where Triton compiles it;
- a graph replay of one kernel that only reads the bytes of a 64k-context decode step's
  compressed cache (paper shape, batch 1 and 16), and one that reads all the bytes the
  step's floor counts;
- dense SDPA decode at 64k context (paper shape, batch 1 and 16), graph-replayed, as in
  `nsa decode`, and the times 8x / 10x of it leave.
"""

from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


@triton.jit
def _read_kernel(X, OUT, N, ITERS, BLOCK: tl.constexpr):
    """Sum of X[0:N] (grid-strided, BLOCK elements per step), ITERS times over."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for _ in range(ITERS):
        for start in range(pid * BLOCK, N, nprog * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(X + offs, mask=offs < N, other=0.0).to(tl.float32)
    tl.store(OUT + pid, tl.sum(acc, 0))


@triton.jit
def _nop_kernel(OUT, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    if tl.program_id(0) < 0:  # never true: keeps the argument used
        tl.store(OUT, 0.0)


READ_CONFIGS = [(per_sm, block, warps) for per_sm in (1, 2, 4, 8, 16)
                for block, warps in ((2048, 4), (2048, 8), (8192, 8))]


def read_fn(x, iters: int, programs: int, block: int = 2048, warps: int = 8):
    out = torch.empty(programs, device="cuda", dtype=torch.float32)
    return lambda: _read_kernel[(programs,)](x, out, x.numel(), iters, BLOCK=block,
                                             num_warps=warps)


def best_read(nbytes: int, iters: int, sms: int, timer) -> tuple[float, str]:
    """Shortest time (ms) over READ_CONFIGS of reading nbytes iters times, and its config."""
    x = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    best = (float("inf"), "")
    for per_sm, block, warps in READ_CONFIGS:
        t = timer(read_fn(x, iters, sms * per_sm, block, warps))
        best = min(best, (t, f"{per_sm}/SM, {block} elements, {warps} warps"))
    return best


def main() -> None:
    import torch.nn.functional as F
    from gpu_check_forward import bench  # scripts/ is sys.path[0] when run as a script
    from gpu_check_forward import graph_bench as graph_ms

    from nsa.backends import triton_has_pdl

    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    l2 = getattr(props, "L2_cache_size", 0)
    print(f"GPU: {torch.cuda.get_device_name()}, {sms} SMs, L2 {l2 / 2**20:.0f} MiB; "
          f"torch {torch.__version__}, Triton {triton.__version__}", flush=True)
    rows = []

    # read rates: a buffer of ~40% of L2 re-read 200 times, and 4 GB read once
    small = int(0.4 * l2) // 4096 * 4096 if l2 else 16 << 20
    for name, nbytes, iters in (("L2-resident read", small, 200), ("HBM read", 4 << 30, 1)):
        t, cfg = best_read(nbytes, iters, sms, bench)
        rows.append((f"{name} ({nbytes / 2**20:.0f} MiB x {iters})",
                     f"{nbytes * iters / t / 1e9:.2f} TB/s ({cfg})"))

    # launch floors: graphs of k empty kernels in a row
    out = torch.empty(1, device="cuda")
    pdl_opts = [False] + ([True] if triton_has_pdl() else [])
    for pdl in pdl_opts:
        for k in (1, 2, 4):
            def steps(k=k, pdl=pdl):
                for _ in range(k):
                    _nop_kernel[(sms,)](out, PDL=pdl, num_warps=4, launch_pdl=pdl)
            rows.append((f"graph of {k} empty kernel(s){', PDL' if pdl else ''}",
                         f"{1e3 * graph_ms(steps):.1f} us"))

    # decode bytes at 64k context, paper shape (H = 4 KV heads, d_k = d_v = 128, bf16)
    H, d, S = 4, 128, 65536
    n_cmp = (S - 32) // 16 + 1
    per_seq_cmp = n_cmp * H * 2 * d * 2
    per_seq_all = (n_cmp + 16 * 64 + 512) * H * 2 * d * 2
    for B in (1, 16):
        for what, nb in (("compressed cache", per_seq_cmp),
                         ("every byte of the floor", per_seq_all)):
            t, cfg = best_read(B * nb, 1, sms, graph_ms)
            rows.append((f"one kernel reading the {what}, B={B} ({B * nb / 1e6:.1f} MB)",
                         f"{1e3 * t:.1f} us ({cfg})"))
        q = torch.randn(B, 64, 1, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, H, S, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        t = graph_ms(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        target = 8 if B == 1 else 10
        rows.append((f"dense SDPA decode, 64k, B={B}",
                     f"{1e3 * t:.1f} us (/{target}: {1e3 * t / target:.1f} us)"))
        del q, k, v
    w = max(len(r[0]) for r in rows)
    for name, val in rows:
        print(f"{name:<{w}}  {val}")


if __name__ == "__main__":
    main()
