"""Sliding-window branch on the GPU: flash attention over the last w keys."""

from nsa.ops.window.launch import win_forward

__all__ = ["win_forward"]
