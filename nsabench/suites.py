"""Declarative suite files: load, validate against a strict schema, expand grids.

A suite is YAML::

    schema_version: 1
    name: cpu-smoke
    description: ...
    defaults:            # parameters for every case whose kind accepts them
      device: auto
    cases:
      - name: parity-small
        kind: parity             # env | parity | prefill | decode | generate | needle | train
        devices: [cpu]           # optional: device types the case is meant for
        description: ...
        params:                  # a list value expands to a grid (cartesian product)
          T: [128, 200]
          dtype: [float32, bfloat16]
        thresholds:              # number, or a mapping dtype -> number
          max_rel_err: {float32: 1.0e-5, bfloat16: 2.0e-2}

Unknown keys, wrong types and values that NSAConfig rejects are errors naming the file,
line, key and reason (:class:`SuiteError`, exit 2). Threshold ``max_X`` checks metric X
<= value, ``min_X`` checks metric X >= value.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from nsa.backends import dtype_name
from nsa.config import ConfigError, NSAConfig
from nsabench.errors import SuiteError, UsageError

SCHEMA_VERSION = 1
KINDS = ("env", "parity", "prefill", "decode", "generate", "needle", "train")
# kinds whose runner does not exist yet, recorded as skipped with this reason (none now)
NOT_IMPLEMENTED: dict[str, str] = {}
DEVICE_TYPES = ("cpu", "cuda")
BACKEND_CHOICES = ("auto", "reference", "triton")
DTYPE_CHOICES = ("float16", "bfloat16", "float32", "float64")
PREFILL_MODES = ("fwd", "fwd_bwd")
NEEDLE_ABLATIONS = ("none", "random_selection", "unaligned")
NEEDLE_GATES = ("sel", "all")
TRAIN_TASKS = ("lm", "passkey")


@dataclass(frozen=True)
class Param:
    """One case parameter: its type, default, and whether a list means a grid."""

    type: str  # int | float | bool | str | str_list | float_list | int_list
    default: Any
    help: str
    grid: bool = True  # scalar types only: a YAML list expands to a grid
    min: float | None = None
    choices: tuple[str, ...] | None = None
    nullable: bool = False


def _p(type_: str, default: Any, help_: str, **kw: Any) -> Param:
    return Param(type_, default, help_, **kw)


_CFG = NSAConfig()
COMMON = {
    "device": _p("str", "auto", "auto | cpu | cuda | cuda:N (auto: cuda if available)",
                 grid=False),
    "dtype": _p("str", "float32", "dtype of the measured backend", choices=DTYPE_CHOICES),
    "backend": _p("str", "auto", "auto | reference | triton", choices=BACKEND_CHOICES),
    "seed": _p("int", 0, "random seed of the inputs", min=0),
    "threads": _p("int", 0, "CPU intra-op threads for the case (0: torch's default)",
                  min=0, grid=False),
}
SHAPE = {
    "B": _p("int", 1, "batch size", min=1),
    "H": _p("int", 2, "KV heads", min=1),
    "G": _p("int", 4, "GQA group size (query heads = H * G)", min=1),
    "d_k": _p("int", 64, "query/key head dim", min=1),
    "d_v": _p("int", None, "value head dim (default: d_k)", min=1, nullable=True),
}
BLOCK = {
    "l": _p("int", _CFG.l, "compression block", min=1),
    "d": _p("int", _CFG.d, "compression stride", min=1),
    "l_sel": _p("int", _CFG.l_sel, "selection block l'", min=1),
    "n": _p("int", _CFG.n, "selected blocks (forced included)", min=1),
    "n_initial": _p("int", _CFG.n_initial, "forced initial blocks", min=0),
    "n_local": _p("int", _CFG.n_local, "forced local blocks", min=0),
    "w": _p("int", _CFG.w, "sliding window", min=1),
}
TIMING = {
    "warmup": _p("int", 1, "untimed calls before timing", min=0, grid=False),
    "repeats": _p("int", 5, "timed calls (CPU: at most, within budget_s; the median is "
                            "reported)", min=1, grid=False),
    "budget_s": _p("float", 2.0, "CPU: time budget of one measurement in seconds (at "
                                 "least one timed call)", min=0, grid=False),
}

KIND_PARAMS: dict[str, dict[str, Param]] = {
    "env": {
        "device": COMMON["device"],
        "require_backends": _p("str_list", ["reference"],
                               "backends that must be usable on the device",
                               choices=BACKEND_CHOICES[1:]),
    },
    "parity": {
        **COMMON, **SHAPE, **BLOCK,
        "T": _p("int", 256, "sequence length", min=1),
        "grad": _p("bool", True, "also compare gradients (dq, dk, dv, gates)", grid=False),
    },
    "prefill": {
        **COMMON, **SHAPE, **BLOCK, **TIMING,
        "T": _p("int", 1024, "sequence length", min=1),
        "modes": _p("str_list", list(PREFILL_MODES), "fwd and/or fwd_bwd",
                    choices=PREFILL_MODES),
        "branches": _p("bool", True, "also time each branch alone (forward)", grid=False),
        "graph": _p("bool", True, "CUDA, triton backend: also time the NSA forward replayed "
                                  "from a CUDA graph, the GPU's work without the host's "
                                  "launch cost",
                    grid=False),
        "deterministic": _p("bool", False, "fwd_bwd: bitwise-reproducible backward "
                                           "(nsa_attention(deterministic=True))", grid=False),
        "fla": _p("bool", False, "also time fla-core's parallel_nsa and NSA in the "
                                 "configuration both support: mean-pooled compression with "
                                 "l = d = l', no sliding window (needs fla-core installed, "
                                 "CUDA, float16/bfloat16, G a power of two >= 16)",
                  grid=False),
    },
    "decode": {
        **COMMON, **SHAPE, **BLOCK, **TIMING,
        "S": _p("int", 4096, "context length: tokens in the cache, the new one included",
                min=1),
        "check": _p("bool", True, "compare the decode output with the float64 reference",
                    grid=False),
    },
    "generate": {
        **COMMON,
        "context": _p("int", 4096, "prompt tokens (random bytes) before generation", min=1),
        "new": _p("int", 64, "tokens generated greedily after the prompt (the timed steps)",
                  min=1, grid=False),
        "B": SHAPE["B"],
        "layers": _p("int", 4, "transformer blocks of the tiny LM", min=1),
        "hidden": _p("int", 1024, "hidden size", min=1),
        "H": _p("int", 4, "KV heads", min=1),
        "G": _p("int", 4, "query heads per KV head", min=1),
        "d_k": _p("int", 64, "query/key head dim (even: RoPE)", min=1),
        "d_v": SHAPE["d_v"],
        "phi": _p("str", "mlp", "NSA compression: mlp (paper) or mean", choices=("mlp", "mean")),
        **BLOCK,
        "graph": _p("bool", True, "CUDA: also time NSA replaying a CUDA-graph-captured step",
                    grid=False),
    },
    "needle": {
        **COMMON, **SHAPE, **BLOCK,
        "T": _p("int", 4096, "haystack length", min=1),
        "depths": _p("float_list", [0.0, 0.25, 0.5, 0.75, 1.0], "needle depths in [0, 1]"),
        "trials": _p("int", 4, "trials (haystacks per KV head) per (length, depth)", min=1,
                     grid=False),
        "distractors": _p("int", 8, "distractor blocks (cycling half / weak / spike), each "
                                    "with a wrong code", min=0),
        "codes": _p("int", 32, "codebook size (chance = 1 / codes); orthonormal codes when "
                               "codes <= d_v", min=2, grid=False),
        "gates": _p("str", "sel", "sel: only the selection gate on (the code can only come "
                                  "through selected blocks); all: the three gates at 1/3",
                    choices=NEEDLE_GATES),
        "ablation": _p("str", "none", "none; random_selection (random block indices instead "
                                      "of the op's own); unaligned (needle keys not "
                                      "aligned): both must fail", choices=NEEDLE_ABLATIONS),
    },
    "train": {
        **COMMON,
        "task": _p("str", "lm", "lm: next-byte loss on the Python standard library's source; "
                                "passkey: synthetic passkey retrieval, evaluated at longer "
                                "lengths", choices=TRAIN_TASKS, grid=False),
        "attention": _p("str_list", ["nsa", "dense"], "models to train (same data, same "
                                                      "order, same seed)",
                        choices=("nsa", "dense")),
        "steps": _p("int", 200, "optimizer steps", min=1, grid=False),
        "T": _p("int", 256, "training sequence length", min=1),
        "B": _p("int", 8, "global batch size (split across --nproc ranks)", min=1),
        "lr": _p("float", 3e-4, "peak learning rate (AdamW)", min=0),
        "lr_warmup": _p("int", 20, "linear warm-up steps, then cosine decay to lr / 10",
                        min=0, grid=False),
        "weight_decay": _p("float", 0.1, "AdamW weight decay", min=0, grid=False),
        "grad_clip": _p("float", 1.0, "gradient norm clip (0: off)", min=0, grid=False),
        "nproc": _p("int", 1, "processes: > 1 launches torchrun with DistributedDataParallel "
                              "(NCCL on GPU, gloo on CPU)", min=1, grid=False),
        "layers": _p("int", 2, "transformer blocks", min=1),
        "hidden": _p("int", 64, "hidden size", min=1),
        "H": _p("int", 1, "KV heads", min=1),
        "G": _p("int", 2, "query heads per KV head", min=1),
        "d_k": _p("int", 32, "query/key head dim (even: RoPE)", min=1),
        "d_v": _p("int", None, "value head dim (default: d_k)", min=1, nullable=True),
        "phi": _p("str", "mlp", "NSA compression: mlp (paper) or mean", choices=("mlp", "mean")),
        **BLOCK,
        "eval_every": _p("int", 20, "validation every this many steps (and at the end)",
                         min=1, grid=False),
        "eval_batches": _p("int", 4, "validation batches of B windows each", min=1,
                           grid=False),
        "corpus_bytes": _p("int", 4_000_000, "lm: bytes of standard-library source read "
                                             "(sorted files; the last 10% are validation)",
                           min=1024, grid=False),
        "eval_lengths": _p("int_list", [256, 512, 1024], "passkey: evaluation lengths",
                           min=16),
        "eval_depths": _p("float_list", [0.0, 0.25, 0.5, 0.75, 1.0],
                          "passkey: depths of the key in [0, 1]"),
        "eval_trials": _p("int", 8, "passkey: prompts per (length, depth)", min=1,
                          grid=False),
    },
}

# threshold name -> metric; max_X means X <= value, min_X means X >= value
KIND_THRESHOLDS: dict[str, tuple[str, ...]] = {
    "env": (),
    "parity": ("max_rel_err", "max_abs_err", "max_grad_rel_err", "min_sel_match"),
    "prefill": ("min_speedup_fwd", "min_speedup_fwd_bwd", "max_nsa_fwd_ms",
                "max_nsa_fwd_bwd_ms", "min_speedup_fwd_vs_fla", "min_speedup_fwd_bwd_vs_fla"),
    "decode": ("min_speedup", "max_read_vs_spec", "max_read_fraction", "max_rel_err",
               "min_sel_match"),
    "generate": ("min_speedup_eager", "min_graph_vs_dense_eager", "min_graph_token_match"),
    "needle": ("min_accuracy", "min_recall", "min_dense_accuracy", "min_worst_depth_accuracy",
               "max_accuracy"),
    "train": ("max_final_loss", "max_loss_ratio", "min_loss_drop", "min_passkey_accuracy",
              "min_passkey_digit_accuracy"),
}

TOP_KEYS = {"schema_version", "name", "description", "defaults", "cases"}
CASE_KEYS = {"name", "kind", "description", "devices", "params", "thresholds"}


def threshold_metric(key: str) -> tuple[str, str]:
    """("max_rel_err") -> ("rel_err", "<=")."""
    if key.startswith("max_"):
        return key[4:], "<="
    return key[4:], ">="


# ----------------------------------------------------------------------------- YAML with lines

class _LineDict(dict):
    """A mapping that remembers the line of itself and of each key (1-based)."""

    line: int = 0
    key_lines: dict


class _Loader(yaml.SafeLoader):
    pass


# YAML 1.1 reads "1e-5" as a string; accept exponent floats without a dot as floats.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> _LineDict:
    loader.flatten_mapping(node)
    out = _LineDict()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in out.key_lines:
            raise SuiteError([f"{loader.name}:{line}: {key}: duplicate key (first at line "
                              f"{out.key_lines[key]})"])
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = line
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line(mapping: Any, key: str | None = None) -> int | None:
    if not isinstance(mapping, _LineDict):
        return None
    if key is not None and key in mapping.key_lines:
        return mapping.key_lines[key]
    return mapping.line


# ----------------------------------------------------------------------------- suite model

@dataclass
class CaseDef:
    """One case as written in the suite (params merged with defaults, lists intact)."""

    name: str
    kind: str
    description: str
    devices: list[str] | None
    params: dict[str, Any]
    thresholds: dict[str, Any]
    line: int | None = None


@dataclass
class Suite:
    name: str
    description: str
    source: str
    schema_version: int
    defaults: dict[str, Any]
    cases: list[CaseDef]
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, meta: bool = True) -> dict[str, Any]:
        """Plain data. ``meta=False`` gives a valid suite file with every parameter
        explicit (suite.resolved.yaml: run it again with --suite); ``meta=True`` adds the
        source, the option overrides and each case's grid point ids (results.json)."""
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "name": self.name,
            "description": self.description,
        }
        if meta:
            out["source"] = self.source
            out["overrides"] = _plain(self.overrides)
            out["defaults"] = _plain(self.defaults)
        cases = []
        for c in self.cases:
            entry: dict[str, Any] = {"name": c.name, "kind": c.kind}
            if c.description:
                entry["description"] = c.description
            if c.devices:
                entry["devices"] = list(c.devices)
            entry["params"] = _plain(full_params(c.kind, c.params) if not meta else c.params)
            if c.thresholds:
                entry["thresholds"] = _plain(c.thresholds)
            if meta:
                entry["instances"] = [i.id for i in expand_case(c)]
            cases.append(entry)
        out["cases"] = cases
        return out


