"""Routing policy: which backend runs the op on a device, and why.

Minimal for now (reference everywhere); the toolkit issue turns this into a policy
table with per-branch decisions and the SM 8.9 rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from nsa.config import NSAConfig


@dataclass(frozen=True)
class Choice:
    backend: str
    reason: str


def choose_op_backend(q: Tensor, config: NSAConfig) -> Choice:
    return Choice("reference", "only the reference backend is available")
