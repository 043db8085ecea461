"""NSAConfig: every hyperparameter of Native Sparse Attention, validated once.

Names follow ../shared/design/NSA-SPEC.md (paper defaults in brackets there):
``l`` compression block, ``d`` compression stride, ``l_sel`` selection block (l'),
``n`` selected blocks (forced ones included), ``n_initial`` / ``n_local`` forced blocks,
``w`` sliding window. Module-level sizes (hidden size, heads, head dims, phi, RoPE,
gate) only matter to :class:`nsa.NSAAttention`; the functional op reads the block
parameters alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

PHI_KINDS = ("mlp", "mean")


class ConfigError(ValueError):
    """An NSAConfig field breaks a rule; the message names the field, rule and value."""


@dataclass(frozen=True)
class NSAConfig:
    # block structure (paper defaults)
    l: int = 32
    d: int = 16
    l_sel: int = 64
    n: int = 16
    n_initial: int = 1
    n_local: int = 2
    w: int = 512
    # module sizes
    hidden_size: int = 256
    n_heads: int = 4  # HQ, query heads
    n_kv_heads: int = 1  # H, key/value heads
    d_k: int = 64
    d_v: int = 64
    # compression function phi: "mlp" (paper) or "mean" (ablation / public peers)
    phi: str = "mlp"
    phi_hidden: int | None = None  # hidden width of phi's MLP; None -> 2 * max(d_k, d_v)
    rope: bool = True
    rope_base: float = 10000.0
    gate_hidden: int | None = None  # hidden width of the gate MLP; None -> hidden_size // 4
    share_kv: bool = False  # one K/V projection for all three branches
    scale: float | None = None  # softmax scale; None -> 1/sqrt(d_k)

    def __post_init__(self) -> None:
        positive = (
            "l", "d", "l_sel", "n", "w", "hidden_size", "n_heads", "n_kv_heads", "d_k", "d_v",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"NSAConfig.{name} must be a positive integer, got {value!r}")
        for name in ("n_initial", "n_local"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"NSAConfig.{name} must be an integer >= 0, got {value!r}")
        if self.l % self.d:
            raise ConfigError(
                f"NSAConfig.d={self.d} must divide l={self.l} (l % d = {self.l % self.d})"
            )
        if self.l_sel % self.d:
            raise ConfigError(
                f"NSAConfig.d={self.d} must divide l_sel={self.l_sel} "
                f"(l_sel % d = {self.l_sel % self.d})"
            )
        if self.n < self.n_initial + self.n_local:
            raise ConfigError(
                f"NSAConfig.n={self.n} must be >= n_initial + n_local = "
                f"{self.n_initial} + {self.n_local} = {self.n_initial + self.n_local}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"NSAConfig.n_heads={self.n_heads} (HQ) must be divisible by "
                f"n_kv_heads={self.n_kv_heads} (H); HQ % H = {self.n_heads % self.n_kv_heads}"
            )
        if self.phi not in PHI_KINDS:
            raise ConfigError(f"NSAConfig.phi must be one of {PHI_KINDS}, got {self.phi!r}")
        if self.rope and self.d_k % 2:
            raise ConfigError(f"NSAConfig.d_k={self.d_k} must be even when rope=True")
        if self.rope_base <= 0:
            raise ConfigError(f"NSAConfig.rope_base must be > 0, got {self.rope_base!r}")
        for name in ("phi_hidden", "gate_hidden"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"NSAConfig.{name} must be None or a positive integer, "
                                  f"got {value!r}")
        if self.scale is not None and not self.scale > 0:
            raise ConfigError(f"NSAConfig.scale must be None or > 0, got {self.scale!r}")

    # derived sizes
    @property
    def G(self) -> int:
        """GQA group size HQ / H."""
        return self.n_heads // self.n_kv_heads

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.d_k ** -0.5

    @property
    def phi_hidden_size(self) -> int:
        return self.phi_hidden if self.phi_hidden is not None else 2 * max(self.d_k, self.d_v)

    @property
    def gate_hidden_size(self) -> int:
        return self.gate_hidden if self.gate_hidden is not None else max(1, self.hidden_size // 4)

    def num_compressed(self, t: int) -> int:
        """Compressed tokens that exist after ``t`` raw tokens: floor((t - l)/d) + 1 or 0."""
        return 0 if t < self.l else (t - self.l) // self.d + 1

    def num_sel_blocks(self, t: int) -> int:
        """Selection blocks covering ``t`` raw tokens: ceil(t / l_sel)."""
        return -(-t // self.l_sel)

    def replace(self, **changes: Any) -> NSAConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NSAConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"NSAConfig got unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)
