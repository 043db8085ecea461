"""Time the Triton NSA backward (per kernel and end to end) against dense SDPA on a GPU.

    python scripts/gpu_check_backward.py                   # paper shape, T = 8k..64k
    python scripts/gpu_check_backward.py --T 16384,65536   # chosen lengths
    python scripts/gpu_check_backward.py --compile-only    # no GPU: compile the backward
                                                           # kernels for sm_90, print
                                                           # registers/spills/smem/MMA

Paper shape: B=1, HQ=64, H=4 (G=16), d_k=d_v=128, bf16, l=32, d=16, l'=64, n=16, w=512.
Per length it prints: dense fwd+bwd (SDPA, is_causal, enable_gqa), NSA fwd (kernels
saving what the backward needs), NSA fwd+bwd (atomics and deterministic), each backward
piece alone (compressed flash backward, window flash backward, selected dQ + dK/dV
with the inverted-index build), and the peak memory of forward+backward of both.
Times are medians of triton.testing.do_bench (CUDA events, after warm-up).
GPU tests: python -m pytest -m gpu tests/gpu/test_triton_backward_gpu.py
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def compile_only() -> None:

    import triton
    from gpu_check_forward import (  # scripts/ is sys.path[0]
        loop_plain_loads,
        sm90_programs_per_sm,
    )
    from script_modules import resource_usage
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nsa.ops.flashbwd.kernels import _bwd_dkdv_kernel, _bwd_dq_kernel
    from nsa.ops.selection.bwd_kernels import (
        _sel_bwd_dkdv_kernel,
        _sel_bwd_dq_kernel,
        _sel_bwd_reduce_kernel,
    )

    ptr = {**{n: "*bf16" for n in ("Q", "K", "V", "DO", "K2", "V2", "OUT")},
           "GATE": "*fp32", "GATE2": "*fp32",  # gate_f32
           **{n: "*fp32" for n in ("LSE", "DELTA", "DKP", "DVP", "DQ", "DKO", "DVO", "DQX",
                                   "LSE2", "DELTA2")},
           **{n: "*i32" for n in ("IDX", "KEYS", "SEG_BLK", "SEG_LO", "SEG_HI", "SEG_FIRST",
                                  "SEG_COUNT")}}

    def one(fn, consts, warps, stages, extra=None):
        # one head-dim tile (the second tile of head_dim_split is not compiled here)
        consts = {**{k: 0 for k in ("DK2", "DKT2") if k in fn.arg_names}, **consts}
        sig = {}
        for name in fn.arg_names:
            sig[name] = ("constexpr" if name in consts else (extra or {}).get(name)
                         or ptr.get(name)
                         or ("fp32" if name in ("qk_scale", "sm_scale") else "i32"))
        # as a launch specialises them: pointers and strides divisible by 16 (not the
        # [B, HQ, T] log-sum-exp's head stride T or the index tables' strides)
        odd = {"stride_lh", "stride_eh", "stride_eb", "stride_sh", "stride_sb"}
        attrs = {(i,): [["tt.divisibility", 16]] for i, nm in enumerate(fn.arg_names)
                 if sig[nm].startswith("*") or (nm.startswith("stride_") and nm not in odd)}
        c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, "num_stages": stages})
        ru, regs = resource_usage(c)
        mma = ("wgmma" if "wgmma" in c.asm["ptx"] else
               "mma.sync" if "mma.sync" in c.asm["ptx"] else "-")
        occ = sm90_programs_per_sm(ru, c.metadata.shared, warps)
        return (f"w{warps} s{stages} smem={c.metadata.shared // 1024}KB {regs} {mma} {occ} "
                f"loop-loads={loop_plain_loads(c.asm['ttgir'])}")

    for G, d in ((16, 128), (4, 128), (1, 128), (4, 192), (16, 256), (3, 64)):
        G2 = 1 << (G - 1).bit_length()
        D = 1 << (d - 1).bit_length()
        from nsa.ops.flashbwd.launch import _configs
        from nsa.ops.selection.bwd_launch import _sel_bwd_config
        from nsa.ops.selection.launch import one_position_warps

        class _Cuda:
            type = "cuda"

        import nsa.ops.flashbwd.launch as FL
        import nsa.ops.selection.bwd_launch as SL

        FL.interpreting = SL.interpreting = lambda: False
        (bm1, bn1, w1, st1), (bm2, bn2, w2, st2) = _configs(D, D, G2, _Cuda())
        for mask in (0, 1):
            c = dict(G=G, GP2=G2, PP=max(1, bm1 // G2), BLOCK_N=bn1, DK=D, DV=D,
                     D_K=d, D_V=d, MASK=mask, CMP_L=32, CMP_D=16, DOT_PREC="tf32",
                     USE_DESC=False)
            print(f"dkdv mask={mask} G={G:2d} d={d}: " + one(_bwd_dkdv_kernel, c, w1, st1),
                  flush=True)
            for desc in (False, True) if d == D else (False,):
                c = dict(G=G, GP2=G2, PP=max(1, bm2 // G2), BLOCK_N=bn2, DK=D, DV=D,
                         D_K=d, D_V=d, MASK=mask, CMP_L=32, CMP_D=16, ACCUMULATE=True,
                         DOT_PREC="tf32", USE_DESC=desc, **dict.fromkeys(
                             ("K2", "V2", "GATE2", "LSE2", "DELTA2", "OUT")), MASK2=-1)
                td = ({n: f"tensordesc<bf16[1,{bn2},1,{D}]>" for n in ("K", "V")} if desc
                      else None)
                print(f"dq   mask={mask} desc={desc:d} G={G:2d} d={d}: "
                      + one(_bwd_dq_kernel, c, w2, st2, td), flush=True)
        # the compressed and window dQ in one kernel, final dQ in bf16 (flash_dq)
        for desc in (False, True) if d == D else (False,):
            c = dict(G=G, GP2=G2, PP=max(1, bm2 // G2), BLOCK_N=bn2, DK=D, DV=D,
                     D_K=d, D_V=d, MASK=0, MASK2=1, CMP_L=32, CMP_D=16, ACCUMULATE=True,
                     DOT_PREC="tf32", USE_DESC=desc)
            td = ({n: f"tensordesc<bf16[1,{bn2},1,{D}]>" for n in ("K", "V", "K2", "V2")}
                  if desc else None)
            print(f"dq   cmp+win desc={desc:d} G={G:2d} d={d}: "
                  + one(_bwd_dq_kernel, c, w2, st2, td), flush=True)
        for desc in (False, True) if d == D else (False,):
            bnq, wq, stq, bmk, bnk, wk, st = _sel_bwd_config(D, D, G2, 64, _Cuda(), desc)
            wq = one_position_warps(max(1, 16 // G2), D, D, True, wq)
            c = dict(G=G, GP2=G2, PP=max(1, 16 // G2), DK=D, DV=D, D_K=d, D_V=d, L_SEL=64,
                     BLOCK_N=bnq, N_SEL=16, NP=16, ACCUMULATE=True, DOT_PREC="tf32",
                     USE_DESC=desc)
            td = {n: f"tensordesc<bf16[1,{bnq},1,{D}]>" for n in ("K", "V")} if desc else None
            print(f"sel dq desc={desc:d} G={G:2d} d={d}: "
                  + one(_sel_bwd_dq_kernel, c, wq, stq, td),
                  flush=True)
        # dq_out: 0 dK/dV only, 1 also dQ by atomics, 2 also dQ partials (mode "block")
        for atomic, dq_out in ((True, 0), (False, 0), (True, 1), (True, 2)):
            if dq_out and G > 8:
                continue
            c = dict(G=G, GP2=G2, PP=max(1, bmk // G2), DK=D, DV=D, D_K=d, D_V=d,
                     L_SEL=64, BLOCK_N=bnk, NSUB=64 // bnk, ATOMIC=atomic, DOT_PREC="tf32",
                     N_SEL=16, DQ_OUT=dq_out)
            print(f"sel dkdv atomic={atomic:d} dq_out={dq_out} G={G:2d} d={d}: "
                  + one(_sel_bwd_dkdv_kernel, c, wk, st), flush=True)
    c = dict(DKT=128, DVT=128, D_K=128, D_V=128, L_SEL=64, BLOCK_N=64, NSUB=1)
    print("sel reduce d=128: " + one(_sel_bwd_reduce_kernel, c, 4, 1,
                                     {"DK": "*bf16", "DV": "*bf16", "DKP": "*fp32",
                                      "DVP": "*fp32"}))


def bench_gpu(lengths: list[int]) -> None:
    import torch

    from nsa import NSAConfig

    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    B, H, G, D = 1, 4, 16, 128
    HQ = H * G
    dt = torch.bfloat16
    scale = D ** -0.5
    print(f"{torch.cuda.get_device_name()}: paper shape B={B} HQ={HQ} H={H} d={D} bf16, "
          f"l=32 d=16 l'=64 n=16 w=512; times in ms (do_bench medians)")
    hdr = (f"{'T':>6} {'dense f+b':>9} {'nsa fwd':>8} {'nsa f+b':>8} {'x dense':>7} "
           f"{'det f+b':>8} {'cmp bwd':>8} {'win bwd':>8} {'sel dq':>7} {'sel dkdv':>8} "
           f"{'inv idx':>7} {'sel det':>7} {'peak nsa':>8} {'peak dns':>8}")
    print(hdr)
    for T in lengths:
        _one_length(T, cfg, B, H, G, D, HQ, dt, scale)
        torch.cuda.empty_cache()


def fwd_bwd_callables(leaves, dout, cfg):
    """(nsa_fb(det=False), dense_fb): NSA (Triton) and dense SDPA forward+backward, each
    returning the gradients of its inputs for ``dout``; ``leaves`` require grad."""
    import torch
    import torch.nn.functional as F

    from nsa import nsa_attention

    inputs = list(leaves.values())

    def nsa_fb(det=False):
        out = nsa_attention(**leaves, config=cfg, backend="triton", deterministic=det)
        return torch.autograd.grad(out, inputs, dout)

    qd, kd, vd = (leaves[k].detach().transpose(1, 2).contiguous().requires_grad_(True)
                  for k in ("q", "k_sel", "v_sel"))
    dd = dout.transpose(1, 2).contiguous()

    def dense_fb():
        o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
        return torch.autograd.grad(o, (qd, kd, vd), dd)

    return nsa_fb, dense_fb


def _one_length(T, cfg, B, H, G, D, HQ, dt, scale) -> None:
    import torch
    from triton.testing import do_bench

    from nsa import compress_mean
    from nsa.ops.flashbwd import MASK_CMP, MASK_WIN, flash_backward
    from nsa.ops.selection.bwd_launch import inverted_index, sel_backward
    from nsa.ops.triton_backend import forward_kernels

    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*s, sc=1.0):
        return (torch.randn(*s, generator=g, device="cuda") * sc).to(dt)

    raw_k = r(B, T, H, D)
    leaves = dict(q=r(B, T, HQ, D), k_sel=r(B, T, H, D), v_sel=r(B, T, H, D),
                  k_win=r(B, T, H, D), v_win=r(B, T, H, D),
                  k_cmp=compress_mean(raw_k, cfg.l, cfg.d),
                  v_cmp=compress_mean(r(B, T, H, D), cfg.l, cfg.d),
                  **{f"g_{b}": torch.rand(B, T, HQ, generator=g, device="cuda").to(dt)
                     for b in ("cmp", "sel", "win")})
    for v in leaves.values():
        v.requires_grad_(True)
    dout = r(B, T, HQ, D)
    nsa_fb, dense_fb = fwd_bwd_callables(leaves, dout, cfg)

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        res = fn()
        torch.cuda.synchronize()
        p = torch.cuda.max_memory_allocated() - base
        del res
        return p / 2**30

    grads = nsa_fb()
    bad = [i for i, x in enumerate(grads) if not torch.isfinite(x).all()]
    del grads
    p_nsa, p_dense = peak(nsa_fb), peak(dense_fb)
    t_dense = do_bench(dense_fb)
    t_fb = do_bench(nsa_fb)
    t_det = do_bench(lambda: nsa_fb(True))
    det_a, det_b = nsa_fb(True), nsa_fb(True)
    det_equal = all(torch.equal(a, b) for a, b in zip(det_a, det_b, strict=True))
    del det_a, det_b
    with torch.no_grad():
        det_leaves = {k: v.detach() for k, v in leaves.items()}
        t_fwd = do_bench(lambda: forward_kernels(**det_leaves, block_indices=None, cfg=cfg,
                                                 scale=scale, save=True, want_o_sel=False))
        fk = forward_kernels(**det_leaves, block_indices=None, cfg=cfg, scale=scale,
                             save=True, want_o_sel=False)
        q = det_leaves["q"]
        dq = torch.zeros(q.shape, device="cuda", dtype=torch.float32)

        def prep(o, gname):
            rr = (dout.float() * o.float()).sum(-1)
            gate = det_leaves[gname].contiguous()
            return gate, (gate.float() * rr).contiguous()

        gc, dc = prep(fk["o_cmp"], "g_cmp")
        gw, dw = prep(fk["o_win"], "g_win")
        gs, ds = prep(fk["o_sel"], "g_sel")
        t_cmp = do_bench(lambda: flash_backward(
            q, det_leaves["k_cmp"], det_leaves["v_cmp"], dout, gc, fk["lse_cmp"], dc, dq,
            scale, mask=MASK_CMP, cmp_l=cfg.l, cmp_d=cfg.d))
        t_win = do_bench(lambda: flash_backward(
            q, det_leaves["k_win"], det_leaves["v_win"], dout, gw, fk["lse_win"], dw, dq,
            scale, mask=MASK_WIN, w=cfg.w))
        t_sel = do_bench(lambda: sel_backward(
            q, det_leaves["k_sel"], det_leaves["v_sel"], fk["idx"], dout, gs,
            fk["lse_sel"], ds, dq, cfg, scale))
        t_sel_det = do_bench(lambda: sel_backward(
            q, det_leaves["k_sel"], det_leaves["v_sel"], fk["idx"], dout, gs,
            fk["lse_sel"], ds, dq, cfg, scale, deterministic=True))
        nb = cfg.num_sel_blocks(T)
        t_inv = do_bench(lambda: inverted_index(fk["idx"], T, nb, 1024))
        # the dK/dV column is (dQ + dK/dV) - dQ alone (the group-centric dQ kernel; where
        # G <= 8 runs the block path, dQ is formed inside dK/dV and the column is 0)
        t_dq = do_bench(lambda: sel_backward(
            q, det_leaves["k_sel"], det_leaves["v_sel"], fk["idx"], dout, gs,
            fk["lse_sel"], ds, dq, cfg, scale, dq_only=True))
    print(f"{T:>6} {t_dense:>9.2f} {t_fwd:>8.2f} {t_fb:>8.2f} {t_dense / t_fb:>6.2f}x "
          f"{t_det:>8.2f} {t_cmp:>8.2f} {t_win:>8.2f} {t_dq:>7.2f} {t_sel - t_dq:>8.2f} "
          f"{t_inv:>7.2f} {t_sel_det:>7.2f} {p_nsa:>7.2f}G {p_dense:>7.2f}G"
          + ("" if det_equal else "  DETERMINISTIC MISMATCH")
          + (f"  NON-FINITE grads {bad}" if bad else ""), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--T", default="8192,16384,32768,65536")
    a = ap.parse_args()
    if a.compile_only:
        compile_only()
    else:
        bench_gpu([int(x) for x in a.T.split(",")])


if __name__ == "__main__":
    main()
