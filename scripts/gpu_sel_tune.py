"""Selected-branch kernels: pointer loads against tensor-descriptor (bulk copy) loads.

    python scripts/gpu_sel_tune.py                 # T = 16k and 64k, G = 16 (+ G = 4, 1 at 64k)
    python scripts/gpu_sel_tune.py --Ts 65536 --no-groups

Paper shape (HQ=64, H=4, d=128, bf16, l=32, d=16, l'=64, n=16, w=512), block indices from
the kernels' own selection on random inputs. For each variant (loads, warps, pipeline
stages) it prints the median time (triton.testing.do_bench) of the selected forward with
the gate combine and of the selected dQ, the L2 rate that implies (every position pulls
its n*l' keys and values), and the largest relative difference of its output from the
pointer-load default (the default itself is checked against float64 by the GPU tests).
It ends with the whole NSA forward, default loads and descriptor loads, against dense
SDPA in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def _check_forward():
    spec = importlib.util.spec_from_file_location(
        "gpu_check_forward", os.path.join(ROOT, "scripts", "gpu_check_forward.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run(T: int, G: int, fwd_variants, dq_variants, whole: bool) -> None:
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    import nsa.ops.selection.launch as sl
    from nsa import NSAConfig, nsa_attention
    from nsa.ops.compression import cmp_forward
    from nsa.ops.selection import sel_forward, select_topn
    from nsa.ops.selection.bwd_launch import sel_backward
    from nsa.ops.window import win_forward

    cf = _check_forward()
    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    H, D = 4, 128
    HQ = G * H
    scale = D ** -0.5
    inp = cf.make(T, HQ, H, D, D, cfg, torch.bfloat16)
    q, k, v = inp["q"], inp["k_sel"], inp["v_sel"]
    o_cmp, scores = cmp_forward(q, inp["k_cmp"], inp["v_cmp"], cfg, scale)
    idx = select_topn(scores, T, inp["k_cmp"].shape[1], cfg)
    del scores
    o_win = win_forward(q, inp["k_win"], inp["v_win"], cfg.w, scale)
    fl = cf.floors(T, HQ, H, D, D, cfg.l, cfg.d, cfg.l_sel, cfg.n, cfg.w)
    l2 = fl["sel"]["l2_bytes"]

    def fwd(**kw):
        return sel_forward(q, k, v, idx, cfg, scale, g_sel=inp["g_sel"], o_cmp=o_cmp,
                           g_cmp=inp["g_cmp"], o_win=o_win, g_win=inp["g_win"], **kw)[1]

    base = fwd(use_desc=False).clone()
    for name, kw in fwd_variants(G):
        try:
            out = fwd(**kw)
            ok = torch.isfinite(out).all().item()
            d = rel(out, base)
            ms = do_bench(lambda kw=kw: fwd(**kw), warmup=25, rep=100, return_mode="median")
            print(f"{T:>6} {G:>3} fwd {name:<16} {ms:8.3f} ms {l2 / ms / 1e9:6.2f} TB/s "
                  f"rel {d:.1e}{'' if ok else ' NON-FINITE'}", flush=True)
        except Exception as e:  # noqa: BLE001 (a variant that cannot launch is a result)
            print(f"{T:>6} {G:>3} fwd {name:<16} failed: {type(e).__name__}: {e}"[:300])

    dout = torch.randn_like(q)
    lse = torch.empty(1, HQ, T, device="cuda", dtype=torch.float32)
    sel_forward(q, k, v, idx, cfg, scale, lse=lse)
    gate = inp["g_sel"].contiguous()
    delta = torch.randn(gate.shape, device="cuda", dtype=torch.float32)

    def dq_run(**kw):
        dq = torch.zeros(q.shape, device="cuda", dtype=torch.float32)
        sel_backward(q, k, v, idx, dout, gate, lse, delta, dq, cfg, scale, dq_only=True, **kw)
        return dq

    dq_base = dq_run(use_desc=False)
    dq = torch.zeros(q.shape, device="cuda", dtype=torch.float32)
    for name, kw in dq_variants(G):
        try:
            d = rel(dq_run(**kw), dq_base)
            ms = do_bench(lambda kw=kw: sel_backward(
                q, k, v, idx, dout, gate, lse, delta, dq, cfg, scale, dq_only=True, **kw),
                warmup=25, rep=100, return_mode="median")
            print(f"{T:>6} {G:>3} dQ  {name:<16} {ms:8.3f} ms {l2 / ms / 1e9:6.2f} TB/s "
                  f"rel {d:.1e}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{T:>6} {G:>3} dQ  {name:<16} failed: {type(e).__name__}: {e}"[:300])
    if whole:
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        t_dense = do_bench(lambda: F.scaled_dot_product_attention(
            qt, kt, vt, is_causal=True, enable_gqa=True), return_mode="median")
        del qt, kt, vt
        for flag in (False, True):
            sl.SEL_USE_DESC = flag
            t = do_bench(lambda: nsa_attention(**inp, config=cfg, backend="triton"),
                         return_mode="median")
            print(f"{T:>6} {G:>3} NSA forward, descriptors {'on ' if flag else 'off'}: "
                  f"{t:8.3f} ms, dense {t_dense:8.3f} ms, {t_dense / t:5.2f}x", flush=True)
        sl.SEL_USE_DESC = False
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--Ts", default="16384,65536")
    ap.add_argument("--no-groups", action="store_true", help="G = 16 only")
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_sel_tune: needs a CUDA GPU")
    print(torch.cuda.get_device_name(), flush=True)

    def fwd_variants(G):
        v = [("ptr default", dict(use_desc=False))]
        for w, s in ((2, 3), (2, 2), (4, 3), (4, 2), (4, 4), (2, 4), (8, 3)):
            v.append((f"desc w{w} s{s}", dict(use_desc=True, num_warps=w, num_stages=s)))
        return v

    def dq_variants(G):
        v = [("ptr default", dict(use_desc=False))]
        for w, s in ((4, 2), (4, 3), (8, 2), (8, 3)):
            v.append((f"desc w{w} s{s}", dict(use_desc=True, dq_warps=w, dq_stages=s)))
        v.append(("ptr w8 s2", dict(use_desc=False, dq_warps=8, dq_stages=2)))
        return v

    Ts = [int(x) for x in a.Ts.split(",")]
    for T in Ts:
        run(T, 16, fwd_variants, dq_variants, whole=True)
    if not a.no_groups:
        for G in (4, 1):
            run(Ts[-1], G, fwd_variants, dq_variants, whole=False)


if __name__ == "__main__":
    main()
