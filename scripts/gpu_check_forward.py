"""Time the Triton NSA prefill forward against dense SDPA on a CUDA GPU; print a table.

    python scripts/gpu_check_forward.py                  # paper shape, T = 8k..64k
    python scripts/gpu_check_forward.py --quick          # T = 8k and 16k only
    python scripts/gpu_check_forward.py --out DIR        # also write DIR/forward_bench.json
    python scripts/gpu_check_forward.py --groups 8,4,2,1 # time more group sizes at 64k
    python scripts/gpu_check_forward.py --compile-only   # no GPU: compile every kernel for
                                                         # sm_90 and print registers/spills

Paper shape: B=1, HQ=64, H=4 (G=16), d_k=d_v=128, bf16, l=32, d=16, l'=64, n=16, w=512.
Dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) in
[B, HQ, T, D] layout. Times are medians of triton.testing.do_bench (CUDA events, after a
warm-up that includes compilation), inputs random normal, built outside the timed region.
Each row also gives the kernel's floor from PERF.md: max(FLOPs / 700 TFLOP/s,
compulsory HBM bytes / 3 TB/s); the selected-attention row adds the bytes it must pull
from L2 (every position reads its n*l' keys and values; with random data no two
positions share a block), which no FLOP floor shows.
GPU tests: python -m pytest -m gpu tests/gpu/test_triton_forward_gpu.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PEAK_FLOPS = 700e12
PEAK_BYTES = 3.0e12


def floors(T: int, HQ: int, H: int, dk: int, dv: int, l: int, d: int, ls: int, n: int,
           w: int) -> dict[str, dict[str, float]]:
    """FLOPs and compulsory bytes per kernel (bf16 inputs, fp32 scores)."""
    import torch

    t = torch.arange(T, dtype=torch.float64)
    nvis = torch.clamp(torch.div(t + 1 - l + d, d, rounding_mode="floor"), min=0)
    cur = torch.div(t, ls, rounding_mode="floor")
    n_sel_tok = torch.minimum(cur + 1, torch.tensor(float(n))) * ls - (ls - 1 - (t % ls))
    n_sel_tok = torch.minimum(n_sel_tok, t + 1)
    n_win = torch.minimum(t + 1, torch.tensor(float(w)))
    pair = 2 * (dk + dv)
    N = max(0, (T - l) // d + 1)
    nb = -(-T // ls)
    q_b, o_b = T * HQ * dk * 2, T * HQ * dv * 2
    kv_b = T * H * (dk + dv) * 2
    sc_b = H * T * nb * 4
    out = {
        "dense": dict(flops=HQ * (t + 1).sum().item() * pair, bytes=q_b + kv_b + o_b),
        "cmp_attn": dict(flops=HQ * nvis.sum().item() * pair,
                         bytes=q_b + N * H * (dk + dv) * 2 + o_b),
        "cmp_fused": dict(flops=HQ * nvis.sum().item() * (pair + 2 * dk),
                          bytes=q_b + N * H * (dk + dv) * 2 + o_b + sc_b),
        "topn": dict(flops=0.0, bytes=sc_b + T * H * n * 4),
        "win": dict(flops=HQ * n_win.sum().item() * pair, bytes=q_b + kv_b + o_b),
        "sel": dict(flops=HQ * n_sel_tok.sum().item() * pair,
                    bytes=q_b + kv_b + 3 * o_b + 3 * T * HQ * 2 + T * H * n * 4,
                    l2_bytes=H * n_sel_tok.sum().item() * (dk + dv) * 2),
    }
    for v in out.values():
        v["floor_ms"] = 1e3 * max(v["flops"] / PEAK_FLOPS, v["bytes"] / PEAK_BYTES)
    out["nsa"] = dict(flops=sum(out[k]["flops"] for k in ("cmp_fused", "sel", "win")),
                      bytes=sum(out[k]["bytes"] for k in ("cmp_fused", "topn", "sel", "win")))
    out["nsa"]["floor_ms"] = sum(out[k]["floor_ms"] for k in ("cmp_fused", "topn", "sel", "win"))
    return out


DEVICE = "cuda"


def bench(fn) -> float:
    if DEVICE != "cuda":  # --smoke: one timed call on the CPU interpreter
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_bench(fn) -> float:
    """The median time of ``fn`` replayed from a CUDA graph (``nsa prefill``'s own
    capture-and-time, :func:`nsabench.runners.common.graph_bench`): the GPU time of its
    work without the host's launch cost."""
    import torch

    from nsabench.runners.common import graph_bench as capture_and_time

    t, why = capture_and_time(fn, torch.device("cuda"))
    if t is None:
        raise RuntimeError(f"graph_bench: {why}")
    return t.ms


