"""Routing policy: which backend runs each branch on a device, and why.

Capability (can a backend run this case?) lives in :mod:`nsa.backends`; this module
holds the *choices* as data:

* :data:`PREFERENCE`: per branch, the backends tried in order;
* :data:`POLICY`: rules that switch a capable backend off for some branches on some
  devices unless an environment flag lifts them (e.g. SM 8.9: no Triton selection);

and one function, :func:`route`, that returns the chosen backend per branch with the
reason. :func:`choose_op_backend` is what ``nsa_attention(backend="auto")`` calls.

This is the only module of the project that reads environment variables; all of them
are listed in :data:`ENV_VARS` with meaning and default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from nsa.backends import (
    BACKEND_SPECS,
    BRANCHES,
    DeviceInfo,
    Flags,
    Shapes,
    device_info,
    dtype_name,
)
from nsa.config import NSAConfig

# name -> (default, meaning). Every variable the project reads, in one place.
ENV_VARS: dict[str, tuple[str, str]] = {
    "NSA_TRITON_SEL_FORCE": (
        "0", "1 = use the Triton selection kernel on SM 8.9 (RTX 4090) too, where the "
             "policy routes selection to the reference (parity testing)"),
    "NSA_USE_FA2": (
        "0", "1 = let flash-attn run the cmp and win branches when it is installed"),
    "TRITON_INTERPRET": (
        "0", "Triton's interpreter switch; 1 makes the Triton backend usable on CPU "
             "(slow, for tests)"),
    "NSA_KV_DESC": (
        "unset", "1 = Triton kernels read key/value (and query) tiles by tensor descriptor "
                 "(bulk copies) wherever they can, 0 = never; unset = where the kernel's "
                 "default says so on SM 9.0+"),
    "NSA_SEL_MODE": (
        "unset", "group = the selected-attention forward streams each position's blocks "
                 "(group-centric), block = it reads each selected block once and merges "
                 "per-block partials (block-centric, scratch memory); unset = block on "
                 "CUDA for G <= 8 while the partials fit 8 GiB, else group"),
    "NSA_DEBUG": (
        "0", "1 = the nsa command prints the full traceback of known errors"),
    "GITHUB_STEP_SUMMARY": (
        "unset", "file the nsa command appends its Markdown report to (set by GitHub "
                 "Actions)"),
}

_TRUE = {"1", "true", "yes", "on"}


def _env_on(name: str) -> bool:
    return os.environ.get(name, ENV_VARS[name][0]).strip().lower() in _TRUE


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1 (Triton's flag: kernels run on the CPU interpreter), read now;
    one variable, for the launchers that ask on every call."""
    return _env_on("TRITON_INTERPRET")


def read_flags() -> Flags:
    """The routing switches, read from the environment now (not at import)."""
    return Flags(
        triton_sel_force=_env_on("NSA_TRITON_SEL_FORCE"),
        use_fa2=_env_on("NSA_USE_FA2"),
        triton_interpret=triton_interpret(),
    )


def kv_desc_env() -> bool | None:
    """NSA_KV_DESC: True (1), False (0) or None (unset or anything else: kernels decide)."""
    v = os.environ.get("NSA_KV_DESC", "").strip().lower()
    return True if v in _TRUE else False if v in {"0", "false", "no", "off"} else None


# The selected-attention forward's default path (nsa.ops.selection.launch.auto_sel_mode):
# block-centric up to this group size (measured, docs/perf-notes.md) ...
SEL_BLOCK_MAX_G = 8
# ... while its scratch partials ([B, T, H, n, G, d_v] in q's dtype plus float32
# log-sum-exps) stay below this many bytes
SEL_BLOCK_MAX_PARTIAL_BYTES = 8 << 30
SEL_MODES = ("group", "block")


def sel_mode_env() -> str | None:
    """NSA_SEL_MODE: "group", "block" or None (unset: the measured default). Any other
    value raises ValueError naming the variable."""
    v = os.environ.get("NSA_SEL_MODE", "").strip().lower()
    if not v:
        return None
    if v not in SEL_MODES:
        raise ValueError(f"NSA_SEL_MODE must be one of {SEL_MODES} or unset, got {v!r}")
    return v


def debug_enabled() -> bool:
    """NSA_DEBUG=1: show tracebacks for known errors."""
    return _env_on("NSA_DEBUG")


