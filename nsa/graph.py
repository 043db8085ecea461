"""CUDA-graph capture of a decode step (one new token per sequence).

A decode step over static caches (``NSACache(static=True, max_len=...)``) touches no host
state but the caches' host-side ``max_length``; :class:`GraphedDecode` runs the first
steps eagerly (Triton compilation, allocator warm-up), captures the next one, and from
then on copies the input into the captured buffer, replays, and advances ``max_length``
itself. Outputs are the graph's own buffers, overwritten by the next step: clone them to
keep them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from nsa.cache import CacheError, NSACache


class GraphedDecode:
    def __init__(self, step: Callable[[Tensor], Tensor], caches: Sequence[NSACache],
                 warmup_steps: int = 2) -> None:
        for i, c in enumerate(caches):
            if not isinstance(c, NSACache) or not c.static:
                raise CacheError(f"GraphedDecode: cache {i} must be an NSACache with "
                                 "static=True (allocate it with max_len)")
            if c.device.type != "cuda":
                raise CacheError(f"GraphedDecode: cache {i} is on {c.device}; CUDA graphs "
                                 "need a CUDA device")
        self.step = step
        self.caches = list(caches)
        self.warmup_left = warmup_steps
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: Tensor | None = None
        self.static_out: Tensor | None = None
        self.stream = torch.cuda.Stream()

    def _check_capacity(self) -> None:
        for i, c in enumerate(self.caches):
            if c.max_length + 1 > c.max_len:
                raise CacheError(f"GraphedDecode: cache {i} is full ({c.max_len} tokens, "
                                 "max_len); allocate a larger max_len")

    def __call__(self, x: Tensor) -> Tensor:
        self._check_capacity()
        if self.warmup_left > 0:  # eager, on a side stream as capture requires
            self.warmup_left -= 1
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                out = self.step(x)
            torch.cuda.current_stream().wait_stream(self.stream)
            return out
        if self.graph is None:
            self.static_in = x.clone()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                # recorded, not run; the host-side bookkeeping in step() runs once here
                self.static_out = self.step(self.static_in)
            self.graph.replay()
            return self.static_out
        self.static_in.copy_(x)
        self.graph.replay()
        for c in self.caches:
            c.max_length += 1
        return self.static_out
