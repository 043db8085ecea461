"""The window branch on a side CUDA stream or in line: whole NSA forward, alternating A/B.

    python scripts/gpu_overlap_ab.py                         # the default cases
    python scripts/gpu_overlap_ab.py --cases 16384:1,8192:16 --rounds 4 --bwd
    python scripts/gpu_overlap_ab.py --smoke                 # CPU interpreter (in line only)

Paper shape but for the group size (B=1, H=4, HQ=4*G, d=128, bf16, l=32, d=16, l'=64,
n=16, w=512), random inputs. For each case (T:G) and round, ``nsa_attention(backend=
"triton")`` with ``triton_backend.WINDOW_SIDE_STREAM`` False, then True: the median of
triton.testing.do_bench (host and GPU, as ``nsa prefill`` times it) and of the same call
replayed from a CUDA graph (GPU only). Outputs of the two settings must be bitwise equal
(the same kernels on the same inputs). ``--bwd`` also times forward+backward (do_bench).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from script_modules import load_script  # noqa: E402

DEFAULT_CASES = "8192:16,16384:16,65536:16,16384:1,16384:2,16384:4,16384:8,65536:1,65536:4"


def main() -> None:
    def extra(ap):
        ap.add_argument("--cases", default=DEFAULT_CASES, help="T:G pairs")
        ap.add_argument("--rounds", type=int, default=2)
        ap.add_argument("--bwd", action="store_true", help="also forward+backward")

    cf = load_script("gpu_check_forward")
    args, cfg, H, d, _, _ = cf.tuning_setup(__doc__, "0", "16", 1, [2], extra)
    import torch

    import nsa.ops.triton_backend as TB
    from nsa import nsa_attention

    cuda = cf.DEVICE == "cuda"
    cases = [tuple(int(x) for x in c.split(":")) for c in args.cases.split(",")]
    if args.smoke:
        cases = [(700, 2)]
    settings = (False, True) if cuda else (False,)
    print(f"GPU: {torch.cuda.get_device_name() if cuda else 'cpu (smoke)'}; "
          f"torch {torch.__version__}", flush=True)
    print("| T | G | round | side stream | do_bench ms | graph ms | fwd+bwd ms | equal |")
    print("|---|---|---|---|---|---|---|---|")
    for T, G in cases:
        dtype = torch.bfloat16 if cuda else torch.float32
        inp = cf.make(T, H * G, H, d, d, cfg, dtype)

        def fwd(inp=inp):
            return nsa_attention(**inp, config=cfg, backend="triton")

        ref = None
        for r in range(args.rounds):
            for side in settings:
                TB.WINDOW_SIDE_STREAM = side
                out = fwd()
                if ref is None:
                    ref = out
                same = bool(torch.equal(out, ref))
                ms = cf.bench(fwd)
                gms = cf.graph_bench(fwd) if cuda else float("nan")
                fb = float("nan")
                if args.bwd:
                    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
                    dout = torch.randn_like(out)

                    def fwd_bwd(leaves=leaves, dout=dout):
                        o = nsa_attention(**leaves, config=cfg, backend="triton")
                        torch.autograd.grad(o, list(leaves.values()), dout)

                    fb = cf.bench(fwd_bwd)
                print(f"| {T} | {G} | {r} | {side} | {ms:.3f} | {gms:.3f} | {fb:.3f} | "
                      f"{same} |", flush=True)
        TB.WINDOW_SIDE_STREAM = None


if __name__ == "__main__":
    main()