def block_scores(T, G, H, d, cfg):
    """Group block scores of random paper-shape inputs (H KV heads, G query heads each,
    d_k = d_v = d; bf16 on the GPU, float32 in the interpreter) from the compressed
    kernel, and the number of compressed tokens: the top-n's input."""
    import torch

    from nsa.ops.compression import cmp_forward

    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    inp = make(T, H * G, H, d, d, cfg, dtype)
    _, scores = cmp_forward(inp["q"], inp["k_cmp"], inp["v_cmp"], cfg, d ** -0.5)
    return scores, inp["k_cmp"].shape[1]


def _selection_inputs(T, G, H, d, cfg, seed=0):
    """(inputs of :func:`make`, scale, the compressed kernel's output, the kernels' own
    top-n) on random paper-shape data."""
    import torch

    from nsa.ops.compression import cmp_forward
    from nsa.ops.selection import select_topn

    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    inp = make(T, H * G, H, d, d, cfg, dtype, seed=seed)
    scale = d ** -0.5
    o_cmp, scores = cmp_forward(inp["q"], inp["k_cmp"], inp["v_cmp"], cfg, scale)
    idx = select_topn(scores, T, inp["k_cmp"].shape[1], cfg)
    return inp, scale, o_cmp, idx


def selected_case(T, G, H, d, cfg, seed=0):
    """Inputs of the selected branch on random paper-shape data (as :func:`block_scores`):
    a dict with ``inp`` (:func:`make`), ``scale``, ``o_cmp`` and ``idx`` (the compressed
    kernel's output and the kernels' own top-n), ``lse`` and ``o_sel`` (the group path's
    forward), a random ``dout`` and the branch's ``delta`` = g_sel * rowsum(dout * O_sel):
    what the selected forward and backward take."""
    import torch

    from nsa.ops.selection import sel_forward

    inp, scale, o_cmp, idx = _selection_inputs(T, G, H, d, cfg, seed)
    q = inp["q"]
    lse = torch.empty(1, H * G, T, device=q.device, dtype=torch.float32)
    o_sel = sel_forward(q, inp["k_sel"], inp["v_sel"], idx, cfg, scale, lse=lse,
                        mode="group")[0]
    dout = torch.randn_like(q)
    delta = (inp["g_sel"].float() * (dout.float() * o_sel.float()).sum(-1)).contiguous()
    return dict(inp=inp, scale=scale, o_cmp=o_cmp, idx=idx, lse=lse, o_sel=o_sel, dout=dout,
                delta=delta)


def combine_case(T, G, H, d, cfg, seed=0):
    """The selected forward with the gate combine on random paper-shape data: a dict with
    ``inp`` (:func:`make`), ``scale``, ``idx`` (the kernels' own top-n), ``o_cmp``,
    ``o_win`` and ``sel(**kw)``, which runs ``sel_forward`` with every branch's output and
    gate and returns the combined output (``kw``: its options, e.g. ``mode``)."""
    from nsa.ops.selection import sel_forward
    from nsa.ops.window import win_forward

    inp, scale, o_cmp, idx = _selection_inputs(T, G, H, d, cfg, seed)
    q = inp["q"]
    o_win = win_forward(q, inp["k_win"], inp["v_win"], cfg.w, scale)

    def sel(**kw):
        return sel_forward(q, inp["k_sel"], inp["v_sel"], idx, cfg, scale,
                           g_sel=inp["g_sel"], o_cmp=o_cmp, g_cmp=inp["g_cmp"],
                           o_win=o_win, g_win=inp["g_win"], **kw)[1]

    return dict(inp=inp, scale=scale, idx=idx, o_cmp=o_cmp, o_win=o_win, sel=sel)


