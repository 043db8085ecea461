"""Top-n block choice (``select_topn``): variants timed side by side, indices compared.

    python scripts/gpu_topn_tune.py                      # T = 16k, 64k
    python scripts/gpu_topn_tune.py --Ts 65536 --groups 16
    python scripts/gpu_topn_tune.py --smoke              # CPU interpreter, tiny shapes

Paper shape (H=4, d=128, bf16, l=32, d=16, l'=64, n=16), block scores from the compressed
kernel on random inputs. Every variant's indices must equal the default's bit for bit
(the CPU tests check the kernel against the reference); the table gives the median time
(triton.testing.do_bench) of each tile (rows per program, blocks per chunk, warps).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


# name -> select_topn keyword arguments (rows per program, blocks per chunk, warps)
VARIANTS = {
    "r4 ch32 w1 (default)": dict(rows=4, chunk=32, warps=1),
    "r4 ch16 w1": dict(rows=4, chunk=16, warps=1),
    "r8 ch32 w1": dict(rows=8, chunk=32, warps=1),
    "r2 ch32 w1": dict(rows=2, chunk=32, warps=1),
    "r4 ch64 w1": dict(rows=4, chunk=64, warps=1),
    "r8 ch32 w2": dict(rows=8, chunk=32, warps=2),
    "r8 ch128 w4 (v3 tile)": dict(rows=8, chunk=128, warps=4),
}


def main() -> None:
    import gpu_check_forward as cf  # scripts/ is sys.path[0] when run as a script

    args, cfg, H, d, Ts, groups = cf.tuning_setup(__doc__, "16384,65536", "16", 1, [2])
    import torch

    from nsa.ops.selection import select_topn

    variants = VARIANTS
    if args.smoke:
        variants = {k: v for k, v in VARIANTS.items() if v["rows"] <= 8}
    gpu = torch.cuda.get_device_name() if cf.DEVICE == "cuda" else "cpu (smoke)"
    print(f"GPU: {gpu}; torch {torch.__version__}", flush=True)
    for T in Ts:
        for G in groups:
            scores, N = cf.block_scores(T, G, H, d, cfg)
            want = select_topn(scores, T, N, cfg)
            print(f"\nT={T} G={G}: scores {tuple(scores.shape)}", flush=True)
            print("| variant | ms | indices equal |\n|---|---|---|")
            for name, kw in variants.items():
                try:
                    got = select_topn(scores, T, N, cfg, **kw)
                    same = bool(torch.equal(got, want))
                    ms = cf.bench(lambda s=scores, t=T, n=N, kw=kw: select_topn(s, t, n, cfg, **kw))
                    print(f"| {name} | {ms:.3f} | {same} |", flush=True)
                except Exception as e:  # a variant that does not compile is reported
                    print(f"| {name} | failed: {type(e).__name__}: {str(e)[:120]} | - |",
                          flush=True)


if __name__ == "__main__":
    main()