def step_summary_path() -> str | None:
    """GITHUB_STEP_SUMMARY: where CI wants the Markdown report appended, if set."""
    path = os.environ.get("GITHUB_STEP_SUMMARY", "").strip()
    return path or None


def env_snapshot() -> dict[str, str | None]:
    """Current raw value of every variable in ENV_VARS (None = unset), for reports."""
    return {name: os.environ.get(name) for name in ENV_VARS}


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Rule:
    """Switch ``backend`` off for ``branches`` on matching devices unless ``lifted_by``.

    ``capability`` None matches every device; otherwise only CUDA devices of exactly
    that compute capability.
    """

    id: str
    backend: str
    branches: tuple[str, ...]
    text: str
    capability: tuple[int, int] | None = None
    lifted_by: str | None = None  # env flag that lifts the rule when on

    def applies(self, device: DeviceInfo, branch: str, backend: str, flags: Flags) -> bool:
        if backend != self.backend or branch not in self.branches:
            return False
        if self.capability is not None and device.capability != self.capability:
            return False
        return not (self.lifted_by is not None and flags.is_on(self.lifted_by))


POLICY: tuple[Rule, ...] = (
    Rule(
        id="sm89-triton-sel",
        backend="triton",
        branches=("sel",),
        capability=(8, 9),
        lifted_by="NSA_TRITON_SEL_FORCE",
        text="SM 8.9 (RTX 4090): Triton selection disabled unless NSA_TRITON_SEL_FORCE=1",
    ),
    Rule(
        id="fa2-opt-in",
        backend="flash-attn",
        branches=("cmp", "win"),
        lifted_by="NSA_USE_FA2",
        text="flash-attn used for cmp/win only when installed and enabled (NSA_USE_FA2=1)",
    ),
)

# Backends tried per branch, first usable one wins. The reference always can.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cmp": ("flash-attn", "triton", "reference"),
    "sel": ("triton", "reference"),
    "win": ("flash-attn", "triton", "reference"),
}


# ----------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Choice:
    backend: str
    reason: str


@dataclass(frozen=True)
class BranchChoice:
    branch: str
    backend: str
    reason: str
    # backends passed over before the chosen one, with why
    rejected: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class Routing:
    device: DeviceInfo
    dtype: str
    shapes: Shapes
    op: Choice
    branches: dict[str, BranchChoice] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "case": {"device": self.device.describe(), "dtype": self.dtype,
                     "d_k": self.shapes.d_k, "d_v": self.shapes.d_v, "G": self.shapes.G},
            "op": {"backend": self.op.backend, "reason": self.op.reason},
            "branches": {
                b: {"backend": c.backend, "reason": c.reason,
                    "rejected": {name: list(why) for name, why in c.rejected}}
                for b, c in self.branches.items()
            },
        }

    def lines(self) -> list[str]:
        out = [f"op: {self.op.backend} ({self.op.reason})"]
        out += [f"{b}: {c.backend} ({c.reason})" for b, c in self.branches.items()]
        return out


def policy_reasons(device: DeviceInfo, branch: str, backend: str, flags: Flags) -> list[str]:
    """Policy rules that switch ``backend`` off for ``branch`` on ``device``."""
    return [f"policy {r.id}: {r.text}" for r in POLICY
            if r.applies(device, branch, backend, flags)]


def branch_reasons(
    backend: str, branch: str, device: DeviceInfo, dtype: torch.dtype | str, shapes: Shapes,
    flags: Flags,
) -> list[str]:
    """Capability reasons followed by policy reasons; [] = this backend would run it."""
    spec = BACKEND_SPECS[backend]
    return (spec.not_supported_reasons(device, dtype, shapes, branch=branch, flags=flags)
            + policy_reasons(device, branch, backend, flags))


