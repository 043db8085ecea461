"""What every measuring command does: resolve the suite and options, check the request
against the machine, run the cases with progress, write the run folder, print, exit."""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nsa import policy
from nsa.backends import BACKEND_SPECS, device_info
from nsabench import env as envmod
from nsabench import report, results, suites
from nsabench.cli.options import one_or_list, parse_strs
from nsabench.errors import (
    EXIT_FAILED,
    EnvironmentUnavailable,
    NSABenchError,
    UsageError,
)
from nsabench.runners import run_cases, utc_now

STATUS_STYLE = {"passed": "green", "failed": "bold red", "skipped": "yellow",
                "error": "bold red"}


def err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def out_console() -> Console:
    return Console(highlight=False)


@contextmanager
def guard() -> Iterator[None]:
    """Known errors: one line on stderr and their exit code (NSA_DEBUG=1: traceback too)."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except NSABenchError as exc:
        if policy.debug_enabled():
            traceback.print_exc(file=sys.stderr)
        sys.stderr.write(f"nsa: error: {exc}\n")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        sys.stderr.write("nsa: interrupted\n")
        raise typer.Exit(130) from None
    except Exception as exc:
        if policy.debug_enabled():
            traceback.print_exc(file=sys.stderr)
        first = str(exc).splitlines()[0] if str(exc) else ""
        sys.stderr.write(f"nsa: internal error: {type(exc).__name__}: {first} "
                         f"(set NSA_DEBUG=1 for the traceback)\n")
        raise typer.Exit(EXIT_FAILED) from None


# ----------------------------------------------------------------------------- request checks

def target_device(device: str | None) -> torch.device:
    """The device a --device value means here; exit 3 if this machine lacks it."""
    want = (device or "auto").strip().lower()
    if want == "auto":
        return torch.device("cuda" if envmod.cuda_available() else "cpu")
    try:
        dev = torch.device(want)
    except RuntimeError:
        raise UsageError(f"--device: expected auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda":
        if not envmod.cuda_available():
            raise EnvironmentUnavailable(
                f"--device {device}: CUDA is not available here "
                f"({envmod.cuda_unavailable_reason()})")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise EnvironmentUnavailable(f"--device {device}: only {n} CUDA device(s) "
                                         f"(cuda:0..cuda:{n - 1})")
    return dev


def check_backends(backends: list[str] | None, dev: torch.device) -> None:
    """An explicitly asked backend that cannot run on this device at all: exit 3.
    (Case-specific limits such as a head dim only skip the affected cases.)"""
    flags = policy.read_flags()
    for name in backends or []:
        if name in ("auto",) or name not in BACKEND_SPECS:
            continue
        spec = BACKEND_SPECS[name]
        why = spec.install_reasons() + spec.device_reasons(device_info(dev), flags)
        if why:
            raise EnvironmentUnavailable(f"--backend {name} cannot run on {dev}: "
                                         + "; ".join(why))


# ----------------------------------------------------------------------------- progress

class Reporter:
    """A rich progress bar on a terminal; plain log lines on stderr otherwise."""

    def __init__(self, total: int, title: str):
        self.console = err_console()
        self.total = total
        self.live = self.console.is_terminal
        self.progress = None
        if self.live and total:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(),
                                     console=self.console, transient=True)
            self.task = self.progress.add_task(title, total=total)

    def __enter__(self) -> Reporter:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def start(self, i: int, spec: suites.CaseSpec) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=spec.id)

    def done(self, i: int, spec: suites.CaseSpec, rec: dict[str, Any]) -> None:
        reason = f": {rec['reason']}" if rec["reason"] else ""
        line = (f"[{i + 1}/{self.total}] {spec.id}: {rec['status']} "
                f"({rec['duration_s']:.1f} s){reason}")
        if self.progress is not None:
            style = STATUS_STYLE.get(rec["status"], "")
            self.progress.console.print(line, style=style, markup=False)
            self.progress.advance(self.task)
        else:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()


# ----------------------------------------------------------------------------- the run

def execute(
    *,
    command: str,
    suite_arg: str | None,
    default_suite: str,
    kinds: set[str] | None,
    out: Path,
    json_out: bool,
    device: str | None,
    dtype: str | None,
    backend: str | None,
    label: str | None,
    overrides: dict[str, Any] | None = None,
    argv: list[str] | None = None,
) -> int:
    """Run a suite (only cases of ``kinds``), write the run folder, print; exit code."""
    dev = target_device(device)
    backends = parse_strs(backend)
    check_backends(backends, dev)
    suite = suites.load_suite(suite_arg or default_suite)
    opts: dict[str, Any] = dict(overrides or {})
    if device is not None:
        opts["device"] = device.strip().lower()
    opts["dtype"] = one_or_list(parse_strs(dtype))
    opts["backend"] = one_or_list(backends)
    suite = suites.apply_overrides(suite, opts)
    specs = suites.expand(suite, kinds)
    if not specs:
        raise UsageError(f"suite {suite.name} ({suite.source}) has no "
                         f"{'/'.join(sorted(kinds or []))} case to run")

    started, t0 = utc_now(), time.perf_counter()
    git = results.git_info()
    env = envmod.probe()
    run_dir = results.make_run_dir(Path(out), command, label)
    suite_dict = suite.to_dict()
    suite_dict["kinds_run"] = sorted(kinds) if kinds else sorted({s.kind for s in specs})
    (run_dir / "suite.resolved.yaml").write_text(suites.resolved_yaml(suite))
    (run_dir / "env.json").write_text(results.to_json(env))

    with Reporter(len(specs), command) as rep:
        cases = run_cases(specs, on_done=rep.done, on_start=rep.start, run_dir=run_dir)

    data = results.build_results(
        command=command, argv=argv if argv is not None else ["nsa", *sys.argv[1:]],
        label=label, suite=suite_dict, env=env, cases=cases, started_utc=started,
        finished_utc=utc_now(), duration_s=time.perf_counter() - t0, git=git)
    text = results.write_results(run_dir, data)
    md = report.render_all(data, run_dir)
    summary_path = policy.step_summary_path()
    if summary_path:
        try:
            with open(summary_path, "a") as fh:
                fh.write(md + "\n")
        except OSError as exc:
            err_console().print(f"nsa: warning: cannot append to GITHUB_STEP_SUMMARY "
                                f"{summary_path}: {exc}", markup=False)

    if json_out:
        sys.stdout.write(text)
        sys.stdout.flush()
        err_console().print(f"{data['summary']['verdict_text']}\nrun folder: {run_dir}",
                            markup=False)
    else:
        print_summary(data, run_dir)
    return data["summary"]["exit_code"]


def print_summary(data: dict[str, Any], run_dir: Path) -> None:
    con = out_console()
    t = Table(title=f"nsa {data['command']}: {data['suite']['name']}", title_justify="left")
    for col in ("case", "status", "checks", "reason"):
        t.add_column(col, overflow="fold")
    for c in data["cases"]:
        ok = sum(k["passed"] is True for k in c["checks"])
        t.add_row(escape(c["id"]), f"[{STATUS_STYLE.get(c['status'], '')}]{c['status']}[/]",
                  f"{ok}/{len(c['checks'])}" if c["checks"] else "",
                  escape(c["reason"] or ""))
    con.print(t)
    style = {"PASS": "bold green", "FAIL": "bold red"}.get(data["summary"]["verdict"],
                                                           "bold yellow")
    con.print(data["summary"]["verdict_text"], style=style, markup=False)
    con.print(f"report: {run_dir / 'report.md'}", markup=False)


def measure_command(command: str, default_suite: str, kinds: set[str] | None, *,
                    suite: str | None, out: Path, json_out: bool, device: str | None,
                    dtype: str | None, backend: str | None, label: str | None,
                    overrides: dict[str, Any] | None = None) -> None:
    """Body of parity/decode/prefill/readiness: run and exit with the run's code."""
    with guard():
        code = execute(command=command, suite_arg=suite, default_suite=default_suite,
                       kinds=kinds, out=out, json_out=json_out, device=device, dtype=dtype,
                       backend=backend, label=label, overrides=overrides)
    raise typer.Exit(code)
