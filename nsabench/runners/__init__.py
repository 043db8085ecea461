"""Runners: one per kind of case. Each takes a CaseSpec and a device and returns metrics;
this module turns that into a case record with checks and a status, never dropping one.

Status: "passed" (ran, every check passed), "failed" (a check failed; NaN never
passes), "skipped" (could not run here; the reason says why), "error" (the runner
raised; the reason is the exception).
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from nsa import policy
from nsabench import artifacts
from nsabench.results import fmt
from nsabench.runners import decode, envcase, generate, needle, parity, prefill, train
from nsabench.runners.common import CaseSkip, NotForDevice, resolve_device
from nsabench.suites import NOT_IMPLEMENTED, CaseSpec, threshold_metric

RUNNERS: dict[str, Callable[[CaseSpec, torch.device], dict[str, Any]]] = {
    "env": envcase.run,
    "parity": parity.run,
    "prefill": prefill.run,
    "decode": decode.run,
    "generate": generate.run,
    "needle": needle.run,
    "train": train.run,
}


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def clean_number(v: Any) -> Any:
    """JSON has no NaN/inf: store them as the strings "nan", "inf", "-inf" (also inside
    the lists and mappings a metric may hold, e.g. a loss curve)."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, list):
        return [clean_number(x) for x in v]
    if isinstance(v, dict):
        return {k: clean_number(x) for k, x in v.items()}
    return v


def _is_bad(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v in ("nan",)


def evaluate(spec: CaseSpec, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The checks of a case that ran: built-in ones, then the declared thresholds."""
    checks: list[dict[str, Any]] = []

    def add(name: str, metric: str, op: str, threshold: Any, note: str | None = None) -> None:
        value = metrics.get(metric)
        if threshold is None:
            passed = None
        elif op == "==":
            passed = value == threshold
        elif _is_bad(value) or isinstance(value, str):
            passed = False
            if value is None:
                # why it is missing: the run's errors, and an optional comparator named
                # in the metric that was not used ("fla" for speedup_fwd_vs_fla)
                errors = [v for k, v in metrics.items() if k.endswith("_error")
                          and isinstance(v, str)]
                errors += [f"{k} {v}" for k, v in metrics.items()
                           if k in metric.split("_") and isinstance(v, str)
                           and v.startswith("not used")]
                note = note or "; ".join(["not measured", *errors])
            else:
                note = note or "not a number"
        elif op == "<=":
            passed = bool(float(value) <= threshold)
        else:
            passed = bool(float(value) >= threshold)
        checks.append({"name": name, "metric": metric, "op": op, "threshold": threshold,
                       "value": clean_number(value), "passed": passed, "note": note})

    if "finite" in metrics:
        add("outputs finite (no NaN/inf)", "finite", "==", True)
    if spec.kind == "env":
        for name in spec.params["require_backends"]:
            add(f"backend {name} usable", f"backend_{name}_usable", "==", True,
                metrics.get(f"backend_{name}_reasons"))
    dtype = spec.params.get("dtype")
    for key, thr in spec.thresholds.items():
        metric, op = threshold_metric(key)
        note = None
        if isinstance(thr, dict):
            if dtype in thr:
                thr = thr[dtype]
            else:
                thr, note = None, f"no threshold for dtype {dtype} (declared for " \
                                  f"{', '.join(thr)})"
        add(key, metric, op, thr, note)
    return checks


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads (0: leave torch's setting), restored afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)


def describe_check(c: dict[str, Any]) -> str:
    """"max_rel_err: measured 0.03, needs <= 0.01" (one line, for reasons and logs)."""
    if c["op"] == "==":
        want = f"must be {fmt(c['threshold'])}"
    else:
        want = f"needs {c['op']} {fmt(c['threshold'])}"
    note = f" ({c['note']})" if c.get("note") else ""
    return f"{c['name']}: measured {fmt(c['value'])}, {want}{note}"


def run_case(spec: CaseSpec) -> dict[str, Any]:
    started = utc_now()
    t0 = time.perf_counter()
    status, reason, metrics, checks, tb = "passed", None, {}, [], None
    applicable = True
    try:
        if spec.kind in NOT_IMPLEMENTED:
            raise CaseSkip(NOT_IMPLEMENTED[spec.kind])
        device = resolve_device(spec)
        with cpu_threads(spec.params.get("threads", 0) if device.type == "cpu" else 0):
            metrics = {"device": str(device), **RUNNERS[spec.kind](spec, device)}
            if device.type == "cpu":
                metrics["threads"] = torch.get_num_threads()
        checks = evaluate(spec, metrics)
        failed = [c for c in checks if c["passed"] is False]
        if failed:
            status = "failed"
            reason = "; ".join(describe_check(c) for c in failed)
    except CaseSkip as exc:
        status, reason = "skipped", str(exc)
        applicable = not isinstance(exc, NotForDevice)
    except torch.OutOfMemoryError as exc:
        status, reason = "skipped", f"out of memory on this device: {str(exc).splitlines()[0]}"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception as exc:  # recorded, never dropped; the run goes on
        status, reason = "error", f"{type(exc).__name__}: {exc}"
        tb = traceback.format_exc()
        if policy.debug_enabled():
            import sys

            print(tb, file=sys.stderr)
    record = {
        "id": spec.id,
        "case": spec.case,
        "kind": spec.kind,
        "description": spec.description,
        "devices": list(spec.devices) if spec.devices else None,
        "params": spec.params,
        "status": status,
        "reason": reason,
        "applicable": applicable,
        "metrics": {k: clean_number(v) for k, v in metrics.items()},
        "thresholds": spec.thresholds,
        "checks": checks,
        "started_utc": started,
        "finished_utc": utc_now(),
        "duration_s": round(time.perf_counter() - t0, 3),
    }
    if tb is not None:
        record["traceback"] = tb
    return record


def run_cases(specs: list[CaseSpec],
              on_done: Callable[[int, CaseSpec, dict[str, Any]], None] | None = None,
              on_start: Callable[[int, CaseSpec], None] | None = None,
              run_dir: Path | None = None,
              ) -> list[dict[str, Any]]:
    """Run every case in order; ``run_dir`` is where runners may write files beside
    results.json (train checkpoints), None for none."""
    out = []
    with artifacts.run_folder(run_dir):
        for i, spec in enumerate(specs):
            if on_start:
                on_start(i, spec)
            rec = run_case(spec)
            out.append(rec)
            if on_done:
                on_done(i, spec, rec)
    return out
