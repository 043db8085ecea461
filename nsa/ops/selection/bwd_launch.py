"""Raw launcher of the selected-branch backward (dQ group-centric, dK/dV key-centric)."""

from __future__ import annotations

import torch
from torch import Tensor

from nsa.config import NSAConfig
from nsa.ops.compression.launch import (
    LOG2E,
    cdiv,
    dot_precision,
    head_dim_split,
    head_dim_tile,
    interpreting,
    next_pow2,
    rows_per_position,
    shrink_on_oor,
)
from nsa.ops.descriptors import kv_desc, resolve_desc
from nsa.ops.flashbwd.launch import gate_f32
from nsa.ops.selection.bwd_kernels import (
    _segment_table_kernel,
    _sel_bwd_dkdv_kernel,
    _sel_bwd_dq_kernel,
    _sel_bwd_dq_reduce_kernel,
    _sel_bwd_reduce_kernel,
)
from nsa.policy import SEL_BLOCK_MAX_PARTIAL_BYTES

# key-centric dQ (mode "block", not deterministic): float32 atomics (True) or per-slot
# partials and an ordered sum (False); measured in docs/perf-notes.md
DQ_ATOMIC = True


def inverted_index(idx: Tensor, T: int, nb: int, seg_len: int, entries: bool = False):
    """Positions that selected each block, grouped by block and cut into segments.

    idx int32 [B, T, H, n] (canonical: each block at most once per row, -1 unused).
    Returns (keys [B, H, T*n] sorted ``block*T + t`` (unused slots sort last; with
    ``entries``, ``block*T*n + t*n + j``, j the block's slot in row t; both from
    :func:`nsa.ops.selection.launch.entries_by_block`),
    seg_blk, seg_lo, seg_hi [B, H, S_MAX] int32 (segment -> block, entry range; block
    ``nb`` marks an unused segment), seg_first, seg_count [B, H, nb] int32 (each block's
    segments are seg_first .. seg_first + seg_count - 1)). All on the device, no host sync:
    S_MAX = ceil(T*n / seg_len) + nb bounds the number of segments.
    """
    from nsa.ops.selection.launch import entries_by_block

    B, _, H, n = idx.shape
    keys, first = entries_by_block(idx, nb, by_position=not entries)
    s_max = -(-(T * n) // seg_len) + nb
    seg = torch.empty(3, B, H, s_max, device=idx.device, dtype=torch.int32)
    per_block = torch.empty(2, B, H, nb, device=idx.device, dtype=torch.int32)
    _segment_table_kernel[(H, B)](
        first, seg[0], seg[1], seg[2], per_block[0], per_block[1],
        first.stride(0), first.stride(1), seg.stride(1), seg.stride(2),
        per_block.stride(1), per_block.stride(2),
        nb, s_max, seg_len, 1 << (nb.bit_length() - 1), BLOCK=1024, num_warps=4,
    )
    return keys, seg[0], seg[1], seg[2], per_block[0], per_block[1]


def _sel_bwd_config(DK: int, DV: int, GP2: int, L_SEL: int, device: torch.device,
                    desc: bool = False, DK2: int = 0):
    """(dQ BLOCK_N, dQ warps, dQ stages, dK/dV BLOCK_M, dK/dV BLOCK_N, dK/dV warps,
    dK/dV stages). dQ with descriptor loads takes 3 stages at d <= 128 (H200, 64k:
    18.2 / 13.3 / 11.0 ms for G = 16 / 4 / 1, against 18.5 / 15.0 / 12.3 with 2 stages and
    18.2 / 16.1 / 13.5 with pointer loads). dK/dV on 4 warps: at 255 registers a program
    of 8 warps holds a whole SM, one of 4 lets two share it, which pays for the spills
    (sm_90 compile: 800 bytes of stack at G = 16) on these latency-bound gathers (H200,
    64k, scripts/gpu_tune_backward.py --sel-only: G = 16 dK/dV 26.5 -> 14.4 ms with 3
    stages, 14.8 with 2; dQ + dK/dV at G = 4 11.0 -> 8.8 with 2 stages, 9.2 with 3; G = 1
    3.3 -> 2.5; d = 64, G = 16, dK/dV 20.2 -> 9.8). ``DK2``: the second q/k tile where
    the kernels take the head dim as two (:func:`head_dim_split`). At the paper's d_k = 192
    (128 + 64), d_v = 128 (H200, 16k, G = 16, scripts/gpu_tune_backward.py --D 192 --DV
    128, ms): dQ on 2 warps, 2 stages 5.20 against 6.72 on 4 (the wide-head choice);
    dK/dV 32 x 64 on 4 warps, 2 stages 3.75 against 7.52 (32 x 32) and 12.81 (the d <= 128
    tile, 64 x 64 on 4 warps, 3 stages)."""
    block = max(16, next_pow2(L_SEL))
    if interpreting() or device.type != "cuda":
        return min(block, 32), 4, 1, max(32, GP2), min(block, 32), 4, 1
    if DK2 and max(DK, DV) <= 128:
        return min(block, 32), 2, 2, max(32, GP2), min(block, 64), 4, 2
    if max(DK, DV) <= 128:
        return (min(block, 64), 4, 3 if desc else 2, max(64, GP2), min(block, 64), 4,
                3 if GP2 >= 16 else 2)
    return min(block, 32), 4, 2, max(32, GP2), min(block, 32), 4, 2


def sel_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx: Tensor,
    dout: Tensor,
    gate: Tensor,
    lse: Tensor,
    delta: Tensor,
    dq: Tensor,
    cfg: NSAConfig,
    scale: float,
    *,
    deterministic: bool = False,
    accumulate_dq: bool = True,
    seg_len: int | None = None,
    positions_per_program: int | None = None,
    dq_only: bool = False,
    use_desc: bool | None = None,
    dq_warps: int | None = None,
    dq_stages: int | None = None,
    mode: str | None = None,
    dq_atomic: bool | None = None,
    dq_block_n: int | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """dK, dV of the selected branch (k's/v's dtype); adds (or writes) its dQ into ``dq``.

    q [B, T, HQ, d_k]; k/v [B, T, H, d_k/d_v]; idx int32 [B, T, H, n] canonical (as the
    forward used); dout [B, T, HQ, d_v]; gate = g_sel [B, T, HQ] (any float dtype: see
    ``flashbwd.launch.gate_f32``); lse float32 [B, HQ, T]
    (base-2, from the forward); delta float32 [B, T, HQ] with gate's strides; dq float32.
    ``deterministic``: per-segment partials summed in a fixed order instead of float32
    atomics (bitwise reproducible). ``seg_len``: positions per dK/dV program.
    ``dq_only``: stop after dQ and return (None, None) (for timing runs; mode "block"
    forms dQ in the dK/dV kernel, so it runs whole and returns (None, None)).
    ``use_desc``: the dQ kernel reads key/value tiles through tensor descriptors, as in
    :func:`nsa.ops.selection.sel_forward`. ``dq_warps``/``dq_stages`` override the dQ
    launch config and ``dq_block_n`` its keys per dot (for tuning runs).
    ``mode``: where dQ is formed. "group": by the group-centric dQ kernel (streams each
    position's blocks, like the forward); "block": by the key-centric dK/dV kernel, which
    already forms dS for every (block, position) pair, as float32 atomics into ``dq``
    (``dq_atomic``, the default) or, with ``deterministic`` or ``dq_atomic=False``, as
    per-slot partials summed in slot order. Default: the forward's choice
    (:func:`nsa.ops.selection.launch.sel_forward_mode`), "group" where the partials would
    pass its memory cap.
    """
    B, T, HQ, d_k = q.shape
    H, d_v = k.shape[2], v.shape[-1]
    G = HQ // H
    GP2 = rows_per_position(G)
    # q/k head dim as one or two power-of-two tiles (d_k = 192: 128 + 64 columns)
    (DK, DK2), DV = head_dim_split(d_k), head_dim_tile(d_v)
    L = cfg.l_sel
    if gate.stride() != delta.stride():
        raise ValueError("sel_backward: delta must have the gate's strides")
    gate = gate_f32(gate)
    # the dK/dV kernel gathers query rows with 32-bit offsets within one batch element
    for name, x in (("q", q), ("dout", dout), ("gate", gate)):
        if T * x.stride(1) + HQ * x.stride(2) >= 2**31:
            raise ValueError(f"sel_backward: {name} of {tuple(x.shape)} is too large for the "
                             f"32-bit row offsets of the dK/dV kernel (T * stride(1) >= 2^31)")
    use_desc = resolve_desc("sel_backward", use_desc, k, v, DK + DK2, DV)
    bn_q, warps_q, stages_q, bm_kv, bn_kv, warps_kv, stages = _sel_bwd_config(
        DK, DV, GP2, L, q.device, use_desc, DK2)
    warps_q, stages_q = dq_warps or warps_q, dq_stages or stages_q
    if dq_block_n is not None:
        from nsa.ops.selection.launch import tuning_tile

        bn_q = tuning_tile("sel_backward", "dq_block_n", dq_block_n)
    prec = dot_precision(q.dtype, q.device)
    qk_scale = scale * LOG2E
    n_sel = idx.shape[-1]
    common = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
    )
    go = (
        dout.stride(0), dout.stride(1), dout.stride(2),
        gate.stride(0), gate.stride(1), gate.stride(2),
        lse.stride(0), lse.stride(1),
    )

    from nsa.ops.selection.launch import forced_sel_mode, one_position_warps, sel_forward_mode

    dq_atomic = DQ_ATOMIC if dq_atomic is None else dq_atomic
    dq_partial = deterministic or not dq_atomic
    forced = forced_sel_mode(mode)
    mode = forced or sel_forward_mode(q, d_v, H, n_sel)
    # the default also keeps deterministic dQ partials under the forward's memory cap
    part_bytes = B * T * H * n_sel * cdiv(L, bn_kv) * G * d_k * 4
    if (mode == "block" and dq_partial and forced is None
            and part_bytes > SEL_BLOCK_MAX_PARTIAL_BYTES):
        mode = "group"
    if mode == "block":
        dk, dv = _sel_backward_block_dq(
            q, k, v, idx, dout, gate, lse, delta, dq, cfg, scale, common, go, prec,
            deterministic=deterministic, accumulate_dq=accumulate_dq, seg_len=seg_len,
            dq_partial=dq_partial, bm_kv=bm_kv, bn_kv=bn_kv, warps_kv=warps_kv,
            stages=stages)
        return (None, None) if dq_only else (dk, dv)

    # dQ: group-centric, like the forward
    pp_q = positions_per_program or max(1, 16 // GP2)
    if dq_warps is None:
        # (by the covered width: d_k = 192 as 128 + 64 keeps its configuration's warps)
        warps_q = one_position_warps(pp_q, head_dim_tile(d_k), DV, q.device.type == "cuda",
                                     warps_q)

    def launch_q(_bm, st):
        kd, vd = ((kv_desc(k, T, bn_q, DK), kv_desc(v, T, bn_q, DV)) if use_desc else (k, v))
        kd2 = kv_desc(k, T, bn_q, DK2) if use_desc and DK2 else kd
        _sel_bwd_dq_kernel[(cdiv(T, pp_q), H, B)](
            q, kd, kd2, vd, idx, dout, gate, lse, delta, dq, *common,
            idx.stride(0), idx.stride(1), idx.stride(2), *go,
            dq.stride(0), dq.stride(1), dq.stride(2),
            T, qk_scale, scale,
            G=G, GP2=GP2, PP=pp_q, DK=DK, DV=DV, D_K=d_k, D_V=d_v,
            L_SEL=L, BLOCK_N=bn_q, N_SEL=n_sel, NP=next_pow2(n_sel),
            ACCUMULATE=accumulate_dq, DOT_PREC=prec, USE_DESC=use_desc, DK2=DK2,
            num_warps=warps_q, num_stages=st,
        )

    shrink_on_oor(launch_q, 16, stages_q, 16)
    if dq_only:
        return None, None

    dk, dv, _ = _sel_dkdv(q, k, v, idx, dout, gate, lse, delta, cfg, scale, common, go,
                          prec, deterministic=deterministic, seg_len=seg_len, bm_kv=bm_kv,
                          bn_kv=bn_kv, warps_kv=warps_kv, stages=stages)
    return dk, dv


def _sel_dkdv(q, k, v, idx, dout, gate, lse, delta, cfg, scale, common, go, prec, *,
              deterministic, seg_len, bm_kv, bn_kv, warps_kv, stages, dq=None,
              dq_partial=False):
    """dK/dV key-centric over the inverted index; with ``dq`` also the rows' dQ (atomics
    into ``dq``, or partials returned as a third value with ``dq_partial``)."""
    import nsa.ops.selection.launch as SL

    B, T, HQ, d_k = q.shape
    H, d_v = k.shape[2], v.shape[-1]
    G = HQ // H
    GP2 = rows_per_position(G)
    (DK, DK2), DV = head_dim_split(d_k), head_dim_tile(d_v)
    L = cfg.l_sel
    nb = cfg.num_sel_blocks(T)
    n_sel = idx.shape[-1]
    qk_scale = scale * LOG2E
    # H200, 64k: 128..2048 positions per segment all within 3% (45-46 ms with dQ)
    seg = seg_len or (1024 if q.device.type == "cuda" and not interpreting() else 16)
    with_dq = dq is not None
    keys, seg_blk, seg_lo, seg_hi, seg_first, seg_count = inverted_index(
        idx, T, nb, seg, entries=with_dq)
    s_max = seg_blk.shape[-1]
    nsub = cdiv(L, bn_kv)
    if deterministic:
        dko = torch.empty(B, H, s_max * L, d_k, device=q.device, dtype=torch.float32)
        dvo = torch.empty(B, H, s_max * L, d_v, device=q.device, dtype=torch.float32)
    else:
        dko = torch.zeros(B, T, H, d_k, device=q.device, dtype=torch.float32)
        dvo = torch.zeros(B, T, H, d_v, device=q.device, dtype=torch.float32)
    dqx, dq_out = q.new_empty(1, 1, 1, 1, 1, dtype=torch.float32), 0
    if with_dq and dq_partial:
        dqx = torch.empty(B, T, H, n_sel * nsub, G, d_k, device=q.device, dtype=torch.float32)
        if SL.PARTIAL_FILL is not None:
            dqx.fill_(SL.PARTIAL_FILL)
        dq_out = 2
    elif with_dq:
        dqx, dq_out = dq.unsqueeze(-1), 1
    xs = dqx.stride()

    def launch_kv(bm, st):
        pp = max(1, bm // GP2)
        _sel_bwd_dkdv_kernel[(s_max * nsub, H, B)](
            q, k, v, dout, gate, lse, delta, keys, seg_blk, seg_lo, seg_hi, dko, dvo,
            *common, *go,
            keys.stride(0), keys.stride(1),
            seg_blk.stride(0), seg_blk.stride(1),
            *dko.stride(), *dvo.stride(),
            T, H, nb, qk_scale, scale,
            G=G, GP2=GP2, PP=pp, DK=DK, DV=DV, D_K=d_k, D_V=d_v,
            L_SEL=L, BLOCK_N=bn_kv, NSUB=nsub, ATOMIC=not deterministic,
            DOT_PREC=prec, DQX=dqx, stride_x0=xs[0], stride_x1=xs[1], stride_x2=xs[2],
            stride_x3=xs[3], stride_x4=xs[4], SPAN=T * n_sel if with_dq else T,
            N_SEL=n_sel, DQ_OUT=dq_out, DK2=DK2, num_warps=warps_kv, num_stages=st,
        )

    shrink_on_oor(launch_kv, bm_kv, stages, max(16, GP2))
    dq_part = dqx if dq_out == 2 else None
    if not deterministic:
        return dko.to(k.dtype), dvo.to(v.dtype), dq_part
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    _sel_bwd_reduce_kernel[(nb * nsub, H, B)](
        dko, dvo, seg_first, seg_count, dk, dv,
        dko.stride(0), dko.stride(1), dko.stride(2),
        dvo.stride(0), dvo.stride(1), dvo.stride(2),
        seg_first.stride(0), seg_first.stride(1),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        T, DKT=DK, DVT=DV, D_K=d_k, D_V=d_v, L_SEL=L, BLOCK_N=bn_kv, NSUB=nsub,
        DKT2=DK2, num_warps=4, num_stages=1,
    )
    return dk, dv, dq_part


def _sel_backward_block_dq(q, k, v, idx, dout, gate, lse, delta, dq, cfg, scale, common, go,
                           prec, *, deterministic, accumulate_dq, seg_len, dq_partial, bm_kv,
                           bn_kv, warps_kv, stages):
    """Mode "block": dK, dV and dQ from the key-centric kernel (no group-centric pass)."""
    B, T, HQ, d_k = q.shape
    H = k.shape[2]
    G = HQ // H
    GP2 = rows_per_position(G)
    if not accumulate_dq and not dq_partial:
        dq.zero_()
    dk, dv, part = _sel_dkdv(q, k, v, idx, dout, gate, lse, delta, cfg, scale, common, go,
                             prec, deterministic=deterministic, seg_len=seg_len, bm_kv=bm_kv,
                             bn_kv=bn_kv, warps_kv=warps_kv, stages=stages, dq=dq,
                             dq_partial=dq_partial)
    if part is not None:
        on_gpu = q.device.type == "cuda" and not interpreting()
        pp = max(1, (64 if on_gpu else 16) // GP2)
        n_sel = idx.shape[-1]
        DK, DK2 = head_dim_split(d_k)
        _sel_bwd_dq_reduce_kernel[(cdiv(T, pp), H, B)](
            part, idx, dq, *part.stride()[:5],
            idx.stride(0), idx.stride(1), idx.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            T, G=G, GP2=GP2, PP=pp, DK=DK, D_K=d_k, N_SEL=n_sel,
            NSUB=part.shape[3] // n_sel, ACCUMULATE=accumulate_dq, DK2=DK2, num_warps=4,
            num_stages=1,
        )
    return dk, dv
