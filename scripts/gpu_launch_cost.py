"""Host cost of each Triton launch in an NSA call, split into Triton's steps.

    python scripts/gpu_launch_cost.py prefill --T 16384 --G 1
    python scripts/gpu_launch_cost.py decode --context 4096

Records every launch of one call (prefill: the forward at the paper shape but for the
group size; decode: one eager TinyLM decode step, 4 layers, HQ=16, H=4, d=64), then
times, per distinct kernel and in microseconds of CPU per launch (the GPU is not waited
on inside a batch): the whole ``kernel[grid](...)``; Triton's binder (argument binding and
specialisation); its cache-key computation; the compiled kernel's launcher called
directly with the bound arguments (host tensor descriptors are encoded there); and the
encoding of the host tensor descriptors alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def record(call):
    """Run call() once; return [(jit_fn, grid, args, kwargs, compiled)] of its launches."""
    from triton.runtime.jit import JITFunction

    real_run = JITFunction.run
    seen = []

    def run(self, *args, grid, warmup, **kwargs):
        k = real_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        seen.append((self, grid, args, dict(kwargs), k))
        return k

    JITFunction.run = run
    try:
        call()
    finally:
        JITFunction.run = real_run
    return seen


def per_launch_us(fn, n):
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = time.perf_counter() - t0
    torch.cuda.synchronize()
    return 1e6 * t / n


def parts(rec, n):
    """Timings (us per launch) of one recorded launch's steps."""
    import torch
    from triton import knobs
    from triton.backends.nvidia.driver import make_tensordesc_arg
    from triton.runtime.driver import driver
    from triton.runtime.jit import compute_cache_key
    from triton.tools.tensor_descriptor import TensorDescriptor

    fn, grid, args, kwargs, k = rec
    dev = torch.cuda.current_device()
    kernel_cache, key_cache, _target, _backend, binder = fn.device_caches[dev]
    kw = dict(kwargs, debug=fn.debug, instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, spec, opts = binder(*args, **kw)
    g = tuple(grid) + (1,) * (3 - len(grid))
    stream = driver.active.get_current_stream(dev)
    vals = tuple(bound.values())
    descs = [a for a in vals if isinstance(a, TensorDescriptor)]
    metas = getattr(k.metadata, "tensordesc_meta", None) or [None] * len(descs)

    def full():
        fn[grid](*args, **kwargs)

    def direct():
        k.run(g[0], g[1], g[2], stream, k.function, k.packed_metadata, None, None, None, *vals)

    def encode():
        for a, m in zip(descs, metas, strict=True):
            make_tensordesc_arg(a, m)

    out = {
        "full": per_launch_us(full, n),
        "binder": per_launch_us(lambda: binder(*args, **kw), n),
        "cache key": per_launch_us(lambda: compute_cache_key(key_cache, spec, opts), n),
        "launcher": per_launch_us(direct, n),
        "descriptors": per_launch_us(encode, n) if descs else 0.0,
    }
    return out, len(vals), len(descs)


def prefill_call(T, G):
    import gpu_check_forward as cf  # scripts/ is sys.path[0] when run as a script
    import torch

    from nsa import NSAConfig, nsa_attention

    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    H, d = 4, 128
    inp = cf.make(T, H * G, H, d, d, cfg, torch.bfloat16)
    return lambda: nsa_attention(**inp, config=cfg, backend="triton")


def decode_call(context):
    import torch

    from nsa import NSAConfig
    from nsa.model import TinyLM

    cfg = NSAConfig(hidden_size=1024, n_heads=16, n_kv_heads=4, d_k=64, d_v=64)
    torch.manual_seed(0)
    m = TinyLM(cfg, n_layers=4, attention="nsa").cuda().to(torch.bfloat16).eval()
    prompt = torch.randint(0, 256, (1, context), device="cuda")
    caches = m.new_caches(1, max_len=context + 4096)
    with torch.no_grad():
        logits = m(prompt, caches=caches)[:, -1]
    tok = logits.argmax(-1)
    return lambda: m.decode(tok, caches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("scenario", choices=["prefill", "decode"])
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--G", type=int, default=1)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--n", type=int, default=200, help="launches per timing")
    ap.add_argument("--cprofile", type=int, default=0, metavar="ROWS",
                    help="also cProfile's tables (internal and cumulative time) of 20 calls")
    args = ap.parse_args()
    import torch

    call = prefill_call(args.T, args.G) if args.scenario == "prefill" else decode_call(args.context)
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    walls = []
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        walls.append(1e6 * (time.perf_counter() - t0))
    if args.cprofile:
        from gpu_host_profile import cprofile_tables  # scripts/ is sys.path[0]

        cprofile_tables(call, 20, args.cprofile)
    recs = record(call)
    torch.cuda.synchronize()
    print(f"GPU: {torch.cuda.get_device_name()}; {args.scenario}: {len(recs)} launches per call, "
          f"host per call {statistics.median(walls):.0f} us (median of 20)", flush=True)
    cols = ["full", "binder", "cache key", "launcher", "descriptors"]
    print(f"{'kernel':<28} {'args':>4} {'desc':>4} " + " ".join(f"{c:>11}" for c in cols))
    tot = dict.fromkeys(cols, 0.0)
    done = {}
    for rec in recs:
        name = rec[0].__name__
        if name.startswith("_entry_"):  # relaunching the index build overruns its counts
            continue
        if name not in done:
            done[name] = parts(rec, args.n)
        res, nargs, ndesc = done[name]
        for c in cols:
            tot[c] += res[c]
        print(f"{name:<28} {nargs:>4} {ndesc:>4} " + " ".join(f"{res[c]:>11.1f}" for c in cols))
    print(f"{'sum over the call':<38} " + " ".join(f"{tot[c]:>11.1f}" for c in cols))


if __name__ == "__main__":
    main()
