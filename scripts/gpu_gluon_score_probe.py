"""The compressed kernel's score pass (pass 2) with asynchronous wgmma, as a timing probe.

Triton 3.6 waits on every non-accumulating wgmma right after issuing it, so the fused
compressed kernel's pass 2 runs QK product -> wait -> exponentials -> Eq. 9/10 mapping in
series (``scripts/gpu_score_map_probe.py``: ~5.5 of its ~7.3 ms at 64k are the product,
the exponentials and the wait). This probe writes pass 2 in Gluon (Triton's explicit-layout
dialect, ``triton.experimental.gluon``, sm_90 only): key tiles by TMA into a ring of shared
buffers, tile j+1's product issued asynchronously before tile j is exponentiated and
mapped (``warpgroup_mma_wait(1)``). It runs after the Triton pass 1 (attention with the
base-2 log-sum-exp stored), i.e. the launcher's two-pass mode with a Gluon second launch.

    python scripts/gpu_gluon_score_probe.py [--Ts 16384,65536] [--rounds 3]
    python scripts/gpu_gluon_score_probe.py --compile-only   # no GPU: sm_90 compile

Prints, per length: the fused Triton kernel, Triton pass 1 alone, and pass 1 + the Gluon
pass 2 (ms per round), the scores' largest relative difference from the fused kernel's
where both are written, and the share of equal top-n entries. Paper shape only
(G = 16, d = 128, l = 32, d = 16, l' = 64); not a library path.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)


@gluon.jit
def _map_tile(s, j, qk_scale, lse, n_vis, n_full, carry, s_base, stride_st, t0, T, NB,
              PP: gl.constexpr, G: gl.constexpr, BLOCK_N: gl.constexpr,
              SEL_B: gl.constexpr, SEL_A: gl.constexpr, SL: gl.constexpr,
              MAP: gl.constexpr):
    """Eq. 9/10 for one [PP*G, BLOCK_N] tile of scores s (the MMA's layout): stores the
    tile's [PP, BJ] group block scores and returns the tail for the next tile's block 0.
    MAP=False (a timing bound, wrong scores): only a per-position sum of P is kept."""
    BJ: gl.constexpr = BLOCK_N // SEL_B
    p = gl.exp2(s * qk_scale - lse[:, None])
    if j * BLOCK_N >= n_full:
        cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))
        p = gl.where(cols[None, :] < n_vis[:, None], p, 0.0)
    if not MAP:
        rs = gl.convert_layout(gl.sum(gl.reshape(gl.sum(p, axis=1), [PP, G]), axis=1),
                               gl.SliceLayout(1, SL))
        return carry + rs
    pg = gl.sum(gl.reshape(p, [PP, G, BLOCK_N]), axis=1)  # Eq. 10: the group's heads
    p3 = gl.reshape(pg, [PP, BJ, SEL_B])
    r = gl.arange(0, SEL_B, layout=gl.SliceLayout(0, gl.SliceLayout(1, p3.type.layout)))
    w_in = gl.minimum(SEL_A, SEL_B - r).to(gl.float32)
    w_tail = gl.maximum(r + SEL_A - SEL_B, 0).to(gl.float32)
    sc = gl.convert_layout(gl.sum(p3 * w_in[None, None, :], axis=2), SL)
    tail = gl.convert_layout(gl.sum(p3 * w_tail[None, None, :], axis=2), SL)
    jj = gl.zeros([PP, BJ], gl.int32, SL) + gl.arange(0, BJ, layout=gl.SliceLayout(0, SL))[None, :]
    shifted = gl.gather(tail, gl.maximum(jj - 1, 0), 1)
    sc += gl.where(jj == 0, carry[:, None], shifted)
    carry = gl.sum(gl.where(jj == BJ - 1, tail, 0.0), axis=1)
    offs_p = gl.arange(0, PP, layout=gl.SliceLayout(1, SL))
    col = j * BJ + jj
    ok = ((t0 + offs_p) < T)[:, None] & (col < NB)
    gl.store(s_base + offs_p[:, None] * stride_st + col, sc, mask=ok)
    return carry


@gluon.jit
def _score_pass_kernel(q_ptr, k_desc, lse_ptr, s_ptr,
                       stride_qb, stride_qt, stride_qh, stride_lb, stride_lh,
                       stride_sb, stride_sh, stride_st,
                       T, N, NB, qk_scale,
                       G: gl.constexpr, PP: gl.constexpr, BLOCK_N: gl.constexpr,
                       D: gl.constexpr, CMP_L: gl.constexpr, CMP_D: gl.constexpr,
                       SEL_B: gl.constexpr, SEL_A: gl.constexpr, NUM_BUF: gl.constexpr,
                       MAP: gl.constexpr, num_warps: gl.constexpr):
    BLOCK_M: gl.constexpr = PP * G
    BJ: gl.constexpr = BLOCK_N // SEL_B
    n_tiles_t = (T + PP - 1) // PP
    tile = n_tiles_t - 1 - gl.program_id(0)  # heaviest tiles first
    h = gl.program_id(1)
    b = gl.program_id(2)
    t0 = tile * PP

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    ql: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    SL: gl.constexpr = gl.BlockedLayout([1, 1], [32 // BJ, BJ], [num_warps, 1], [1, 0])

    # q rows (row r: position t0 + r // G, head h*G + r % G) into shared memory
    rq = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ql))
    cq = gl.arange(0, D, layout=gl.SliceLayout(0, ql))
    tq = t0 + rq // G
    q_ptrs = (q_ptr + b.to(gl.int64) * stride_qb + tq.to(gl.int64)[:, None] * stride_qt
              + (h * G + rq % G)[:, None] * stride_qh + cq[None, :])
    q = gl.load(q_ptrs, mask=(tq < T)[:, None], other=0.0)
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, D],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, D],
                                                                            gl.bfloat16))
    q_smem.store(q)

    # per-row lse (base 2) and visible compressed tokens, in the MMA's row layout
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
    t_row = t0 + rows // G
    lse = gl.load(lse_ptr + b.to(gl.int64) * stride_lb + (h * G + rows % G).to(gl.int64)
                  * stride_lh + t_row, mask=t_row < T, other=float("inf"))
    n_vis = gl.minimum(gl.maximum(t_row + 1 - CMP_L + CMP_D, 0) // CMP_D, N)
    t_last = gl.minimum(t0 + PP - 1, T - 1)
    n_lo = gl.minimum(gl.maximum(t0 + 1 - CMP_L + CMP_D, 0) // CMP_D, N)
    n_hi = gl.minimum(gl.maximum(t_last + 1 - CMP_L + CMP_D, 0) // CMP_D, N)
    n_full = (n_lo // BLOCK_N) * BLOCK_N
    n_tiles = gl.maximum((n_hi + BLOCK_N - 1) // BLOCK_N, 1)  # tile 0 always (masked)

    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_BUF, BLOCK_N, D], k_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_BUF):
        mbarrier.init(bars.index(i), count=1)
    row0 = b * N
    kcol = h * D
    for i in gl.static_range(NUM_BUF):  # tiles 0 .. NUM_BUF-1; step j refills j + NUM_BUF
        pred = i < n_tiles
        mbarrier.expect(bars.index(i), k_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(k_desc, [row0 + i * BLOCK_N, kcol], bars.index(i),
                                        k_smem.index(i), pred=pred)
    fence_async_shared()

    s_base = s_ptr + b.to(gl.int64) * stride_sb + h.to(gl.int64) * stride_sh \
        + t0.to(gl.int64) * stride_st
    carry = gl.zeros([PP], gl.float32, gl.SliceLayout(1, SL))
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
    mbarrier.wait(bars.index(0), 0)
    s_cur = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero, use_acc=False,
                          is_async=True)
    for j in range(0, n_tiles - 1):
        nxt = j + 1
        mbarrier.wait(bars.index(nxt % NUM_BUF), (nxt // NUM_BUF) & 1)
        s_next = warpgroup_mma(q_smem, k_smem.index(nxt % NUM_BUF).permute((1, 0)), zero,
                               use_acc=False, is_async=True)
        s_cur = warpgroup_mma_wait(num_outstanding=1, deps=(s_cur,))
        # tile j's buffer is free: refill it with tile j + NUM_BUF
        ref = j + NUM_BUF
        pred = ref < n_tiles
        slot = j % NUM_BUF
        mbarrier.expect(bars.index(slot), k_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(k_desc, [row0 + ref * BLOCK_N, kcol], bars.index(slot),
                                        k_smem.index(slot), pred=pred)
        carry = _map_tile(s_cur, j, qk_scale, lse, n_vis, n_full, carry, s_base, stride_st,
                          t0, T, NB, PP, G, BLOCK_N, SEL_B, SEL_A, SL, MAP)
        s_cur = s_next
    s_cur = warpgroup_mma_wait(num_outstanding=0, deps=(s_cur,))
    carry = _map_tile(s_cur, n_tiles - 1, qk_scale, lse, n_vis, n_full, carry, s_base,
                      stride_st, t0, T, NB, PP, G, BLOCK_N, SEL_B, SEL_A, SL, MAP)
    for i in gl.static_range(NUM_BUF):
        mbarrier.invalidate(bars.index(i))
    # the last tile's tail belongs to the block after it
    offs_p = gl.arange(0, PP, layout=gl.SliceLayout(1, SL))
    j_last = n_tiles * BJ
    gl.store(s_base + offs_p * stride_st + j_last, carry,
             mask=((t0 + offs_p) < T) & (j_last < NB))


PP, BLOCK_N, D, G = 8, 64, 128, 16


def k_descriptor(k_cmp):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, N, H, d = k_cmp.shape
    k2 = k_cmp.contiguous().view(B * N, H * d)
    lay = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], gl.bfloat16)
    return TensorDescriptor(k2, [B * N, H * d], [H * d, 1], [BLOCK_N, D], lay)


def gluon_scores(q, k_cmp, lse, cfg, scale, scores, num_buf=3, map_scores=True):
    B, T, HQ, d = q.shape
    N, H = k_cmp.shape[1], k_cmp.shape[2]
    assert HQ // H == G and d == D and cfg.l // cfg.d > 1
    NB = scores.shape[-1]
    grid = ((T + PP - 1) // PP, H, B)
    _score_pass_kernel[grid](
        q, k_descriptor(k_cmp), lse, scores, q.stride(0), q.stride(1), q.stride(2),
        lse.stride(0), lse.stride(1), scores.stride(0), scores.stride(1), scores.stride(2),
        T, N, NB, scale * 1.4426950408889634, G=G, PP=PP, BLOCK_N=BLOCK_N, D=D,
        CMP_L=cfg.l, CMP_D=cfg.d, SEL_B=cfg.l_sel // cfg.d, SEL_A=cfg.l // cfg.d,
        NUM_BUF=num_buf, MAP=map_scores, num_warps=4)
    return scores


def compile_only() -> None:
    """sm_90 compiles of the kernel with the mapping and of the row-sum bound (no GPU)."""

    import triton
    from script_modules import resource_usage
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    lay = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], gl.bfloat16)
    desc = (f"tensordesc<bf16[{BLOCK_N}, {D}],NVMMASharedLayout(swizzle_byte_width="
            f"{lay.swizzle_byte_width}, element_bitwidth=16, rank=2, transposed=False, "
            f"fp4_padded=False, cga_layout=[])>")
    fn = _score_pass_kernel
    ptrs = {"q_ptr": "*bf16", "k_desc": desc, "lse_ptr": "*fp32", "s_ptr": "*fp32",
            "qk_scale": "fp32"}
    for map_scores in (True, False):
        consts = dict(G=G, PP=PP, BLOCK_N=BLOCK_N, D=D, CMP_L=32, CMP_D=16, SEL_B=4, SEL_A=2,
                      NUM_BUF=3, MAP=map_scores, num_warps=4)
        sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in fn.arg_names}
        k = triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        waits = [ln.split("{")[1].split("}")[0] for ln in k.asm["ttgir"].splitlines()
                 if "warp_group_dot_wait" in ln]
        _, regs = resource_usage(k)
        print(f"sm_90 compile, {'mapping' if map_scores else 'row-sum bound'}: {regs}, "
              f"shared {k.metadata.shared} B, wgmma waits {waits}, "
              f"{k.asm['ptx'].count('wgmma.mma_async')} wgmma.mma_async in the PTX")


def one_length(T: int, rounds: int) -> None:
    import torch
    from triton.testing import do_bench

    import nsa.ops.compression.launch as CL
    from nsa import NSAConfig, compress_mean
    from nsa.ops.selection import select_topn

    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    H, scale = 4, D ** -0.5
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, T, H * G, D, generator=g, device="cuda").to(torch.bfloat16)
    k, v = (compress_mean(torch.randn(1, T, H, D, generator=g, device="cuda")
                          .to(torch.bfloat16), cfg.l, cfg.d) for _ in range(2))
    NB = cfg.num_sel_blocks(T)
    o_ref, sc_ref = CL.cmp_forward(q, k, v, cfg, scale)
    lse = torch.empty(1, H * G, T, device="cuda", dtype=torch.float32)
    o1, _ = CL.cmp_forward(q, k, v, cfg, scale, want_scores=False, lse=lse)
    sc = torch.full((1, H, T, NB), float("nan"), device="cuda", dtype=torch.float32)
    gluon_scores(q, k, lse, cfg, scale, sc)
    torch.cuda.synchronize()
    both_written = ~torch.isnan(sc) & ~torch.isnan(sc_ref)
    idx_ref = select_topn(sc_ref, T, k.shape[1], cfg)
    idx = select_topn(sc, T, k.shape[1], cfg)  # reads only entries it needs: NaN elsewhere
    big = both_written & (sc_ref.abs() > 1e-6)
    diff = ((sc - sc_ref).abs() / sc_ref.abs())[big]
    same = (idx == idx_ref).float().mean().item()
    print(f"T={T}: scores max rel diff {diff.max().item():.2e} over {int(big.sum())} entries; "
          f"top-n equal {same:.6f}; pass-1 output equal {bool(torch.equal(o1, o_ref))}",
          flush=True)

    def fused():
        CL.cmp_forward(q, k, v, cfg, scale)

    def pass1():
        CL.cmp_forward(q, k, v, cfg, scale, want_scores=False, lse=lse)

    def pass2():
        gluon_scores(q, k, lse, cfg, scale, sc)

    def both():
        pass1()
        pass2()

    def pass2_bound():
        gluon_scores(q, k, lse, cfg, scale, sc, map_scores=False)

    rows = {"fused (Triton)": fused, "pass 1 alone": pass1, "Gluon pass 2 alone": pass2,
            "pass 1 + Gluon pass 2": both, "Gluon pass 2, row sum": pass2_bound}
    times: dict[str, list[float]] = {n: [] for n in rows}
    for _ in range(rounds):  # alternating: back-to-back rows drift 10-20%
        for name, fn in rows.items():
            times[name].append(do_bench(fn))
    for name, ts in times.items():
        print(f"T={T:6d} {name:>22}: " + " / ".join(f"{t:.3f}" for t in ts), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--Ts", default="16384,65536")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile-only", action="store_true")
    a = ap.parse_args()
    if a.compile_only:
        compile_only()
        return
    import torch

    print(f"{torch.cuda.get_device_name()}; compressed forward at the paper shape, ms per "
          f"round", flush=True)
    for T in (int(x) for x in a.Ts.split(",")):
        one_length(T, a.rounds)


if __name__ == "__main__":
    main()
