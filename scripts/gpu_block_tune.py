"""Block-centric selected attention (G <= 8 on the GPU): its merge and its block kernel.

    python scripts/gpu_block_tune.py                      # T = 16k, 64k; G = 1, 4, 8
    python scripts/gpu_block_tune.py --Ts 16384 --groups 4
    python scripts/gpu_block_tune.py --smoke              # CPU interpreter, tiny shapes

Paper shape but for the group size (H=4, HQ=4*G, d=128, bf16, l=32, d=16, l'=64, n=16,
w=512), block indices from the kernels' own selection on random inputs. For each (T, G)
it prints the per-kernel GPU time of the default path (torch.profiler), then the median
time (triton.testing.do_bench) of the selected forward with the gate combine
(``sel_forward(mode="block")``: index, block kernel, merge) for merge tiles (rows and
pipeline stages per program) and block-kernel variants (rows, warps, stages, and whether
the next step's query rows are gathered during this step), each with its relative
difference from the default's output.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from script_modules import load_script  # noqa: E402


def main() -> None:
    def extra(ap):
        ap.add_argument("--merge-only", action="store_true",
                        help="time the merge tiles only, not the block-kernel variants")
        ap.add_argument("--prefetch-only", action="store_true",
                        help="only the block kernel with and without its query-row prefetch")

    cf = load_script("gpu_check_forward")
    args, cfg, H, d, Ts, groups = cf.tuning_setup(__doc__, "16384,65536", "1,4,8", 1, [1, 3],
                                                  extra)
    import torch

    import nsa.ops.selection.launch as SL

    cuda = cf.DEVICE == "cuda"
    gpu = torch.cuda.get_device_name() if cuda else "cpu (smoke)"
    print(f"GPU: {gpu}; torch {torch.__version__}", flush=True)
    merges = {"64x1": (64, 1), "64x2": (64, 2), "128x2": (128, 2), "32x2": (32, 2),
              "128x3": (128, 3)}
    blocks = {"rows 64 w4 s3": (64, 4, 3, False), "rows 64 w4 s3 prefetch": (64, 4, 3, True),
              "rows 64 w8 s3": (64, 8, 3, False), "rows 32 w4 s3": (32, 4, 3, False),
              "rows 64 w4 s2": (64, 4, 2, False), "rows 128 w8 s2": (128, 8, 2, False)}
    if args.merge_only:
        blocks = {}
    if args.prefetch_only:
        merges = {}
        blocks = {k: v for k, v in blocks.items() if k.startswith("rows 64 w4 s3")}
    if args.smoke:
        merges = {"16x1": (16, 1), "32x2": (32, 2)}
        blocks = {"rows 16 w4 s1": (16, 4, 1, False), "rows 16 w4 s1 prefetch": (16, 4, 1, True)}

    def run_case(T: int, G: int) -> dict:
        case = cf.combine_case(T, G, H, d, cfg)

        def sel(**kw):
            return case["sel"](mode="block", **kw)

        ref = sel().float()
        row = {"T": T, "G": G}
        if cuda:
            row["kernels"] = cf.kernel_ms(sel)
        for name, tile in merges.items():
            SL.MERGE_TILE = tile
            out = sel().float()
            err = ((out - ref).norm() / ref.norm()).item()
            row["merge " + name] = (cf.bench(sel), err)
        SL.MERGE_TILE = None
        for name, (bm, w, st, pf) in blocks.items():
            SL.BLOCK_PREFETCH = pf  # True / False force it
            kw = dict(block_rows=bm, num_warps=w, num_stages=st)
            out = sel(**kw).float()
            err = ((out - ref).norm() / ref.norm()).item()
            row["block " + name] = (cf.bench(lambda kw=kw: sel(**kw)), err)
        SL.BLOCK_PREFETCH = None  # the default: the launcher's rule
        return row

    rows = []
    for T in Ts:
        for G in groups:
            row = run_case(T, G)
            rows.append(row)
            print(f"T={T} G={G}: kernels " + ", ".join(
                f"{k} {v:.3f}" for k, v in row.get("kernels", {}).items()), flush=True)
            print("   " + "; ".join(f"{k}={v[0]:.3f}ms (rel {v[1]:.1e})"
                                    for k, v in row.items() if isinstance(v, tuple)),
                  flush=True)
            if cuda:
                torch.cuda.empty_cache()
    names = [k for k in rows[0] if isinstance(rows[0][k], tuple)]
    print(f"\n## Block path: selected forward + combine ({gpu}, bf16, H={H}, d={d}, "
          f"n={cfg.n}; median ms; defaults: merge 128x2, block rows 64 w4 s3 without prefetch)")
    print("| variant | " + " | ".join(f"T={r['T']} G={r['G']}" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for k in names:
        print(f"| {k} | " + " | ".join(f"{r[k][0]:.3f}" for r in rows) + " |")


if __name__ == "__main__":
    main()
