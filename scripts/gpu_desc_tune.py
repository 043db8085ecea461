"""Prefill kernels: pointer loads against tensor-descriptor (bulk copy) loads of K/V tiles.

    python scripts/gpu_desc_tune.py                 # T = 16k and 64k, G = 16 (+ G = 4, 1 at 64k)
    python scripts/gpu_desc_tune.py --Ts 65536 --no-groups --kernels cmp,win
    python scripts/gpu_desc_tune.py --no-groups --kernels sel --block-n   # key tiles

Paper shape (HQ=64, H=4, d=128, bf16, l=32, d=16, l'=64, n=16, w=512), block indices from
the kernels' own selection on random inputs. For each variant (loads, warps, pipeline
stages) it prints the median time (triton.testing.do_bench) of the selected forward with
the gate combine and of the selected dQ, the L2 rate that implies (every position pulls
its n*l' keys and values), and the largest relative difference of its output from the
pointer-load default (the default itself is checked against float64 by the GPU tests).
The compressed (fused with block scores, and attention only) and sliding-window kernels
get the same treatment (their rate is FLOP/s of the attention). It ends with the whole NSA
forward, pointer loads and descriptor loads, against dense SDPA in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from script_modules import load_script  # noqa: E402


def _script(name: str):
    """Another script of this folder, as a module (its helpers, not its main)."""
    return load_script(name)


def _check_forward():
    return _script("gpu_check_forward")


def paper_case(T: int, G: int):
    """(check-forward module, config, H, D, HQ, scale, bf16 inputs) of the paper shape with
    H = 4 KV heads of G query heads each."""
    import torch

    from nsa import NSAConfig

    cf = _check_forward()
    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    H, D = 4, 128
    HQ = G * H
    return cf, cfg, H, D, HQ, D ** -0.5, cf.make(T, HQ, H, D, D, cfg, torch.bfloat16)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def timed(T, G, kind, name, fn, base, unit) -> None:
    """Time ``fn`` (returns its output), compare with ``base``, print one row."""
    import torch
    from triton.testing import do_bench

    try:
        out = fn()
        ok = all(torch.isfinite(x).all().item() for x in out)
        d = max(rel(x, b) for x, b in zip(out, base, strict=True))
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        amount, label = unit  # bytes or FLOPs: amount / ms / 1e9 = tera per second
        print(f"{T:>6} {G:>3} {kind:<4} {name:<22} {ms:8.3f} ms {amount / ms / 1e9:7.2f} "
              f"{label} rel {d:.1e}{'' if ok else ' NON-FINITE'}", flush=True)
    except Exception as e:  # noqa: BLE001 (a variant that cannot launch is a result)
        print(f"{T:>6} {G:>3} {kind:<4} {name:<22} failed: {type(e).__name__}: {e}"[:300])


def run_cmp_win(T: int, G: int) -> None:
    import torch

    from nsa.ops.compression import cmp_forward
    from nsa.ops.window import win_forward

    cf, cfg, H, D, HQ, scale, inp = paper_case(T, G)
    q = inp["q"]
    fl = cf.floors(T, HQ, H, D, D, cfg.l, cfg.d, cfg.l_sel, cfg.n, cfg.w)

    def cmp(**kw):  # (o,): unwritten score entries (never read) hold garbage
        return cmp_forward(q, inp["k_cmp"], inp["v_cmp"], cfg, scale, **kw)[:1]

    def attn(**kw):
        return cmp(want_scores=False, **kw)

    base_f = cmp(use_desc=False)
    base_a = attn(use_desc=False)
    unit = (fl["cmp_attn"]["flops"], "TFLOP/s")
    for name, kw in [("ptr default", {}), ("desc 64x64 w4 s3", {}),
                     ("desc 64x64 w4 s2", dict(num_stages=2)),
                     ("desc 64x64 w4 s4", dict(num_stages=4)),
                     ("desc 64x32 w4 s3", dict(block_n=32)),
                     ("desc 64x32 w4 s4", dict(block_n=32, num_stages=4)),
                     ("desc 128x64 w8 s2", dict(block_m=128, num_warps=8, num_stages=2)),
                     ("desc 128x64 w8 s3", dict(block_m=128, num_warps=8, num_stages=3)),
                     ("desc 128x128 w8 s2", dict(block_m=128, block_n=128, num_warps=8,
                                                 num_stages=2))]:
        kw = dict(kw, use_desc=name.startswith("desc"))
        timed(T, G, "cmpF", name, lambda kw=kw: cmp(**kw), base_f, unit)
        timed(T, G, "cmpA", name, lambda kw=kw: attn(**kw), base_a, unit)

    def win(**kw):
        return (win_forward(q, inp["k_win"], inp["v_win"], cfg.w, scale, **kw),)

    base_w = win(use_desc=False)
    unit = (fl["win"]["flops"], "TFLOP/s")
    for name, kw in [("ptr default", {}), ("desc 128x64 w8 s3", {}),
                     ("desc 128x64 w8 s4", dict(num_stages=4)),
                     ("desc 128x64 w8 s2", dict(num_stages=2)),
                     ("desc 64x64 w4 s3", dict(block_m=64, num_warps=4)),
                     ("desc 64x32 w4 s3", dict(block_m=64, block_n=32, num_warps=4)),
                     ("desc 128x128 w8 s2", dict(block_n=128, num_stages=2))]:
        kw = dict(kw, use_desc=name.startswith("desc"))
        timed(T, G, "win", name, lambda kw=kw: win(**kw), base_w, unit)
    torch.cuda.empty_cache()


def on_off(T, G, label, set_knob, fn, t_dense=None) -> None:
    """Time ``fn`` with a knob off, then on (``set_knob(False / True)``), then reset it to
    the default (``set_knob(None)``); one row each, against dense where given."""
    from triton.testing import do_bench

    for flag in (False, True):
        set_knob(flag)
        t = do_bench(fn, return_mode="median")
        vs = f", dense {t_dense:8.3f} ms, {t_dense / t:5.2f}x" if t_dense else ""
        print(f"{T:>6} {G:>3} {label} {'on ' if flag else 'off'}: {t:8.3f} ms{vs}", flush=True)
    set_knob(None)


def _bwd_branch(T, G, branch, flash_backward, q, k, v, dout, gate, lse, delta, mk, scale,
                unit) -> None:
    import torch

    def fb(parts, **kw):
        dq = torch.zeros(q.shape, device="cuda", dtype=torch.float32)
        dk, dv = flash_backward(q, k, v, dout, gate, lse, delta, dq, scale, parts=parts,
                                **mk, **kw)
        return (dq,) if parts == "dq" else (dk, dv)

    base_q = fb("dq", use_desc=False)
    for name, kw in [("ptr default", {}), ("desc default", {}),
                     ("desc 64x64 w4 s3", dict(num_stages=3)),
                     ("desc 128x64 w8 s2", dict(dq_config=(128, 64, 8))),
                     ("desc 128x32 w8 s2", dict(dq_config=(128, 32, 8)))]:
        kw = dict(kw, use_desc=name.startswith("desc"))
        # dQ: 3 of the backward's 5 matrix products (QK, dO V, dS K) = 1.5x the forward's
        timed(T, G, f"{branch}Q", name, lambda kw=kw: fb("dq", **kw), base_q,
              (unit[0] * 1.5, unit[1]))
    base_kv = fb("dkdv", use_desc_rows=False)
    for name, kw in [("ptr default", {}), ("desc default", {}),
                     ("desc 32x128 w8 s2", dict(kv_config=(32, 128, 8), num_stages=2)),
                     ("desc 16x64 w4 s3", dict(kv_config=(16, 64, 4))),
                     ("ptr 32x128 w8 s2", dict(kv_config=(32, 128, 8), num_stages=2))]:
        kw = dict(kw, use_desc_rows=name.startswith("desc"))
        # dK/dV: 4 products (QK, dO V, P^T dO, dS^T Q) = 2x the forward's
        timed(T, G, f"{branch}KV", name, lambda kw=kw: fb("dkdv", **kw), base_kv,
              (unit[0] * 2.0, unit[1]))


def run_bwd(T: int, G: int) -> None:
    """Flash backward (compressed and window branches): dQ and dK/dV kernels apart, then
    the whole forward+backward with and without descriptors against dense."""
    import torch
    from triton.testing import do_bench

    import nsa.ops.descriptors as dsc
    from nsa.ops.flashbwd import MASK_CMP, MASK_WIN, flash_backward
    from nsa.ops.triton_backend import forward_kernels

    cf, cfg, H, D, HQ, scale, inp = paper_case(T, G)
    q = inp["q"]
    dout = torch.randn_like(q)
    with torch.no_grad():
        fk = forward_kernels(**inp, block_indices=None, cfg=cfg, scale=scale, save=True,
                             want_o_sel=False)
    fl = cf.floors(T, HQ, H, D, D, cfg.l, cfg.d, cfg.l_sel, cfg.n, cfg.w)
    for branch, mask, kk, vv, o, gname, fl_key in (
            ("cmp", MASK_CMP, "k_cmp", "v_cmp", "o_cmp", "g_cmp", "cmp_attn"),
            ("win", MASK_WIN, "k_win", "v_win", "o_win", "g_win", "win")):
        gate = inp[gname].contiguous()
        delta = (gate.float() * (dout.float() * fk[o].float()).sum(-1)).contiguous()
        _bwd_branch(T, G, branch, flash_backward, q, inp[kk], inp[vv], dout, gate,
                    fk[f"lse_{branch}"], delta, dict(mask=mask, w=cfg.w, cmp_l=cfg.l,
                                                     cmp_d=cfg.d), scale,
                    (fl[fl_key]["flops"], "TFLOP/s"))
    if G == 16:
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
        nsa_fb, dense_fb = _script("gpu_check_backward").fwd_bwd_callables(leaves, dout, cfg)
        t_dense = do_bench(dense_fb, return_mode="median")
        on_off(T, G, "NSA fwd+bwd, descriptors", lambda f: setattr(dsc, "USE_DESC", f), nsa_fb,
               t_dense)
    torch.cuda.empty_cache()


def run_score(T: int, G: int) -> None:
    """Compressed kernel: block scores by register reductions against the tensor-core
    product (score_dot); scores compared where selection reads them."""
    import torch
    from triton.testing import do_bench

    import nsa.ops.compression.launch as cl
    from nsa import nsa_attention
    from nsa.ops.compression import cmp_forward
    cf, cfg, H, D, HQ, scale, inp = paper_case(T, G)
    q, kc, vc = inp["q"], inp["k_cmp"], inp["v_cmp"]
    N = kc.shape[1]
    # entries selection reads: block j of query t with j*4 - 1 < n_vis(t)
    t = torch.arange(T, device="cuda")
    n_vis = ((t + 1 - cfg.l + cfg.d).clamp(min=0) // cfg.d).clamp(max=N)
    j = torch.arange(cfg.num_sel_blocks(T), device="cuda")
    readable = (j[None, :] * 4 - 1 < n_vis[:, None])
    base = cmp_forward(q, kc, vc, cfg, scale, score_dot=False)[1][..., readable]
    for name, kw in [("fused regs", dict(score_dot=False)),
                     ("fused dot", dict(score_dot=True)),
                     ("two-pass regs", dict(score_dot=False, mode="two_pass")),
                     ("two-pass dot", dict(score_dot=True, mode="two_pass"))]:
        sc = cmp_forward(q, kc, vc, cfg, scale, **kw)[1][..., readable]
        d = rel(sc, base)
        ms = do_bench(lambda kw=kw: cmp_forward(q, kc, vc, cfg, scale, **kw),
                      return_mode="median")
        print(f"{T:>6} {G:>3} cmpS {name:<16} {ms:8.3f} ms  scores rel {d:.1e}", flush=True)
    if G == 16:
        on_off(T, G, "NSA forward, score dot",
               lambda f: setattr(cl, "CMP_SCORE_DOT", f),
               lambda: nsa_attention(**inp, config=cfg, backend="triton"))
    torch.cuda.empty_cache()


def run(T: int, G: int, fwd_variants, dq_variants, whole: bool) -> None:
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    import nsa.ops.descriptors as dsc
    from nsa import nsa_attention
    from nsa.ops.compression import cmp_forward
    from nsa.ops.selection import sel_forward, select_topn
    from nsa.ops.selection.bwd_launch import sel_backward
    from nsa.ops.window import win_forward

    cf, cfg, H, D, HQ, scale, inp = paper_case(T, G)
    q, k, v = inp["q"], inp["k_sel"], inp["v_sel"]
    o_cmp, scores = cmp_forward(q, inp["k_cmp"], inp["v_cmp"], cfg, scale)
    idx = select_topn(scores, T, inp["k_cmp"].shape[1], cfg)
    del scores
    o_win = win_forward(q, inp["k_win"], inp["v_win"], cfg.w, scale)
    fl = cf.floors(T, HQ, H, D, D, cfg.l, cfg.d, cfg.l_sel, cfg.n, cfg.w)
    l2 = fl["sel"]["l2_bytes"]

    # the group-centric kernels (the ones with descriptor loads) at every G
    def fwd(**kw):
        return sel_forward(q, k, v, idx, cfg, scale, g_sel=inp["g_sel"], o_cmp=o_cmp,
                           g_cmp=inp["g_cmp"], o_win=o_win, g_win=inp["g_win"], mode="group",
                           **kw)[1]

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
    sel_forward(q, k, v, idx, cfg, scale, lse=lse, mode="group")
    gate = inp["g_sel"].contiguous()
    delta = torch.randn(gate.shape, device="cuda", dtype=torch.float32)

    def dq_run(**kw):
        dq = torch.zeros(q.shape, device="cuda", dtype=torch.float32)
        sel_backward(q, k, v, idx, dout, gate, lse, delta, dq, cfg, scale, dq_only=True,
                     mode="group", **kw)
        return dq

    dq_base = dq_run(use_desc=False)
    dq = torch.zeros(q.shape, device="cuda", dtype=torch.float32)
    for name, kw in dq_variants(G):
        try:
            d = rel(dq_run(**kw), dq_base)
            ms = do_bench(lambda kw=kw: sel_backward(
                q, k, v, idx, dout, gate, lse, delta, dq, cfg, scale, dq_only=True,
                mode="group", **kw),
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
        on_off(T, G, "NSA forward, descriptors", lambda f: setattr(dsc, "USE_DESC", f),
               lambda: nsa_attention(**inp, config=cfg, backend="triton"), t_dense)
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--Ts", default="16384,65536")
    ap.add_argument("--no-groups", action="store_true", help="G = 16 only")
    ap.add_argument("--kernels", default="sel,cmp",
                    help="sel (forward + dQ), cmp (+ window), bwd (flash backward), "
                         "score (compressed block scores: reductions or tensor cores)")
    ap.add_argument("--block-n", action="store_true",
                    help="sel: also 16- and 32-key tiles (selected forward and dQ)")
    a = ap.parse_args()
    kernels = set(a.kernels.split(","))
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_desc_tune: needs a CUDA GPU")
    print(torch.cuda.get_device_name(), flush=True)

    def fwd_variants(G):
        v = [("ptr default", dict(use_desc=False))]
        for w, s in ((2, 2), (2, 3)):
            v.append((f"desc w{w} s{s}", dict(use_desc=True, num_warps=w, num_stages=s)))
        if a.block_n:  # keys per dot: smaller tiles, more programs per SM
            for bn, w, s in ((32, 2, 2), (32, 2, 3), (32, 2, 4), (32, 1, 3), (16, 1, 4),
                             (16, 2, 4)):
                v.append((f"desc n{bn} w{w} s{s}", dict(use_desc=True, num_warps=w,
                                                        num_stages=s, block_n=bn)))
        return v

    def dq_variants(G):
        v = [("ptr default", dict(use_desc=False))]
        for w, s in ((4, 3), (4, 2)):
            v.append((f"desc w{w} s{s}", dict(use_desc=True, dq_warps=w, dq_stages=s)))
        if a.block_n:
            for bn, w, s in ((64, 2, 3), (32, 2, 3), (32, 2, 4), (32, 4, 3), (16, 2, 4)):
                v.append((f"desc n{bn} w{w} s{s}", dict(use_desc=True, dq_warps=w,
                                                        dq_stages=s, dq_block_n=bn)))
        return v

    Ts = [int(x) for x in a.Ts.split(",")]
    groups = [16] + ([] if a.no_groups else [4, 1])
    for G in groups:
        for T in Ts if G == 16 else Ts[-1:]:
            if "cmp" in kernels:
                run_cmp_win(T, G)
            if "sel" in kernels:
                run(T, G, fwd_variants, dq_variants, whole=G == 16)
            if "bwd" in kernels:
                run_bwd(T, G)
            if "score" in kernels:
                run_score(T, G)


if __name__ == "__main__":
    main()