@dataclass(frozen=True)
class CaseSpec:
    """One grid point: every parameter has one value."""

    id: str
    case: str
    kind: str
    description: str
    devices: tuple[str, ...] | None
    params: dict[str, Any]
    thresholds: dict[str, Any]


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# ----------------------------------------------------------------------------- value checks

def _type_word(p: Param) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false",
            "str": "a string", "str_list": "a list of strings",
            "float_list": "a list of numbers", "int_list": "a list of integers"}[p.type]


def coerce_scalar(p: Param, value: Any, key: str) -> Any:
    """One value of parameter ``key`` checked and normalised; raises ValueError(reason)."""
    if value is None and p.nullable:
        return None
    t = p.type
    if t == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
    elif t == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        value = float(value)
    elif t == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
    elif t == "str":
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        if key == "dtype":
            try:
                value = dtype_name(value)
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        elif key == "device":
            value = value.strip().lower()
            if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
                raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
    if p.min is not None and isinstance(value, (int, float)) and value < p.min:
        raise ValueError(f"must be >= {p.min:g}, got {value!r}")
    if p.choices is not None and t == "str" and value not in p.choices:
        raise ValueError(f"must be one of {', '.join(p.choices)}, got {value!r}")
    return value


def coerce_value(p: Param, value: Any, key: str) -> Any:
    """A parameter value as written: a scalar, a grid list (grid params), or a list param."""
    if p.type.endswith("_list"):
        if not isinstance(value, list) or not value:
            raise ValueError(f"expected a non-empty list, got {value!r}")
        inner = Param(p.type[:-5], None, p.help, min=p.min, choices=p.choices)
        return [coerce_scalar(inner, v, key) for v in value]
    if isinstance(value, list):
        if not p.grid:
            raise ValueError(f"expected {_type_word(p)} (this parameter does not take a "
                             f"list), got {value!r}")
        if not value:
            raise ValueError("an empty list expands to no case")
        return [coerce_scalar(p, v, key) for v in value]
    return coerce_scalar(p, value, key)


