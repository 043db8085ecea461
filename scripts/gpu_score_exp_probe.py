"""What the compressed kernel's score pass (pass 2) spends on exp2: the fused compressed
forward at the paper shape timed with pass 2's p = exp2(S - lse) computed as written (MUFU),
by a polynomial on the FMA units for every element or for half of the columns, and with no
exponential at all (a timing bound only: its scores are wrong), against pass 1 alone.

    python scripts/gpu_score_exp_probe.py [--T 65536] [--G 16]

Each variant is the kernel source with that one line replaced, loaded as its own module and
swapped into the launcher; it prints the median time, the scores' relative difference from
the MUFU variant and whether top-n picks the same blocks.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from script_modules import module_from_source  # noqa: E402

LINE = "            p = tl.math.exp2(s - lse[:, None])\n"

POLY = '''

@triton.jit
def _exp2_fma(x):
    """2^x for x <= 0 on the FMA units: 2^n (exponent bits) times a degree-5 polynomial of
    the fraction (fitted on Chebyshev nodes of [0, 1))."""
    x = tl.maximum(x, -127.0)
    n = tl.floor(x)
    f = x - n
    p = C5
    p = p * f + C4
    p = p * f + C3
    p = p * f + C2
    p = p * f + C1
    p = p * f + C0
    return p * ((n.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
'''

VARIANTS = {
    "mufu": LINE,
    "fma-all": "            p = _exp2_fma(s - lse[:, None])\n",
    "fma-half": (
        "            x2 = tl.reshape(s - lse[:, None], [BLOCK_M, BLOCK_N // 2, 2])\n"
        "            xa, xb = tl.split(x2)\n"
        "            p = tl.reshape(tl.join(tl.math.exp2(xa), _exp2_fma(xb)), "
        "[BLOCK_M, BLOCK_N])\n"),
    "no-exp (bound)": "            p = s - lse[:, None] + 200.0\n",
}


def coefficients() -> list[float]:
    import numpy as np

    k = np.arange(64)
    f = 0.5 - 0.5 * np.cos((2 * k + 1) * np.pi / 128)  # Chebyshev nodes on [0, 1]
    c = np.polynomial.polynomial.polyfit(f, np.exp2(f), 5)
    return [float(x) for x in c]


def load_variant(name: str, src: str, coef: list[float]):
    body = src.replace(LINE, VARIANTS[name])
    consts = "".join(f"C{i} = tl.constexpr({c!r})\n" for i, c in enumerate(coef))
    body = body.replace("\n\n@triton.jit\ndef _n_visible", "\n" + consts + POLY
                        + "\n\n@triton.jit\ndef _n_visible", 1)
    return module_from_source(body, f"cmp_variant_{abs(hash(name))}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--G", type=int, default=16)
    a = ap.parse_args()
    import torch
    from triton.testing import do_bench

    import nsa.ops.compression.kernels as CK
    import nsa.ops.compression.launch as CL
    from nsa import NSAConfig, compress_mean
    from nsa.ops.selection import select_topn

    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    H, D, T = 4, 128, a.T
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, T, H * a.G, D, generator=g, device="cuda").to(torch.bfloat16)
    k = compress_mean(torch.randn(1, T, H, D, generator=g, device="cuda").to(torch.bfloat16),
                      cfg.l, cfg.d)
    v = compress_mean(torch.randn(1, T, H, D, generator=g, device="cuda").to(torch.bfloat16),
                      cfg.l, cfg.d)
    scale = D ** -0.5
    src = inspect.getsource(CK)
    assert src.count(LINE) == 1, "pass 2's exp2 line changed: update LINE"
    coef = coefficients()
    f = torch.linspace(-30, 0, 1 << 20, dtype=torch.float64)
    print(f"{torch.cuda.get_device_name()}, T={T}, G={a.G}; polynomial {coef}", flush=True)
    t1 = do_bench(lambda: CL.cmp_forward(q, k, v, cfg, scale, want_scores=False))
    print(f"pass 1 only: {t1:.3f} ms", flush=True)
    base_kernel = CL._cmp_fwd_kernel
    ref = ref_idx = None
    for name in VARIANTS:
        CL._cmp_fwd_kernel = load_variant(name, src, coef)._cmp_fwd_kernel
        try:
            o, sc = CL.cmp_forward(q, k, v, cfg, scale)
            idx = select_topn(sc, T, k.shape[1], cfg)
            ms = do_bench(lambda: CL.cmp_forward(q, k, v, cfg, scale))
            if ref is None:
                ref, ref_idx = sc.clone(), idx.clone()
            err = ((sc - ref).norm() / ref.norm()).item()
            same = (idx == ref_idx).float().mean().item()
            print(f"{name:>15}: fused {ms:.3f} ms (score pass ~{ms - t1:.3f}); scores rel "
                  f"{err:.1e}; top-n entries equal {same:.6f}", flush=True)
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"{name:>15}: failed {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        finally:
            CL._cmp_fwd_kernel = base_kernel
    c = torch.tensor(coef, dtype=torch.float64)
    fr = f - torch.floor(f)
    poly = sum(c[i] * fr ** i for i in range(6)) * torch.exp2(torch.floor(f))
    err = ((poly - torch.exp2(f)).abs() / torch.exp2(f)).max().item()
    print(f"polynomial max rel error on [-30, 0]: {err:.2e}")


if __name__ == "__main__":
    main()
