"""Per-kernel CUDA time of one NSA decode step (torch.profiler), paper shape, bf16, for a
few launch variants (split size, warps of the first stage)."""

from __future__ import annotations

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from nsa import NSAConfig
from nsa.cache import NSACache
from nsa.ops.decode import launch, nsa_decode


def one(S: int, B: int) -> str:
    cfg = NSAConfig(n_heads=64, n_kv_heads=4, d_k=128, d_v=128)
    cache = NSACache(cfg, B, device="cuda", dtype=torch.bfloat16, max_len=S)
    cache.prefill(*(torch.randn(B, S, 4, 128, device="cuda", dtype=torch.bfloat16)
                    for _ in range(6)))
    q = torch.randn(B, 64, 128, device="cuda", dtype=torch.bfloat16)
    g = [torch.rand(B, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
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
        us = getattr(ev, "device_time", None) or ev.cuda_time
        if ev.key.startswith("_dec"):
            parts.append(f"{ev.key[5:]}={us:.1f}")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()
    torch.cuda.current_stream().wait_stream(s)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        run()
    t = triton.testing.do_bench(gr.replay, return_mode="median") * 1e3
    return f"graph {t:6.1f} us  " + " ".join(parts)


def main() -> None:
    print(torch.cuda.get_device_name())
    for bc, warps in ((64, 4), (64, 8), (128, 8), (32, 4)):
        launch.BLOCK_C, launch.STAGE1_WARPS = bc, warps
        for S, B in ((4096, 1), (65536, 1), (65536, 16)):
            print(f"BLOCK_C={bc:<4} warps={warps}  S={S:<6} B={B:<3} {one(S, B)}")


if __name__ == "__main__":
    main()
