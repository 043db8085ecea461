"""Backward of the compressed and sliding-window branches (one flash backward, two masks)."""

from nsa.ops.flashbwd.launch import (
    MASK_CMP,
    MASK_WIN,
    FlashBranch,
    branch_rowdots,
    flash_backward,
    flash_dq,
)

__all__ = ["MASK_CMP", "MASK_WIN", "FlashBranch", "branch_rowdots", "flash_backward",
           "flash_dq"]
