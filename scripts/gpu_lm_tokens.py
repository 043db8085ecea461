"""Tokens/s of the tiny LM generating after a long prompt: NSA (Triton decode, eager and
CUDA-graph replay) against dense attention (SDPA over the KV cache), same model sizes.

    python scripts/gpu_lm_tokens.py --context 32768 --new 256
"""

from __future__ import annotations

import argparse

import torch

from nsa import NSAConfig
from nsa.model import TinyLM
from nsabench.runners.generate import tokens_per_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--variants", default="main", choices=["main", "all"],
                    help="all: also NSA without the fused decode projection/append and "
                         "the graph without programmatic dependent launch")
    a = ap.parse_args()
    cfg = NSAConfig(hidden_size=1024, n_heads=16, n_kv_heads=4, d_k=64, d_v=64)
    torch.manual_seed(0)
    prompt = torch.randint(0, 256, (a.batch, a.context), device="cuda")
    print(f"{torch.cuda.get_device_name()}: TinyLM 4 layers, hidden 1024, HQ=16, H=4, d=64, "
          f"bf16, batch {a.batch}, context {a.context}, {a.new} new tokens")
    from nsa.ops.decode import launch

    rows = []
    variants = [("dense", "dense", False, True, None)]
    if a.variants == "all":  # the paths before the fused decode and without PDL too
        variants += [("nsa, unfused", "nsa", False, False, None),
                     ("nsa (CUDA graph), unfused", "nsa", True, False, None),
                     ("nsa (CUDA graph), no PDL", "nsa", True, True, False)]
    variants += [("nsa", "nsa", False, True, None), ("nsa (CUDA graph)", "nsa", True, True, None)]
    for name, att, graph, fused, pdl in variants:
        torch.manual_seed(0)
        m = TinyLM(cfg, n_layers=4, attention=att).cuda().to(torch.bfloat16).eval()
        for blk in m.blocks:
            blk.attn.fused_decode = fused
        launch.PDL = pdl
        rows.append((name, tokens_per_s(m, prompt, a.new, graph, torch.device("cuda"))[0]))
        launch.PDL = None
        del m
        torch.cuda.empty_cache()
    dense = rows[0][1]
    print(f"{'model':<28} {'tokens/s':>10} {'vs dense':>9}")
    for name, tps in rows:
        print(f"{name:<28} {tps:>10.1f} {tps / dense:>8.2f}x")


if __name__ == "__main__":
    main()
