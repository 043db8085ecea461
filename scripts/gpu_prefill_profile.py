"""Per-kernel GPU time of one NSA prefill call (torch.profiler), paper shape, bf16.

    python scripts/gpu_prefill_profile.py                  # T = 65536, forward+backward
    python scripts/gpu_prefill_profile.py --T 8192 --mode fwd
    python scripts/gpu_prefill_profile.py --smoke          # CPU interpreter, tiny shapes

Paper shape: B=1, HQ=64, H=4 (G=16 unless --G), d_k=d_v=128 (unless --dk / --dv), l=32,
d=16, l'=64, n=16, w=512, random normal inputs. After warm-up, three calls of
``nsa_attention(backend="triton")`` (and ``.backward`` with a random dout in fwd+bwd mode)
run under the profiler; it prints every GPU kernel and memory operation with its calls
per NSA call and time per call, the sum of those times, and the wall time per call from
CUDA events around the same calls: the difference is what the GPU waits for between
kernels (host time).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--G", type=int, default=16)
    ap.add_argument("--mode", choices=("fwd", "fwd+bwd"), default="fwd+bwd")
    ap.add_argument("--dk", type=int, default=128, help="key/query head dim (paper: 192)")
    ap.add_argument("--dv", type=int, default=128, help="value head dim")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU interpreter, tiny shapes (numbers meaningless)")
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from torch.profiler import ProfilerActivity, profile

    from nsa import NSAConfig, compress_mean, nsa_attention

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        sys.exit("gpu_prefill_profile: needs a CUDA GPU (or --smoke)")
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    T, H, G, dk, dv = args.T, 4, args.G, args.dk, args.dv
    if args.smoke:
        cfg = NSAConfig(l=32, d=16, l_sel=64, n=4, n_initial=1, n_local=2, w=64)
        T, H, G, dk, dv = 200, 1, 2, 16, 16
    HQ = H * G
    g = torch.Generator(device=dev).manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g, device=dev).to(dtype)

    inp = dict(q=r(1, T, HQ, dk), k_sel=r(1, T, H, dk), v_sel=r(1, T, H, dv),
               k_win=r(1, T, H, dk), v_win=r(1, T, H, dv),
               k_cmp=compress_mean(r(1, T, H, dk), cfg.l, cfg.d),
               v_cmp=compress_mean(r(1, T, H, dv), cfg.l, cfg.d),
               **{f"g_{b}": torch.rand(1, T, HQ, generator=g, device=dev).to(dtype)
                  for b in ("cmp", "sel", "win")})
    train = args.mode == "fwd+bwd"
    if train:
        inp = {k: v.requires_grad_(True) for k, v in inp.items()}
    dout = r(1, T, HQ, dv)

    def call():
        out = nsa_attention(**inp, config=cfg, backend="triton")
        if train:
            out.backward(dout)
            for v in inp.values():
                v.grad = None

    calls = 1 if args.smoke else 3
    for _ in range(1 if args.smoke else 3):
        call()
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            call()
        end.record()
        torch.cuda.synchronize()
        wall = start.elapsed_time(end) / calls
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            call()
        if cuda:
            torch.cuda.synchronize()
    per = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name][0] += 1
            per[e.name][1] += e.device_time_total / 1e3  # ms
    name = torch.cuda.get_device_name() if cuda else "cpu (smoke)"
    print(f"## NSA {args.mode}, T={T}, G={G}, d_k={dk}, d_v={dv}, bf16 ({name}; per NSA call)")
    print("| kernel | calls | ms |")
    print("|---|---|---|")
    total = 0.0
    for k, (n, ms) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        total += ms / calls
        print(f"| {k[:90]} | {n / calls:g} | {ms / calls:.3f} |")
    if cuda:
        print(f"\nsum of GPU times {total:.3f} ms; wall per call (CUDA events) {wall:.3f} ms")


if __name__ == "__main__":
    main()
