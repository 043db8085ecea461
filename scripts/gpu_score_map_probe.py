"""What the compressed kernel's score pass (pass 2) spends after its exponentials: the
fused compressed forward at the paper shape timed with its Eq. 9 / Eq. 10 mapping written
three ways, against two timing bounds and pass 1 alone.

    python scripts/gpu_score_map_probe.py [--Ts 16384,65536] [--G 16]

Variants of ``_scores_tile`` (the kernel source with that one function replaced, loaded as
its own module and swapped into the launcher):

* ``heads-first``: the sum over the group's heads on P, then Eq. 9's weights and tail;
* ``cols-first``: Eq. 9's weights on every row first, then the head sum on the
  l'/d-times narrower result (inner and tail each summed over the heads);
* ``no-tail (bound)``: ``heads-first`` without the tail handed to the next block (the
  gather and the carry): wrong scores when l > l' - d, a bound on what the shift costs;
* ``row-sum (bound)``: only a per-position sum of P is kept and stored once at the end:
  the dot, the exponentials and the wait without any per-tile mapping or store.

It prints the median time per variant, the scores' relative difference from
``heads-first`` and the share of top-n entries equal to its picks.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from script_modules import module_from_source  # noqa: E402

START = "@triton.jit\ndef _scores_tile(p, carry"
END = "@triton.jit\ndef _cmp_fwd_kernel("

HEAD = '''@triton.jit
def _scores_tile(p, carry, s_ptrs, kt_i, pos_ok, NB,
                 PP: tl.constexpr, GP2: tl.constexpr, BLOCK_N: tl.constexpr,
                 SEL_B: tl.constexpr, SEL_A: tl.constexpr):
    BJ: tl.constexpr = BLOCK_N // SEL_B
    r = tl.arange(0, SEL_B)
    w_in = tl.minimum(SEL_A, SEL_B - r).to(tl.float32)
    w_tail = tl.maximum(r + SEL_A - SEL_B, 0).to(tl.float32)
    jj = tl.broadcast_to(tl.arange(0, BJ)[None, :], [PP, BJ])
    j0 = kt_i * BJ
'''

BODIES = {
    "cols-first": '''
    p3 = tl.reshape(p, [PP * GP2, BJ, SEL_B])
    sc = tl.sum(tl.reshape(tl.sum(p3 * w_in[None, None, :], 2), [PP, GP2, BJ]), 1)
    if SEL_A > 1:
        tail = tl.sum(tl.reshape(tl.sum(p3 * w_tail[None, None, :], 2), [PP, GP2, BJ]), 1)
        shifted = tl.gather(tail, tl.maximum(jj - 1, 0), 1)
        sc += tl.where(jj == 0, carry[:, None], shifted)
        carry = tl.sum(tl.where(jj == BJ - 1, tail, 0.0), 1)
    tl.store(s_ptrs + j0, sc, mask=pos_ok & (j0 + tl.arange(0, BJ)[None, :] < NB))
    return carry
''',
    "no-tail (bound)": '''
    pg = tl.sum(tl.reshape(p, [PP, GP2, BLOCK_N]), 1)
    sc = tl.sum(tl.reshape(pg, [PP, BJ, SEL_B]) * w_in[None, None, :], 2)
    tl.store(s_ptrs + j0, sc, mask=pos_ok & (j0 + tl.arange(0, BJ)[None, :] < NB))
    return carry
''',
    "row-sum (bound)": '''
    return carry + tl.sum(tl.reshape(tl.sum(p, 1), [PP, GP2]), 1)
''',
}


def load_variant(name: str, src: str):
    a, b = src.index(START), src.index(END)
    body = src if name == "heads-first" else src[:a] + HEAD + BODIES[name] + "\n\n" + src[b:]
    return module_from_source(body, f"cmp_map_{abs(hash(name))}")


def one_length(T: int, G: int, src: str, rounds: int) -> None:
    import torch
    from triton.testing import do_bench

    import nsa.ops.compression.launch as CL
    from nsa import NSAConfig, compress_mean
    from nsa.ops.selection import select_topn

    cfg = NSAConfig(l=32, d=16, l_sel=64, n=16, n_initial=1, n_local=2, w=512)
    H, D = 4, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, T, H * G, D, generator=g, device="cuda").to(torch.bfloat16)
    k = compress_mean(torch.randn(1, T, H, D, generator=g, device="cuda").to(torch.bfloat16),
                      cfg.l, cfg.d)
    v = compress_mean(torch.randn(1, T, H, D, generator=g, device="cuda").to(torch.bfloat16),
                      cfg.l, cfg.d)
    scale = D ** -0.5
    base_kernel = CL._cmp_fwd_kernel
    names = ["heads-first", *BODIES]
    kernels = {n: load_variant(n, src)._cmp_fwd_kernel for n in names}
    ref = ref_idx = None
    times: dict[str, list[float]] = {n: [] for n in ["pass 1 only", *names]}
    notes: dict[str, str] = {}
    for rnd in range(rounds):  # alternate the variants: back-to-back rows drift 10-20%
        times["pass 1 only"].append(
            do_bench(lambda: CL.cmp_forward(q, k, v, cfg, scale, want_scores=False)))
        for name in names:
            CL._cmp_fwd_kernel = kernels[name]
            try:
                if rnd == 0:
                    o, sc = CL.cmp_forward(q, k, v, cfg, scale)
                    idx = select_topn(sc, T, k.shape[1], cfg)
                    if ref is None:
                        ref, ref_idx = sc.clone(), idx.clone()
                    err = ((sc - ref).norm() / ref.norm()).item()
                    same = (idx == ref_idx).float().mean().item()
                    notes[name] = f"scores rel {err:.1e}, top-n equal {same:.6f}"
                times[name].append(do_bench(lambda: CL.cmp_forward(q, k, v, cfg, scale)))
            except Exception as exc:  # noqa: BLE001 - report and go on
                notes[name] = f"failed {type(exc).__name__}: {str(exc)[:300]}"
            finally:
                CL._cmp_fwd_kernel = base_kernel
    for name, ts in times.items():
        row = " / ".join(f"{t:.3f}" for t in ts)
        print(f"T={T:6d} G={G:2d} {name:>16}: {row} ms  {notes.get(name, '')}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--Ts", default="16384,65536")
    ap.add_argument("--G", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    import torch

    import nsa.ops.compression.kernels as CK

    src = inspect.getsource(CK)
    assert src.count(START) == 1 and src.count(END) == 1, "kernel source changed: update"
    print(f"{torch.cuda.get_device_name()}; fused compressed forward (O + block scores), "
          f"ms per round", flush=True)
    for T in (int(x) for x in a.Ts.split(",")):
        one_length(T, a.G, src, a.rounds)


if __name__ == "__main__":
    main()
