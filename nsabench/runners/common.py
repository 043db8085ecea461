"""Shared pieces of the runners: device/backend resolution, inputs, timing, errors."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nsa import policy
from nsa.backends import BACKEND_SPECS, Shapes, dtype_name, module_status
from nsa.config import NSAConfig
from nsa.ops.reference import compress_mean
from nsabench.env import cuda_available, cuda_unavailable_reason
from nsabench.suites import CaseSpec, config_for


class CaseSkip(Exception):
    """The case cannot run here; the message is the reason recorded in results."""


class NotForDevice(CaseSkip):
    """The suite meant the case for other device types (``devices:``); still recorded."""


# ----------------------------------------------------------------------------- resolution

def resolve_device(spec: CaseSpec) -> torch.device:
    """The torch device of a case, or CaseSkip with the reason it cannot run here."""
    want = spec.params.get("device", "auto")
    if want == "auto":
        dev = torch.device("cuda" if cuda_available() else "cpu")
    else:
        dev = torch.device(want)
        if dev.type == "cuda":
            if not cuda_available():
                raise CaseSkip(f"device {want} asked, but CUDA is not available: "
                               f"{cuda_unavailable_reason()}")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise CaseSkip(f"device {want} asked, but only {torch.cuda.device_count()} "
                               f"CUDA device(s) exist")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if spec.devices and dev.type not in spec.devices:
        raise NotForDevice(f"case is meant for {' or '.join(spec.devices)} devices; this run "
                       f"uses {dev.type}")
    return dev


def shapes_of(p: dict[str, Any]) -> Shapes:
    return Shapes(d_k=p["d_k"], d_v=p["d_v"], G=p["G"])


def resolve_backend(p: dict[str, Any], device: torch.device) -> tuple[str, str]:
    """(backend name, why) for the case's ``backend`` parameter; CaseSkip if it cannot run."""
    dtype = p["dtype"]
    shapes = shapes_of(p)
    if p["backend"] == "auto":
        choice = policy.route(device, dtype, shapes).op
        return choice.backend, choice.reason
    why = BACKEND_SPECS[p["backend"]].not_supported_reasons(device, dtype, shapes)
    if why:
        raise CaseSkip(f"backend {p['backend']} cannot run this case: " + "; ".join(why))
    return p["backend"], "requested"