def _coerce_threshold(kind: str, key: str, value: Any) -> Any:
    if key not in KIND_THRESHOLDS[kind]:
        known = ", ".join(KIND_THRESHOLDS[kind]) or "none"
        raise ValueError(f"unknown threshold for kind {kind} (known: {known})")

    def num(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"expected a number, got {v!r}")
        return float(v)

    if isinstance(value, dict):
        out = {}
        for dt, v in value.items():
            try:
                name = dtype_name(str(dt))
            except ValueError:
                raise ValueError(f"per-dtype threshold keys must be dtypes "
                                 f"({', '.join(DTYPE_CHOICES)}), got {dt!r}") from None
            out[name] = num(v)
        return out
    return num(value)


# ----------------------------------------------------------------------------- loading

def shipped_dir() -> Path:
    return Path(str(resources.files("nsabench") / "suites"))


def shipped_suites() -> dict[str, Path]:
    return {p.stem: p for p in sorted(shipped_dir().glob("*.yaml"))}


def find_suite(name_or_path: str) -> Path:
    """A suite file path, or the shipped suite of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_suites()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise UsageError(f"--suite {name_or_path!r}: no such file and no shipped suite of that name "
                     f"(shipped: {', '.join(shipped)})")


def load_suite(name_or_path: str | Path) -> Suite:
    """Read and validate a suite (all problems reported at once in one SuiteError)."""
    path = find_suite(str(name_or_path))
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read suite {path}: {exc}") from None
    return parse_suite(text, _source_name(path))


def _source_name(path: Path) -> str:
    """A shipped suite is named by its place in the package (same on every machine)."""
    try:
        if path.resolve().parent == shipped_dir().resolve():
            return f"nsabench/suites/{path.name}"
    except OSError:
        pass
    return str(path)


def parse_suite(text: str, source: str = "<suite>") -> Suite:
    loader = _Loader(text)
    loader.name = source
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise SuiteError([f"{where}: invalid YAML: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise SuiteError([f"{source}: invalid YAML: {exc}"]) from None
    finally:
        loader.dispose()
    return validate_suite(data, source)


def validate_suite(data: Any, source: str = "<suite>") -> Suite:
    problems: list[str] = []

    def err(mapping: Any, key: str | None, path: str, reason: str) -> None:
        line = _line(mapping, key)
        where = f"{source}:{line}" if line else source
        problems.append(f"{where}: {path}: {reason}")

    if not isinstance(data, dict):
        raise SuiteError([f"{source}: the suite must be a YAML mapping with keys "
                          f"{', '.join(sorted(TOP_KEYS))}, got {type(data).__name__}"])
    for key in data:
        if key not in TOP_KEYS:
            err(data, key, str(key), f"unknown key (allowed: {', '.join(sorted(TOP_KEYS))})")
    version = data.get("schema_version")
    if "schema_version" not in data:
        err(data, None, "schema_version", "missing (this toolkit reads schema_version: "
            f"{SCHEMA_VERSION})")
    elif version != SCHEMA_VERSION or isinstance(version, bool):
        err(data, "schema_version", "schema_version",
            f"unsupported version {version!r} (this toolkit reads {SCHEMA_VERSION})")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        err(data, "name" if "name" in data else None, "name", "missing or not a string")
    description = data.get("description", "")
    if not isinstance(description, str):
        err(data, "description", "description", f"expected a string, got {description!r}")
        description = ""

    all_params = {k: p for kind in KIND_PARAMS.values() for k, p in kind.items()}
    defaults_raw = data.get("defaults") or {}
    defaults: dict[str, Any] = {}
    if not isinstance(defaults_raw, dict):
        err(data, "defaults", "defaults", "expected a mapping of parameters")
        defaults_raw = {}
    for key, value in defaults_raw.items():
        if key not in all_params:
            err(defaults_raw, key, f"defaults.{key}",
                f"unknown parameter (known: {', '.join(sorted(all_params))})")
            continue
        # defaults apply per kind: check against every kind that has this parameter
        try:
            defaults[key] = coerce_value(all_params[key], value, key)
        except ValueError as exc:
            err(defaults_raw, key, f"defaults.{key}", str(exc))

    cases_raw = data.get("cases")
    cases: list[CaseDef] = []
    if not isinstance(cases_raw, list) or not cases_raw:
        err(data, "cases" if "cases" in data else None, "cases",
            "missing or empty (expected a list of cases)")
        cases_raw = []
    seen: dict[str, int] = {}
    for i, case in enumerate(cases_raw):
        where = f"cases[{i}]"
        if not isinstance(case, dict):
            problems.append(f"{source}: {where}: expected a mapping, got {case!r}")
            continue
        cname = case.get("name")
        if not isinstance(cname, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", cname or ""):
            err(case, "name" if "name" in case else None, f"{where}.name",
                f"missing or not a name of letters, digits, '_', '-', '.' (got {cname!r})")
            cname = f"case{i}"
        elif cname in seen:
            err(case, "name", f"{where}.name", f"duplicate case name {cname!r} "
                f"(first in cases[{seen[cname]}])")
        seen.setdefault(cname, i)
        where = f"cases[{i}] ({cname})"
        for key in case:
            if key not in CASE_KEYS:
                err(case, key, f"{where}.{key}",
                    f"unknown key (allowed: {', '.join(sorted(CASE_KEYS))})")
        kind = case.get("kind")
        if kind not in KINDS:
            err(case, "kind" if "kind" in case else None, f"{where}.kind",
                f"must be one of {', '.join(KINDS)}, got {kind!r}")
            continue
        desc = case.get("description", "")
        if not isinstance(desc, str):
            err(case, "description", f"{where}.description", f"expected a string, got {desc!r}")
            desc = ""
        devices = case.get("devices")
        if devices is not None:
            if (not isinstance(devices, list) or not devices
                    or any(d not in DEVICE_TYPES for d in devices)):
                err(case, "devices", f"{where}.devices",
                    f"expected a list of {', '.join(DEVICE_TYPES)}, got {devices!r}")
                devices = None
        spec = KIND_PARAMS[kind]
        params = {k: v for k, v in defaults.items() if k in spec}
        raw = case.get("params") or {}
        if not isinstance(raw, dict):
            err(case, "params", f"{where}.params", "expected a mapping")
            raw = {}
        for key, value in raw.items():
            if key not in spec:
                err(raw, key, f"{where}.params.{key}",
                    f"unknown parameter for kind {kind} (known: {', '.join(spec)})")
                continue
            try:
                params[key] = coerce_value(spec[key], value, key)
            except ValueError as exc:
                err(raw, key, f"{where}.params.{key}", str(exc))
        thresholds: dict[str, Any] = {}
        raw_t = case.get("thresholds") or {}
        if not isinstance(raw_t, dict):
            err(case, "thresholds", f"{where}.thresholds", "expected a mapping")
            raw_t = {}
        for key, value in raw_t.items():
            try:
                thresholds[key] = _coerce_threshold(kind, key, value)
            except ValueError as exc:
                err(raw_t, key, f"{where}.thresholds.{key}", str(exc))
        cdef = CaseDef(cname, kind, desc, devices, params, thresholds, _line(case))
        for problem in _config_problems(cdef):
            err(case, "params" if "params" in case else None, f"{where}.params", problem)
        cases.append(cdef)
    if problems:
        raise SuiteError(problems)
    return Suite(name=name, description=description, source=source,
                 schema_version=SCHEMA_VERSION, defaults=defaults, cases=cases)


def _config_problems(case: CaseDef) -> list[str]:
    """NSAConfig's verdict on every grid point (d | l, n >= forced blocks, ...)."""
    if not set(BLOCK) & set(KIND_PARAMS[case.kind]):
        return []
    seen: dict[str, str] = {}
    for spec in expand_case(case):
        try:
            config_for(spec.params)
        except ConfigError as exc:
            seen.setdefault(str(exc), f"{exc} (first at {spec.id})")
    return list(seen.values())[:3]


