"""Raw launchers of the shared flash backward (compressed and window branches).

No autograd and no validation beyond shapes: :mod:`nsa.ops.triton_autograd` calls these.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from nsa.ops.compression.launch import (
    LOG2E,
    cdiv,
    dot_precision,
    head_dim_split,
    head_dim_tile,
    interpreting,
    rows_per_position,
    shrink_on_oor,
)
from nsa.ops.descriptors import kv_desc, resolve_desc, rows_desc
from nsa.ops.flashbwd.kernels import _bwd_dkdv_kernel, _bwd_dq_kernel, _rowdot_kernel

MASK_CMP = 0
MASK_WIN = 1

# flash_dq: two branches in one kernel (True) or in two launches, the second adding the
# first's float32 rows (tuning runs compare the two)
PAIR_DQ = True


def _configs(DK: int, DV: int, GP2: int, device: torch.device, DK2: int = 0):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the dK/dV kernel, same of the dQ kernel.

    Measured on an H200 at the paper shape, T = 64k (scripts/gpu_tune_backward.py,
    docs/perf-notes.md): dK/dV 32 x 64 on 4 warps, 3 stages (compressed 26.5 ms, window
    7.8 ms; 64 x 64 on 8 warps took 59.7 / 16.0 ms), dQ 64 x 64 on 4 warps, 2 stages
    (15.5 / 4.9 ms; 128 x 32 on 8 warps 26.8 / 7.9 ms).

    ``DK2``: the second q/k tile where the kernels take the head dim as two
    (:func:`head_dim_split`; ``DK`` the first). At the paper's d_k = 192 (128 + 64), d_v =
    128, H200, 16k, G = 16 (scripts/gpu_tune_backward.py --D 192 --DV 128, ms, compressed /
    window): dK/dV 32 x 128 on 8 warps, 3 stages 2.94 / 1.96 against 5.30 / 4.05 for the
    wide-head tile (32 x 32, 4 warps, 2 stages) and 4.76 / 3.09 for the d <= 128 one; dQ
    128 x 64 on 8 warps, 3 stages 1.94 / 1.94 against 2.36 / 2.23 (64 x 32, 4 warps) and
    3.08 / 3.10 (64 x 64, 4 warps).
    """
    if interpreting() or device.type != "cuda":
        return (32, 32, 4, 1), (32, 32, 4, 1)
    if DK2 and max(DK, DV) <= 128:
        kv, dq = (32, 128, 8, 3), (128, 64, 8, 3)
    elif max(DK, DV) <= 128:
        kv, dq = (32, 64, 4, 3), (64, 64, 4, 2)
    else:
        kv, dq = (32, 32, 4, 2), (64, 32, 4, 2)
    return (max(kv[0], GP2), *kv[1:]), (max(dq[0], GP2), *dq[1:])


def gate_f32(gate: Tensor) -> Tensor:
    """``gate`` as float32 with its own strides (itself if it already is float32).

    The dK/dV kernels load one gate value per row and step; only 4-byte elements go
    through a loop's asynchronous copies, so a bf16 gate was a plain load that stalled
    every step on its latency.
    """
    if gate.dtype == torch.float32:
        return gate
    out = torch.empty_strided(gate.shape, gate.stride(), dtype=torch.float32,
                              device=gate.device)
    return out.copy_(gate)