def flash_attn_status(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if flash-attn can serve as a dense baseline here, else why not."""
    why = module_status("flash_attn", import_it=True)
    if why is not None:
        return why
    if device.type != "cuda":
        return "flash-attn needs a CUDA device"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs float16 or bfloat16, got {dtype_name(dtype)}"
    return None


FLA_INSTALL = "pip install --no-deps fla_core-*.whl einops-*.whl"


def fla_device_reason(device: torch.device) -> str | None:
    """None if fla-core's Triton kernels can run on ``device``, else why not."""
    if device.type != "cuda":
        return f"fla-core's parallel_nsa needs a CUDA device, this case runs on {device.type}"
    return None


def fla_parallel_nsa():
    """fla-core's ``fla.ops.nsa.parallel_nsa`` (ImportError if it is not installed)."""
    from fla.ops.nsa import parallel_nsa

    return parallel_nsa


def fla_status(device: torch.device, dtype: torch.dtype, p: dict[str, Any]) -> str | None:
    """None if fla-core's ``parallel_nsa`` can be timed against NSA in case ``p`` here,
    else every reason it cannot, joined by "; ".

    The configuration both support (fla-core 0.6): compression by mean pooling with block
    = stride = selection block (l = d = l'), the first and the 2 local blocks forced
    (n_initial = 1, n_local = 2), G = HQ / H a power of two >= 16, d_k <= 256, and
    l' >= 2 * next_power_of_two(n) (its top-k tile); CUDA, float16 or bfloat16."""
    why: list[str] = []
    try:
        if not callable(fla_parallel_nsa()):
            why.append("fla-core is installed but fla.ops.nsa.parallel_nsa is not a function")
    except ImportError as exc:
        why.append(f"fla-core is not installed ({exc}; install the wheels with "
                   f"`{FLA_INSTALL}`)")
    except Exception as exc:  # a broken install (missing einops, Triton mismatch...)
        first = str(exc).splitlines()[0] if str(exc) else ""
        why.append(f"fla-core is installed but fla.ops.nsa failed to import: "
                   f"{type(exc).__name__}: {first[:160]}")
    dev = fla_device_reason(device)
    if dev is not None:
        why.append(dev)
    if dtype not in (torch.float16, torch.bfloat16):
        why.append(f"fla-core's parallel_nsa needs float16 or bfloat16, got "
                   f"{dtype_name(dtype)}")
    G = p["G"]
    if G < 16 or G & (G - 1):
        why.append(f"fla-core's parallel_nsa needs G = HQ / H a power of two >= 16, got G={G}")
    l_sel = p["l_sel"]
    differ = [f"{k}={p[k]}" for k in ("l", "d") if p[k] != l_sel]
    if differ:
        why.append(f"fla-core pools and selects blocks of one size (l = d = l'): "
                   f"{', '.join(differ)} {'differs' if len(differ) == 1 else 'differ'} from "
                   f"l_sel={l_sel}")
    if (p["n_initial"], p["n_local"]) != (1, 2):
        why.append(f"fla-core always selects the first block and the 2 local ones: needs "
                   f"n_initial=1, n_local=2, got n_initial={p['n_initial']}, "
                   f"n_local={p['n_local']}")
    if p["d_k"] > 256:
        why.append(f"fla-core's parallel_nsa needs d_k <= 256, got d_k={p['d_k']}")
    slots = 1 << max(p["n"] - 1, 0).bit_length()  # next power of two >= n
    if l_sel < 2 * slots:
        why.append(f"fla-core's parallel_nsa needs l_sel >= 2 * next_power_of_two(n) = "
                   f"{2 * slots}, got l_sel={l_sel}, n={p['n']}")
    return "; ".join(why) if why else None


# ----------------------------------------------------------------------------- inputs

@dataclass
class Inputs:
    """Random NSA inputs in the layout of nsa_attention ([B, T, heads, dim])."""

    q: Tensor
    k_sel: Tensor
    v_sel: Tensor
    k_win: Tensor
    v_win: Tensor
    k_cmp_raw: Tensor
    v_cmp_raw: Tensor
    g_cmp: Tensor
    g_sel: Tensor
    g_win: Tensor

    NAMES = ("q", "k_sel", "v_sel", "k_win", "v_win", "k_cmp_raw", "v_cmp_raw",
             "g_cmp", "g_sel", "g_win")

    def tensors(self) -> list[Tensor]:
        return [getattr(self, n) for n in self.NAMES]

    def map(self, fn) -> Inputs:
        return Inputs(*(fn(t) for t in self.tensors()))

    def leaves(self, dtype: torch.dtype | None = None) -> Inputs:
        """Detached copies (optionally cast) that require grad."""
        return self.map(lambda t: t.detach().to(dtype or t.dtype).requires_grad_(True))

    def op_args(self, cfg: NSAConfig, gates: tuple[str, ...] = ("cmp", "sel", "win")
                ) -> dict[str, Any]:
        """Keyword arguments of nsa_attention; compressed K/V via compress_mean (phi=mean)."""
        return {
            "q": self.q, "k_sel": self.k_sel, "v_sel": self.v_sel,
            "k_win": self.k_win, "v_win": self.v_win,
            "k_cmp": compress_mean(self.k_cmp_raw, cfg.l, cfg.d),
            "v_cmp": compress_mean(self.v_cmp_raw, cfg.l, cfg.d),
            "g_cmp": self.g_cmp if "cmp" in gates else None,
            "g_sel": self.g_sel if "sel" in gates else None,
            "g_win": self.g_win if "win" in gates else None,
            "config": cfg,
        }


def make_inputs(p: dict[str, Any], T: int, device: torch.device, dtype: torch.dtype,
                seed: int) -> Inputs:
    """Random normal q/k/v (never zeros) and gates uniform in (0.01, 0.99)."""
    B, H, G, dk, dv = p["B"], p["H"], p["G"], p["d_k"], p["d_v"]
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    def gate() -> Tensor:
        return 0.01 + 0.98 * torch.rand(B, T, H * G, generator=gen, device=device, dtype=dtype)

    return Inputs(
        q=randn(B, T, H * G, dk),
        k_sel=randn(B, T, H, dk), v_sel=randn(B, T, H, dv),
        k_win=randn(B, T, H, dk), v_win=randn(B, T, H, dv),
        k_cmp_raw=randn(B, T, H, dk), v_cmp_raw=randn(B, T, H, dv),
        g_cmp=gate(), g_sel=gate(), g_win=gate(),
    )


def case_config(p: dict[str, Any]) -> NSAConfig:
    return config_for(p).replace(n_heads=p["H"] * p["G"], n_kv_heads=p["H"], d_k=p["d_k"],
                                 d_v=p["d_v"], phi="mean", rope=False)


# ----------------------------------------------------------------------------- errors

def rel_err(x: Tensor, ref: Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (NaN if x has NaN; inf if ref is 0 and x is not)."""
    x64, r64 = x.detach().double(), ref.detach().double()
    num = torch.linalg.vector_norm(x64 - r64).item()
    den = torch.linalg.vector_norm(r64).item()
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def max_abs_err(x: Tensor, ref: Tensor) -> float:
    return (x.detach().double() - ref.detach().double()).abs().max().item()


def cat_flat(ts: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def all_finite(*ts: Tensor | None) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts if t is not None)


# ----------------------------------------------------------------------------- timing

@dataclass(frozen=True)
class Timing:
    ms: float
    n: int | None  # timed calls; None when the timer chose
    timer: str


def graph_bench(fn, device: torch.device, **tp) -> tuple[Timing | None, str | None]:
    """:func:`bench` of ``fn`` replayed from a CUDA graph: the GPU time of its work without
    the host's Python and launch cost. (timing, None), or (None, why) where it cannot be
    captured (not CUDA; a backend that synchronises with the host). Warmed up on a side
    stream first, as capture requires; the graph and its memory pool are freed after."""
    if device.type != "cuda":
        return None, "CUDA graphs need a CUDA device"
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    graph = None
    try:
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench(graph.replay, device, **tp), None
    except Exception as exc:  # recorded, not fatal: the eager timings stand
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    finally:
        del graph
        sync(device)
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, device: torch.device, warmup: int = 1, repeats: int = 5,
          budget_s: float = 2.0) -> Timing:
    """Median time of ``fn()`` in ms. GPU: after ``warmup`` calls (autotuning included),
    ``triton.testing.do_bench(..., return_mode="median")`` when Triton imports, else CUDA
    events over ``repeats`` calls; a call slower than ``budget_s`` is timed once. CPU: a
    monotonic clock over up to ``repeats`` calls within ``budget_s`` seconds (at least
    one), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        sync(device)
        # one timed call first: a function slower than the budget (a reference fallback
        # at long context) is reported from that call instead of being repeated
        t0 = time.perf_counter()
        fn()
        sync(device)
        once = time.perf_counter() - t0
        if once > budget_s:
            return Timing(once * 1e3, 1, "single call (slower than budget_s)")
        if module_status("triton") is None:
            try:
                from triton.testing import do_bench

                # do_bench picks its own number of repeats (about 100 ms of calls)
                return Timing(float(do_bench(fn, return_mode="median")), None,
                              "triton.do_bench")
            except ImportError:
                pass
        times = []
        for _ in range(max(repeats, 3)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return Timing(statistics.median(times), len(times), "torch.cuda.Event")
    samples: list[float] = []
    t_start = time.perf_counter()
    while len(samples) < repeats:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start >= budget_s:
            break
    return Timing(statistics.median(samples) * 1e3, len(samples), "time.perf_counter")


def graphed(fn, device: torch.device):
    """On CUDA: ``fn`` captured in a CUDA graph (after warm-up on a side stream, as capture
    requires) and returned as its replay; elsewhere ``fn`` itself. Decode steps are short
    enough that launch overhead is the cost a server sees without graphs; timing the
    replay measures the kernels, for NSA and the dense baseline alike."""
    if device.type != "cuda":
        return fn
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def timing_params(p: dict[str, Any]) -> dict[str, Any]:
    return {"warmup": p["warmup"], "repeats": p["repeats"], "budget_s": p["budget_s"]}


def speedup(dense_ms: float | None, nsa_ms: float | None) -> float | None:
    if not dense_ms or not nsa_ms:
        return None
    return dense_ms / nsa_ms
