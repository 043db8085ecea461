"""Compressed branch on the GPU: flash attention over compressed tokens + Eq. 9/10 block scores."""

from nsa.ops.compression.launch import CMP_MODES, cmp_forward

__all__ = ["CMP_MODES", "cmp_forward"]
