"""The NSA specification written in PyTorch: the oracle every backend is tested against.

Pure PyTorch, any device, any floating dtype (float64 for oracles; half types are
computed in float32 and cast back). Vectorised over batch, heads, blocks and tokens;
queries are processed in chunks so memory is O(chunk x keys), never O(T^2).

Every piece of the spec is a function of its own so tests and other backends can use it:
:func:`compress_mean`, :func:`cmp_visible`, :func:`overlap_matrix`,
:func:`block_scores`, :func:`group_scores`, :func:`select_blocks`,
:func:`canonical_indices`, and the three branch attentions.

Positions are explicit: ``q_pos`` holds each query's absolute position, shape [B, Tq],
so the same code serves prefill (q_pos = 0..T-1), decode (q_pos = current length - 1)
and ragged batches (one position per sequence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nsa.config import NSAConfig

# Largest intermediate (elements) a query chunk may create; bounds reference memory.
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class NSAAux:
    """Side outputs of ``nsa_attention(..., return_aux=True)``.

    block_indices: [B, T, H, n] selected blocks, ascending, -1 for unused slots
        (None when the selection branch was not computed).
    o_cmp, o_sel, o_win: [B, T, HQ, d_v] ungated branch outputs (None when skipped).
    """

    block_indices: Tensor | None = None
    o_cmp: Tensor | None = None
    o_sel: Tensor | None = None
    o_win: Tensor | None = None


# ----------------------------------------------------------------------------- pieces


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference computes in: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_compressed(t: int, l: int, d: int) -> int:
    """Number of compressed tokens that exist after ``t`` raw tokens."""
    return 0 if t < l else (t - l) // d + 1


def compress_blocks(x: Tensor, l: int, d: int) -> Tensor:
    """Raw tokens [B, T, H, D] -> overlapping blocks [B, N, H, l, D]; block i = [i*d, i*d+l)."""
    if x.dim() != 4:
        raise ValueError(f"compress_blocks: x must be [B, T, H, D], got shape {tuple(x.shape)}")
    B, T, H, D = x.shape
    N = num_compressed(T, l, d)
    if N == 0:
        return x.new_zeros(B, 0, H, l, D)
    # unfold gives [B, N, H, D, l]
    return x.unfold(1, l, d).permute(0, 1, 2, 4, 3)


def compress_mean(x: Tensor, l: int, d: int) -> Tensor:
    """phi = "mean": compressed token i is the mean of raw tokens [i*d, i*d + l).

    x: [B, T, H, D] -> [B, N, H, D] with N = floor((T - l)/d) + 1 (0 if T < l).
    """
    if l <= 0 or d <= 0 or l % d:
        raise ValueError(f"compress_mean: need positive l, d with d | l, got l={l}, d={d}")
    return compress_blocks(x, l, d).mean(dim=3)


def num_cmp_visible(q_pos: Tensor, l: int, d: int) -> Tensor:
    """N_cmp(t): compressed tokens visible to a query at position t (same shape as q_pos)."""
    return torch.where(q_pos + 1 < l, torch.zeros_like(q_pos), (q_pos + 1 - l) // d + 1)


def cmp_visible(q_pos: Tensor, N: int, l: int, d: int) -> Tensor:
    """Bool [..., N]: compressed token i is visible to query t iff i*d + l - 1 <= t."""
    i = torch.arange(N, device=q_pos.device)
    return (i * d + l - 1) <= q_pos.unsqueeze(-1)


def overlap_matrix(
    N: int, n_blocks: int, l: int, d: int, l_sel: int, device=None, dtype=torch.float32
) -> Tensor:
    """[N, n_blocks]: raw tokens shared by compressed block i and selection block j."""
    i = torch.arange(N, device=device).unsqueeze(1)
    j = torch.arange(n_blocks, device=device).unsqueeze(0)
    lo = torch.maximum(i * d, j * l_sel)
    hi = torch.minimum(i * d + l, (j + 1) * l_sel)
    return (hi - lo).clamp(min=0).to(dtype)


def block_scores(p_cmp: Tensor, n_blocks: int, l: int, d: int, l_sel: int) -> Tensor:
    """Eq. 9: p_sel[..., j] = sum_i p_cmp[..., i] * overlap(i, j) / d.

    p_cmp: [..., N] compressed-token importances (zero where not visible).
    """
    M = overlap_matrix(p_cmp.shape[-1], n_blocks, l, d, l_sel, p_cmp.device, p_cmp.dtype)
    return (p_cmp @ M) / d


def group_scores(p_sel: Tensor) -> Tensor:
    """Eq. 10: sum of per-head block scores over the G heads of a group.

    p_sel: [B, H, G, Tq, n_blocks] -> [B, H, Tq, n_blocks]
    """
    return p_sel.sum(dim=2)


def canonical_indices(idx: Tensor) -> Tensor:
    """Sort block indices ascending with -1 (unused) slots last, along the last dim."""
    big = torch.iinfo(idx.dtype).max
    keyed = torch.where(idx < 0, torch.full_like(idx, big), idx)
    keyed = keyed.sort(dim=-1).values
    return torch.where(keyed == big, torch.full_like(keyed, -1), keyed)


def select_blocks(scores: Tensor, q_pos: Tensor, cfg: NSAConfig) -> Tensor:
    """Eq. 11/12: top-n blocks per (query, group) with forced initial/local blocks.

    scores: [B, H, Tq, n_blocks] group scores; q_pos: [B, Tq] absolute positions.
    Returns int64 [B, H, Tq, n]: ascending block indices, -1 for unused slots.
    Candidates are blocks j with j*l_sel <= t; forced blocks go first, then the highest
    scores; equal scores go to the lower block index (stable sort).
    """
    B, H, Tq, nb = scores.shape
    n = cfg.n
    j = torch.arange(nb, device=scores.device)
    t = q_pos[:, None, :, None]  # [B, 1, Tq, 1]
    cand = j * cfg.l_sel <= t
    cur = t // cfg.l_sel
    forced = cand & ((j < cfg.n_initial) | ((cur - j >= 0) & (cur - j < cfg.n_local)))
    inf = torch.tensor(float("inf"), dtype=scores.dtype, device=scores.device)
    prio = torch.where(forced, inf, torch.where(cand, scores, -inf))
    order = prio.sort(dim=-1, descending=True, stable=True).indices[..., :n]
    taken = torch.gather(cand.expand(B, H, Tq, nb), -1, order)
    idx = torch.where(taken, order, torch.full_like(order, -1))
    if idx.shape[-1] < n:
        idx = torch.cat([idx, idx.new_full((B, H, Tq, n - idx.shape[-1]), -1)], dim=-1)
    return canonical_indices(idx)


def _dedup_indices(idx: Tensor) -> Tensor:
    """Canonical order with repeated block indices replaced by -1 (a block counts once)."""
    idx = canonical_indices(idx)
    dup = torch.zeros_like(idx, dtype=torch.bool)
    dup[..., 1:] = (idx[..., 1:] == idx[..., :-1]) & (idx[..., 1:] >= 0)
    return canonical_indices(torch.where(dup, torch.full_like(idx, -1), idx))


def masked_softmax(s: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last dim restricted to ``mask``; a row with no key gives zeros."""
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m)
    den = p.sum(dim=-1, keepdim=True)
    return p / torch.where(den > 0, den, torch.ones_like(den))


