"""Tile/warp variants of the backward kernels, timed one by one at the paper shape.

    python scripts/gpu_tune_backward.py [--T 65536]
    python scripts/gpu_tune_backward.py --sel-only   # the selected branch's variants only
    python scripts/gpu_tune_backward.py --flash-only --kv-only --branches cmp

Prints ms per variant for the compressed and window flash backward (dK/dV kernel and
dQ kernel separately) and the selected branch (dQ, dK/dV with several segment lengths).
The chosen defaults live in nsa/ops/flashbwd/launch.py and
nsa/ops/selection/bwd_launch.py; docs/perf-notes.md records what was measured.
"""

# ruff: noqa: B023  (each lambda is timed at once, inside its own loop step)
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    import torch
    from triton.testing import do_bench

    from nsa import NSAConfig, compress_mean
    from nsa.ops.flashbwd import MASK_CMP, MASK_WIN, flash_backward
    from nsa.ops.selection.bwd_launch import sel_backward
    from nsa.ops.triton_backend import forward_kernels

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--sel-only", action="store_true",
                    help="skip the compressed and window variants")
    ap.add_argument("--sel-dq-only", action="store_true",
                    help="only the selected branch's dQ kernel variants (warps, stages)")
    ap.add_argument("--flash-only", action="store_true",
                    help="only the compressed and window variants (--kv-only: their dK/dV)")
    ap.add_argument("--kv-only", action="store_true",
                    help="with --flash-only: the dK/dV kernel's variants only")
    ap.add_argument("--branches", default="cmp,win", help="flash branches to tune")
    ap.add_argument("--G", type=int, default=16, help="query heads per KV head")
    ap.add_argument("--D", type=int, default=128, help="head dim (d_k; also d_v unless --DV)")
    ap.add_argument("--DV", type=int, default=None, help="value head dim (paper: --D 192 --DV "
                                                         "128)")
    a = ap.parse_args()
    T = a.T
    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    B, H, G, D = 1, 4, a.G, a.D
    DV = a.DV or D
    HQ = G * H
    dt = torch.bfloat16
    scale = D ** -0.5
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g, device="cuda").to(dt)

    x = dict(q=r(B, T, HQ, D), k_sel=r(B, T, H, D), v_sel=r(B, T, H, DV), k_win=r(B, T, H, D),
             v_win=r(B, T, H, DV), k_cmp=compress_mean(r(B, T, H, D), cfg.l, cfg.d),
             v_cmp=compress_mean(r(B, T, H, DV), cfg.l, cfg.d),
             **{f"g_{b}": torch.rand(B, T, HQ, generator=g, device="cuda").to(dt)
                for b in ("cmp", "sel", "win")})
    dout = r(B, T, HQ, DV)
    fk = forward_kernels(**x, block_indices=None, cfg=cfg, scale=scale, save=True,
                         want_o_sel=False)
    dq = torch.zeros(x["q"].shape, device="cuda", dtype=torch.float32)

    def prep(o, gname):
        gate = x[gname].contiguous()
        return gate, (gate.float() * (dout.float() * o.float()).sum(-1)).contiguous()

    gc, dc = prep(fk["o_cmp"], "g_cmp")
    gw, dw = prep(fk["o_win"], "g_win")
    gs, ds = prep(fk["o_sel"], "g_sel")
    print(f"{torch.cuda.get_device_name()}, T={T}, paper shape but G={G}, d_k={D}, d_v={DV} (H=4, "
          "bf16)")
    branches = {
        "cmp": dict(k=x["k_cmp"], v=x["v_cmp"], gate=gc, lse=fk["lse_cmp"], delta=dc,
                    mask=MASK_CMP, cmp_l=cfg.l, cmp_d=cfg.d),
        "win": dict(k=x["k_win"], v=x["v_win"], gate=gw, lse=fk["lse_win"], delta=dw,
                    mask=MASK_WIN, w=cfg.w),
    }
    kv_variants = [(32, 64, 4, 3), (32, 32, 4, 2), (64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2),
                   (32, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 2), (128, 64, 8, 2),
                   (64, 64, 8, 3)]
    dq_variants = [(128, 32, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2),
                   (128, 32, 8, 3), (128, 64, 8, 3), (256, 32, 8, 2)]
    branches = {n: b for n, b in branches.items() if n in a.branches.split(",")}
    for name, br in ({} if a.sel_only or a.sel_dq_only else branches).items():
        k, v = br.pop("k"), br.pop("v")
        gate, lse, delta = br.pop("gate"), br.pop("lse"), br.pop("delta")
        for bm, bn, w, st in kv_variants:
            try:
                ms = do_bench(lambda: flash_backward(
                    x["q"], k, v, dout, gate, lse, delta, dq, scale, kv_config=(bm, bn, w),
                    num_stages=st, parts="dkdv", **br))
                print(f"{name} dkdv BM={bm:3d} BN={bn:3d} warps={w} stages={st}: {ms:8.2f} ms",
                      flush=True)
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"{name} dkdv BM={bm} BN={bn} warps={w} stages={st}: failed "
                      f"{type(exc).__name__}: {str(exc)[:100]}", flush=True)
        for bm, bn, w, st in [] if a.kv_only else dq_variants:
            try:
                ms = do_bench(lambda: flash_backward(
                    x["q"], k, v, dout, gate, lse, delta, dq, scale, dq_config=(bm, bn, w),
                    num_stages=st, parts="dq", **br))
                print(f"{name} dq   BM={bm:3d} BN={bn:3d} warps={w} stages={st}: {ms:8.2f} ms",
                      flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"{name} dq BM={bm} BN={bn} warps={w} stages={st}: failed "
                      f"{type(exc).__name__}: {str(exc)[:100]}", flush=True)
    if a.flash_only:
        return
    sel = (x["q"], x["k_sel"], x["v_sel"], fk["idx"], dout, gs, fk["lse_sel"], ds, dq, cfg,
           scale)
    ms_dq = do_bench(lambda: sel_backward(*sel, dq_only=True))
    print(f"sel dq: {ms_dq:.2f} ms")
    if a.sel_dq_only:
        sel_backward(*sel, dq_only=True, accumulate_dq=False)
        ref = dq.clone()
        for w, st in [(2, 3), (2, 2), (2, 4), (8, 3), (4, 4), (4, 2), (4, 3)]:
            sel_backward(*sel, dq_only=True, dq_warps=w, dq_stages=st, accumulate_dq=False)
            err = ((dq - ref).norm() / ref.norm()).item()
            ms = do_bench(lambda: sel_backward(*sel, dq_only=True, dq_warps=w, dq_stages=st))
            print(f"sel dq warps={w} stages={st}: {ms:.2f} ms (rel {err:.1e})", flush=True)
        return
    # dK/dV tiles (rows = positions x G heads gathered per step, keys per program, warps,
    # stages), timed as dQ + dK/dV with the launcher's config replaced
    import nsa.ops.selection.bwd_launch as BL

    default_cfg = BL._sel_bwd_config
    for bm, bn, w, st in [(32, 32, 4, 2), (64, 64, 8, 2), (64, 64, 4, 2), (64, 64, 8, 3),
                          (64, 64, 4, 3),
                          (128, 64, 8, 2), (128, 64, 8, 3), (32, 64, 4, 2), (64, 32, 4, 2),
                          (128, 32, 8, 2), (64, 64, 8, 1)]:
        def cfg_fn(*args, bm=bm, bn=bn, w=w, st=st, **kw):
            c = default_cfg(*args, **kw)
            return (*c[:3], bm, bn, w, st)

        BL._sel_bwd_config = cfg_fn
        try:
            ms = do_bench(lambda: sel_backward(*sel))
            print(f"sel dkdv BM={bm:3d} BN={bn:3d} warps={w} stages={st}: {ms - ms_dq:8.2f} ms "
                  f"(dq+dkdv {ms:.2f})", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"sel dkdv BM={bm} BN={bn} warps={w} stages={st}: failed "
                  f"{type(exc).__name__}: {str(exc)[:100]}", flush=True)
    BL._sel_bwd_config = default_cfg
    for seg in (128, 256, 512, 1024, 2048):
        for det in (False, True):
            ms = do_bench(lambda: sel_backward(*sel, seg_len=seg, deterministic=det))
            print(f"sel dq+dkdv seg_len={seg:4d} deterministic={det:d}: {ms:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
