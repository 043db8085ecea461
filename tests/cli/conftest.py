"""Fixtures of the CLI tests: a Typer CliRunner, a clean environment, tiny suites.

Every test here runs on the CPU with the reference backend and tiny sizes.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nsabench.cli.main import app

# Tiny block structure shared by the test suites (fast on a busy 2-core machine).
TINY = """\
defaults:
  device: cpu
  backend: reference
  threads: 1
  H: 1
  G: 2
  d_k: 16
  l: 16
  d: 8
  l_sel: 16
  n: 3
  w: 32
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Routing and output must not depend on the caller's shell (other test modules set
    TRITON_INTERPRET=1 process-wide, which would route "auto" to interpreted Triton)."""
    for name in ("TRITON_INTERPRET", "NSA_DEBUG", "GITHUB_STEP_SUMMARY",
                 "NSA_TRITON_SEL_FORCE", "NSA_USE_FA2"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def invoke(runner):
    def run(*args: str, **kw):
        return runner.invoke(app, [str(a) for a in args], **kw)

    return run


@pytest.fixture
def write_suite(tmp_path):
    """write_suite(cases_yaml, name=..., defaults=TINY) -> path of a suite file."""

    def write(cases: str, name: str = "tiny", defaults: str = TINY) -> Path:
        text = f"schema_version: 1\nname: {name}\n{defaults}cases:\n" + textwrap.indent(
            textwrap.dedent(cases).strip("\n"), "  ") + "\n"
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        return path

    return write


def run_folder(out: Path) -> Path:
    """The single run folder an invocation wrote under out."""
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def results_of(out: Path) -> dict:
    return json.loads((run_folder(out) / "results.json").read_text())
