"""Selected attention, group-centric against block-centric (``sel_forward(mode=...)``).

    python scripts/gpu_sel_modes.py                       # T = 16k, 64k; G = 1, 2, 4, 8, 16
    python scripts/gpu_sel_modes.py --Ts 16384 --groups 1,4 --no-variants
    python scripts/gpu_sel_modes.py --smoke               # CPU interpreter, tiny shapes

Paper shape but for the group size (H=4, HQ=4*G, d=128, bf16, l=32, d=16, l'=64, n=16,
w=512), block indices from the kernels' own selection on random inputs. For each (T, G)
it prints the median time (triton.testing.do_bench) of the selected forward with the gate
combine on both paths, the block path's variants (rows per dot, positions per program,
float32 partials, warps) and its inverted index alone, the largest relative difference of
each variant from the group path, then the whole NSA forward with each path forced and
dense SDPA in the same run (per query head: the G < 16 target of PERF.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from script_modules import load_script  # noqa: E402


def _check_forward():
    return load_script("gpu_check_forward")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--Ts", default="16384,65536")
    ap.add_argument("--groups", default="1,2,4,8,16")
    ap.add_argument("--no-variants", action="store_true")
    ap.add_argument("--bwd", action="store_true",
                    help="also the selected backward on each path (dQ group-centric, or "
                         "from the key-centric kernel by atomics / partials) and the "
                         "op's forward+backward")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU interpreter, tiny shapes (numbers meaningless)")
    args = ap.parse_args()
    cf = _check_forward()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        cf.DEVICE = "cpu"
    import torch
    import torch.nn.functional as F

    import nsa.ops.selection.launch as SL
    from nsa import NSAConfig, nsa_attention
    from nsa.ops.selection import sel_forward
    from nsa.ops.selection.bwd_launch import sel_backward
    from nsa.ops.selection.launch import entries_by_block

    bench = cf.bench
    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    H, d = 4, 128
    Ts = [int(x) for x in args.Ts.split(",")]
    groups = [int(x) for x in args.groups.split(",")]
    if args.smoke:
        cfg = NSAConfig(l=32, d=16, l_sel=64, n=4, n_initial=1, n_local=2, w=64)
        Ts, H, d, groups = [300], 1, 32, [1, 3]
    gpu = torch.cuda.get_device_name() if cf.DEVICE == "cuda" else "cpu (smoke)"
    print(f"GPU: {gpu}; torch {torch.__version__}", flush=True)
    def run_case(T: int, G: int) -> dict:
        HQ = H * G
        case = cf.combine_case(T, G, H, d, cfg)
        inp, scale, idx, sel = case["inp"], case["scale"], case["idx"], case["sel"]
        q = inp["q"]

        ref = sel(mode="group")
        variants = {"group": dict(mode="group"), "block": dict(mode="block")}
        if G >= 8:  # group path with several positions per program (union of their blocks)
            pp0 = max(1, 16 // (1 << (G - 1).bit_length()))
            variants.update({f"group pp{pp0 * f}": dict(mode="group",
                                                       positions_per_program=pp0 * f)
                             for f in (2, 4)})
            variants["group pp2 w4"] = dict(mode="group", positions_per_program=2 * pp0,
                                            num_warps=4)
        if not args.no_variants:
            variants.update({
                "block rows128": dict(mode="block", block_rows=128),
                "block rows64": dict(mode="block", block_rows=64),
                "block 2 stages": dict(mode="block", num_stages=2),
                "block seg256": dict(mode="block", seg_len=256),
                "block seg1024": dict(mode="block", seg_len=1024),
                "block fp32 partials": dict(mode="block", partial_dtype=torch.float32),
            })
        row = {"T": T, "G": G}
        for name, kw in variants.items():
            out = sel(**kw)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            row[name] = (bench(lambda kw=kw: sel(**kw)), err)
        nb = cfg.num_sel_blocks(T)
        row["inverted index"] = (bench(lambda: entries_by_block(idx, nb)), 0.0)
        for m in ("group", "block"):
            SL.SEL_MODE = m
            row[f"NSA fwd ({m})"] = (bench(lambda: nsa_attention(
                **inp, config=cfg, backend="triton")), 0.0)
            # host time per call: launches queued without waiting for the GPU
            nsa_attention(**inp, config=cfg, backend="triton")
            if cf.DEVICE == "cuda":
                torch.cuda.synchronize()
            t_host = time.perf_counter()
            for _ in range(20):
                nsa_attention(**inp, config=cfg, backend="triton")
            row[f"host per call ({m})"] = (1e3 * (time.perf_counter() - t_host) / 20, 0.0)
            if cf.DEVICE == "cuda":
                torch.cuda.synchronize()
        SL.SEL_MODE = None
        if args.bwd:
            # selected backward alone (dQ + dK/dV), then the whole op forward+backward
            lse = torch.empty(1, HQ, T, device=q.device, dtype=torch.float32)
            o_sel = sel_forward(q, inp["k_sel"], inp["v_sel"], idx, cfg, scale, lse=lse)[0]
            dout = torch.randn_like(q)
            gate = inp["g_sel"]
            delta = (gate.float() * (dout.float() * o_sel.float()).sum(-1)).contiguous()
            dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
            ref_dq = None
            for name, kw in (("bwd group", dict(mode="group")),
                             ("bwd block atomic", dict(mode="block", dq_atomic=True)),
                             ("bwd block partials", dict(mode="block", dq_atomic=False))):
                def one(kw=kw):
                    return sel_backward(q, inp["k_sel"], inp["v_sel"], idx, dout, gate, lse,
                                        delta, dq, cfg, scale, accumulate_dq=False, **kw)
                one()
                err = 0.0
                if ref_dq is None:
                    ref_dq = dq.clone()
                else:
                    err = ((dq - ref_dq).norm() / ref_dq.norm()).item()
                row[name] = (bench(one), err)
            leaves = {k: (x.detach().clone().requires_grad_(True) if torch.is_tensor(x) else x)
                      for k, x in inp.items()}
            for m in ("group", "block"):
                SL.SEL_MODE = m

                def fb():
                    out = nsa_attention(**leaves, config=cfg, backend="triton")
                    out.backward(dout)

                row[f"NSA fwd+bwd ({m})"] = (bench(fb), 0.0)
            SL.SEL_MODE = None
            if cf.DEVICE == "cuda":
                qt, kt, vt = (inp[k].transpose(1, 2).contiguous().requires_grad_(True)
                              for k in ("q", "k_sel", "v_sel"))
                dt = dout.transpose(1, 2).contiguous()

                def dense_fb():
                    F.scaled_dot_product_attention(qt, kt, vt, is_causal=True,
                                                   enable_gqa=True).backward(dt)

                row["dense fwd+bwd"] = (bench(dense_fb), 0.0)
        if cf.DEVICE == "cuda":
            qt, kt, vt = (inp[k].transpose(1, 2).contiguous() for k in ("q", "k_sel", "v_sel"))
            row["dense"] = (bench(lambda: F.scaled_dot_product_attention(
                qt, kt, vt, is_causal=True, enable_gqa=True)), 0.0)
        return row

    rows = []
    for T in Ts:
        for G in groups:
            t0 = time.time()
            row = run_case(T, G)
            rows.append(row)
            print(f"T={T} G={G}: " + "; ".join(
                f"{k}={v[0]:.3f}ms" + (f" (rel {v[1]:.1e})" if v[1] else "")
                for k, v in row.items() if isinstance(v, tuple)) +
                f" ({time.time() - t0:.0f}s)", flush=True)
            if cf.DEVICE == "cuda":
                torch.cuda.empty_cache()
    print(f"\n## Selected forward + combine, group vs block path ({gpu}, bf16, H={H}, d={d}, "
          f"n={cfg.n}, l'={cfg.l_sel}; median ms)")
    print("| T | G | group | block | inverted index | NSA fwd group | NSA fwd block | dense "
          "| NSA ms per query head (best) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        best = min(r["NSA fwd (group)"][0], r["NSA fwd (block)"][0])
        dense = r.get("dense", (float("nan"),))[0]
        print(f"| {r['T']} | {r['G']} | {r['group'][0]:.3f} | {r['block'][0]:.3f} | "
              f"{r['inverted index'][0]:.3f} | {r['NSA fwd (group)'][0]:.3f} | "
              f"{r['NSA fwd (block)'][0]:.3f} | {dense:.3f} | {best / (H * r['G']):.4f} |")

    if args.bwd:
        print(f"\n## Selected backward and NSA forward+backward ({gpu}, median ms)")
        print("| T | G | sel bwd group | sel bwd block (atomics) | sel bwd block (partials) "
              "| NSA f+b group | NSA f+b block | dense f+b |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['T']} | {r['G']} | {r['bwd group'][0]:.3f} | "
                  f"{r['bwd block atomic'][0]:.3f} | {r['bwd block partials'][0]:.3f} | "
                  f"{r['NSA fwd+bwd (group)'][0]:.3f} | {r['NSA fwd+bwd (block)'][0]:.3f} | "
                  f"{r.get('dense fwd+bwd', (float('nan'),))[0]:.3f} |")


if __name__ == "__main__":
    main()
