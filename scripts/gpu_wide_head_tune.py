"""Tile variants of the compressed, window and selected forward kernels for head dims above
128 (d_k = 192 as two tiles of 128 + 64 columns, d_v = 192 pads to 256), timed one by one
on a GPU; each variant's output is compared with the default's.

    python scripts/gpu_wide_head_tune.py [--T 16384] [--dims 192/128,192,256]

``--dims``: comma-separated d_k/d_v pairs (a single number: d_k = d_v).

Paper shape otherwise (HQ=64, H=4, bf16, l=32, d=16, l'=64, n=16, w=512). Variants are
(BLOCK_M, BLOCK_N, num_warps, num_stages); the defaults live in
nsa/ops/compression/launch.py (_cmp_config) and nsa/ops/window/launch.py (_win_config).
"""

# ruff: noqa: B023  (each lambda is timed at once, inside its own loop step)
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

VARIANTS = [None, (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3),
            (128, 32, 4, 2), (128, 64, 4, 2), (64, 64, 8, 2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--dims", default="192/128,192,256")
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from gpu_check_forward import make
    from triton.testing import do_bench

    from nsa import NSAConfig, nsa_attention
    from nsa.ops.compression import cmp_forward
    from nsa.ops.selection import sel_forward, select_topn
    from nsa.ops.window import win_forward

    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    print(f"{torch.cuda.get_device_name()}, T={a.T}, HQ=64, H=4, bf16", flush=True)
    for dims in a.dims.split(","):
        d, dv = (int(x) for x in (dims.split("/") if "/" in dims else (dims, dims)))
        inp = make(a.T, 64, 4, d, dv, cfg, torch.bfloat16)
        q, scale = inp["q"], d ** -0.5
        ref_c = cmp_forward(q, inp["k_cmp"], inp["v_cmp"], cfg, scale)[0]
        ref_w = win_forward(q, inp["k_win"], inp["v_win"], cfg.w, scale)
        for v in VARIANTS:
            kw = {} if v is None else dict(block_m=v[0], block_n=v[1], num_warps=v[2],
                                          num_stages=v[3])
            name = "default" if v is None else "x".join(map(str, v))
            cells = []
            for kname, fn, ref in (
                    ("cmp", lambda: cmp_forward(q, inp["k_cmp"], inp["v_cmp"], cfg, scale,
                                                **kw)[0], ref_c),
                    ("win", lambda: win_forward(q, inp["k_win"], inp["v_win"], cfg.w, scale,
                                                **kw), ref_w)):
                try:
                    out = fn()
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    cells.append(f"{kname} {do_bench(fn):7.3f} ms (rel {err:.1e})")
                except Exception as exc:  # noqa: BLE001 - report and go on
                    cells.append(f"{kname} failed {type(exc).__name__}: {str(exc)[:80]}")
            print(f"d={d}/{dv} {name:>12}: " + "; ".join(cells), flush=True)
        # the selected forward + combine (group path): warps and stages
        o_cmp, scores = cmp_forward(q, inp["k_cmp"], inp["v_cmp"], cfg, scale)
        idx = select_topn(scores, a.T, inp["k_cmp"].shape[1], cfg)
        o_win = win_forward(q, inp["k_win"], inp["v_win"], cfg.w, scale)

        def sel(**kw):
            return sel_forward(q, inp["k_sel"], inp["v_sel"], idx, cfg, scale,
                               g_sel=inp["g_sel"], o_cmp=o_cmp, g_cmp=inp["g_cmp"],
                               o_win=o_win, g_win=inp["g_win"], mode="group", **kw)[1]

        ref_s = sel()
        for w, st in [(None, None), (4, 2), (2, 2), (2, 3), (8, 2)]:
            out = sel(num_warps=w, num_stages=st)
            err = ((out.float() - ref_s.float()).norm() / ref_s.float().norm()).item()
            ms = do_bench(lambda: sel(num_warps=w, num_stages=st))
            print(f"d={d}/{dv} sel warps={w or 'default'} stages={st or 'default'}: "
                  f"{ms:7.3f} ms (rel {err:.1e})", flush=True)
        ms = do_bench(lambda: nsa_attention(**inp, config=cfg, backend="triton"))
        qt, kt, vt = (inp[k].transpose(1, 2).contiguous() for k in ("q", "k_sel", "v_sel"))
        md = do_bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True,
                                                             enable_gqa=True))
        print(f"d={d}/{dv} NSA forward {ms:.3f} ms, dense {md:.3f} ms ({md / ms:.2f}x)",
              flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
