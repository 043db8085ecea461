"""Tensor descriptors (bulk tensor copies, TMA) for key/value tiles of [B, T, H, d] tensors.

On SM 9.0+ a kernel can read a [rows, d] tile of one (batch, head) by one bulk copy into
shared memory instead of per-thread pointer loads: no address or mask registers, and rows
past the descriptor's row count arrive as zeros. Kernels take a ``USE_DESC`` constexpr
and, with it, descriptors in place of the K/V pointers; :func:`resolve_desc` decides, and
:func:`kv_desc` builds them with an explicit row count (a cache may hold more rows than
the kernel may read: those must never be read, not even as masked-out values).
"""

from __future__ import annotations

from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

# Programmatic override (tests, tuning scripts): True / False forces every kernel's choice;
# None defers to NSA_KV_DESC (nsa.policy), then to SM 9.0+. Read at every launch.
USE_DESC: bool | None = None


def desc_problems(x: Tensor, tile: int) -> list[str]:
    """Why ``x`` [B, T, H, d] cannot be read through a tensor descriptor (empty if it can):
    the head dim must fill its power-of-two tile, the base address and every stride but the
    last must be 16-byte multiples."""
    es = x.element_size()
    why = []
    if x.shape[-1] != tile:
        why.append(f"head dim {x.shape[-1]} is not a power of two")
    if x.data_ptr() % 16:
        why.append("base address not 16-byte aligned")
    if any((st * es) % 16 for st in x.stride()[:-1]) or x.stride(-1) != 1:
        why.append(f"strides {tuple(x.stride())} not 16-byte multiples")
    return why


def forced() -> bool | None:
    """The override in force: USE_DESC if set, else NSA_KV_DESC (None: neither is set)."""
    if USE_DESC is not None:
        return USE_DESC
    from nsa.policy import kv_desc_env

    return kv_desc_env()


def resolve_desc(who: str, use_desc: bool | None, k: Tensor, v: Tensor, DK: int,
                 DV: int) -> bool:
    """Whether a kernel reads k/v tiles through tensor descriptors: ``use_desc`` if given
    (True raises, naming the reason, where they cannot be built), else USE_DESC or
    NSA_KV_DESC if set, else on CUDA devices with bulk tensor copies (SM 9.0+); never where
    they cannot be built."""
    why = [f"{nm}: {w}" for nm, x, tile in (("k", k, DK), ("v", v, DV))
           for w in desc_problems(x, tile)]
    if use_desc and why:
        raise ValueError(f"{who}: use_desc=True, but the key/value tiles cannot be read "
                         "through tensor descriptors: " + "; ".join(why))
    if use_desc is not None:
        return use_desc
    want = forced()
    if want is None:
        from nsa.ops.compression.launch import cuda_capability, interpreting

        want = cuda_capability(k.device) >= (9, 0) and not interpreting()
    return bool(want and not why)


def kv_desc(x: Tensor, rows: int, block_rows: int, tile: int) -> TensorDescriptor:
    """Descriptor of x [B, >= rows, H, d] limited to its first ``rows`` rows; one load
    gives a [1, block_rows, 1, tile] box of one (batch, row offset, head)."""
    B, _, H, d = x.shape
    return TensorDescriptor(x, [B, rows, H, d], list(x.stride()), [1, block_rows, 1, tile])
