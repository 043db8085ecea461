"""CUDA-graph capture of a decode step (one new token per sequence).

A decode step over static caches (``NSACache(static=True, max_len=...)``) touches no host
state but the caches' host-side ``max_length``; :class:`GraphedDecode` runs the first
steps eagerly (Triton compilation, allocator warm-up), captures the next one, and from
then on copies the input into the captured buffer, replays, and advances ``max_length``
itself. Outputs are the graph's own buffers, overwritten by the next step: clone them to
keep them.

Where every sequence of every cache has the same length (no ragged prefill), whether a
step emits a compressed token is known on the host (every d-th step), so two graphs are
captured, sharing one memory pool: one with phi and the compressed-cache write, one
without (phi ran on every step before: a quarter of a tiny-LM step). Ragged caches keep
one graph that runs phi every step and writes where each sequence is due.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from nsa.cache import CacheError, NSACache, emits_at


def emission_key(caches: Sequence[NSACache]) -> tuple:
    """Per cache, whether the next step emits a compressed token: known on the host for a
    uniform batch (every sequence at max_length), None for a ragged one (decided per
    sequence on the device)."""
    return tuple(None if c._ragged_host else emits_at(c.max_length + 1, c.config)
                 for c in caches)


def set_emit_hints(caches: Sequence[NSACache], key: tuple | None) -> None:
    """Set (key) or clear (None) each cache's emit_hint."""
    for c, h in zip(caches, key or (None,) * len(caches), strict=True):
        c.emit_hint = h


class GraphedDecode:
    def __init__(self, step: Callable[[Tensor], Tensor], caches: Sequence[NSACache],
                 warmup_steps: int = 2, weights_token: Callable[[], object] | None = None
                 ) -> None:
        """``weights_token`` (optional) names the state of what the step copies from the
        model at capture (NSAAttention.decode_weights_token: its fused projection weight);
        when it differs from the one at capture (an in-place parameter update), the graphs
        are dropped, the step runs eagerly once (rebuilding the copies) and is captured
        again."""
        for i, c in enumerate(caches):
            if not isinstance(c, NSACache) or not c.static:
                raise CacheError(f"GraphedDecode: cache {i} must be an NSACache with "
                                 "static=True (allocate it with max_len)")
            if c.device.type != "cuda":
                raise CacheError(f"GraphedDecode: cache {i} is on {c.device}; CUDA graphs "
                                 "need a CUDA device")
        self.step = step
        self.weights_token = weights_token
        self.token: object = None
        self.caches = list(caches)
        self.warmup_left = warmup_steps
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.static_in: Tensor | None = None
        self.stream = torch.cuda.Stream()

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The first captured graph (None before capture)."""
        return next(iter(self.graphs.values()))[0] if self.graphs else None

    def _check_capacity(self) -> None:
        for i, c in enumerate(self.caches):
            if c.max_length + 1 > c.max_len:
                raise CacheError(f"GraphedDecode: cache {i} is full ({c.max_len} tokens, "
                                 "max_len); allocate a larger max_len")

    def __call__(self, x: Tensor) -> Tensor:
        self._check_capacity()
        if (self.graphs and self.weights_token is not None
                and self.weights_token() != self.token):
            self.graphs.clear()
            self.warmup_left = max(self.warmup_left, 1)
        if self.warmup_left > 0:  # eager, on a side stream as capture requires
            self.warmup_left -= 1
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                out = self.step(x)
            torch.cuda.current_stream().wait_stream(self.stream)
            return out
        key = emission_key(self.caches)
        if key not in self.graphs:
            if self.static_in is None:
                self.static_in = x.clone()
            else:
                self.static_in.copy_(x)
            graph = torch.cuda.CUDAGraph()
            pool = next(iter(self.graphs.values()))[0].pool() if self.graphs else None
            if not self.graphs and self.weights_token is not None:
                self.token = self.weights_token()
            set_emit_hints(self.caches, key)
            try:
                with torch.cuda.graph(graph, pool=pool):
                    # recorded, not run; the host-side bookkeeping in step() runs once here
                    out = self.step(self.static_in)
            finally:
                set_emit_hints(self.caches, None)
            self.graphs[key] = (graph, out)
            graph.replay()
            return out
        graph, out = self.graphs[key]
        self.static_in.copy_(x)
        graph.replay()
        for c in self.caches:
            c.max_length += 1
        return out
