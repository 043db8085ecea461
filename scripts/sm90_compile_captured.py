"""Compile for sm_90, without a GPU, every Triton kernel launch a small CPU run makes.

Step 1 runs a scenario on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1)
and records each launch: the kernel (module and name), every argument's type and
alignment, the constexpr values and the launch options. Step 2, in a fresh process without
the interpreter, compiles each distinct launch for sm_90 (``triton.compile``, the CUDA
backend's own ptxas) and prints its resources, or the compiler's error. That checks the
code paths a scenario takes (decode's programmatic dependent launch included, with
``--set PDL=1``) against the installed Triton release without a GPU; the tile sizes are the
ones the launchers pick under the interpreter, not on a GPU (the --compile-only modes of
``gpu_check_forward.py`` / ``gpu_check_backward.py`` compile the GPU configurations of
the prefill kernels).

    python scripts/sm90_compile_captured.py decode --set PDL=1
    python scripts/sm90_compile_captured.py prefill
    python scripts/sm90_compile_captured.py prefill-d192 --python /path/to/other/venv/python

``prefill-d192`` runs the paper's d_k = 192 (two head-dim tiles, 128 + 64) forward and
backward on both selected paths. ``--python``: compile (step 2) with another interpreter,
e.g. a venv with an older Triton, after capturing with this one (whose Triton interpreter
runs every kernel of the scenario).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

_TORCH_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64",
                "int32": "i32", "int64": "i64", "int16": "i16", "int8": "i8", "uint8": "u8",
                "bool": "i1"}


def _describe(name, value, no_spec):
    """(kind, payload) of one launch argument, the way Triton's binder specialises it."""
    import torch

    if value is None:
        return "const", None
    if isinstance(value, torch.Tensor):
        ty = "*" + _TORCH_TYPES[str(value.dtype).removeprefix("torch.")]
        return "arg", {"type": ty, "div16": value.data_ptr() % 16 == 0}
    if isinstance(value, bool):
        return "arg", {"type": "i1", "div16": False}
    if isinstance(value, int):
        if value == 1 and name not in no_spec:
            return "const", 1
        ty = "i32" if -2**31 <= value < 2**31 else "i64"
        return "arg", {"type": ty, "div16": value % 16 == 0 and name not in no_spec}
    if isinstance(value, float):
        return "arg", {"type": "fp32", "div16": False}
    if hasattr(value, "block_shape") and hasattr(value, "base"):
        from triton.runtime.jit import mangle_type

        return "arg", {"type": mangle_type(value), "div16": False}
    return "const", value


def capture(scenario: str) -> list[dict]:
    """Run ``scenario`` on the CPU interpreter; return its distinct launches."""
    os.environ["TRITON_INTERPRET"] = "1"
    import inspect

    from triton.runtime.interpreter import InterpretedFunction

    launches: dict[str, dict] = {}
    original = InterpretedFunction.__getitem__  # kernel[grid](...) in Triton 3.4 to 3.6

    def record(self, args, kwargs):
        sig = inspect.signature(self.fn)
        jit_kwargs = getattr(self, "kwargs", None) or {}
        no_spec = set(jit_kwargs.get("do_not_specialize") or ())
        no_spec |= {self.arg_names[i] for i in no_spec if isinstance(i, int)}
        rec = {"module": self.fn.__module__, "name": self.fn.__name__, "args": {},
               "consts": {}, "options": {}}
        constexpr = {n for n, p in sig.parameters.items() if "constexpr" in str(p.annotation)}
        given = dict(zip(self.arg_names, args, strict=False))
        given.update((n, v) for n, v in kwargs.items() if n in self.arg_names)
        for name, value in given.items():
            if name in constexpr:
                rec["consts"][name] = value
            else:
                kind, payload = _describe(name, value, no_spec)
                rec["args" if kind == "arg" else "consts"][name] = payload
        for name in ("num_warps", "num_stages"):
            if name in kwargs:
                rec["options"][name] = kwargs[name]
        for name, p in sig.parameters.items():
            if name not in rec["args"] and name not in rec["consts"]:
                rec["consts"][name] = p.default
        launches.setdefault(json.dumps(rec, sort_keys=True, default=str), rec)

    def getitem(self, grid):
        launch = original(self, grid)

        def call(*args, **kwargs):
            record(self, args, kwargs)
            return launch(*args, **kwargs)

        return call

    InterpretedFunction.__getitem__ = getitem
    try:
        SCENARIOS[scenario]()
    finally:
        InterpretedFunction.__getitem__ = original
    return list(launches.values())


def _scenario_decode() -> None:
    """NSAAttention on the triton backend: a ragged prefill, then decode steps (the fused
    append kernel and the four decode kernels), two of them with a compressed token due."""
    import torch

    from nsa import NSAConfig
    from nsa.module import NSAAttention

    torch.manual_seed(0)
    cfg = NSAConfig(l=32, d=16, l_sel=64, n=4, n_initial=1, n_local=2, w=64,
                    hidden_size=64, n_heads=8, n_kv_heads=2, d_k=32, d_v=32)
    m = NSAAttention(cfg, backend="triton")
    lens = torch.tensor([300, 333])
    x = torch.randn(2, 340, cfg.hidden_size)
    cache = m.new_cache(2, max_len=400)
    with torch.no_grad():
        m.prefill(x[:, :333], cache, lengths=lens)
        for i in range(4):
            m.decode(torch.stack([x[b, int(lens[b]) + i] for b in range(2)])[:, None], cache)