def flash_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    gate: Tensor,
    lse: Tensor,
    delta: Tensor,
    dq: Tensor | None,
    scale: float,
    *,
    mask: int,
    w: int = 0,
    cmp_l: int = 1,
    cmp_d: int = 1,
    accumulate_dq: bool = True,
    q_chunk: int | None = None,
    kv_config: tuple[int, int, int] | None = None,
    dq_config: tuple[int, int, int] | None = None,
    num_stages: int | None = None,
    parts: str = "all",
    use_desc: bool | None = None,
    use_desc_rows: bool | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """dK, dV of one flash branch (in k's/v's dtype); adds (or writes) its dQ into ``dq``.

    q [B, T, HQ, d_k]; k/v [B, NK, H, d_k/d_v] (compressed tokens, or the T raw tokens of
    the window branch); dout [B, T, HQ, d_v] (gradient of the combined output); gate
    [B, T, HQ] (this branch's gate: the kernels use dO = gate * dout; any float dtype,
    converted to float32 by :func:`gate_f32`); lse float32
    [B, HQ, T] (base-2, from the forward); delta float32 [B, T, HQ] with gate's strides
    (gate * rowsum(dout * O_branch)); dq float32 [B, T, HQ, d_k] (None with
    ``parts="dkdv"``).
    ``mask``: MASK_CMP (token i visible iff i*cmp_d + cmp_l - 1 <= t) or MASK_WIN (keys
    (t - w, t]). ``q_chunk``: query positions per dK/dV program (default 4096 on the GPU).
    Tuning runs: ``kv_config``/``dq_config`` = (BLOCK_M, BLOCK_N, num_warps) override the
    two kernels' tiles, ``num_stages`` their pipelining; ``parts`` "dkdv" or "dq" launches
    one kernel only (the other's outputs are then None / dq untouched). ``use_desc``: the dQ
    kernel reads key/value tiles through tensor descriptors (None:
    :func:`nsa.ops.descriptors.resolve_desc` decides; H200, 64k: compressed dQ 15.6 -> 13.0
    ms, window 5.3 -> 5.0); ``use_desc_rows``: the dK/dV kernel reads q/dout rows through
    them (G must be a power of two; None: off, it measured no faster).
    """
    if parts not in ("all", "dkdv", "dq"):
        raise ValueError(f"flash_backward: parts must be all, dkdv or dq, got {parts!r}")
    B, T, HQ, d_k = q.shape
    NK, H, d_v = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // H
    GP2 = rows_per_position(G)
    # q/k head dim as one or two power-of-two tiles (d_k = 192: 128 + 64 columns)
    (DK, DK2), DV = head_dim_split(d_k), head_dim_tile(d_v)
    if gate.stride() != delta.stride():
        raise ValueError("flash_backward: delta must have the gate's strides")
    gate = gate_f32(gate)
    (bm1, bn1, warps1, stages1), _ = _configs(DK, DV, GP2, q.device, DK2)
    bm1, bn1, warps1 = kv_config or (bm1, bn1, warps1)
    stages1 = num_stages or stages1
    use_desc = resolve_desc("flash_backward", use_desc, k, v, DK + DK2, DV)
    # rows by descriptor: a box holds whole groups only. H200, paper shape, 64k: the
    # compressed dK/dV took 27.2 ms with them against 26.8 with pointer loads (window 8.1
    # / 8.2), so they are off unless asked for (here or by USE_DESC / NSA_KV_DESC=1)
    use_desc_rows = resolve_desc(
        "flash_backward", use_desc_rows, q, dout, DK + DK2, DV, default=False,
        why=() if G == GP2 else (f"G = {G} is not a power of two",), arg="use_desc_rows")
    prec = dot_precision(q.dtype, q.device)
    qk_scale = scale * LOG2E
    on_gpu = q.device.type == "cuda" and not interpreting()
    chunk = q_chunk or (4096 if on_gpu else 64)
    # compressed: absolute chunks of positions (every key tile of a chunk reads the same
    # rows; H100, 64k: the dK/dV kernel's q/dout rows had a 28% L2 hit rate with chunks
    # counted from each tile's first position); window: chunks of the tile's own rows
    span = T if mask == MASK_CMP else min(T, bn1 - 1 + w)
    n_chunks = max(1, cdiv(span, chunk))
    # every (key tile, chunk) program stores its whole partial (zeros when its chunk is
    # empty), so the partials need no initialisation
    dkp = torch.empty(n_chunks, B, NK, H, d_k, device=q.device, dtype=torch.float32)
    dvp = torch.empty(n_chunks, B, NK, H, d_v, device=q.device, dtype=torch.float32)
    common = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        gate.stride(0), gate.stride(1), gate.stride(2),
        lse.stride(0), lse.stride(1),
    )

    def launch_kv(bm, st):
        pp = max(1, bm // GP2)
        qd, od = ((rows_desc(q, pp, GP2, DK), rows_desc(dout, pp, GP2, DV))
                  if use_desc_rows else (q, dout))
        qd2 = rows_desc(q, pp, GP2, DK2) if use_desc_rows and DK2 else qd
        _bwd_dkdv_kernel[(cdiv(NK, bn1), n_chunks, H * B)](
            qd, qd2, k, v, od, gate, lse, delta, dkp, dvp, *common,
            dkp.stride(0), dkp.stride(1), dkp.stride(2), dkp.stride(3),
            dvp.stride(0), dvp.stride(1), dvp.stride(2), dvp.stride(3),
            T, NK, H, w, chunk, qk_scale, scale,
            G=G, GP2=GP2, PP=pp, BLOCK_N=bn1, DK=DK, DV=DV, D_K=d_k, D_V=d_v,
            MASK=mask, CMP_L=cmp_l, CMP_D=cmp_d, DOT_PREC=prec, USE_DESC=use_desc_rows,
            DK2=DK2, num_warps=warps1, num_stages=st,
        )

    if NK > 0 and parts != "dq":
        shrink_on_oor(launch_kv, bm1, stages1, max(16, GP2))
    if parts != "dkdv":  # (a branch without keys adds nothing: flash_dq's own case)
        flash_dq(q, dout, dq, scale, [FlashBranch(k, v, gate, lse, delta, mask, w, cmp_l, cmp_d)],
                 accumulate_dq=accumulate_dq, dq_config=dq_config, num_stages=num_stages,
                 use_desc=use_desc)
    if parts == "dq":
        return None, None
    dk = (dkp[0] if n_chunks == 1 else dkp.sum(0)).to(k.dtype)
    dv = (dvp[0] if n_chunks == 1 else dvp.sum(0)).to(v.dtype)
    return dk, dv


class FlashBranch(NamedTuple):
    """One flash branch's inputs to :func:`flash_dq` (see :func:`flash_backward`)."""

    k: Tensor
    v: Tensor
    gate: Tensor
    lse: Tensor
    delta: Tensor
    mask: int
    w: int = 0
    cmp_l: int = 1
    cmp_d: int = 1


def flash_dq(
    q: Tensor,
    dout: Tensor,
    dq: Tensor | None,
    scale: float,
    branches: list[FlashBranch],
    *,
    accumulate_dq: bool,
    out: Tensor | None = None,
    dq_config: tuple[int, int, int] | None = None,
    num_stages: int | None = None,
    use_desc: bool | None = None,
) -> None:
    """dQ of one or two flash branches (the compressed and the window branch: their masks
    differ), added to (``accumulate_dq``) or written into the float32 ``dq``.

    Two branches run in one kernel, which loads each query tile once and sums both
    branches' dQ in registers before its single store (H100/H200, 64k: the window's own
    dQ pass re-read q and read and wrote the float32 dQ once more). ``out`` (q's shape,
    any float dtype, dq's strides): the final dQ goes there (the float32 buffer's rows
    are then only read, where ``accumulate_dq``). ``dq=None`` (with ``out``, nothing to
    accumulate): no float32 buffer. Branches whose gates, lse or Delta differ in layout,
    head dims past 128 (or ``PAIR_DQ = False``) run as two launches instead. Shapes and
    the tuning arguments as in :func:`flash_backward`.
    """
    if not 1 <= len(branches) <= 2:
        raise ValueError(f"flash_dq: expected 1 or 2 branches, got {len(branches)}")
    if len(branches) == 2 and branches[0].mask == branches[1].mask:
        raise ValueError("flash_dq: two branches must have different masks, got "
                         f"{branches[0].mask} twice")
    if dq is None and (out is None or accumulate_dq):
        raise ValueError("flash_dq: dq=None needs out and accumulate_dq=False")
    if out is not None and dq is not None and (out.shape != dq.shape
                                               or out.stride() != dq.stride()):
        raise ValueError(f"flash_dq: out must have dq's shape {tuple(dq.shape)} and strides "
                         f"{dq.stride()}, got {tuple(out.shape)} / {out.stride()}")
    branches = [br._replace(gate=gate_f32(br.gate)) for br in branches]
    for br in branches:
        if br.gate.stride() != br.delta.stride():
            raise ValueError("flash_dq: delta must have the gate's strides")
    # branches with no keys add nothing
    live = [br for br in branches if br.k.shape[1] > 0]
    wide = max(head_dim_tile(q.shape[-1]), head_dim_tile(dout.shape[-1])) > 128
    # past 128 columns the dQ kernel already spilled (sm_90 compile: 480-576 bytes of stack
    # per thread) and the second branch's state adds 300 more; d_k = 192 as two tiles
    # (128 + 64) does not spill alone, but paired 192-376 bytes
    if len(live) == 2 and (not PAIR_DQ or wide or live[0].gate.stride() != live[1].gate.stride()
                           or live[0].lse.stride() != live[1].lse.stride()):
        buf = dq if dq is not None else torch.empty(q.shape, device=q.device,
                                                     dtype=torch.float32)
        flash_dq(q, dout, buf, scale, live[:1], accumulate_dq=accumulate_dq,
                 dq_config=dq_config, num_stages=num_stages, use_desc=use_desc)
        flash_dq(q, dout, buf, scale, live[1:], accumulate_dq=True, out=out,
                 dq_config=dq_config, num_stages=num_stages, use_desc=use_desc)
        return
    if not live:
        target = out if out is not None else dq
        if accumulate_dq:
            if out is not None:
                out.copy_(dq)
        else:
            target.zero_()
        return
    if dq is None:  # the kernel neither reads nor writes DQ here; out lends its strides
        dq = out
    B, T, HQ, d_k = q.shape
    first = live[0]
    H, d_v = first.k.shape[2], first.v.shape[-1]
    G = HQ // H
    GP2 = rows_per_position(G)
    (DK, DK2), DV = head_dim_split(d_k), head_dim_tile(d_v)
    _, (bm2, bn2, warps2, stages2) = _configs(DK, DV, GP2, q.device, DK2)
    bm2, bn2, warps2 = dq_config or (bm2, bn2, warps2)
    stages2 = num_stages or stages2
    descs = [resolve_desc("flash_dq", use_desc, br.k, br.v, DK + DK2, DV) for br in live]
    desc = all(descs)
    w = max(br.w for br in live)
    cmp = [br for br in live if br.mask == MASK_CMP]
    cmp_l, cmp_d = (cmp[0].cmp_l, cmp[0].cmp_d) if cmp else (1, 1)
    prec = dot_precision(q.dtype, q.device)
    qk_scale = scale * LOG2E
    gate, lse = first.gate, first.lse

    def kv(br):
        """(k's columns 0..DK, k's columns DK..DK + DK2 (the first again where DK2 = 0),
        v): descriptors where ``desc``, else the tensors themselves."""
        NK = br.k.shape[1]
        if desc:
            kd = kv_desc(br.k, NK, bn2, DK)
            return kd, kv_desc(br.k, NK, bn2, DK2) if DK2 else kd, kv_desc(br.v, NK, bn2, DV)
        return br.k, br.k, br.v

    def launch_q(bm, st):
        pp = max(1, bm // GP2)
        kd, kd_hi, vd = kv(first)
        extra = {}
        if len(live) == 2:
            sec = live[1]
            k2, k2_hi, v2 = kv(sec)
            extra = dict(K2=k2, K2_HI=k2_hi, V2=v2, GATE2=sec.gate, LSE2=sec.lse,
                         DELTA2=sec.delta,
                         stride_k2b=sec.k.stride(0), stride_k2t=sec.k.stride(1),
                         stride_k2h=sec.k.stride(2), stride_v2b=sec.v.stride(0),
                         stride_v2t=sec.v.stride(1), stride_v2h=sec.v.stride(2),
                         NK2=sec.k.shape[1], MASK2=sec.mask)
        _bwd_dq_kernel[(cdiv(T, pp), H, B)](
            q, kd, kd_hi, vd, dout, gate, lse, first.delta, dq,
            q.stride(0), q.stride(1), q.stride(2),
            first.k.stride(0), first.k.stride(1), first.k.stride(2),
            first.v.stride(0), first.v.stride(1), first.v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            gate.stride(0), gate.stride(1), gate.stride(2),
            lse.stride(0), lse.stride(1),
            dq.stride(0), dq.stride(1), dq.stride(2),
            T, first.k.shape[1], w, qk_scale, scale,
            G=G, GP2=GP2, PP=pp, BLOCK_N=bn2, DK=DK, DV=DV, D_K=d_k, D_V=d_v,
            MASK=first.mask, CMP_L=cmp_l, CMP_D=cmp_d, ACCUMULATE=accumulate_dq,
            DOT_PREC=prec, USE_DESC=desc, OUT=out, DK2=DK2, num_warps=warps2, num_stages=st,
            **extra,
        )

    shrink_on_oor(launch_q, bm2, stages2, max(16, GP2))


def branch_rowdots(dout: Tensor, outs: list[Tensor]) -> list[Tensor]:
    """[rowsum(dout * O_x) for O_x in outs] as float32 [B, T, HQ], without materialising
    any float32 copy of dout or O_x (dout is read once for up to three outputs).

    dout and every O_x: [B, T, HQ, d_v], same shape; made contiguous if they are not.
    """
    if not outs:
        return []
    if len(outs) > 3:
        raise ValueError(f"branch_rowdots: at most 3 outputs, got {len(outs)}")
    dout = dout.contiguous()
    outs = [o.contiguous() for o in outs]
    D = dout.shape[-1]
    n_rows = dout.numel() // D if D else 0
    res = [torch.empty(dout.shape[:-1], device=dout.device, dtype=torch.float32) for _ in outs]
    if n_rows == 0:
        return [r.zero_() for r in res]
    DP = max(16, 1 << (D - 1).bit_length())
    block_r = max(1, 4096 // DP)
    o = outs + [outs[0]] * (3 - len(outs))
    r = res + [res[0]] * (3 - len(res))
    _rowdot_kernel[(cdiv(n_rows, block_r),)](
        dout, o[0], o[1], o[2], r[0], r[1], r[2], n_rows,
        D=D, DP=DP, BLOCK_R=block_r, N_OUT=len(outs), num_warps=4,
    )
    return res