def config_for(params: dict[str, Any]) -> NSAConfig:
    """NSAConfig of a case's block parameters (module sizes follow the shape params)."""
    kw = {k: params[k] for k in BLOCK if k in params}
    return NSAConfig(**kw)


# ----------------------------------------------------------------------------- expansion

def full_params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    spec = KIND_PARAMS[kind]
    return {k: params.get(k, p.default) for k, p in spec.items()}


# order of the varying parameters in a case id: "prefill[T=512,B=1,dtype=bfloat16]"
ID_ORDER = ("T", "S", "B", "H", "G", "d_k", "d_v", "dtype", "backend")


def expand_case(case: CaseDef) -> list[CaseSpec]:
    """Every grid point of a case, in declaration order; ids name the varying values."""
    spec = KIND_PARAMS[case.kind]
    params = full_params(case.kind, case.params)
    axes = [k for k, p in spec.items()
            if isinstance(params[k], list) and not p.type.endswith("_list")]
    varying = sorted((k for k in axes if len(params[k]) > 1),
                     key=lambda k: (ID_ORDER.index(k) if k in ID_ORDER else len(ID_ORDER)))
    out = []
    for combo in itertools.product(*(params[k] for k in axes)):
        point = dict(params)
        point.update(zip(axes, combo, strict=True))
        if point.get("d_v", 1) is None:
            point["d_v"] = point["d_k"]
        label = ",".join(f"{k}={point[k]}" for k in varying)
        cid = f"{case.name}[{label}]" if label else case.name
        out.append(CaseSpec(cid, case.name, case.kind, case.description,
                            tuple(case.devices) if case.devices else None, point,
                            dict(case.thresholds)))
    return out


