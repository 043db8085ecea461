"""NSA forward+backward time (Triton backend, paper shape but any G) for one or more source
trees, each in its own process, in one call: old-against-new comparisons on one card.

    git archive <rev> nsa | tar -x -C /tmp/old      # on the development machine
    python scripts/gpu_fwd_bwd_trees.py --trees .,/tmp/old,. --cases 65536:1,65536:4,16384:2

Prints one line per (tree, T, G): do_bench median of nsa_attention + torch.autograd.grad
of every input (bf16, B=1, H=4, d=128, l=32, d=16, l'=64, n=16, w=512). Listing the
current tree twice brackets the old one and shows the run-to-run spread.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def child(tree: str, cases: list[tuple[int, int]]) -> None:
    # the shared input builder and timing pair; both scripts put their own checkout first
    # on sys.path when imported, so the tree goes in front after them (nsa is imported
    # lazily, inside their functions)
    import gpu_check_backward as cb
    import gpu_check_forward as cf

    sys.path.insert(0, os.path.abspath(tree))
    import torch
    from triton.testing import do_bench

    from nsa import NSAConfig

    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    H, D = 4, 128
    for T, G in cases:
        leaves = cf.make(T, H * G, H, D, D, cfg, torch.bfloat16)
        for v in leaves.values():
            v.requires_grad_(True)
        nsa_fb, _ = cb.fwd_bwd_callables(leaves, torch.randn_like(leaves["q"]), cfg)
        print(f"{tree:>24} T={T:>6} G={G:>2}: {do_bench(nsa_fb):8.3f} ms", flush=True)
        del leaves, nsa_fb
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", default=".", help="comma-separated source trees (with nsa/)")
    ap.add_argument("--cases", default="65536:16", help="comma-separated T:G pairs")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    try:
        cases = [tuple(int(v) for v in c.split(":")) for c in a.cases.split(",")]
        if any(len(c) != 2 or min(c) < 1 for c in cases):
            raise ValueError
    except ValueError:
        sys.exit(f"--cases: expected T:G pairs like 65536:4,16384:1, got {a.cases!r}")
    if a.child:
        child(a.child, cases)
        return
    for tree in a.trees.split(","):
        if not os.path.isdir(os.path.join(tree, "nsa")):
            sys.exit(f"--trees: {tree!r} has no nsa/ package")
    for tree in a.trees.split(","):
        # a fresh process per tree: each imports its own nsa and compiles its own kernels
        subprocess.run([sys.executable, os.path.abspath(__file__), "--child", tree,
                        "--cases", a.cases], check=True, cwd=os.path.abspath(tree))


if __name__ == "__main__":
    main()
