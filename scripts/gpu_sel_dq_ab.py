"""Selected dQ: descriptor against pointer loads, alternated (A/B/A/B...) in one run.

    python scripts/gpu_sel_dq_ab.py                 # T = 65536, G = 16, 4 rounds
    python scripts/gpu_sel_dq_ab.py --T 16384 --rounds 6

Paper shape (H=4, HQ=64, d=128, bf16, l=32, d=16, l'=64, n=16), the kernels' own
selection on random inputs. Timings of one kernel at 64k moved by 10-20% between
variants benched one after another (`gpu_desc_tune.py`), so each variant here is timed
in alternation, several rounds, and the table gives every round's median ms; the dQ of
both variants must be equal to float32 rounding.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from script_modules import load_script  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    cf = load_script("gpu_check_forward")
    import torch

    from nsa import NSAConfig
    from nsa.ops.selection.bwd_launch import sel_backward

    if not torch.cuda.is_available():
        sys.exit("gpu_sel_dq_ab: needs a CUDA GPU")
    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    T, H, G, d = args.T, 4, 16, 128
    case = cf.selected_case(T, G, H, d, cfg)
    inp, scale, idx, lse, dout, delta = (case[x] for x in ("inp", "scale", "idx", "lse",
                                                            "dout", "delta"))
    q, k, v, gate = inp["q"], inp["k_sel"], inp["v_sel"], inp["g_sel"]
    variants = {"descriptors (default)": dict(use_desc=True),
                "pointer loads": dict(use_desc=False)}
    outs, times = {}, {n: [] for n in variants}
    for name, kw in variants.items():
        dq = torch.zeros(q.shape, device="cuda", dtype=torch.float32)
        sel_backward(q, k, v, idx, dout, gate, lse, delta, dq, cfg, scale,
                     accumulate_dq=False, dq_only=True, mode="group", **kw)
        outs[name] = dq
    a, b = outs.values()
    print(f"{torch.cuda.get_device_name()}: T={T}, dQ rel difference "
          f"{((a - b).norm() / a.norm()).item():.1e}", flush=True)
    dq = torch.zeros(q.shape, device="cuda", dtype=torch.float32)
    for _ in range(args.rounds):
        for name, kw in variants.items():
            times[name].append(cf.bench(lambda kw=kw: sel_backward(
                q, k, v, idx, dout, gate, lse, delta, dq, cfg, scale, accumulate_dq=False,
                dq_only=True, mode="group", **kw)))
    print("| variant | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " |")
    print("|---|" + "---|" * args.rounds)
    for name, ts in times.items():
        print(f"| {name} | " + " | ".join(f"{t:.3f}" for t in ts) + " |")


if __name__ == "__main__":
    main()
