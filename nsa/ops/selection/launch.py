"""Raw launchers of the selection kernels: top-n block choice and selected attention."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from nsa.config import NSAConfig
from nsa.ops.compression.launch import (
    LOG2E,
    dot_precision,
    head_dim_tile,
    last_dim_contiguous,
    next_pow2,
    rows_per_position,
    shrink_on_oor,
)
from nsa.ops.descriptors import kv_desc, resolve_desc
from nsa.ops.selection.kernels import _sel_fwd_kernel, _topn_kernel


def select_topn(
    scores: Tensor, T: int, N: int, cfg: NSAConfig, *, out: Tensor | None = None,
    rows: int | None = None, chunk: int | None = None,
) -> Tensor:
    """Top-n blocks per (query, KV head) from group scores, canonical order, on the device.

    scores: [B, H, T, >= ceil(T / l_sel)] float32 group block scores (Eq. 10), read only
    where a query can have a nonzero score (see :func:`nsa.ops.compression.cmp_forward`);
    N: number of compressed tokens (visibility is min(N, N_cmp(t))).
    Returns int32 [B, T, H, n]: ascending block indices, -1 last, identical to
    ``reference.select_blocks`` on the same scores (forced initial/local blocks, ties to
    the lower index).
    """
    B, H = scores.shape[0], scores.shape[1]
    n_free = cfg.n - cfg.n_initial - cfg.n_local
    P = next_pow2(max(cfg.n_initial + cfg.n_local, n_free, 1))
    if out is None:
        out = torch.empty(B, T, H, cfg.n, device=scores.device, dtype=torch.int32)
    on_gpu = scores.device.type == "cuda"
    # H200, 64k: 8 rows 2.4 ms, 16 rows 3.5 ms, 32 rows 3.1 ms; the CPU interpreter pays
    # per operation, so it takes wide tiles
    rows = rows or (8 if on_gpu else 32)
    chunk = chunk or (128 if on_gpu else 64)
    grid = (triton.cdiv(T, rows), H, B)
    _topn_kernel[grid](
        scores, out,
        scores.stride(0), scores.stride(1), scores.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        T, N,
        CMP_L=cfg.l, CMP_D=cfg.d, L_SEL=cfg.l_sel,
        SEL_B=cfg.l_sel // cfg.d, SEL_A=cfg.l // cfg.d,
        N_SEL=cfg.n, N_INIT=cfg.n_initial, N_LOCAL=cfg.n_local,
        K_FREE=n_free, P=P, NOUT=next_pow2(cfg.n), ROWS=rows, CH=chunk,
        num_warps=4, num_stages=1,
    )
    return out


def _sel_config(DK: int, DV: int, L_SEL: int, device: torch.device, desc: bool):
    """(BLOCK_N, num_warps, num_stages): BLOCK_N keys of a selected block per dot."""
    block = max(16, next_pow2(L_SEL))  # keys past the block's end are masked
    if device.type != "cuda":
        return min(block, 64), 4, 1
    if max(DK, DV) <= 128:
        # descriptor loads, H200, 64k: 2 warps 2 stages 14.5 ms (G=16) / 12.1 (G=4) / 10.1
        # (G=1); 3 stages 14.6 / 11.9 / 10.4; 4 warps 16.3 / 12.9 / 10.7
        return (min(block, 64), 2, 2) if desc else (min(block, 64), 4, 3)
    return min(block, 32), 4, 3


def sel_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_indices: Tensor,
    cfg: NSAConfig,
    scale: float,
    *,
    o_branch: Tensor | None = None,
    out: Tensor | None = None,
    g_sel: Tensor | None = None,
    o_cmp: Tensor | None = None,
    g_cmp: Tensor | None = None,
    o_win: Tensor | None = None,
    g_win: Tensor | None = None,
    lse: Tensor | None = None,
    positions_per_program: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_desc: bool | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Selected-block attention, optionally fused with the gate combine.

    q [B, T, HQ, d_k]; k/v [B, T, H, d_k/d_v]; block_indices int [B, T, H, n] canonical
    (ascending, deduplicated, -1 last; as ``select_topn`` writes them).
    ``o_branch`` (allocated if None and ``g_sel`` is None): ungated O_sel [B, T, HQ, d_v].
    With ``g_sel`` given, also writes ``out`` = g_sel*O_sel (+ g_cmp*o_cmp) (+ g_win*o_win)
    in q's dtype. Returns (o_branch or None, out or None).
    ``lse``: optional float32 [B, HQ, T] (last dim contiguous) that receives the base-2
    log-sum-exp of every row (for the backward).
    ``positions_per_program``: query positions packed into one program (default
    max(1, 16 // GP2): every dot has at least 16 rows). ``num_warps``/``num_stages``
    override the launch config (for tuning runs). ``use_desc``: load the selected key and
    value tiles as bulk tensor copies through tensor descriptors (None:
    :func:`nsa.ops.descriptors.resolve_desc` decides).
    """
    q, k, v = map(last_dim_contiguous, (q, k, v))
    B, T, HQ, d_k = q.shape
    H, d_v = k.shape[2], v.shape[-1]
    G = HQ // H
    GP2 = rows_per_position(G)
    PP = positions_per_program or max(1, 16 // GP2)
    if PP & (PP - 1):
        raise ValueError(f"sel_forward: positions_per_program must be a power of two, got {PP}")
    DK, DV = head_dim_tile(d_k), head_dim_tile(d_v)
    write_out = g_sel is not None
    if not write_out and o_branch is None:
        o_branch = torch.empty(B, T, HQ, d_v, device=q.device, dtype=q.dtype)
    if write_out and out is None:
        out = torch.empty(B, T, HQ, d_v, device=q.device, dtype=q.dtype)
    use_desc = resolve_desc("sel_forward", use_desc, k, v, DK, DV)
    bn, warps, stages = _sel_config(DK, DV, cfg.l_sel, q.device, use_desc)
    if PP == 1 and max(DK, DV) <= 128 and q.device.type == "cuda":
        # one position per program (G >= 16): 2 warps share the softmax reductions with
        # less traffic than 4 (H200, paper shape, 64k: 17.1 ms against 17.6 ms)
        warps = 2
    warps, stages = num_warps or warps, num_stages or stages
    dummy = q.new_empty(1, 1, 1, 1)
    lse_arg = lse if lse is not None else q.new_empty(1, 1, 1, dtype=torch.float32)

    def t3(x):
        return (x.stride(0), x.stride(1), x.stride(2)) if x is not None else (0, 0, 0)

    def launch(_bm, stages_):
        kd, vd = ((kv_desc(k, T, bn, DK), kv_desc(v, T, bn, DV)) if use_desc else (k, v))
        _sel_fwd_kernel[(triton.cdiv(T, PP), H, B)](
            q, kd, vd, block_indices,
            out if out is not None else dummy, o_branch if o_branch is not None else dummy,
            o_cmp if o_cmp is not None else dummy, o_win if o_win is not None else dummy,
            g_sel if g_sel is not None else dummy, g_cmp if g_cmp is not None else dummy,
            g_win if g_win is not None else dummy, lse_arg,
            *t3(q), *t3(k), *t3(v), *t3(block_indices), *t3(out), *t3(o_branch),
            *t3(o_cmp), *t3(o_win), *t3(g_sel), *t3(g_cmp), *t3(g_win),
            lse_arg.stride(0), lse_arg.stride(1),
            T, scale * LOG2E,
            G=G, GP2=GP2, PP=PP, DK=DK, DV=DV, D_K=d_k, D_V=d_v,
            L_SEL=cfg.l_sel, BLOCK_N=bn, N_SEL=block_indices.shape[-1],
            NP=next_pow2(block_indices.shape[-1]),
            WRITE_OUT=write_out, WRITE_BRANCH=o_branch is not None,
            HAS_CMP=write_out and o_cmp is not None and g_cmp is not None,
            HAS_WIN=write_out and o_win is not None and g_win is not None,
            STORE_LSE=lse is not None, DOT_PREC=dot_precision(q.dtype, q.device),
            USE_DESC=use_desc, num_warps=warps, num_stages=stages_,
        )

    shrink_on_oor(launch, 16, stages, 16)
    return o_branch, out
