"""Raw launcher of the sliding-window kernel."""

from __future__ import annotations

import torch
from torch import Tensor

from nsa.ops.compression.launch import (
    LOG2E,
    cdiv,
    cuda_capability,
    dot_precision,
    head_dim_split,
    head_dim_tile,
    last_dim_contiguous,
    rows_per_position,
    shrink_on_oor,
)
from nsa.ops.descriptors import kv_desc, resolve_desc
from nsa.ops.window.kernels import _win_fwd_kernel


def _win_config(DK: int, DV: int, GP2: int, device: torch.device, desc: bool = False,
                DK2: int = 0):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); ``DK2``: the head dim's second tile
    (:func:`nsa.ops.compression.launch.head_dim_split`)."""
    if device.type != "cuda":
        bm, bn, warps, stages = 64, 32, 4, 1
    else:
        major, _ = cuda_capability(device)
        big = max(DK, DV)
        if DK2 and big <= 128:
            # head dim as two tiles (d_k = 192: 128 + 64): 2 stages of 64-key tiles (80 KB at
            # 192 + 128 columns: two programs per SM; 3 stages would take 120 KB)
            bm, bn, warps, stages = 64, 64, 4, 2
        elif big <= 64:
            bm, bn, warps, stages = 128, 64, 4, 3
        elif big <= 128 and desc:
            # H200, 64k: 64 x 64 on 4 warps 3.43 / 0.82 / 0.20 ms for G = 16 / 4 / 1, against
            # 3.39 / 0.90 / 0.27 with 128 x 64 on 8 warps; 16k, G = 16: 0.78 against 0.85
            bm, bn, warps, stages = 64, 64, 4, 3
        elif big <= 128:
            bm, bn, warps, stages = 128, 64, 8, 3 if major >= 9 else 2
        else:
            # as the compressed kernel's (H200, 16k, G = 16: d = 192 1.50 -> 1.36 ms, d = 256
            # 1.70 -> 1.47 against 128 x 32 on 8 warps; scripts/gpu_wide_head_tune.py)
            bm, bn, warps, stages = 64, 32, 4, 2
    return max(bm, GP2), bn, warps, stages


def win_forward(
    q: Tensor, k: Tensor, v: Tensor, w: int, scale: float, *, o: Tensor | None = None,
    lse: Tensor | None = None, block_m: int | None = None, block_n: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None, use_desc: bool | None = None,
) -> Tensor:
    """Sliding-window attention: query t attends to keys (t - w, t].

    q [B, T, HQ, d_k]; k/v [B, T, H, d_k/d_v] at positions 0..T-1.
    Returns o [B, T, HQ, d_v] in q's dtype (``o`` may be passed preallocated).
    ``lse``: optional float32 [B, HQ, T] (last dim contiguous) that receives the base-2
    log-sum-exp of every row (what the backward needs). ``block_m``, ``block_n``,
    ``num_warps``, ``num_stages`` override the launch config (tuning runs); ``use_desc``: read
    key/value tiles through tensor descriptors (None: :func:`nsa.ops.descriptors.resolve_desc`
    decides).
    """
    q, k, v = map(last_dim_contiguous, (q, k, v))
    B, T, HQ, d_k = q.shape
    H, d_v = k.shape[2], v.shape[-1]
    G = HQ // H
    GP2 = rows_per_position(G)
    (DK, DK2), DV = head_dim_split(d_k), head_dim_tile(d_v)
    if o is None:
        o = torch.empty(B, T, HQ, d_v, device=q.device, dtype=q.dtype)
    use_desc = resolve_desc("win_forward", use_desc, k, v, DK + DK2, DV)
    bm, bn, warps, stages = _win_config(DK, DV, GP2, q.device, use_desc, DK2)
    bm, bn = block_m or bm, block_n or bn
    warps, stages = num_warps or warps, num_stages or stages

    lse_arg = lse if lse is not None else q.new_empty(1, 1, 1, dtype=torch.float32)

    def launch(bm_, stages_):
        PP = max(1, bm_ // GP2)
        kd, vd = (kv_desc(k, T, bn, DK), kv_desc(v, T, bn, DV)) if use_desc else (k, v)
        kd2 = kv_desc(k, T, bn, DK2) if use_desc and DK2 else kd
        _win_fwd_kernel[(cdiv(T, PP), H, B)](
            q, kd, kd2, vd, o, lse_arg,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            lse_arg.stride(0), lse_arg.stride(1),
            T, w, scale * LOG2E,
            G=G, GP2=GP2, PP=PP, BLOCK_N=bn, DK=DK, DV=DV, D_K=d_k, D_V=d_v,
            STORE_LSE=lse is not None, DOT_PREC=dot_precision(q.dtype, q.device),
            USE_DESC=use_desc, DK2=DK2, num_warps=warps, num_stages=stages_,
        )

    shrink_on_oor(launch, bm, stages, max(16, GP2))
    return o
