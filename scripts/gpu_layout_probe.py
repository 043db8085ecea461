"""Key/value layout probe: token-major [B, T, H, d] against head-major storage.

    python scripts/gpu_layout_probe.py                  # T = 16k, 64k; G = 16
    python scripts/gpu_layout_probe.py --smoke          # CPU interpreter, tiny shapes

The op's key and value inputs are [B, T, H, d] with the heads of a token side by side,
so a 64-row tile of one head is 64 rows of d elements, H*d apart. The kernels take any
strides, so the same tensors copied head-major (each head's rows contiguous, viewed back
as [B, T, H, d]) run the same kernels on contiguous tiles. Paper shape (H=4, HQ=64,
d=128, bf16, l=32, d=16, l'=64, n=16, w=512), random inputs, the kernels' own selection.
Per kernel: median ms on both layouts, whether the outputs are bitwise equal, and the
cost of the head-major copy of the kernel's keys and values.

``--op``: then the whole op (``nsa_attention``, forward and forward+backward) with the
default layout and with the compressed / compressed and window / all keys and values
given head-major, each timed twice in alternation.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from script_modules import load_script  # noqa: E402


def _check_forward():
    return load_script("gpu_check_forward")


def head_major(x):
    """The same values with each head's rows contiguous, viewed as [B, T, H, d]."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def probe(cf, T, H, G, d, cfg, table):
    """Time every kernel of ``cases`` on both layouts at length T; rows go to ``table``."""
    import torch

    from nsa.ops.compression import cmp_forward
    from nsa.ops.selection import sel_forward
    from nsa.ops.selection.bwd_launch import sel_backward
    from nsa.ops.window import win_forward

    case = cf.selected_case(T, G, H, d, cfg)
    inp, scale, idx, lse, dout, delta = (case[x] for x in ("inp", "scale", "idx", "lse",
                                                            "dout", "delta"))
    q, gate = inp["q"], inp["g_sel"]
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)

    def sel_f(k, v):
        return sel_forward(q, k, v, idx, cfg, scale, mode="group")[0]

    def sel_dq(k, v):
        sel_backward(q, k, v, idx, dout, gate, lse, delta, dq, cfg, scale,
                     accumulate_dq=False, dq_only=True, mode="group")
        return dq.clone()

    def sel_bwd(k, v):
        dk, dv = sel_backward(q, k, v, idx, dout, gate, lse, delta, dq, cfg, scale,
                              accumulate_dq=False, mode="group")
        return torch.cat([dk.flatten(), dv.flatten(), dq.flatten().to(dk.dtype)])

    def cmp_f(k, v):
        o, s = cmp_forward(q, k, v, cfg, scale)
        return o

    def win_f(k, v):
        return win_forward(q, k, v, cfg.w, scale)

    cases = (("selected forward", sel_f, "sel"), ("selected dQ", sel_dq, "sel"),
             ("selected dQ + dK/dV", sel_bwd, "sel"),
             ("compressed forward + scores", cmp_f, "cmp"), ("window forward", win_f, "win"))
    for name, fn, br in cases:
        k, v = inp[f"k_{br}"], inp[f"v_{br}"]
        kh, vh = head_major(k), head_major(v)
        a, b = fn(k, v), fn(kh, vh)
        same = bool(torch.equal(a, b))
        t_tok = cf.bench(lambda fn=fn, k=k, v=v: fn(k, v))
        t_head = cf.bench(lambda fn=fn, k=kh, v=vh: fn(k, v))
        t_copy = cf.bench(lambda k=k, v=v: (head_major(k), head_major(v)))
        table.append((T, name, t_tok, t_head, t_copy, same))
        print(f"T={T} {name}: token-major {t_tok:.3f} ms, head-major {t_head:.3f} ms, "
              f"copy {t_copy:.3f} ms, equal {same}", flush=True)
    if cf.DEVICE == "cuda":
        torch.cuda.empty_cache()


def op_layouts(cf, T, H, G, d, cfg):
    """The whole op per key/value layout, forward and forward+backward, twice each."""
    import torch

    from nsa import nsa_attention

    dtype = torch.bfloat16 if cf.DEVICE == "cuda" else torch.float32
    inp = cf.make(T, H * G, H, d, d, cfg, dtype)
    dout = torch.randn_like(inp["q"])
    sets = {"token-major": (), "cmp head-major": ("cmp",), "cmp+win head-major": ("cmp", "win"),
            "all head-major": ("cmp", "sel", "win")}
    res = {name: [] for name in sets}
    ref = None
    for _rep in range(2):
        for name, brs in sets.items():
            x = dict(inp)
            for br in brs:
                x[f"k_{br}"], x[f"v_{br}"] = head_major(x[f"k_{br}"]), head_major(x[f"v_{br}"])
            out = nsa_attention(**x, config=cfg, backend="triton")
            if ref is None:
                ref = out
            same = bool(torch.equal(out, ref))
            leaves = {k: v.detach().clone().requires_grad_(True) for k, v in x.items()}

            def fb(leaves=leaves):
                nsa_attention(**leaves, config=cfg, backend="triton").backward(dout)

            t_f = cf.bench(lambda x=x: nsa_attention(**x, config=cfg, backend="triton"))
            t_fb = cf.bench(fb)
            res[name].append((t_f, t_fb, same))
    print(f"\n## The op per key/value layout, T={T} (median ms, two alternating runs)")
    print("| layout | forward | forward+backward | output equal |")
    print("|---|---|---|---|")
    for name, rows in res.items():
        print(f"| {name} | " + " / ".join(f"{r[0]:.3f}" for r in rows) + " | "
              + " / ".join(f"{r[1]:.3f}" for r in rows) + f" | {rows[0][2]} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--Ts", default="16384,65536")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--op", action="store_true", help="also time the whole op per layout")
    ap.add_argument("--no-kernels", action="store_true", help="skip the per-kernel table")
    args = ap.parse_args()
    cf = _check_forward()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        cf.DEVICE = "cpu"
    import torch

    from nsa import NSAConfig

    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    H, d, G = 4, 128, 16
    Ts = [int(x) for x in args.Ts.split(",")]
    if args.smoke:
        cfg = NSAConfig(l=32, d=16, l_sel=64, n=4, n_initial=1, n_local=2, w=64)
        Ts, H, d, G = [300], 1, 32, 16
    gpu = torch.cuda.get_device_name() if cf.DEVICE == "cuda" else "cpu (smoke)"
    print(f"GPU: {gpu}; torch {torch.__version__}", flush=True)
    table = []
    for T in Ts:
        if not args.no_kernels:
            probe(cf, T, H, G, d, cfg, table)
        if args.op:
            op_layouts(cf, T, H, G, d, cfg)
    if not table:
        return
    print(f"\n## Key/value layout ({gpu}, bf16, G={G}, median ms)")
    print("| T | kernel | token-major | head-major | head-major copy of k, v | equal |")
    print("|---|---|---|---|---|---|")
    for T, name, a, b, c, same in table:
        print(f"| {T} | {name} | {a:.3f} | {b:.3f} | {c:.3f} | {same} |")


if __name__ == "__main__":
    main()
