"""Quick decode timing on a GPU: NSA Triton decode step vs dense SDPA decode, both
replayed from CUDA graphs, paper shape (HQ=64, H=4, d=128, bf16). Prints a table."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
import triton

from nsa import NSAConfig
from nsa.cache import NSACache
from nsa.ops.decode import nsa_decode


def graphed(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def bench(S: int, B: int, HQ=64, H=4, D=128, dtype=torch.bfloat16):
    cfg = NSAConfig(n_heads=HQ, n_kv_heads=H, d_k=D, d_v=D)
    dev = "cuda"
    cache = NSACache(cfg, B, device=dev, dtype=dtype, max_len=S, static=False)
    raw = [torch.randn(B, S, H, D, device=dev, dtype=dtype) for _ in range(6)]
    cache.prefill(*raw)
    q = torch.randn(B, HQ, D, device=dev, dtype=dtype)
    g = [torch.rand(B, HQ, device=dev, dtype=dtype) for _ in range(3)]
    run = lambda: nsa_decode(q, cache, *g, backend="triton")  # noqa: E731
    run()
    t_eager = triton.testing.do_bench(run, return_mode="median")
    gr = graphed(run)
    t_nsa = triton.testing.do_bench(gr.replay, return_mode="median")
    qd = q[:, :, None]  # [B, HQ, 1, D]
    kd = raw[0].transpose(1, 2)
    vd = raw[1].transpose(1, 2)
    dense = lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True)  # noqa: E731
    gd = graphed(dense)
    t_dense = triton.testing.do_bench(gd.replay, return_mode="median")
    reads = sum(int(v[0, 0]) for v in cache.last_reads.values())
    return t_nsa * 1e3, t_eager * 1e3, t_dense * 1e3, reads


def main():
    print(torch.cuda.get_device_name(), file=sys.stderr)
    print(f"{'S':>7} {'B':>3} {'nsa graph us':>13} {'nsa eager us':>13} {'dense us':>9} "
          f"{'speedup':>8} {'tokens read':>12}")
    for B in (1, 16):
        for S in (4096, 16384, 65536):
            tn, te, td, reads = bench(S, B)
            print(f"{S:>7} {B:>3} {tn:>13.1f} {te:>13.1f} {td:>9.1f} {td / tn:>8.2f} "
                  f"{reads:>12}")


if __name__ == "__main__":
    main()
