"""Preallocated NSA decode state for one attention layer (NSA-SPEC.md, "Decode").

Per sequence it holds every raw selection-branch key/value, a ring buffer of the last
``w`` window-branch keys/values, a ring buffer of the last ``l`` raw compressed-branch
keys/values, and the compressed cache (one entry per emitted compressed token).
Buffers are allocated up front (``max_len``) or grow by capacity doubling; nothing is
concatenated per step. Every argument is checked before anything is written, so a
failed step leaves the cache exactly as it was.

Protocol for one decode step: ``cache.append(...)`` the new token's keys/values, then
run :func:`nsa.ops.decode.nsa_decode` for its query (a query sees itself).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from nsa.config import NSAConfig
from nsa.ops.reference import compress_mean, num_compressed

# phi over whole sequences: (k [B,T,H,d_k], v [B,T,H,d_v]) -> ([B,N,H,d_k], [B,N,H,d_v])
CompressFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

BRANCH_NAMES = ("cmp", "sel", "win")


class CacheError(RuntimeError):
    """A decode cache operation cannot proceed (capacity, shape, state)."""


class NSACache:
    """Decode state of one NSA layer for a batch of sequences of equal length."""

    def __init__(
        self,
        config: NSAConfig,
        batch: int,
        n_kv_heads: int | None = None,
        d_k: int | None = None,
        d_v: int | None = None,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        compress: CompressFn | None = None,
        initial_capacity: int = 1024,
    ) -> None:
        if not isinstance(batch, int) or batch <= 0:
            raise CacheError(f"NSACache: batch must be a positive int, got {batch!r}")
        if max_len is not None and (not isinstance(max_len, int) or max_len <= 0):
            raise CacheError(f"NSACache: max_len must be None or a positive int, got {max_len!r}")
        self.config = config
        self.B = batch
        self.H = config.n_kv_heads if n_kv_heads is None else n_kv_heads
        self.d_k = config.d_k if d_k is None else d_k
        self.d_v = config.d_v if d_v is None else d_v
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.growable = max_len is None
        self.compress: CompressFn = compress or (
            lambda k, v: (compress_mean(k, config.l, config.d),
                          compress_mean(v, config.l, config.d))
        )
        self.length = 0
        cap = max_len if max_len is not None else max(initial_capacity, 1)
        B, H, dk, dv = self.B, self.H, self.d_k, self.d_v
        kw = {"device": self.device, "dtype": dtype}
        self.k_sel = torch.empty(B, cap, H, dk, **kw)
        self.v_sel = torch.empty(B, cap, H, dv, **kw)
        self.k_cmp = torch.empty(B, num_compressed(cap, config.l, config.d), H, dk, **kw)
        self.v_cmp = torch.empty(B, self.k_cmp.shape[1], H, dv, **kw)
        self.k_win = torch.zeros(B, config.w, H, dk, **kw)
        self.v_win = torch.zeros(B, config.w, H, dv, **kw)
        self.k_raw = torch.zeros(B, config.l, H, dk, **kw)  # ring of raw cmp-branch keys
        self.v_raw = torch.zeros(B, config.l, H, dv, **kw)
        # tokens actually read by the last decode step, per branch, [B, H] (set by nsa_decode)
        self.last_reads: dict[str, Tensor] = {}
        self.total_reads: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ properties
    @property
    def capacity(self) -> int:
        return self.k_sel.shape[1]

    @property
    def num_cmp(self) -> int:
        """Compressed tokens emitted so far."""
        return num_compressed(self.length, self.config.l, self.config.d)

    def window_positions(self) -> Tensor:
        """[B, w] absolute position held by each window slot (-1 = empty)."""
        w = self.config.w
        t = self.length - 1
        s = torch.arange(w, device=self.device)
        pos = t - torch.remainder(t - s, w)
        pos = torch.where(pos >= 0, pos, torch.full_like(pos, -1))
        return pos.unsqueeze(0).expand(self.B, w)

    # ------------------------------------------------------------------ checks
    def _check_tokens(self, names: tuple[str, ...], xs: tuple[Tensor, ...], ndim: int,
                      T: int | None) -> int:
        lead = "[B, T, H, *]" if ndim == 4 else "[B, H, *]"
        for name, x in zip(names, xs, strict=False):
            if not isinstance(x, Tensor):
                raise CacheError(f"NSACache: {name} must be a tensor {lead}, got "
                                 f"{type(x).__name__}")
            if x.dim() != ndim:
                raise CacheError(f"NSACache: {name} must be {ndim}-D {lead}, got shape "
                                 f"{tuple(x.shape)}")
            D = self.d_k if name.startswith("k") else self.d_v
            want = (self.B, T, self.H, D) if ndim == 4 else (self.B, self.H, D)
            got = tuple(x.shape)
            if ndim == 4 and T is None:
                T = got[1]
                want = (self.B, T, self.H, D)
            if got != want:
                raise CacheError(f"NSACache: {name} must have shape {want}, got {got}")
            if x.device != self.device:
                raise CacheError(f"NSACache: {name} is on {x.device}, cache is on {self.device}")
            if x.dtype != self.dtype:
                raise CacheError(f"NSACache: {name} has dtype {x.dtype}, cache holds {self.dtype}")
        return T or 1

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        if not self.growable:
            raise CacheError(
                f"NSACache: capacity {self.capacity} tokens (max_len) exceeded: the step needs "
                f"{needed}; allocate with a larger max_len or max_len=None to grow"
            )
        cap = self.capacity
        while cap < needed:
            cap *= 2
        ncmp = num_compressed(cap, self.config.l, self.config.d)
        for name, length in (("k_sel", cap), ("v_sel", cap), ("k_cmp", ncmp), ("v_cmp", ncmp)):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0], length, *old.shape[2:])
            new[:, : old.shape[1]] = old
            setattr(self, name, new)

    # ------------------------------------------------------------------ writes
    def prefill(
        self,
        k_sel: Tensor, v_sel: Tensor, k_win: Tensor, v_win: Tensor,
        k_cmp_raw: Tensor, v_cmp_raw: Tensor,
        k_cmp: Tensor | None = None, v_cmp: Tensor | None = None,
    ) -> None:
        """Fill an empty cache with P tokens (exactly what P append() calls would leave).

        Raw tensors are [B, P, H, *] (already position-encoded). ``k_cmp``/``v_cmp``
        may pass compressed tokens already computed by phi over the same raw tokens.
        """
        if self.length:
            raise CacheError(f"NSACache.prefill: cache already holds {self.length} tokens; "
                             "prefill needs an empty cache (use append for more tokens)")
        names = ("k_sel", "v_sel", "k_win", "v_win", "k_cmp_raw", "v_cmp_raw")
        P = self._check_tokens(names, (k_sel, v_sel, k_win, v_win, k_cmp_raw, v_cmp_raw), 4,
                               None)
        cfg = self.config
        N = num_compressed(P, cfg.l, cfg.d)
        if k_cmp is None or v_cmp is None:
            k_cmp, v_cmp = self.compress(k_cmp_raw, v_cmp_raw)
        if k_cmp.shape[1] != N or v_cmp.shape[1] != N:
            raise CacheError(f"NSACache.prefill: expected {N} compressed tokens for P={P}, got "
                             f"{k_cmp.shape[1]} / {v_cmp.shape[1]}")
        self._ensure_capacity(P)
        with torch.no_grad():
            self.k_sel[:, :P] = k_sel
            self.v_sel[:, :P] = v_sel
            self.k_cmp[:, :N] = k_cmp
            self.v_cmp[:, :N] = v_cmp
            for ring_k, ring_v, k, v in ((self.k_win, self.v_win, k_win, v_win),
                                         (self.k_raw, self.v_raw, k_cmp_raw, v_cmp_raw)):
                R = ring_k.shape[1]
                p = torch.arange(max(0, P - R), P, device=self.device)
                ring_k[:, p % R] = k[:, p]
                ring_v[:, p % R] = v[:, p]
        self.length = P

    def append(
        self, k_sel: Tensor, v_sel: Tensor, k_win: Tensor, v_win: Tensor,
        k_cmp_raw: Tensor, v_cmp_raw: Tensor,
    ) -> None:
        """Append one token per sequence ([B, H, *] each); emits a compressed token when
        the count of tokens n_seen reaches l + m*d."""
        names = ("k_sel", "v_sel", "k_win", "v_win", "k_cmp_raw", "v_cmp_raw")
        self._check_tokens(names, (k_sel, v_sel, k_win, v_win, k_cmp_raw, v_cmp_raw), 3, None)
        cfg = self.config
        t = self.length
        n_seen = t + 1
        emit = n_seen >= cfg.l and (n_seen - cfg.l) % cfg.d == 0
        if emit:
            # raw block [n_seen - l, n_seen): ring slots in position order, new token last
            slots = torch.arange(n_seen - cfg.l, n_seen - 1, device=self.device) % cfg.l
            kb = torch.cat([self.k_raw[:, slots], k_cmp_raw[:, None]], dim=1)
            vb = torch.cat([self.v_raw[:, slots], v_cmp_raw[:, None]], dim=1)
            kc, vc = self.compress(kb, vb)  # [B, 1, H, *]; computed before any write
        self._ensure_capacity(n_seen)
        with torch.no_grad():
            self.k_sel[:, t] = k_sel
            self.v_sel[:, t] = v_sel
            self.k_win[:, t % cfg.w] = k_win
            self.v_win[:, t % cfg.w] = v_win
            self.k_raw[:, t % cfg.l] = k_cmp_raw
            self.v_raw[:, t % cfg.l] = v_cmp_raw
            if emit:
                i = (n_seen - cfg.l) // cfg.d
                self.k_cmp[:, i] = kc[:, 0]
                self.v_cmp[:, i] = vc[:, 0]
        self.length = n_seen

    def record_reads(self, reads: dict[str, Tensor]) -> None:
        self.last_reads = reads
        for k, v in reads.items():
            self.total_reads[k] = self.total_reads.get(k, 0) + v
