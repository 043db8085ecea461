"""Backend capability as data: what each backend can run, and in words why not.

Each :class:`BackendSpec` declares the branches it implements, the devices, dtypes,
head dims and group sizes it supports, and the modules it needs. Asking
``spec.not_supported_reasons(device, dtype, shapes)`` returns an empty list when it can
run the case, else one readable sentence per reason. *Whether* a usable backend is
*chosen* is policy, not capability: see :mod:`nsa.policy` (which also reads every
environment variable; the values reach this module as a :class:`Flags` value).

Nothing here touches a GPU at import time; device facts are probed on demand and cached.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass, field

import torch

BRANCHES = ("cmp", "sel", "win")

_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}
_DTYPE_ALIASES = {
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float64": "float64", "fp64": "float64", "double": "float64",
}


def dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical name of a floating dtype ("float32", "bfloat16", ...)."""
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key not in _DTYPE_ALIASES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of "
                             f"{sorted(set(_DTYPE_ALIASES.values()))} (or fp16/bf16/fp32/fp64)")
        return _DTYPE_ALIASES[key]
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def to_dtype(name: str | torch.dtype) -> torch.dtype:
    """torch dtype from a name or alias ("bf16" -> torch.bfloat16)."""
    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, dtype_name(name))


@dataclass(frozen=True)
class Flags:
    """Switches that change routing; read from the environment only by nsa.policy."""

    triton_sel_force: bool = False  # NSA_TRITON_SEL_FORCE=1
    use_fa2: bool = False  # NSA_USE_FA2=1
    triton_interpret: bool = False  # TRITON_INTERPRET=1

    def is_on(self, env_name: str) -> bool:
        return {
            "NSA_TRITON_SEL_FORCE": self.triton_sel_force,
            "NSA_USE_FA2": self.use_fa2,
            "TRITON_INTERPRET": self.triton_interpret,
        }[env_name]


