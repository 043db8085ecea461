"""One position, two Triton paths: the prefill kernels' output and selected blocks at the
last position of T tokens against one decode step over a cache holding the same T tokens,
both against the float64 reference. Separates "decode differs from prefill" into
selection differences (near-tied block scores in low precision) and everything else.

    python scripts/gpu_decode_vs_prefill.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from nsa import NSAConfig, nsa_attention  # noqa: E402
from nsa.cache import NSACache  # noqa: E402
from nsa.ops.decode import nsa_decode  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def case(name: str, cfg: NSAConfig, T: int, B: int = 4, dtype=torch.bfloat16) -> None:
    torch.manual_seed(T)
    dev, H, HQ, D = "cuda", cfg.n_kv_heads, cfg.n_heads, cfg.d_k
    raw = [torch.randn(B, T, H, D, device=dev, dtype=dtype) for _ in range(6)]
    q = torch.randn(B, T, HQ, D, device=dev, dtype=dtype)
    g = [torch.rand(B, T, HQ, device=dev, dtype=dtype) for _ in range(3)]
    cache = NSACache(cfg, B, device=dev, dtype=dtype, max_len=T)
    cache.prefill(*raw)
    n = cache.num_cmp
    kc, vc = cache.k_cmp[:, :n], cache.v_cmp[:, :n]
    with torch.no_grad():
        pre, aux = nsa_attention(q, raw[0], raw[1], raw[2], raw[3], kc, vc, *g, config=cfg,
                                 backend="triton", return_aux=True)
        dec, dec_idx = nsa_decode(q[:, -1], cache, *(x[:, -1] for x in g), backend="triton",
                                  return_indices=True)
        ref, ref_idx = nsa_decode(q[:, -1].double(), cache.as_dtype(torch.float64),
                                  *(x[:, -1].double() for x in g), backend="reference",
                                  return_indices=True)
    pre_idx = aux.block_indices[:, -1].to(ref_idx.dtype)
    dec_idx = dec_idx.to(ref_idx.dtype)
    # a (b, h) row whose selected set differs
    rows = lambda a, b: (a != b).any(-1).float().mean().item()  # noqa: E731
    same = (pre_idx == dec_idx).all(-1)  # [B, H]
    same_q = same.repeat_interleave(HQ // H, dim=1)  # [B, HQ]
    pd = pre[:, -1]
    both = ((pd - dec).double().norm(dim=-1) / pd.double().norm(dim=-1))
    print(f"{name:6s} T={T:6d}: rows with other blocks: prefill/ref {rows(pre_idx, ref_idx):.3f}"
          f" decode/ref {rows(dec_idx, ref_idx):.3f} prefill/decode {rows(pre_idx, dec_idx):.3f}"
          f" | rel err vs ref: prefill {rel(pd, ref):.1e} decode {rel(dec, ref):.1e}"
          f" | prefill vs decode, worst head: same blocks {both[same_q].max().item():.1e}"
          + (f", other blocks {both[~same_q].max().item():.1e}" if (~same_q).any() else ""),
          flush=True)


def main() -> None:
    print(torch.cuda.get_device_name())
    tiny = NSAConfig(n_heads=4, n_kv_heads=1, d_k=64, d_v=64, l=32, d=16, l_sel=64, n=8,
                     n_initial=1, n_local=2, w=256)
    paper = NSAConfig(n_heads=64, n_kv_heads=4, d_k=128, d_v=128)
    for T in (1024, 4096, 16384):
        case("tiny", tiny, T)
    for T in (4096, 16384):
        case("paper", paper, T)


if __name__ == "__main__":
    main()