# ----------------------------------------------------------------------------- branches
# Layout inside the reference: q as [B, H, G, Tq, D]; keys as [B, H, S, D].


def _to_groups(q: Tensor, H: int) -> Tensor:
    B, Tq, HQ, D = q.shape
    return q.view(B, Tq, H, HQ // H, D).permute(0, 2, 3, 1, 4)


def _from_groups(o: Tensor) -> Tensor:
    B, H, G, Tq, D = o.shape
    return o.permute(0, 3, 1, 2, 4).reshape(B, Tq, H * G, D)


def cmp_attention(
    qg: Tensor, k_cmp: Tensor, v_cmp: Tensor, q_pos: Tensor, cfg: NSAConfig, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Compressed branch. qg [B,H,G,Tq,dk]; k_cmp/v_cmp [B,N,H,*]; q_pos [B,Tq].

    Returns (o [B,H,G,Tq,dv], p_cmp [B,H,G,Tq,N], visible [B,1,1,Tq,N]).
    """
    N = k_cmp.shape[1]
    vis = cmp_visible(q_pos, N, cfg.l, cfg.d)[:, None, None]  # [B,1,1,Tq,N]
    if N == 0:
        B, H, G, Tq, _ = qg.shape
        p = qg.new_zeros(B, H, G, Tq, 0)
        return qg.new_zeros(B, H, G, Tq, v_cmp.shape[-1]), p, vis
    s = torch.einsum("bhgtd,bnhd->bhgtn", qg, k_cmp) * scale
    p = masked_softmax(s, vis)
    o = torch.einsum("bhgtn,bnhd->bhgtd", p, v_cmp)
    return o, p, vis


def sel_attention(
    qg: Tensor, k: Tensor, v: Tensor, idx: Tensor, q_pos: Tensor, cfg: NSAConfig, scale: float
) -> tuple[Tensor, Tensor]:
    """Selected branch: attend to the tokens of the chosen blocks at positions <= t.

    qg [B,H,G,Tq,dk]; k/v [B,Tk,H,*] raw tokens at positions 0..Tk-1;
    idx [B,H,Tq,n] distinct block indices or -1. Returns (o, keys-read mask [B,H,Tq,n,l']).
    """
    B, Tk, H, dk = k.shape
    dv = v.shape[-1]
    ls = cfg.l_sel
    nb = -(-Tk // ls)
    pad = nb * ls - Tk
    if pad:
        k = torch.cat([k, k.new_zeros(B, pad, H, dk)], dim=1)
        v = torch.cat([v, v.new_zeros(B, pad, H, dv)], dim=1)
    kb = k.view(B, nb, ls, H, dk).permute(0, 3, 1, 2, 4)  # [B,H,nb,l',dk]
    vb = v.view(B, nb, ls, H, dv).permute(0, 3, 1, 2, 4)
    safe = idx.clamp(min=0)
    bi = torch.arange(B, device=k.device)[:, None, None, None]
    hi = torch.arange(H, device=k.device)[None, :, None, None]
    ks = kb[bi, hi, safe]  # [B,H,Tq,n,l',dk]
    vs = vb[bi, hi, safe]
    pos = safe[..., None] * ls + torch.arange(ls, device=k.device)  # [B,H,Tq,n,l']
    t = q_pos[:, None, :, None, None]
    mask = (idx[..., None] >= 0) & (pos <= t) & (pos < Tk)
    Tq, n = idx.shape[2], idx.shape[3]
    s = torch.einsum("bhgtd,bhtsd->bhgts", qg, ks.reshape(B, H, Tq, n * ls, dk)) * scale
    p = masked_softmax(s, mask.reshape(B, H, 1, Tq, n * ls))
    o = torch.einsum("bhgts,bhtsd->bhgtd", p, vs.reshape(B, H, Tq, n * ls, dv))
    return o, mask


def win_attention(
    qg: Tensor, k: Tensor, v: Tensor, k_pos: Tensor, q_pos: Tensor, cfg: NSAConfig, scale: float
) -> tuple[Tensor, Tensor]:
    """Sliding window: keys with t - w < position <= t. k/v [B,S,H,*], k_pos [B,S] (-1 empty).

    Returns (o [B,H,G,Tq,dv], mask [B,1,1,Tq,S]).
    """
    kp = k_pos[:, None, :]
    t = q_pos[:, :, None]
    mask = ((kp >= 0) & (kp <= t) & (kp > t - cfg.w))[:, None, None]
    s = torch.einsum("bhgtd,bshd->bhgts", qg, k) * scale
    p = masked_softmax(s, mask)
    o = torch.einsum("bhgts,bshd->bhgtd", p, v)
    return o, mask


# ----------------------------------------------------------------------------- one chunk


@dataclass
class ChunkResult:
    out: Tensor  # [B, Tq, HQ, dv] gated sum (compute dtype)
    o_cmp: Tensor | None
    o_sel: Tensor | None
    o_win: Tensor | None
    block_indices: Tensor | None  # [B, Tq, H, n]
    reads: dict[str, Tensor]  # tokens read per branch, [B, Tq, H]


def nsa_chunk(
    q: Tensor,
    q_pos: Tensor,
    k_sel: Tensor | None,
    v_sel: Tensor | None,
    k_win: Tensor | None,
    v_win: Tensor | None,
    k_win_pos: Tensor | None,
    k_cmp: Tensor | None,
    v_cmp: Tensor | None,
    g_cmp: Tensor | None,
    g_sel: Tensor | None,
    g_win: Tensor | None,
    cfg: NSAConfig,
    scale: float,
    block_indices: Tensor | None = None,
    want_branches: bool = False,
) -> ChunkResult:
    """NSA for queries at explicit positions, all tensors already in the compute dtype.

    q [B,Tq,HQ,dk]; q_pos [B,Tq]; k_sel/v_sel [B,Tk,H,*] at positions 0..Tk-1;
    k_win/v_win [B,S,H,*] at positions k_win_pos [B,S]; k_cmp/v_cmp [B,N,H,*];
    gates [B,Tq,HQ] or None; block_indices [B,Tq,H,n] or None.
    """
    B, Tq, HQ, _ = q.shape
    H = (k_sel if k_sel is not None else k_win if k_win is not None else k_cmp).shape[2]
    qg = _to_groups(q, H)
    out = None
    res = ChunkResult(out=q, o_cmp=None, o_sel=None, o_win=None, block_indices=None, reads={})

    def add(o: Tensor, g: Tensor) -> None:
        nonlocal out
        term = _from_groups(o) * g.unsqueeze(-1)
        out = term if out is None else out + term

    need_scores = g_sel is not None and block_indices is None
    if g_cmp is not None or need_scores:
        o, p, vis = cmp_attention(qg, k_cmp, v_cmp, q_pos, cfg, scale)
        res.reads["cmp"] = vis.sum(-1)[:, 0, 0, :, None].expand(B, Tq, H)
        if g_cmp is not None:
            add(o, g_cmp)
            res.o_cmp = _from_groups(o) if want_branches else None
    if g_sel is not None:
        Tk = k_sel.shape[1]
        nb = -(-Tk // cfg.l_sel)
        if block_indices is None:
            p_sel = block_scores(p.detach(), nb, cfg.l, cfg.d, cfg.l_sel)
            idx = select_blocks(group_scores(p_sel), q_pos, cfg)  # [B,H,Tq,n]
        else:
            idx = _dedup_indices(block_indices.permute(0, 2, 1, 3).long())
            idx = torch.where(idx < nb, idx, torch.full_like(idx, -1))
        o, mask = sel_attention(qg, k_sel, v_sel, idx, q_pos, cfg, scale)
        add(o, g_sel)
        res.o_sel = _from_groups(o) if want_branches else None
        res.block_indices = idx.permute(0, 2, 1, 3)
        res.reads["sel"] = mask.sum(dim=(-1, -2)).permute(0, 2, 1)
    if g_win is not None:
        o, mask = win_attention(qg, k_win, v_win, k_win_pos, q_pos, cfg, scale)
        add(o, g_win)
        res.o_win = _from_groups(o) if want_branches else None
        res.reads["win"] = mask.sum(-1)[:, 0, 0, :, None].expand(B, Tq, H)
    if out is None:
        out = q.new_zeros(B, Tq, HQ, (v_sel if v_sel is not None else v_win).shape[-1])
    res.out = out
    return res


# ----------------------------------------------------------------------------- full op


def _chunk_size(B: int, T: int, HQ: int, H: int, dk: int, dv: int, N: int, cfg: NSAConfig) -> int:
    per_query = max(
        B * H * cfg.n * cfg.l_sel * (dk + dv),  # gathered selected keys/values
        B * HQ * (cfg.n * cfg.l_sel + N + cfg.w) * 2,  # scores + probabilities
    )
    return max(1, min(T, _CHUNK_ELEMENTS // max(1, per_query)))


def reference_nsa(
    q: Tensor,
    k_sel: Tensor | None,
    v_sel: Tensor | None,
    k_win: Tensor | None,
    v_win: Tensor | None,
    k_cmp: Tensor | None,
    v_cmp: Tensor | None,
    g_cmp: Tensor | None,
    g_sel: Tensor | None,
    g_win: Tensor | None,
    cfg: NSAConfig,
    scale: float,
    block_indices: Tensor | None = None,
    return_aux: bool = False,
    chunk_size: int | None = None,
    deterministic: bool = False,
) -> Tensor | tuple[Tensor, NSAAux]:
    """Prefill/training NSA over T tokens at positions 0..T-1 (inputs already validated).

    ``deterministic`` is accepted for the backends' common signature: the reference's
    determinism is PyTorch's own (``torch.use_deterministic_algorithms``).
    """
    B, T, HQ, dk = q.shape
    ref = next(x for x in (k_sel, k_win, k_cmp) if x is not None)
    H = ref.shape[2]
    dv = next(x for x in (v_sel, v_win, v_cmp) if x is not None).shape[-1]
    N = k_cmp.shape[1] if k_cmp is not None else 0
    out_dtype = q.dtype
    ct = compute_dtype(q.dtype)
    cast = lambda x: None if x is None else x.to(ct)  # noqa: E731
    q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp = map(
        cast, (q, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp)
    )
    g_cmp, g_sel, g_win = map(cast, (g_cmp, g_sel, g_win))
    C = chunk_size or _chunk_size(B, T, HQ, H, dk, dv, N, cfg)
    outs, aux_parts = [], {"block_indices": [], "o_cmp": [], "o_sel": [], "o_win": []}
    pos_all = torch.arange(T, device=q.device)
    for t0 in range(0, T, C):
        t1 = min(T, t0 + C)
        q_pos = pos_all[t0:t1].unsqueeze(0).expand(B, -1)
        w0 = max(0, t0 - cfg.w + 1)
        sl = lambda g, t0=t0, t1=t1: None if g is None else g[:, t0:t1]  # noqa: E731
        r = nsa_chunk(
            q[:, t0:t1],
            q_pos,
            None if k_sel is None else k_sel[:, :t1],
            None if v_sel is None else v_sel[:, :t1],
            None if k_win is None else k_win[:, w0:t1],
            None if v_win is None else v_win[:, w0:t1],
            pos_all[w0:t1].unsqueeze(0).expand(B, -1),
            k_cmp,
            v_cmp,
            sl(g_cmp),
            sl(g_sel),
            sl(g_win),
            cfg,
            scale,
            block_indices=None if block_indices is None else block_indices[:, t0:t1],
            want_branches=return_aux,
        )
        outs.append(r.out)
        if return_aux:
            for key in aux_parts:
                aux_parts[key].append(getattr(r, key))
    out = torch.cat(outs, dim=1).to(out_dtype)
    if not return_aux:
        return out
    cat = lambda xs: None if xs[0] is None else torch.cat(xs, dim=1)  # noqa: E731
    aux = NSAAux(
        block_indices=cat(aux_parts["block_indices"]),
        o_cmp=None if cat(aux_parts["o_cmp"]) is None else cat(aux_parts["o_cmp"]).to(out_dtype),
        o_sel=None if cat(aux_parts["o_sel"]) is None else cat(aux_parts["o_sel"]).to(out_dtype),
        o_win=None if cat(aux_parts["o_win"]) is None else cat(aux_parts["o_win"]).to(out_dtype),
    )
    return out, aux


def dense_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Causal dense attention with an explicit mask (GQA), for baselines and oracles.

    q [B,T,HQ,dk], k/v [B,T,H,*] at positions 0..T-1. Chunked over queries.
    """
    B, T, HQ, dk = q.shape
    H = k.shape[2]
    scale = dk ** -0.5 if scale is None else scale
    qg = _to_groups(q, H)
    pos = torch.arange(T, device=q.device)
    C = max(1, min(T, _CHUNK_ELEMENTS // max(1, B * HQ * T * 2)))
    outs = []
    for t0 in range(0, T, C):
        t1 = min(T, t0 + C)
        mask = (pos[None, :t1] <= pos[t0:t1, None])[None, None, None]
        s = torch.einsum("bhgtd,bshd->bhgts", qg[:, :, :, t0:t1], k[:, :t1]) * scale
        outs.append(torch.einsum("bhgts,bshd->bhgtd", masked_softmax(s, mask), v[:, :t1]))
    return _from_groups(torch.cat(outs, dim=3))


__all__ = [
    "NSAAux",
    "block_scores",
    "canonical_indices",
    "cmp_attention",
    "cmp_visible",
    "compress_blocks",
    "compress_mean",
    "compute_dtype",
    "dense_attention",
    "group_scores",
    "masked_softmax",
    "nsa_chunk",
    "num_cmp_visible",
    "num_compressed",
    "overlap_matrix",
    "reference_nsa",
    "sel_attention",
    "select_blocks",
    "win_attention",
]
