"""results.json: the versioned record of a run, the single source of truth.

Everything else in a run folder (report.md, CSVs, plots) is rendered from it by
:mod:`nsabench.report`. Layout (schema_version 1)::

    schema_version, tool {name, version}, command, argv, label,
    started_utc, finished_utc, duration_s,
    git {commit, dirty, reason}, env {... see nsabench.env},
    suite {name, source, description, overrides, defaults, cases[...]},
    cases: [{id, case, kind, description, devices, params, status, reason,
             metrics, thresholds, checks[{name, metric, op, threshold, value, passed,
             note}], started_utc, finished_utc, duration_s}],
    summary {counts, checks, verdict, verdict_text, exit_code}

Non-finite numbers are stored as the strings "nan", "inf", "-inf" (JSON has none).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nsa
import nsabench
from nsabench.errors import EXIT_ENV, EXIT_FAILED, EXIT_OK, ResultsError

RESULTS_SCHEMA_VERSION = 1
STATUSES = ("passed", "failed", "skipped", "error")
CASE_KEYS = ("id", "case", "kind", "params", "status", "reason", "metrics", "thresholds",
             "checks", "started_utc", "finished_utc")
TOP_KEYS = ("schema_version", "tool", "command", "started_utc", "finished_utc", "git", "env",
            "suite", "cases", "summary")


def fmt(v: Any, digits: int = 4) -> str:
    """Numbers with ``digits`` significant digits; None as an em dash; others as str."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 10 ** digits or abs(v) < 1e-3):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


# ----------------------------------------------------------------------------- git, folders

def git_info() -> dict[str, Any]:
    """Commit and dirty flag of the repository holding the nsa package (if any)."""
    root = Path(nsa.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            first = (commit.stderr.strip().splitlines() or ["git rev-parse failed"])[0]
            return {"commit": None, "dirty": None, "reason": f"not a git checkout: {first[:200]}"}
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                 "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip()),
                "reason": None}
    except (OSError, subprocess.SubprocessError) as exc:
        return {"commit": None, "dirty": None, "reason": f"git unavailable: {exc}"}


def sanitize_label(label: str | None) -> str | None:
    if not label:
        return None
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.")
    return clean or None


def make_run_dir(out: Path, command: str, label: str | None = None,
                 now: datetime | None = None) -> Path:
    """A new folder out/<command>-YYYYmmdd-HHMMSS[-label]; never an existing one (a
    numeric suffix -2, -3, ... is added when the name is taken)."""
    now = now or datetime.now(timezone.utc)
    name = f"{command}-{now:%Y%m%d-%H%M%S}"
    label = sanitize_label(label)
    if label:
        name += f"-{label}"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        path = out / (name if i == 1 else f"{name}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ResultsError(f"cannot create a new run folder under {out} (too many named {name})")


# ----------------------------------------------------------------------------- summary

def summarize(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and the verdict. Cases a suite meant for other device types
    (``applicable: false``) are listed as skipped but do not make a run INCOMPLETE."""
    counts = {s: sum(c["status"] == s for c in cases) for s in STATUSES}
    checks = [k for c in cases for k in c["checks"]]
    n_pass = sum(k["passed"] is True for k in checks)
    n_fail = sum(k["passed"] is False for k in checks)
    n_none = sum(k["passed"] is None for k in checks)
    n = len(cases)
    other = sum(c["status"] == "skipped" and c.get("applicable") is False for c in cases)
    skipped_here = counts["skipped"] - other
    ran = n - counts["skipped"]
    bad = counts["failed"] + counts["error"]
    tail = f"; {other} case(s) meant for other devices skipped" if other else ""
    if bad:
        verdict = "FAIL"
        parts = []
        if counts["failed"]:
            parts.append(f"{n_fail} of {len(checks)} checks failed in {counts['failed']} case(s)")
        if counts["error"]:
            parts.append(f"{counts['error']} case(s) raised an error")
        text = "; ".join(parts) + f"; {counts['passed']} of {ran} cases that ran passed"
        if skipped_here:
            text += f"; {skipped_here} case(s) skipped"
        code = EXIT_FAILED
    elif ran == 0:
        verdict = "NOT RUN"
        text = f"all {n} cases were skipped: nothing was measured (see Skipped cases)"
        code = EXIT_ENV
        tail = ""
    elif skipped_here:
        verdict = "INCOMPLETE"
        text = (f"no check failed ({n_pass} of {len(checks)} checks passed in {ran} cases), "
                f"but {skipped_here} case(s) could not run here (see Skipped cases)")
        code = EXIT_OK
    else:
        verdict = "PASS"
        text = f"all {ran} cases ran and passed; {n_pass} of {len(checks)} checks passed"
        code = EXIT_OK
    text += tail
    if n_none:
        text += f"; {n_none} check(s) had no threshold for their dtype"
    return {
        "counts": counts,
        "skipped_other_devices": other,
        "checks": {"total": len(checks), "passed": n_pass, "failed": n_fail,
                   "no_threshold": n_none},
        "verdict": verdict,
        "verdict_text": f"{verdict}: {text}",
        "exit_code": code,
    }


def build_results(*, command: str, argv: list[str], label: str | None, suite: dict[str, Any],
                  env: dict[str, Any], cases: list[dict[str, Any]], started_utc: str,
                  finished_utc: str, duration_s: float, git: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "tool": {"name": "nsabench", "version": nsabench.__version__},
        "command": command,
        "argv": argv,
        "label": sanitize_label(label),
        "started_utc": started_utc,
        "finished_utc": finished_utc,
        "duration_s": round(duration_s, 3),
        "git": git,
        "env": env,
        "suite": suite,
        "cases": cases,
        "summary": summarize(cases),
    }


# ----------------------------------------------------------------------------- io

def validate_results(data: Any, source: str = "results.json") -> dict[str, Any]:
    """Check the shape of a results document; ResultsError names what is wrong."""
    if not isinstance(data, dict):
        raise ResultsError(f"{source}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != RESULTS_SCHEMA_VERSION:
        raise ResultsError(f"{source}: schema_version {version!r} is not supported "
                           f"(this toolkit reads {RESULTS_SCHEMA_VERSION})")
    missing = [k for k in TOP_KEYS if k not in data]
    if missing:
        raise ResultsError(f"{source}: missing key(s) {', '.join(missing)}")
    if not isinstance(data["cases"], list):
        raise ResultsError(f"{source}: cases must be a list")
    for i, case in enumerate(data["cases"]):
        if not isinstance(case, dict):
            raise ResultsError(f"{source}: cases[{i}] must be an object")
        miss = [k for k in CASE_KEYS if k not in case]
        if miss:
            raise ResultsError(f"{source}: cases[{i}] misses key(s) {', '.join(miss)}")
        if case["status"] not in STATUSES:
            raise ResultsError(f"{source}: cases[{i}].status must be one of "
                               f"{', '.join(STATUSES)}, got {case['status']!r}")
        if case["status"] == "skipped" and not case["reason"]:
            raise ResultsError(f"{source}: cases[{i}] ({case['id']}) is skipped without a reason")
    return data


def to_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def write_results(run_dir: Path, data: dict[str, Any]) -> str:
    text = to_json(data)
    (run_dir / "results.json").write_text(text)
    return text


def load_results(path: Path) -> tuple[Path, dict[str, Any]]:
    """(run folder, results) from a run folder or a results.json path."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise ResultsError(f"{path}: no results.json there (expected a run folder written by "
                           f"an nsa command)")
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{file}: cannot read JSON: {exc}") from None
    return file.parent, validate_results(data, str(file))
