"""Loads left synchronous inside loops, for every kernel compiled into a Triton cache.

    python scripts/triton_cache_loop_loads.py [CACHE_DIR]   # default ~/.triton/cache

Run after a workload on the GPU machine (tests, a benchmark): each compiled kernel's
final TTGIR is read and its ``tt.load`` ops inside ``scf.for`` bodies counted
(``gpu_check_forward.loop_plain_loads``). Such a load is not copied asynchronously by the
loop pipeliner; a per-row load of 2-byte elements there stalled the backward's dK/dV
loops every step (backward b6 in docs/perf-notes.md). Loads of indices that a later load
depends on also count; they are expected.
"""

from __future__ import annotations

import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    from gpu_check_forward import loop_plain_loads

    root = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.triton/cache")
    seen = {}
    for path in sorted(glob.glob(os.path.join(root, "*", "*.ttgir"))):
        name = os.path.basename(path)[: -len(".ttgir")]
        with open(path) as f:
            n = loop_plain_loads(f.read())
        seen.setdefault(name, []).append(n)
    if not seen:
        sys.exit(f"no .ttgir files under {root}")
    for name, counts in sorted(seen.items()):
        print(f"{name}: loop-loads {sorted(set(counts))} over {len(counts)} compile(s)")


if __name__ == "__main__":
    main()
