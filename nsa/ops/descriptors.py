"""Tensor descriptors (bulk tensor copies, TMA) for key/value tiles of [B, T, H, d] tensors.

On SM 9.0+ a kernel can read a [rows, d] tile of one (batch, head) by one bulk copy into
shared memory instead of per-thread pointer loads: no address or mask registers, and rows
past the descriptor's row count arrive as zeros. Kernels take a ``USE_DESC`` constexpr
and, with it, descriptors in place of the K/V pointers; :func:`resolve_desc` decides, and
:func:`kv_desc` builds them with an explicit row count (a cache may hold more rows than
the kernel may read: those must never be read, not even as masked-out values).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:  # Triton is imported where a descriptor is built (nsa env runs without it)
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
                 DV: int, *, default: bool | None = None, why: tuple[str, ...] = (),
                 arg: str = "use_desc") -> bool:
    """Whether a kernel reads k/v tiles through tensor descriptors: ``use_desc`` if given
    (True raises, naming the reason, where they cannot be built), else USE_DESC or
    NSA_KV_DESC if set, else ``default`` (the kernel's measured choice; None: on CUDA
    devices with bulk tensor copies, SM 9.0+); never where they cannot be built. ``why``:
    reasons of the kernel's own against descriptors; ``arg``: the caller's argument name."""
    why = list(why) + [f"{nm}: {w}" for nm, x, tile in (("k", k, DK), ("v", v, DV))
                       for w in desc_problems(x, tile)]
    if use_desc and why:
        raise ValueError(f"{who}: {arg}=True, but the tiles cannot be read through tensor "
                         "descriptors: " + "; ".join(why))
    if use_desc is not None:
        return use_desc
    want = forced()
    if want is None:
        want = default
    if want is None:
        from nsa.ops.compression.launch import cuda_capability, interpreting

        want = cuda_capability(k.device) >= (9, 0) and not interpreting()
    return bool(want and not why)


def kv_desc(x: Tensor, rows: int, block_rows: int, tile: int) -> TensorDescriptor:
    """Descriptor of x [B, >= rows, H, d] limited to its first ``rows`` rows; one load
    gives a [1, block_rows, 1, tile] box of one (batch, row offset, head)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, _, H, d = x.shape
    return TensorDescriptor(x, [B, rows, H, d], list(x.stride()), [1, block_rows, 1, tile])


def rows_desc(x: Tensor, positions: int, heads: int, tile: int) -> TensorDescriptor:
    """Descriptor of x [B, T, HQ, d]; one load gives a [1, positions, heads, tile] box of
    consecutive positions and query heads (the group-packed rows of a tile)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, positions, heads, tile])


def describe(device_type: str, capability: tuple[int, int] | None,
             interpreter: bool) -> list[dict[str, str]]:
    """Which load and score variants the Triton kernels take on a device, and why: rows of
    {"what", "variant", "why"} for ``nsa env`` and every report's env.json."""
    f = forced()
    src = ("descriptors.USE_DESC" if USE_DESC is not None else "NSA_KV_DESC") + f"={int(bool(f))}"
    cuda = device_type == "cuda" and not interpreter
    sm90 = cuda and capability is not None and tuple(capability) >= (9, 0)
    if f is not None:
        prefill = ("bulk tensor copies (descriptors)" if f else "pointer loads", f"forced: {src}")
    elif sm90:
        prefill = ("bulk tensor copies (descriptors)",
                   f"SM {capability[0]}.{capability[1]} has them; measured faster "
                   "(docs/perf-notes.md)")
    else:
        prefill = ("pointer loads", "not a CUDA device" if not cuda else
                   f"SM {capability[0]}.{capability[1]}: no bulk tensor copies"
                   if capability else "compute capability unknown")
    pointer_unless = ("pointer loads", "measured no faster with descriptors; "
                      "NSA_KV_DESC=1 forces them")
    rows = [
        {"what": "key/value tiles, prefill forward and dQ kernels", "variant": prefill[0],
         "why": prefill[1] + ("; pointer loads for tensors a descriptor cannot describe "
                              "(head dim not a power of two, 16-byte alignment)"
                              if prefill[0] != "pointer loads" else "")},
        {"what": "key/value tiles, decode kernels",
         "variant": "bulk tensor copies (descriptors)" if f else "pointer loads",
         "why": f"forced: {src}" if f is not None else pointer_unless[1]},
        {"what": "q/dout rows, flash dK/dV kernel",
         "variant": "bulk tensor copies (descriptors)" if f else "pointer loads",
         "why": (f"forced: {src} (power-of-two groups only)" if f is not None
                 else pointer_unless[1])},
        {"what": "compressed block scores (Eq. 9/10)",
         "variant": ("tensor-core product for G <= 4, register reductions above" if cuda
                     else "register reductions"),
         "why": ("measured faster for G <= 4 only (docs/perf-notes.md)" if cuda else
                 "the default off CUDA (cmp_forward(score_dot=True) takes the product)")},
        sel_path_row(cuda),
        pdl_row(cuda, capability),
    ]
    return rows


def pdl_row(cuda: bool, capability: tuple[int, int] | None) -> dict[str, str]:
    """Whether the decode kernels are launched with programmatic dependent launch
    (:func:`nsa.ops.decode.launch._chain`), for :func:`describe`."""
    from nsa.backends import PDL_MIN_TRITON, module_version, triton_has_pdl

    what, plain = "decode kernel launches", "plain launches"
    if not cuda:
        return {"what": what, "variant": plain, "why": "not a CUDA device"}
    if capability is None or tuple(capability) < (9, 0):
        sm = f"SM {capability[0]}.{capability[1]}" if capability else "unknown SM"
        return {"what": what, "variant": plain,
                "why": f"{sm}: programmatic dependent launch needs SM 9.0+"}
    if not triton_has_pdl():
        return {"what": what, "variant": plain,
                "why": f"Triton {module_version('triton')} cannot compile the kernels' "
                       f"gdc_* calls (needs {PDL_MIN_TRITON} or newer)"}
    return {"what": what,
            "variant": "programmatic dependent launch where the compressed splits are one "
                       "wave (each kernel starts while the previous one drains)",
            "why": "measured faster at batch 1 (docs/perf-notes.md, decode v4); "
                   "nsa.ops.decode.launch.PDL forces it either way"}


def sel_path_row(cuda: bool) -> dict[str, str]:
    """The selected-attention forward's path (:func:`nsa.ops.selection.launch.sel_forward`)
    for :func:`describe`."""
    from nsa.policy import SEL_BLOCK_MAX_G, SEL_BLOCK_MAX_PARTIAL_BYTES, sel_mode_env

    what = "selected attention, prefill forward"
    try:
        env = sel_mode_env()
    except ValueError as exc:
        return {"what": what, "variant": "invalid setting", "why": str(exc)}
    if env is not None:
        return {"what": what, "variant": f"{env}-centric", "why": f"forced: NSA_SEL_MODE={env}"}
    if not cuda:
        return {"what": what, "variant": "group-centric",
                "why": "the default off CUDA (NSA_SEL_MODE=block takes the other)"}
    return {"what": what,
            "variant": f"block-centric for G <= {SEL_BLOCK_MAX_G} (each selected block read "
                       "once, per-block partials merged), group-centric above",
            "why": f"measured faster for G <= {SEL_BLOCK_MAX_G} (docs/perf-notes.md); "
                   f"group-centric where the partials would pass "
                   f"{SEL_BLOCK_MAX_PARTIAL_BYTES >> 30} GiB"}