def kernel_ms(fn, calls: int = 3) -> dict[str, float]:
    """GPU time per call of every kernel ``fn`` launches (torch.profiler, after one warm
    call), largest first."""
    from collections import defaultdict

    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name] += ev.device_time / (1e3 * calls)
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def tuning_setup(doc: str, Ts: str, groups: str, smoke_H: int, smoke_groups: list[int],
                 extra=None):
    """Argument parsing and paper-shape setup shared by the tuning scripts:
    (args, cfg, H, d, Ts, groups). --smoke runs them on the CPU interpreter (set before
    any kernel is defined) with T = 700, d = 32 and the given heads and groups. ``extra``:
    a function that adds the script's own arguments to the parser."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--Ts", default=Ts)
    ap.add_argument("--groups", default=groups)
    ap.add_argument("--smoke", action="store_true",
                    help="CPU interpreter, tiny shapes (numbers meaningless)")
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    global DEVICE
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        DEVICE = "cpu"
    from nsa import NSAConfig

    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    if args.smoke:
        return args, cfg, smoke_H, 32, [700], smoke_groups
    return (args, cfg, 4, 128, [int(x) for x in args.Ts.split(",")],
            [int(x) for x in args.groups.split(",")])


def make(T, HQ, H, dk, dv, cfg, dtype, seed=0):
    import torch

    from nsa import compress_mean

    device = DEVICE
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device).to(dtype)  # noqa: E731
    k_raw, v_raw = r(1, T, H, dk), r(1, T, H, dv)
    return dict(
        q=r(1, T, HQ, dk), k_sel=r(1, T, H, dk), v_sel=r(1, T, H, dv), k_win=r(1, T, H, dk),
        v_win=r(1, T, H, dv), k_cmp=compress_mean(k_raw, cfg.l, cfg.d),
        v_cmp=compress_mean(v_raw, cfg.l, cfg.d),
        **{f"g_{b}": torch.rand(1, T, HQ, generator=g, device=device).to(dtype)
           for b in ("cmp", "sel", "win")},
    )


def run_case(T, HQ, H, d, cfg, per_kernel=True, variants=False, dense=True):
    import torch
    import torch.nn.functional as F

    from nsa import nsa_attention
    from nsa.ops.compression import cmp_forward
    from nsa.ops.selection import sel_forward, select_topn
    from nsa.ops.window import win_forward

    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    inp = make(T, HQ, H, d, d, cfg, dtype)
    scale = d ** -0.5
    row: dict[str, float] = {}
    fl = floors(T, HQ, H, d, d, cfg.l, cfg.d, cfg.l_sel, cfg.n, cfg.w)
    if dense:
        qt, kt, vt = (inp[k].transpose(1, 2).contiguous() for k in ("q", "k_sel", "v_sel"))
        row["dense"] = bench(lambda: F.scaled_dot_product_attention(
            qt, kt, vt, is_causal=True, enable_gqa=True))
        del qt, kt, vt
    if DEVICE != "cuda":
        row["dense"] = float("nan")
    row["nsa"] = bench(lambda: nsa_attention(**inp, config=cfg, backend="triton"))
    if per_kernel:
        q, kc, vc = inp["q"], inp["k_cmp"], inp["v_cmp"]
        N = kc.shape[1]
        row["cmp_fused"] = bench(lambda: cmp_forward(q, kc, vc, cfg, scale, mode="fused"))
        row["cmp_two_pass"] = bench(lambda: cmp_forward(q, kc, vc, cfg, scale, mode="two_pass"))
        row["cmp_attn"] = bench(lambda: cmp_forward(q, kc, vc, cfg, scale, want_scores=False))
        o_cmp, scores = cmp_forward(q, kc, vc, cfg, scale)
        row["topn"] = bench(lambda: select_topn(scores, T, N, cfg))
        idx = select_topn(scores, T, N, cfg)
        row["win"] = bench(lambda: win_forward(q, inp["k_win"], inp["v_win"], cfg.w, scale))
        o_win = win_forward(q, inp["k_win"], inp["v_win"], cfg.w, scale)

        def sel(**kw):
            return sel_forward(q, inp["k_sel"], inp["v_sel"], idx, cfg, scale,
                               g_sel=inp["g_sel"], o_cmp=o_cmp, g_cmp=inp["g_cmp"],
                               o_win=o_win, g_win=inp["g_win"], **kw)

        row["sel"] = bench(sel)
        if variants:
            # the previous defaults, for comparison in the same run
            row["sel_w4"] = bench(lambda: sel(num_warps=4))
            row["topn_rows16"] = bench(lambda: select_topn(scores, T, N, cfg, rows=16))
            row["cmp_fused_bm128w8"] = bench(lambda: cmp_forward(
                q, kc, vc, cfg, scale, block_m=128, num_warps=8))
            row["win_bm64w4"] = bench(lambda: win_forward(
                q, inp["k_win"], inp["v_win"], cfg.w, scale, block_m=64, num_warps=4))
        del o_cmp, scores, idx, o_win
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row, fl


def sm90_programs_per_sm(resource_usage: str, smem_bytes: int, warps: int) -> str:
    """Programs of one kernel an SM 9.0 multiprocessor holds at once, and what limits it
    (registers, shared memory or warps), from ``cuobjdump --dump-resource-usage`` text:
    64K registers (allocated per warp in units of 256), 228 KB of shared memory (1 KB of it
    reserved per program), 64 warps. A kernel that fits one program per SM hides no
    latency with a second one (backward b4 in docs/perf-notes.md)."""
    import re

    m = re.search(r"REG:(\d+)", resource_usage)
    regs = int(m.group(1)) if m else 0
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by = {"registers": 65536 // (per_warp * warps),
          "shared memory": (228 * 1024) // (smem_bytes + 1024),
          "warps": 64 // warps}
    limit = min(by, key=by.get)
    return f"{by[limit]}/SM ({limit})"


def loop_plain_loads(ttgir: str) -> int:
    """Global loads inside loops that Triton's pipeliner left synchronous (``tt.load`` in a
    ``scf.for`` body of the final TTGIR): each one waits on its latency every step. Loads of
    2-byte elements one per row (a bf16 gate) end up here; the backward's gate was one
    (backward b6 in docs/perf-notes.md)."""
    n, depth = 0, []
    for line in ttgir.splitlines():
        ind = len(line) - len(line.lstrip())
        if depth and line.strip().startswith("}") and ind <= depth[-1]:
            depth.pop()  # the closing brace of the innermost open loop
        elif "scf.for" in line:
            depth.append(ind)
        elif depth and "tt.load " in line:
            n += 1
    return n


def compile_only() -> None:
    """Compile every kernel for sm_90 without a GPU; print registers, spills, smem, MMA,
    and loads left synchronous inside loops."""

    import triton
    from script_modules import resource_usage
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nsa.ops.compression.kernels import _cmp_fwd_kernel
    from nsa.ops.selection.kernels import (
        _sel_fwd_blocks_kernel,
        _sel_fwd_kernel,
        _sel_merge_kernel,
        _topn_kernel,
    )
    from nsa.ops.selection.launch import _sel_config, one_position_warps
    from nsa.ops.window.kernels import _win_fwd_kernel

    class _Cuda:
        type = "cuda"

    # the launchers' own tile choices for an SM 9.0 device (no GPU here)
    import nsa.ops.compression.launch as CL
    import nsa.ops.window.launch as WL

    CL.interpreting = lambda: False
    CL.cuda_capability = WL.cuda_capability = lambda device: (9, 0)

    not16 = {"stride_lh", "stride_st", "stride_it", "stride_ib", "stride_ih", "stride_sb",
             "stride_sh", "stride_lb", "stride_eb", "stride_eh", "stride_fb", "stride_fh",
             "stride_lt", "stride_lj", "stride_xb", "stride_xt", "stride_xh", "stride_xj"}
    not16 |= {f"stride_g{a}{b}" for a in "scw" for b in "bth"}

    def one(fn, ptrs, consts, warps, stages):
        sig = {}
        for name in fn.arg_names:
            sig[name] = ("constexpr" if name in consts else ptrs.get(name)
                         or ("fp32" if name == "qk_scale" else "i32"))
        attrs = {(i,): [["tt.divisibility", 16]] for i, nm in enumerate(fn.arg_names)
                 if sig[nm].startswith("*") or (nm.startswith("stride_") and nm not in not16)}
        c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, "num_stages": stages})
        ru, regs = resource_usage(c)
        mma = ("wgmma" if "wgmma" in c.asm["ptx"] else
               "mma.sync" if "mma.sync" in c.asm["ptx"] else "-")
        occ = sm90_programs_per_sm(ru, c.metadata.shared, warps)
        return (f"w{warps} s{stages} smem={c.metadata.shared // 1024}KB {regs} {mma} {occ} "
                f"loop-loads={loop_plain_loads(c.asm['ttgir'])}")

    bf = {n: "*bf16" for n in ("Q", "K", "K2", "V", "O", "OB", "OC", "OW", "GS", "GC", "GW")}
    # (G, d_k, d_v); the paper's head dims are d_k = 192, d_v = 128
    for G, d, dv in ((16, 128, 128), (4, 128, 128), (1, 128, 128), (4, 192, 192),
                     (4, 192, 128), (16, 192, 128), (16, 256, 256), (3, 64, 64)):
        G2 = 1 << (G - 1).bit_length()
        DVt = 1 << (dv - 1).bit_length()
        DK, DK2 = CL.head_dim_split(d)  # the kernels' q/k tiles (d = 192: 128 + 64)
        # the launchers' defaults on SM 9.0 (nsa.ops.descriptors): every tile full
        desc = d == DK + DK2 and dv == DVt

        def tdesc(bn, DK=DK, DK2=DK2, DVt=DVt, desc=desc):
            if not desc:
                return {}
            return {"K": f"tensordesc<bf16[1,{bn},1,{DK}]>",
                    "K2": f"tensordesc<bf16[1,{bn},1,{DK2 or DK}]>",
                    "V": f"tensordesc<bf16[1,{bn},1,{DVt}]>"}

        for p1, p2 in ((True, True), (True, False), (False, True)):
            bm, bn, w, st = CL._cmp_config(DK, DVt, G2, 4, _Cuda(), pass2_only=not p1, DK2=DK2)
            c = dict(G=G, GP2=G2, PP=max(1, bm // G2), BLOCK_N=bn, DK=DK, DV=DVt, D_K=d,
                     D_V=dv, CMP_L=32, CMP_D=16, SEL_B=4, SEL_A=2, PASS1=p1, PASS2=p2,
                     DO_PV=True, STORE_LSE=not p2, DOT_PREC="tf32", USE_DESC=desc,
                     SCORE_DOT=G2 <= 4, BJ2=max(16, 1 << (bn // 4).bit_length()), DK2=DK2)
            print(f"cmp  G={G:2d} d={d}/{dv} pass1={p1:d} pass2={p2:d} desc={desc:d}: " + one(
                _cmp_fwd_kernel, {**bf, "LSE": "*fp32", "SCORES": "*fp32", **tdesc(bn)}, c, w,
                st), flush=True)
        bm, bn, w, st = WL._win_config(DK, DVt, G2, _Cuda(), desc, DK2)
        c = dict(G=G, GP2=G2, PP=max(1, bm // G2), BLOCK_N=bn, DK=DK, DV=DVt,
                 D_K=d, D_V=dv, STORE_LSE=True, DOT_PREC="tf32", USE_DESC=desc, DK2=DK2)
        print(f"win  G={G:2d} d={d}/{dv} desc={desc:d}: " + one(
            _win_fwd_kernel, {**bf, "LSE": "*fp32", **tdesc(bn)}, c, w, st))
        for dsc in (False, True) if desc else (False,):
            bn, w, st = _sel_config(DK, DVt, 64, _Cuda(), dsc)
            w = one_position_warps(max(1, 16 // G2), DK, DVt, True, w, up_to=256)
            c = dict(G=G, GP2=G2, PP=max(1, 16 // G2), DK=DK, DV=DVt, D_K=d, D_V=dv, L_SEL=64,
                     BLOCK_N=bn, N_SEL=16, NP=16, WRITE_OUT=True,
                     WRITE_BRANCH=False, HAS_CMP=True, HAS_WIN=True, STORE_LSE=True,
                     DOT_PREC="tf32", USE_DESC=dsc, DK2=DK2)
            print(f"sel  desc={dsc:d} G={G:2d} d={d}/{dv} w{w} s{st}: " + one(
                _sel_fwd_kernel, {**bf, "IDX": "*i32", "LSE": "*fp32",
                                  **tdesc(bn, desc=dsc)}, c, w, st))
        if G <= 8:  # the block-centric path (launcher defaults on the GPU)
            c = dict(G=G, GP2=G2, PP=max(1, 64 // G2), SEG=512, DK=DK, DV=DVt, D_K=d,
                     D_V=dv, L_SEL=64, BLOCK_N=64, N_SEL=16, DOT_PREC="tf32", DK2=DK2,
                     PREFETCH=G2 != 2 and DK + DK2 <= 128)  # the launcher's rule
            print(f"sel blocks G={G:2d} d={d} w4 s3: " + one(
                _sel_fwd_blocks_kernel, {**bf, "KEYS": "*i32", "OFF": "*i32", "PO": "*bf16",
                                         "PL": "*fp32"}, c, 4, 3))
            mrows = 128 if DVt <= 128 else 64  # the launcher's merge tile
            c = dict(G=G, GP2=G2, PP=max(1, mrows // G2), DV=DVt, D_V=dv, N_SEL=16, NJ=16,
                     WRITE_OUT=True, WRITE_BRANCH=False, HAS_CMP=True, HAS_WIN=True,
                     STORE_LSE=True)
            print(f"sel merge  G={G:2d} d={d} w4 s2: " + one(
                _sel_merge_kernel, {**bf, "PO": "*bf16", "PL": "*fp32", "IDX": "*i32",
                                    "LSE": "*fp32"}, c, 4, 2))
    c = dict(CMP_L=32, CMP_D=16, L_SEL=64, SEL_B=4, SEL_A=2, N_SEL=16, N_INIT=1, N_LOCAL=2,
             K_FREE=13, P=16, NOUT=16, ROWS=16, CH=128)
    print("topn n=16: " + one(_topn_kernel, {"SCORES": "*fp32", "IDX": "*i32"}, c, 4, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T = 8192 and 16384 only")
    ap.add_argument("--out", default=None, help="folder for forward_bench.json")
    ap.add_argument("--compile-only", action="store_true",
                    help="no GPU: compile every kernel for sm_90 and print resources")
    ap.add_argument("--Ts", default=None, help="comma-separated sequence lengths")
    ap.add_argument("--no-groups", action="store_true", help="skip the G < 16 rows")
    ap.add_argument("--groups", default="4,1",
                    help="group sizes G < 16 timed at the largest T with H=4 (HQ = 4*G); "
                         "default 4,1 (try 8,4,2,1)")
    ap.add_argument("--smoke", action="store_true",
                    help="no GPU: run this script's code paths on tiny shapes on the CPU "
                         "interpreter (TRITON_INTERPRET=1), numbers meaningless")
    args = ap.parse_args()
    if args.compile_only:
        compile_only()
        return
    if args.smoke:
        global DEVICE
        os.environ["TRITON_INTERPRET"] = "1"
        DEVICE = "cpu"

    import torch
    import triton

    from nsa import NSAConfig, nsa_attention

    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check_forward: needs a CUDA GPU (or --compile-only / --smoke)")
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter smoke run)"
    print(f"GPU: {gpu}; torch {torch.__version__}; triton {triton.__version__}", flush=True)
    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    Ts = ([int(x) for x in args.Ts.split(",")] if args.Ts else
          [8192, 16384] if args.quick else [8192, 16384, 32768, 65536])
    HQ, H, d = 64, 4, 128
    groups = tuple((int(g), 4 * int(g)) for g in args.groups.split(","))
    if args.smoke:
        cfg = NSAConfig(l=32, d=16, l_sel=64, n=4, n_initial=1, n_local=2, w=64)
        Ts, HQ, H, d, groups = [300], 4, 1, 32, ((1, 1),)
    results = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
               "rows": []}
    for T in Ts:
        t0 = time.time()
        row, fl = run_case(T, HQ, H, d, cfg, variants=(T == Ts[-1]), dense=DEVICE == "cuda")
        results["rows"].append(dict(T=T, G=HQ // H, HQ=HQ, H=H, ms=row,
                                    floor_ms={k: v["floor_ms"] for k, v in fl.items()},
                                    flops={k: v["flops"] for k, v in fl.items()},
                                    l2_bytes=fl["sel"]["l2_bytes"]))
        print(f"T={T}: " + " ".join(f"{k}={v:.3f}ms" for k, v in row.items())
              + f" ({time.time() - t0:.0f}s)", flush=True)
    if not args.no_groups:
        T = Ts[-1]
        for G, HQg in groups:
            row, fl = run_case(T, HQg, H, d, cfg, dense=DEVICE == "cuda")
            results["rows"].append(dict(T=T, G=G, HQ=HQg, H=H, ms=row,
                                        floor_ms={k: v["floor_ms"] for k, v in fl.items()},
                                        flops={k: v["flops"] for k, v in fl.items()},
                                        l2_bytes=fl["sel"]["l2_bytes"]))
            print(f"T={T} G={G}: " + " ".join(f"{k}={v:.3f}ms" for k, v in row.items()),
                  flush=True)
    if not args.no_groups and not args.smoke:
        # the configuration fla's parallel_nsa supports: l = l' = d = 64, n = 16, no window
        T = Ts[-1]
        fla_cfg = NSAConfig(l=64, d=64, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
        inp = make(T, HQ, H, d, d, fla_cfg, torch.bfloat16)
        inp["g_win"] = None
        ms = bench(lambda: nsa_attention(**inp, config=fla_cfg, backend="triton"))
        results["fla_config"] = dict(T=T, ms=ms, note="l=l'=d=64, n=16, no window; fla "
                                     "parallel_nsa anchor (PERF.md, H100): 56.99 ms at 64k")
        print(f"T={T} fla-comparable config (l=l'=d=64, n=16, no window): nsa={ms:.3f}ms",
              flush=True)
        del inp
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "forward_bench.json"), "w") as f:
            json.dump(results, f, indent=1)

    print(f"\n## NSA prefill forward, {gpu}, bf16, B=1, H={H}, d={d}, l={cfg.l}, d={cfg.d}, "
          f"l'={cfg.l_sel}, n={cfg.n}, w={cfg.w} (median ms; floor = max(FLOPs/700T, "
          f"bytes/3TB/s))")
    print("| T | G | dense | NSA | dense/NSA | cmp fused | cmp 2-pass | cmp attn only | top-n "
          "| win | sel+combine | sel L2 TB/s | NSA floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        m, f = r["ms"], r["floor_ms"]
        print(f"| {r['T']} | {r['G']} | {m.get('dense', float('nan')):.2f} | {m['nsa']:.2f} | "
              f"{m.get('dense', float('nan')) / m['nsa']:.2f}x | {m['cmp_fused']:.2f} | "
              f"{m['cmp_two_pass']:.2f} | {m['cmp_attn']:.2f} | {m['topn']:.2f} | "
              f"{m['win']:.2f} | {m['sel']:.2f} | {r['l2_bytes'] / m['sel'] / 1e9:.1f} | "
              f"{f['nsa']:.2f} |")
    print("\nper-kernel floors (ms) and achieved TFLOP/s:")
    for r in results["rows"]:
        m, f, fl = r["ms"], r["floor_ms"], r["flops"]
        parts = []
        for k in ("cmp_fused", "cmp_attn", "topn", "win", "sel", "nsa", "dense"):
            if k in m:
                parts.append(f"{k} {f[k]:.2f} floor / {fl[k] / m[k] / 1e9:.0f} TF/s")
        print(f"T={r['T']} G={r['G']}: " + "; ".join(parts))
        main_keys = ("dense", "nsa", "cmp_fused", "cmp_two_pass", "cmp_attn", "topn", "win", "sel")
        extra = {k: v for k, v in m.items() if k not in main_keys}
        if extra:
            print("  variants: " + " ".join(f"{k}={v:.2f}ms" for k, v in extra.items()))


if __name__ == "__main__":
    main()