def _scenario_prefill() -> None:
    import torch

    from nsa import NSAConfig, compress_mean, nsa_attention

    torch.manual_seed(0)
    cfg = NSAConfig(l=32, d=16, l_sel=64, n=4, n_initial=1, n_local=2, w=64)
    B, T, H, G, D = 1, 300, 2, 4, 32
    q = torch.randn(B, T, H * G, D, requires_grad=True)
    k, v = torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    kc, vc = compress_mean(k, cfg.l, cfg.d), compress_mean(v, cfg.l, cfg.d)
    g = torch.rand(B, T, H * G)
    out = nsa_attention(q, k, v, k, v, kc, vc, g, g, g, config=cfg, backend="triton")
    out.square().sum().backward()


def _scenario_prefill_d192() -> None:
    """Forward and backward at d_k = 192 (head_dim_split: 128 + 64 columns), d_v = 32, on
    the group-centric and the block-centric selected paths."""
    import torch

    import nsa.ops.selection.launch as SL
    from nsa import NSAConfig, compress_mean, nsa_attention

    torch.manual_seed(0)
    cfg = NSAConfig(l=32, d=16, l_sel=64, n=3, n_initial=1, n_local=1, w=40)
    B, T, H, G, DK, DV = 1, 150, 1, 2, 192, 32
    k, v = torch.randn(B, T, H, DK), torch.randn(B, T, H, DV)
    kc, vc = compress_mean(k, cfg.l, cfg.d), compress_mean(v, cfg.l, cfg.d)
    g = torch.rand(B, T, H * G)
    for mode in ("group", "block"):
        SL.SEL_MODE = mode
        try:
            q = torch.randn(B, T, H * G, DK, requires_grad=True)
            out = nsa_attention(q, k, v, k, v, kc, vc, g, g, g, config=cfg, backend="triton")
            out.square().sum().backward()
        finally:
            SL.SEL_MODE = None


SCENARIOS = {"decode": _scenario_decode, "prefill": _scenario_prefill,
             "prefill-d192": _scenario_prefill_d192}


def compile_all(launches: list[dict], overrides: dict) -> int:
    """Compile each launch for sm_90; return the number that failed."""
    import importlib

    import triton
    from script_modules import resource_usage
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failed = 0
    for rec in launches:
        fn = getattr(importlib.import_module(rec["module"]), rec["name"])
        consts = dict(rec["consts"])
        for name, value in overrides.items():
            if name in consts:
                consts[name] = value
        sig = {n: "constexpr" if n in consts else rec["args"][n]["type"] for n in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if n in rec["args"] and rec["args"][n]["div16"]}
        opts = {"num_warps": rec["options"].get("num_warps", 4),
                "num_stages": rec["options"].get("num_stages", 3)}
        shown = ", ".join(f"{k}={v}" for k, v in sorted(consts.items())
                          if k.isupper() and v is not None)
        label = f"{rec['name']} ({shown[:150]})"
        try:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                               target=GPUTarget("cuda", 90, 32), options=opts)
        except Exception as exc:  # noqa: BLE001 - report every kernel, then fail
            failed += 1
            # a compile error's first lines name the place; its last line says what is wrong
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            root = exc
            while root.__cause__ is not None:  # nested jit helpers: the innermost error
                root = root.__cause__
            root_lines = [ln for ln in str(root).splitlines() if ln.strip()]
            why = f"{type(root).__name__}: " + " | ".join(root_lines[:1] + root_lines[-1:])
            print(f"FAIL {label}: {type(exc).__name__} ({lines[0] if lines else ''}): "
                  f"{why[:400]}")
            continue
        _, regs = resource_usage(k)
        print(f"ok   {label}: w{opts['num_warps']} {regs} smem={k.metadata.shared // 1024}KB")
    return failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--set", action="append", default=[], metavar="NAME=INT",
                    help="override a constexpr in every kernel that has it (e.g. PDL=1)")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter that compiles the captured launches (default: this one)")
    ap.add_argument("--launches", help=argparse.SUPPRESS)  # internal: step 2's input
    a = ap.parse_args()
    overrides = {}
    for item in a.set:
        name, _, value = item.partition("=")
        if not name or not value.lstrip("-").isdigit():
            ap.error(f"--set expects NAME=INT, got {item!r}")
        overrides[name] = int(value)
    if a.launches:
        import triton

        print(f"compiling with Triton {triton.__version__}", flush=True)
        with open(a.launches) as f:
            sys.exit(1 if compile_all(json.load(f), overrides) else 0)
    launches = capture(a.scenario)
    import triton

    print(f"Triton {triton.__version__}: {len(launches)} distinct launches in the "
          f"{a.scenario} scenario; compiling each for sm_90", flush=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(launches, f, default=str)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [a.python, os.path.abspath(__file__), a.scenario, "--launches", f.name]
    cmd += [x for item in a.set for x in ("--set", item)]
    rc = subprocess.run(cmd, env=env).returncode
    os.unlink(f.name)
    sys.exit(rc)


if __name__ == "__main__":
    main()