@dataclass(frozen=True)
class DeviceInfo:
    """The facts about a device that capability and policy depend on."""

    type: str  # "cpu" or "cuda"
    index: int | None = None
    name: str = ""
    capability: tuple[int, int] | None = None  # CUDA compute capability (major, minor)
    sm_count: int | None = None

    @property
    def label(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    @property
    def sm(self) -> str | None:
        return None if self.capability is None else f"{self.capability[0]}.{self.capability[1]}"

    def describe(self) -> str:
        if self.type != "cuda":
            return self.label
        return f"{self.label} ({self.name}, SM {self.sm})"


@functools.cache
def _probe_device(dev_type: str, index: int | None) -> DeviceInfo:
    if dev_type != "cuda":
        return DeviceInfo(type=dev_type, name=dev_type)
    if index is None:
        index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return DeviceInfo(
        type="cuda", index=index, name=props.name,
        capability=(props.major, props.minor), sm_count=props.multi_processor_count,
    )


def device_info(device: torch.device | str | DeviceInfo) -> DeviceInfo:
    """Probe (once, then cached) the facts of a torch device; DeviceInfo passes through."""
    if isinstance(device, DeviceInfo):
        return device
    dev = torch.device(device)
    return _probe_device(dev.type, dev.index)


@dataclass(frozen=True)
class Shapes:
    """Problem sizes a backend may restrict; None = unknown (not checked)."""

    d_k: int | None = None
    d_v: int | None = None
    G: int | None = None


@dataclass(frozen=True)
class HeadDims:
    """Supported head dims: the listed ones, plus any power of two >= pow2_min."""

    listed: tuple[int, ...] = ()
    pow2_min: int | None = None

    def allows(self, d: int) -> bool:
        if d in self.listed:
            return True
        return self.pow2_min is not None and d >= self.pow2_min and d & (d - 1) == 0

    def describe(self) -> str:
        parts = [", ".join(map(str, self.listed))] if self.listed else []
        if self.pow2_min is not None:
            parts.append(f"any power of two >= {self.pow2_min}")
        return " or ".join(parts)


@functools.cache
def module_status(module: str, import_it: bool = False) -> str | None:
    """None if ``module`` can be found (and imported, with import_it), else why not."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        return f"module {module} not found ({exc})"
    if spec is None:
        return f"module {module} not found"
    if import_it:
        try:
            importlib.import_module(module)
        except Exception as exc:  # a broken install (ABI mismatch...) says why here
            return f"module {module} is installed but failed to import: {exc}"
    return None


@functools.cache
def module_version(module: str) -> str | None:
    """Version of the installed distribution that provides ``module`` ("triton", or
    "pytorch-triton" for PyTorch's nightly builds), read from its metadata without
    importing it; else the module's ``__version__``; None if neither says."""
    for dist in (module, f"pytorch-{module}"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    v = getattr(mod, "__version__", None)
    return str(v) if v else None


def triton_has_pdl() -> bool:
    """Whether the installed Triton compiles the decode kernels' programmatic-dependent-
    launch calls (>= PDL_MIN_TRITON; an unknown version, e.g. a source build, is given the
    benefit of the doubt)."""
    have = version_tuple(module_version("triton") or "")
    return not have or have >= version_tuple(PDL_MIN_TRITON)


def version_tuple(version: str) -> tuple[int, ...]:
    """(major, minor[, patch]) of a version string such as "3.5.0+git1a2b" or "3.4.0rc1";
    () if it does not start with numbers."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version.strip())
    return tuple(int(x) for x in m.groups() if x is not None) if m else ()


@dataclass(frozen=True)
class BackendSpec:
    """What one backend supports, as data. See module docstring."""

    name: str
    description: str
    branches: tuple[str, ...] = BRANCHES
    device_types: tuple[str, ...] = ("cpu", "cuda")
    min_capability: tuple[int, int] | None = None  # for CUDA devices
    cpu_via_interpreter: bool = False  # CPU only when TRITON_INTERPRET=1
    # dtypes the interpreter computes correctly on CPU (None: same as ``dtypes``)
    interpreter_dtypes: tuple[str, ...] | None = None
    dtypes: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")
    head_dims: HeadDims | None = None  # None: any d_k
    d_v_at_most_d_k: bool = False
    min_group: int = 1
    max_group: int | None = None
    # modules that must be importable; (module, import it to check?)
    requires: tuple[tuple[str, bool], ...] = ()
    # (module, oldest version, what the older ones lack) for modules in ``requires``
    min_versions: tuple[tuple[str, str, str], ...] = ()
    # an op backend registered in nsa.ops.BACKENDS under this name counts as installed
    op_backend: bool = False
    notes: tuple[str, ...] = field(default=())

    # -- the three groups of reasons --------------------------------------------------
    def version_reasons(self) -> list[str]:
        """Why the installed versions of the required modules are too old ([]: they are
        not, or are not installed at all, which :meth:`install_reasons` reports)."""
        out = []
        for module, oldest, lacks in self.min_versions:
            if module_status(module) is not None:
                continue
            have = module_version(module)
            if have is None or not version_tuple(have):
                continue  # unknown (a source build without metadata): let it try
            if version_tuple(have) < version_tuple(oldest):
                out.append(f"{module} {have} is older than {oldest}, the oldest release "
                           f"these kernels build with ({lacks}); install "
                           f"'{module}>={oldest}' or use backend='reference'")
        return out

    def install_reasons(self) -> list[str]:
        out = self.version_reasons()
        if self.op_backend and not out:
            from nsa.ops import BACKENDS as registered

            if self.name in registered:
                return []
        for module, import_it in self.requires:
            why = module_status(module, import_it)
            if why is not None:
                out.append(f"not installed: {why}")
        return out

    def device_reasons(self, device: DeviceInfo, flags: Flags) -> list[str]:
        if device.type == "cpu" and self.cpu_via_interpreter and "cpu" not in self.device_types:
            if flags.triton_interpret:
                return []
            need = self._cuda_need()
            return [f"needs {need} (got cpu); on CPU it runs only under the Triton "
                    f"interpreter (TRITON_INTERPRET=1)"]
        if device.type not in self.device_types:
            need = (self._cuda_need() if self.device_types == ("cuda",)
                    else "a device of type " + " or ".join(self.device_types))
            return [f"needs {need} (got {device.label})"]
        if device.type == "cuda" and self.min_capability is not None:
            cap = device.capability
            if cap is None:
                return [f"compute capability of {device.label} unknown; needs SM "
                        f"{self.min_capability[0]}.{self.min_capability[1]} or newer"]
            if cap < self.min_capability:
                return [f"SM {device.sm} ({device.name}) is below the required SM "
                        f"{self.min_capability[0]}.{self.min_capability[1]}"]
        return []

    def case_reasons(self, dtype: torch.dtype | str, shapes: Shapes,
                     branch: str | None = None) -> list[str]:
        out = []
        if branch is not None and branch not in self.branches:
            out.append(f"branch {branch!r} not implemented (implements: "
                       f"{', '.join(self.branches)})")
        name = dtype_name(dtype)
        if name not in self.dtypes:
            out.append(f"dtype {name} not supported (supported: {', '.join(self.dtypes)})")
        if self.head_dims is not None and shapes.d_k is not None:
            if not self.head_dims.allows(shapes.d_k):
                out.append(f"d_k={shapes.d_k} not supported (supported: "
                           f"{self.head_dims.describe()})")
        if self.d_v_at_most_d_k and shapes.d_v is not None and shapes.d_k is not None:
            if shapes.d_v > shapes.d_k:
                out.append(f"d_v={shapes.d_v} must be <= d_k={shapes.d_k}")
        if shapes.G is not None and shapes.G < self.min_group:
            out.append(f"group size G={shapes.G} below the minimum {self.min_group}")
        if shapes.G is not None and self.max_group is not None and shapes.G > self.max_group:
            out.append(f"group size G={shapes.G} above the maximum {self.max_group} (one GQA "
                       f"group must fit one program)")
        return out

    def not_supported_reasons(
        self,
        device: torch.device | str | DeviceInfo,
        dtype: torch.dtype | str,
        shapes: Shapes | None = None,
        branch: str | None = None,
        flags: Flags | None = None,
    ) -> list[str]:
        """Every reason this backend cannot run the case; [] means it can."""
        if flags is None:
            from nsa.policy import read_flags

            flags = read_flags()
        dev = device_info(device)
        shapes = shapes or Shapes()
        out = (self.install_reasons() + self.device_reasons(dev, flags)
               + self.case_reasons(dtype, shapes, branch))
        name = dtype_name(dtype)
        if (dev.type == "cpu" and self.cpu_via_interpreter and self.interpreter_dtypes
                is not None and name in self.dtypes and name not in self.interpreter_dtypes):
            out.append(f"{name} on CPU: the Triton interpreter computes it wrongly (supported "
                       f"there: {', '.join(self.interpreter_dtypes)})")
        return out

    def _cuda_need(self) -> str:
        if self.min_capability is None:
            return "a CUDA device"
        return (f"a CUDA device with compute capability >= "
                f"{self.min_capability[0]}.{self.min_capability[1]}")

    def describe_support(self) -> str:
        dev = []
        if "cpu" in self.device_types:
            dev.append("cpu")
        elif self.cpu_via_interpreter:
            dev.append("cpu with TRITON_INTERPRET=1")
        if "cuda" in self.device_types:
            dev.append(f"cuda SM >= {self.min_capability[0]}.{self.min_capability[1]}"
                       if self.min_capability else "cuda")
        hd = self.head_dims.describe() if self.head_dims else "any"
        parts = [
            f"branches {', '.join(self.branches)}",
            f"devices {', '.join(dev)}",
            f"dtypes {', '.join(self.dtypes)}",
            f"d_k {hd}",
        ]
        if self.d_v_at_most_d_k:
            parts.append("d_v <= d_k")
        parts.append(f"G >= {self.min_group}" if self.max_group is None
                     else f"{self.min_group} <= G <= {self.max_group}")
        return "; ".join(parts)


# Triton 3.3 has no host-side tensor descriptors (triton.tools.tensor_descriptor) and
# no gdc_wait / gdc_launch_dependents; 3.2 also lacks tl.gather. Every prefill kernel
# compiles for sm_90 with 3.4, 3.5 and 3.6 (the scripts' --compile-only).
MIN_TRITON = "3.4"
# Triton 3.4's gdc_launch_dependents / gdc_wait do not compile inside a jit function
# (a TypeError about their `_semantic` argument; scripts/sm90_compile_captured.py):
# decode launches its kernels without programmatic dependent launch there
PDL_MIN_TRITON = "3.5"

# The declared backends, in the order they are listed to users.
BACKEND_SPECS: dict[str, BackendSpec] = {
    "reference": BackendSpec(
        name="reference",
        description="pure PyTorch reference (the spec); any device, any floating dtype",
        op_backend=True,
    ),
    "triton": BackendSpec(
        name="triton",
        description="Triton kernels for all three branches",
        device_types=("cuda",),
        min_capability=(8, 0),
        cpu_via_interpreter=True,
        dtypes=("float16", "bfloat16", "float32"),
        # the interpreter's tl.dot gives wrong results for bfloat16
        interpreter_dtypes=("float16", "float32"),
        head_dims=HeadDims(listed=(64, 128, 192, 256), pow2_min=16),
        d_v_at_most_d_k=True,
        max_group=128,
        requires=(("triton", False), ("nsa.ops.triton_backend", False)),
        min_versions=((
            "triton", MIN_TRITON,
            "host-side tensor descriptors, programmatic dependent launch"),),
        op_backend=True,
    ),
    "flash-attn": BackendSpec(
        name="flash-attn",
        description="flash-attn (FA2) kernels for the compressed and window branches",
        branches=("cmp", "win"),
        device_types=("cuda",),
        min_capability=(8, 0),
        dtypes=("float16", "bfloat16"),
        head_dims=HeadDims(listed=tuple(range(8, 257, 8))),
        requires=(("flash_attn", True),),
    ),
}


def get_spec(name: str) -> BackendSpec:
    try:
        return BACKEND_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; declared: {sorted(BACKEND_SPECS)}") from None


def not_supported_reasons(
    backend: str,
    device: torch.device | str | DeviceInfo,
    dtype: torch.dtype | str,
    shapes: Shapes | None = None,
    branch: str | None = None,
    flags: Flags | None = None,
) -> list[str]:
    """Reasons backend ``backend`` cannot run the case ([] = it can)."""
    return get_spec(backend).not_supported_reasons(device, dtype, shapes, branch, flags)


__all__ = [
    "BACKEND_SPECS",
    "MIN_TRITON",
    "PDL_MIN_TRITON",
    "BRANCHES",
    "BackendSpec",
    "DeviceInfo",
    "Flags",
    "HeadDims",
    "Shapes",
    "device_info",
    "dtype_name",
    "get_spec",
    "module_status",
    "module_version",
    "not_supported_reasons",
    "to_dtype",
    "triton_has_pdl",
    "version_tuple",
]