def expand(suite: Suite, kinds: set[str] | None = None) -> list[CaseSpec]:
    return [s for c in suite.cases if kinds is None or c.kind in kinds for s in expand_case(c)]


def apply_overrides(suite: Suite, overrides: dict[str, Any]) -> Suite:
    """Flags override the suite: each given parameter replaces the value in every case
    whose kind has it. Values are checked like suite values (UsageError, exit 2)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not overrides:
        return suite
    all_params = {k: p for kind in KIND_PARAMS.values() for k, p in kind.items()}
    clean: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in all_params:
            raise UsageError(f"unknown parameter {key!r}")
        try:
            clean[key] = coerce_value(all_params[key], value, key)
        except ValueError as exc:
            raise UsageError(f"--{key.replace('_', '-')}: {exc}") from None
    cases = []
    for c in suite.cases:
        params = dict(c.params)
        for key, value in clean.items():
            if key in KIND_PARAMS[c.kind]:
                params[key] = value
        new = CaseDef(c.name, c.kind, c.description, c.devices, params, c.thresholds, c.line)
        problems = _config_problems(new)
        if problems:
            raise UsageError(f"case {c.name}: the options make an invalid config: {problems[0]}")
        cases.append(new)
    return Suite(suite.name, suite.description, suite.source, suite.schema_version,
                 suite.defaults, cases, {**suite.overrides, **clean})


def resolved_yaml(suite: Suite) -> str:
    """The suite as run: a valid suite file, every parameter explicit, options applied."""
    head = [f"# Resolved from {suite.source}"]
    if suite.overrides:
        head.append("# with options: " + ", ".join(f"{k}={v}" for k, v in suite.overrides.items()))
    head.append("# Every parameter is explicit; run it again with --suite <this file>.")
    body = yaml.safe_dump(suite.to_dict(meta=False), sort_keys=False, default_flow_style=None,
                          width=100)
    return "\n".join(head) + "\n" + body


def describe_params(kind: str) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) of each parameter of a kind (for docs and --help)."""
    return [(k, p.type, p.default, p.help) for k, p in KIND_PARAMS[kind].items()]
