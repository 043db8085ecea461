"""Which dense decode step can a CUDA graph capture (device-side length, static capacity),
and how fast is it against eager SDPA over the exact length? Tiny-LM attention shape by
default (HQ=16, H=4, d=64, bf16, batch 1).

    python scripts/gpu_dense_graph_probe.py --S 32768
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import triton

from nsabench.runners.common import graphed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=32768)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--flex", action="store_true")
    a = ap.parse_args()
    B, HQ, H, D, S = a.B, 16, 4, 64, a.S
    cap = S + 512
    G = HQ // H
    dev, dt = "cuda", torch.bfloat16
    k = torch.randn(B, H, cap, D, device=dev, dtype=dt)
    v = torch.randn(B, H, cap, D, device=dev, dtype=dt)
    q = torch.randn(B, HQ, 1, D, device=dev, dtype=dt)
    pos = torch.tensor([S - 1], device=dev)
    scale = D ** -0.5
    ref = F.scaled_dot_product_attention(q, k[:, :, :S], v[:, :, :S], enable_gqa=True,
                                         scale=scale)
    ar = torch.arange(cap, device=dev)

    def bmm_step():
        qh = q.view(B * H, G, D)
        s = torch.bmm(qh, k.view(B * H, cap, D).transpose(1, 2), out_dtype=torch.float32)
        s = s.mul_(scale).masked_fill_(ar > pos, float("-inf"))
        p = torch.softmax(s, dim=-1).to(dt)
        return torch.bmm(p, v.view(B * H, cap, D)).view(B, HQ, 1, D)

    rows = {}
    eager = lambda: F.scaled_dot_product_attention(  # noqa: E731
        q, k[:, :, :S], v[:, :, :S], enable_gqa=True, scale=scale)
    rows["sdpa eager (exact length)"] = (triton.testing.do_bench(eager) * 1e3, 0.0)
    rows["sdpa graph (exact length, fixed)"] = (
        triton.testing.do_bench(graphed(eager, q.device)) * 1e3, 0.0)
    o = bmm_step()
    rel = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
    rows["bmm fp32 scores + masked softmax, graph"] = (
        triton.testing.do_bench(graphed(bmm_step, q.device)) * 1e3, rel)
    if a.flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

        def score_mod(score, b, h, qi, kv):
            return torch.where(kv <= pos[0], score, -float("inf"))

        def flex_step():
            return flex(q, k, v, score_mod=score_mod, enable_gqa=True, scale=scale)

        t0 = time.perf_counter()
        o = flex_step()
        torch.cuda.synchronize()
        print(f"flex compile {time.perf_counter() - t0:.1f} s")
        rel = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
        rows["flex (score_mod mask), graph"] = (
            triton.testing.do_bench(graphed(flex_step, q.device)) * 1e3, rel)
    print(f"{torch.cuda.get_device_name()}: dense decode B={B} HQ={HQ} H={H} d={D} S={S} "
          f"capacity {cap}")
    for name, (t, rel) in rows.items():
        print(f"{name:<42} {t:8.1f} us   rel err vs SDPA {rel:.1e}")


if __name__ == "__main__":
    main()
