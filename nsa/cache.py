"""Preallocated NSA decode state for one attention layer (NSA-SPEC.md, "Decode").

Per sequence it holds every raw selection-branch key/value, a ring buffer of the last
``w`` window-branch keys/values, a ring buffer of the last ``l`` raw compressed-branch
keys/values, and the compressed cache (one entry per emitted compressed token).

- Buffers are allocated up front (``max_len``) or grow by capacity doubling; nothing is
  concatenated per step. Capacity is kept a multiple of ``l_sel`` (whole blocks).
- Sequences may have different lengths (ragged batches): ``lengths`` is a [B] int64
  tensor on the cache's device and is the truth; ``max_length`` is a host-side upper
  bound used for capacity checks and slicing (no device sync per step).
- ``static=True`` makes every step shape- and branch-independent of the lengths (phi is
  evaluated every step and its result written only where a token is due), so a whole
  decode step can be captured in a CUDA graph. Static caches need ``max_len``.
- Every argument is checked before anything is written: a failed step leaves the cache
  exactly as it was.

Protocol for one decode step: ``cache.append(...)`` the new token's keys/values, then
run :func:`nsa.ops.decode.nsa_decode` for its query (a query sees itself).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from nsa.config import NSAConfig
from nsa.ops.reference import compress_mean, num_compressed

# phi over whole sequences: (k [B,T,H,d_k], v [B,T,H,d_v]) -> ([B,N,H,d_k], [B,N,H,d_v])
CompressFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

BRANCH_NAMES = ("cmp", "sel", "win")


def emits_at(n, cfg: NSAConfig):
    """Whether the n-th token of a sequence completes a compression block (emits compressed
    token (n - l) / d): n = l + m * d. ``n`` an int (a bool back) or an integer tensor of
    per-sequence counts (a bool tensor back)."""
    return (n >= cfg.l) & ((n - cfg.l) % cfg.d == 0)


class CacheError(RuntimeError):
    """A decode cache operation cannot proceed (capacity, shape, state)."""


def ring_positions(lengths: Tensor, R: int) -> Tensor:
    """[B, R]: absolute position held by each slot of a ring of R slots after lengths[b]
    tokens (slot s holds the latest position p < length with p % R == s; -1 = empty)."""
    t = lengths[:, None] - 1
    s = torch.arange(R, device=lengths.device)
    pos = t - torch.remainder(t - s, R)
    return torch.where(pos >= 0, pos, torch.full_like(pos, -1))


class NSACache:
    """Decode state of one NSA layer for a batch of (possibly ragged) sequences."""

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
        static: bool = False,
    ) -> None:
        if not isinstance(batch, int) or batch <= 0:
            raise CacheError(f"NSACache: batch must be a positive int, got {batch!r}")
        if max_len is not None and (not isinstance(max_len, int) or max_len <= 0):
            raise CacheError(f"NSACache: max_len must be None or a positive int, got {max_len!r}")
        if static and max_len is None:
            raise CacheError("NSACache: static=True (CUDA-graph decode) needs max_len: a "
                             "captured step cannot grow its buffers")
        self.config = config
        self.B = batch
        self.H = config.n_kv_heads if n_kv_heads is None else n_kv_heads
        self.d_k = config.d_k if d_k is None else d_k
        self.d_v = config.d_v if d_v is None else d_v
        # resolved through a tensor so "cuda" becomes "cuda:0" and compares equal to inputs'
        self.device = torch.empty(0, device=device if device is not None else "cpu").device
        self.dtype = dtype
        self.max_len = max_len
        self.static = static
        self.compress: CompressFn = compress or (
            lambda k, v: (compress_mean(k, config.l, config.d),
                          compress_mean(v, config.l, config.d))
        )
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.max_length = 0
        self._ragged_host = False  # True once a ragged prefill made lengths differ
        # set by GraphedDecode while it captures a step of a uniform batch: True / False =
        # this step does / does not emit a compressed token (None: decide as usual)
        self.emit_hint: bool | None = None
        cap = max_len if max_len is not None else max(initial_capacity, 1)
        cap = -(-cap // config.l_sel) * config.l_sel
        B, H, dk, dv = self.B, self.H, self.d_k, self.d_v
        kw = {"device": self.device, "dtype": dtype}
        self.k_sel = torch.zeros(B, cap, H, dk, **kw)
        self.v_sel = torch.zeros(B, cap, H, dv, **kw)
        ncmp = max(1, num_compressed(cap, config.l, config.d))
        self.k_cmp = torch.zeros(B, ncmp, H, dk, **kw)
        self.v_cmp = torch.zeros(B, ncmp, H, dv, **kw)
        self.k_win = torch.zeros(B, config.w, H, dk, **kw)
        self.v_win = torch.zeros(B, config.w, H, dv, **kw)
        self.k_raw = torch.zeros(B, config.l, H, dk, **kw)  # ring of raw cmp-branch keys
        self.v_raw = torch.zeros(B, config.l, H, dv, **kw)
        # tokens actually read by the last decode step, per branch, [B, H] (set by nsa_decode)
        self.last_reads: dict[str, Tensor] = {}
        # running totals [B, H, 3] in BRANCH_NAMES order, updated in place (graph replays too)
        self.reads_total = torch.zeros(batch, self.H, 3, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ properties
    @property
    def capacity(self) -> int:
        return self.k_sel.shape[1]

    @property
    def length(self) -> int:
        """Longest sequence so far (host-side; equals every length in a uniform batch)."""
        return self.max_length

    @property
    def num_cmp(self) -> int:
        """Compressed tokens emitted so far by the longest sequence."""
        return num_compressed(self.max_length, self.config.l, self.config.d)

    def window_positions(self) -> Tensor:
        """[B, w] absolute position held by each window slot (-1 = empty)."""
        return ring_positions(self.lengths, self.config.w)

    # ------------------------------------------------------------------ checks
    def _check_tokens(self, names: tuple[str, ...], xs: tuple[Tensor, ...], ndim: int) -> int:
        lead = "[B, T, H, *]" if ndim == 4 else "[B, H, *]"
        T = None
        for name, x in zip(names, xs, strict=True):
            if not isinstance(x, Tensor):
                raise CacheError(f"NSACache: {name} must be a tensor {lead}, got "
                                 f"{type(x).__name__}")
            if x.dim() != ndim:
                raise CacheError(f"NSACache: {name} must be {ndim}-D {lead}, got shape "
                                 f"{tuple(x.shape)}")
            D = self.d_k if name.startswith("k") else self.d_v
            if ndim == 4 and T is None:
                T = x.shape[1]
            want = (self.B, T, self.H, D) if ndim == 4 else (self.B, self.H, D)
            if tuple(x.shape) != want:
                raise CacheError(f"NSACache: {name} must have shape {want}, got "
                                 f"{tuple(x.shape)}")
            if x.device != self.device:
                raise CacheError(f"NSACache: {name} is on {x.device}, cache is on {self.device}")
            if x.dtype != self.dtype:
                raise CacheError(f"NSACache: {name} has dtype {x.dtype}, cache holds {self.dtype}")
        return T or 1

    def _ensure_capacity(self, needed: int) -> None:
        if self.max_len is not None and needed > self.max_len:
            raise CacheError(
                f"NSACache: capacity {self.max_len} tokens (max_len) exceeded: the step needs "
                f"{needed}; allocate with a larger max_len or max_len=None to grow"
            )
        if needed <= self.capacity:
            return
        cap = self.capacity
        while cap < needed:
            cap *= 2
        ncmp = num_compressed(cap, self.config.l, self.config.d)
        for name, size in (("k_sel", cap), ("v_sel", cap), ("k_cmp", ncmp), ("v_cmp", ncmp)):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], size, *old.shape[2:])
            new[:, : old.shape[1]] = old
            setattr(self, name, new)

    def next_emission(self) -> bool | None:
        """Whether the next appended token emits a compressed token: GraphedDecode's hint
        while it captures, else known on the host for a uniform batch; None = decided per
        sequence on the device (ragged batches, and static caches, whose captured step must
        not depend on host lengths)."""
        if self.emit_hint is not None:
            return self.emit_hint
        if self.static or self._ragged_host:
            return None
        return emits_at(self.max_length + 1, self.config)

    # ------------------------------------------------------------------ writes
    def prefill(
        self,
        k_sel: Tensor, v_sel: Tensor, k_win: Tensor, v_win: Tensor,
        k_cmp_raw: Tensor, v_cmp_raw: Tensor,
        k_cmp: Tensor | None = None, v_cmp: Tensor | None = None,
        lengths: Tensor | Sequence[int] | None = None,
    ) -> None:
        """Fill an empty cache with P tokens per sequence (exactly what P append() calls
        would leave). Raw tensors are [B, P, H, *] (already position-encoded);
        ``k_cmp``/``v_cmp`` may pass phi's output over the same raw tokens. ``lengths``
        ([B], each in 1..P) marks a ragged batch whose sequence b is the first lengths[b]
        tokens (the rest is padding and is never visible)."""
        if self.max_length:
            raise CacheError(f"NSACache.prefill: cache already holds {self.max_length} tokens; "
                             "prefill needs an empty cache (use append for more tokens)")
        names = ("k_sel", "v_sel", "k_win", "v_win", "k_cmp_raw", "v_cmp_raw")
        P = self._check_tokens(names, (k_sel, v_sel, k_win, v_win, k_cmp_raw, v_cmp_raw), 4)
        if lengths is None:
            lens = torch.full((self.B,), P, dtype=torch.long, device=self.device)
        else:
            lens = torch.as_tensor(lengths, dtype=torch.long).to(self.device)
            if tuple(lens.shape) != (self.B,):
                raise CacheError(f"NSACache.prefill: lengths must have shape ({self.B},), got "
                                 f"{tuple(lens.shape)}")
            lo, hi = int(lens.min()), int(lens.max())  # one sync, at prefill only
            if lo < 1 or hi > P:
                raise CacheError(f"NSACache.prefill: lengths must lie in [1, P={P}], got "
                                 f"min {lo} max {hi}")
        cfg = self.config
        N = num_compressed(P, cfg.l, cfg.d)
        if k_cmp is None or v_cmp is None:
            k_cmp, v_cmp = self.compress(k_cmp_raw, v_cmp_raw)
        if k_cmp.shape[1] != N or v_cmp.shape[1] != N:
            raise CacheError(f"NSACache.prefill: expected {N} compressed tokens for P={P}, got "
                             f"{k_cmp.shape[1]} / {v_cmp.shape[1]}")
        self._ensure_capacity(P)
        b = torch.arange(self.B, device=self.device)[:, None]
        with torch.no_grad():
            self.k_sel[:, :P] = k_sel
            self.v_sel[:, :P] = v_sel
            self.k_cmp[:, :N] = k_cmp
            self.v_cmp[:, :N] = v_cmp
            for ring_k, ring_v, k, v in ((self.k_win, self.v_win, k_win, v_win),
                                         (self.k_raw, self.v_raw, k_cmp_raw, v_cmp_raw)):
                pos = ring_positions(lens, ring_k.shape[1])
                keep = (pos >= 0)[..., None, None]
                ring_k.copy_(torch.where(keep, k[b, pos.clamp(min=0)], ring_k))
                ring_v.copy_(torch.where(keep, v[b, pos.clamp(min=0)], ring_v))
        self.lengths.copy_(lens)
        self.max_length = P if lengths is None else hi
        self._ragged_host = lengths is not None and lo != hi

    def append(
        self, k_sel: Tensor, v_sel: Tensor, k_win: Tensor, v_win: Tensor,
        k_cmp_raw: Tensor, v_cmp_raw: Tensor,
    ) -> None:
        """Append one token per sequence ([B, H, *] each) at position lengths[b]; emits
        compressed token (n_seen - l)/d where the count n_seen reaches l + m*d."""
        names = ("k_sel", "v_sel", "k_win", "v_win", "k_cmp_raw", "v_cmp_raw")
        self._check_tokens(names, (k_sel, v_sel, k_win, v_win, k_cmp_raw, v_cmp_raw), 3)
        self._ensure_capacity(self.max_length + 1)
        cfg = self.config
        t = self.lengths  # position of the new token, per sequence
        b = torch.arange(self.B, device=self.device)
        n_seen = t + 1
        # phi runs before any write, so a failure in it leaves the cache untouched
        due: Tensor | None = None
        emit = self.next_emission()
        if emit is None:  # per sequence, on the device
            due = emits_at(n_seen, cfg)
            emit = True
        if emit:
            kc, vc = self._compress_block(n_seen, k_cmp_raw, v_cmp_raw)
        with torch.no_grad():
            self.k_sel[b, t] = k_sel
            self.v_sel[b, t] = v_sel
            self.k_win[b, t % cfg.w] = k_win
            self.v_win[b, t % cfg.w] = v_win
            self.k_raw[b, t % cfg.l] = k_cmp_raw
            self.v_raw[b, t % cfg.l] = v_cmp_raw
            if emit:
                i = ((n_seen - cfg.l) // cfg.d).clamp(min=0)
                if due is None:
                    self.k_cmp[b, i] = kc
                    self.v_cmp[b, i] = vc
                else:
                    m = due[:, None, None]
                    self.k_cmp[b, i] = torch.where(m, kc, self.k_cmp[b, i])
                    self.v_cmp[b, i] = torch.where(m, vc, self.v_cmp[b, i])
            self.lengths.add_(1)
        self.max_length += 1

    def _compress_block(self, n_seen: Tensor, k_new: Tensor, v_new: Tensor
                        ) -> tuple[Tensor, Tensor]:
        """phi over raw tokens [n_seen - l, n_seen) of each sequence, the newest one (not
        yet in the ring) given: -> ([B, H, d_k], [B, H, d_v])."""
        cfg = self.config
        offs = torch.arange(cfg.l - 1, device=self.device)
        slots = torch.remainder(n_seen[:, None] - cfg.l + offs, cfg.l)  # [B, l-1]
        b = torch.arange(self.B, device=self.device)[:, None]
        kb = torch.cat([self.k_raw[b, slots], k_new[:, None]], dim=1)
        vb = torch.cat([self.v_raw[b, slots], v_new[:, None]], dim=1)
        with torch.no_grad():
            kc, vc = self.compress(kb, vb)  # [B, 1, H, *]
        return kc[:, 0], vc[:, 0]

    def as_dtype(self, dtype: torch.dtype) -> NSACache:
        """A copy whose cached tokens are cast to ``dtype`` (lengths and configuration
        shared, read counters copied): the float64 oracle of a low-precision decode."""
        c = NSACache.__new__(NSACache)
        c.__dict__.update(self.__dict__)
        for name in ("k_sel", "v_sel", "k_cmp", "v_cmp", "k_win", "v_win", "k_raw", "v_raw"):
            setattr(c, name, getattr(self, name).to(dtype))
        c.dtype, c.last_reads, c.reads_total = dtype, {}, self.reads_total.clone()
        c.__dict__.pop("_triton_ws", None)
        return c

    @property
    def total_reads(self) -> dict[str, Tensor]:
        """Tokens read so far per branch, [B, H] views of ``reads_total``."""
        return {name: self.reads_total[..., i] for i, name in enumerate(BRANCH_NAMES)}

    def record_reads(self, reads: dict[str, Tensor], accumulated: bool = False) -> None:
        """Set last_reads; add them to the totals unless the kernel already did."""
        self.last_reads = reads
        if not accumulated:
            for i, name in enumerate(BRANCH_NAMES):
                if name in reads:
                    self.reads_total[..., i].add_(reads[name])