def choose_branch(
    branch: str,
    device: torch.device | str | DeviceInfo,
    dtype: torch.dtype | str,
    shapes: Shapes | None = None,
    flags: Flags | None = None,
    requested: str = "auto",
) -> BranchChoice:
    """The backend for one branch and why. ``requested`` != "auto" is tried alone (the
    reference is the fallback when it cannot or may not run)."""
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    dev = device_info(device)
    shapes = shapes or Shapes()
    flags = read_flags() if flags is None else flags
    if requested == "auto":
        order = PREFERENCE[branch]
    else:
        if requested not in BACKEND_SPECS:
            raise ValueError(f"backend must be 'auto' or one of {sorted(BACKEND_SPECS)}, "
                             f"got {requested!r}")
        order = (requested,) if requested == "reference" else (requested, "reference")
    rejected: list[tuple[str, tuple[str, ...]]] = []
    for name in order:
        why = branch_reasons(name, branch, dev, dtype, shapes, flags)
        if why:
            rejected.append((name, tuple(why)))
            continue
        if requested != "auto" and name == requested:
            reason = f"requested {name}, and it supports {dev.describe()}, {dtype_name(dtype)}"
        elif rejected:
            reason = "; ".join(f"{n} not used ({'; '.join(w)})" for n, w in rejected)
        else:
            reason = f"first in preference order {', '.join(order)}; supports this case"
        return BranchChoice(branch, name, reason, tuple(rejected))
    # only reachable if even the reference refuses (e.g. an integer dtype)
    why = "; ".join(f"{n} ({'; '.join(w)})" for n, w in rejected)
    return BranchChoice(branch, "none", f"no backend can run it: {why}", tuple(rejected))


def choose_branch_backends(
    device: torch.device | str | DeviceInfo,
    dtype: torch.dtype | str,
    shapes: Shapes | None = None,
    flags: Flags | None = None,
    requested: str = "auto",
) -> dict[str, BranchChoice]:
    """The chosen backend for each branch (cmp, sel, win) with the reason."""
    flags = read_flags() if flags is None else flags
    return {b: choose_branch(b, device, dtype, shapes, flags, requested) for b in BRANCHES}


def _op_choice(dev: DeviceInfo, dtype: torch.dtype | str, shapes: Shapes,
               flags: Flags) -> Choice:
    why = BACKEND_SPECS["triton"].not_supported_reasons(dev, dtype, shapes, flags=flags)
    if why:
        return Choice("reference", "triton not usable: " + "; ".join(why))
    reason = f"triton installed and supports {dev.describe()}, {dtype_name(dtype)}"
    if shapes.d_k is not None:
        reason += f", d_k={shapes.d_k}"
    off = [b for b in BRANCHES if policy_reasons(dev, b, "triton", flags)]
    if off:
        reason += (f" (policy routes its {', '.join(off)} branch to the reference: "
                   + "; ".join(policy_reasons(dev, off[0], "triton", flags)) + ")")
    return Choice("triton", reason)


def route(
    device: torch.device | str | DeviceInfo,
    dtype: torch.dtype | str,
    shapes: Shapes | None = None,
    flags: Flags | None = None,
    requested: str = "auto",
) -> Routing:
    """The op-level backend and the per-branch choices for one case, each explained."""
    dev = device_info(device)
    shapes = shapes or Shapes()
    flags = read_flags() if flags is None else flags
    return Routing(
        device=dev,
        dtype=dtype_name(dtype),
        shapes=shapes,
        op=_op_choice(dev, dtype, shapes, flags),
        branches=choose_branch_backends(dev, dtype, shapes, flags, requested),
    )


def choose_op_backend(
    q: Tensor,
    config: NSAConfig,
    *,
    d_v: int | None = None,
    n_kv_heads: int | None = None,
    flags: Flags | None = None,
) -> Choice:
    """Backend for ``nsa_attention(backend="auto")``: "triton" when it is registered or
    importable and supports q's device, dtype and head dim; otherwise "reference".

    ``config``'s module sizes need not match the op's tensors, so d_v and the number of
    KV heads are only checked when passed.
    """
    G = None
    if n_kv_heads and q.shape[2] % n_kv_heads == 0:
        G = q.shape[2] // n_kv_heads
    shapes = Shapes(d_k=int(q.shape[-1]), d_v=d_v, G=G)
    flags = read_flags() if flags is None else flags
    choice = _op_choice(device_info(q.device), q.dtype, shapes, flags)
    if choice.backend == "triton":
        # the block-score kernel serves l'/d a power of two and l <= l' + d only
        from nsa.ops.triton_backend import config_not_supported_reasons

        why = config_not_supported_reasons(config)
        if why:
            return Choice("reference", "triton not usable: " + "; ".join(why))
    return choice


__all__ = [
    "ENV_VARS",
    "POLICY",
    "PREFERENCE",
    "BranchChoice",
    "Choice",
    "Routing",
    "Rule",
    "branch_reasons",
    "choose_branch",
    "choose_branch_backends",
    "choose_op_backend",
    "debug_enabled",
    "env_snapshot",
    "policy_reasons",
    "read_flags",
    "route",
    "step_summary_path",
]
