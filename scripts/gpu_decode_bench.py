"""Decode timing on a GPU: the NSA Triton decode step against dense SDPA decode, both
replayed from CUDA graphs, paper shape (HQ=64, H=4, d=128, bf16). Checks each NSA output
against the float64 reference decode step first (relative error, selected blocks equal),
then prints a table.

    python scripts/gpu_decode_bench.py                  # the table
    python scripts/gpu_decode_bench.py --variants auto,t1,t4+p3w2  # see set_variant
    python scripts/gpu_decode_bench.py --compare pkg    # another launcher side by side
                                                        # (pkg.launch.triton_decode)
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from nsa import NSAConfig  # noqa: E402
from nsa.cache import NSACache  # noqa: E402
from nsa.ops.decode import launch, nsa_decode  # noqa: E402


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


KNOBS = ("TILES_PER_SM", "SPLIT_TILES", "SEL_PER_SM", "P1_STAGES", "SPLIT_SCORES", "PDL",
         "SUM_SCORES", "BLOCK_C", "TOPK")


def set_variant(v: str, default) -> None:
    """"auto" (the launcher's defaults) or settings joined by "+": "t1" compressed
    splits of one tile, "tN" splits of N tiles, "s1" one selected block per program,
    "p3w2" two warps for kernel p3, "st2" two pipeline stages in p1, "dot" block scores
    through three bf16 dots with the overlap matrix instead of per-block sums, "x3" through
    one 3xTF32 dot, "cN" compressed tiles of N tokens (default 64), "ptr" / "desc"
    key/value tiles by pointer loads / tensor descriptors (the default: pointer loads),
    "nopdl" the kernels launched without programmatic dependent launch, "knock" the top-n
    picks of p2 and p3 by serial max-reductions instead of Triton's top-k."""
    from nsa.ops import descriptors

    for k, val in zip(KNOBS, default[0], strict=True):
        setattr(launch, k, val)
    launch.WARPS = dict(default[1])
    descriptors.USE_DESC = None
    for o in v.split("+"):
        if o == "auto":
            continue
        if o in ("ptr", "desc"):
            descriptors.USE_DESC = o == "desc"
            continue
        if o == "t1":
            launch.TILES_PER_SM = 10**9
        elif o.startswith("t"):
            launch.TILES_PER_SM, launch.SPLIT_TILES = 0, int(o[1:])
        elif o == "s1":
            launch.SEL_PER_SM = 10**9
        elif o == "x3":
            launch.SPLIT_SCORES, launch.SUM_SCORES = False, False
        elif o == "dot":
            launch.SUM_SCORES = False
        elif o.startswith("c") and o[1:].isdigit():
            launch.BLOCK_C = int(o[1:])
        elif o == "nopdl":
            launch.PDL = False
        elif o == "knock":
            launch.TOPK = False
        elif o.startswith("st"):
            launch.P1_STAGES = int(o[2:])
        else:
            k, w = o.split("w")
            launch.WARPS[k] = int(w)


def case(S: int, B: int, variants: list[str], other, HQ=64, H=4, D=128,
         dtype=torch.bfloat16):
    cfg = NSAConfig(n_heads=HQ, n_kv_heads=H, d_k=D, d_v=D)
    dev = "cuda"
    cache = NSACache(cfg, B, device=dev, dtype=dtype, max_len=S, static=False)
    raw = [torch.randn(B, S, H, D, device=dev, dtype=dtype) for _ in range(6)]
    cache.prefill(*raw)
    q = torch.randn(B, HQ, D, device=dev, dtype=dtype)
    g = [torch.rand(B, HQ, device=dev, dtype=dtype) for _ in range(3)]
    scale = D ** -0.5
    row = {}
    # correctness first: float64 reference step on the same (rounded) inputs
    ref, ref_idx = nsa_decode(q.double(), cache.as_dtype(torch.float64), *(x.double() for x in g),
                              backend="reference", return_indices=True)
    out, idx = nsa_decode(q, cache, *g, backend="triton", return_indices=True)
    row["rel"] = ((out.double() - ref).norm() / ref.norm()).item()
    row["sel_match"] = (idx == ref_idx).float().mean().item()
    del ref
    default = tuple(getattr(launch, k) for k in KNOBS), dict(launch.WARPS)
    for v in variants:
        set_variant(v, default)
        run = lambda: nsa_decode(q, cache, *g, backend="triton")  # noqa: E731
        o = run()
        row[f"rel {v}"] = ((o.double() - out.double()).norm() / out.double().norm()).item()
        row[f"t {v}"] = triton.testing.do_bench(graphed(run).replay,
                                                return_mode="median") * 1e3
    set_variant("auto", default)
    if other is not None:
        run2 = lambda: other.triton_decode(q, cache, *g, cfg, scale)  # noqa: E731
        o2 = run2()[0]
        row["old rel"] = ((o2.double() - out.double()).norm() / out.double().norm()).item()
        row["old"] = triton.testing.do_bench(graphed(run2).replay, return_mode="median") * 1e3
    qd = q[:, :, None]  # [B, HQ, 1, D]
    kd = raw[0].transpose(1, 2)
    vd = raw[1].transpose(1, 2)
    dense = lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True)  # noqa: E731
    row["dense"] = triton.testing.do_bench(graphed(dense).replay, return_mode="median") * 1e3
    row["reads"] = sum(int(v[0, 0]) for v in cache.last_reads.values())
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="auto")
    ap.add_argument("--compare", default=None)
    ap.add_argument("--shapes", default="4096x1,16384x1,65536x1,4096x16,16384x16,65536x16")
    a = ap.parse_args()
    variants = a.variants.split(",")
    other = importlib.import_module(f"{a.compare}.launch") if a.compare else None
    print(torch.cuda.get_device_name())
    rows = []
    for sb in a.shapes.split(","):
        S, B = (int(x) for x in sb.split("x"))
        r = case(S, B, variants, other)
        rows.append((S, B, r))
        print(S, B, {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()},
              flush=True)
    keys = [k for k in rows[0][2] if k not in ("reads",)]
    print("| S | B | " + " | ".join(keys) + " | dense / best |")
    print("|---" * (len(keys) + 3) + "|")
    for S, B, r in rows:
        best = min(r[f"t {v}"] for v in variants)
        cells = [f"{r[k]:.2e}" if k.startswith("rel") or k == "old rel" else f"{r[k]:.3f}"
                 if k == "sel_match" else f"{r[k]:.1f}" for k in keys]
        print(f"| {S} | {B} | " + " | ".join(cells) + f" | {r['dense'] / best:.2f}x |")


if __name__ == "__main__":
    main()
