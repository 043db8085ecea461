"""Exit codes, one-line errors, NSA_DEBUG, --help, run folders, GITHUB_STEP_SUMMARY."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
import torch

from nsabench.results import make_run_dir
from tests.cli.conftest import results_of, run_folder

ENV_ONLY = """\
- name: e
  kind: env
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_exits_3(invoke, tmp_path):
    for cmd in ("parity", "decode", "prefill", "readiness"):
        r = invoke(cmd, "--device", "cuda", "--out", tmp_path)
        assert r.exit_code == 3, (cmd, r.stderr)
        assert r.stderr.startswith("nsa: error: --device cuda: CUDA is not available")
        assert len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_triton_backend_on_cpu_exits_3_with_its_reasons(invoke, tmp_path):
    r = invoke("parity", "--backend", "triton", "--out", tmp_path)
    assert r.exit_code == 3
    assert "--backend triton cannot run on cpu" in r.stderr
    assert "TRITON_INTERPRET=1" in r.stderr


@pytest.mark.parametrize("args, text", [
    (["parity", "--dtype", "int8"], "unknown dtype 'int8'"),
    (["decode", "--S", "12x"], "--S: expected a comma list of positive integers"),
    (["prefill", "--device", "tpu"], "--device: expected auto, cpu, cuda or cuda:N"),
    (["parity", "--suite", "no-such-suite"], "no such file and no shipped suite"),
    (["parity", "--backend", "fast"], "--backend: must be one of auto, reference, triton"),
])
def test_bad_usage_exits_2_with_one_line(invoke, tmp_path, args, text):
    r = invoke(*args, "--out", tmp_path)
    assert r.exit_code == 2
    assert text in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_nsa_debug_shows_the_traceback(invoke, tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DEBUG", "1")
    r = invoke("parity", "--dtype", "int8", "--out", tmp_path)
    assert r.exit_code == 2
    assert "Traceback (most recent call last)" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("nsa: error:")


@pytest.mark.parametrize("cmd", ["env", "parity", "decode", "prefill", "readiness", "report",
                                 "suite list", "suite validate"])
def test_help_has_an_example(invoke, cmd):
    r = invoke(*cmd.split(), "--help")
    assert r.exit_code == 0 and "Example" in r.stdout


def test_run_folders_are_never_overwritten(tmp_path):
    now = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    a = make_run_dir(tmp_path, "decode", "x", now)
    b = make_run_dir(tmp_path, "decode", "x", now)
    c = make_run_dir(tmp_path, "decode", None, now)
    assert (a.name, b.name, c.name) == ("decode-20250102-030405-x",
                                        "decode-20250102-030405-x-2", "decode-20250102-030405")


def test_all_cases_skipped_exits_3_and_step_summary_is_appended(invoke, write_suite, tmp_path,
                                                                monkeypatch):
    from nsabench import suites

    # a kind without a runner is recorded as skipped with the reason (none is pending now)
    monkeypatch.setitem(suites.NOT_IMPLEMENTED, "train", "not implemented yet (issue: x)")
    summary = tmp_path / "summary.md"
    summary.write_text("previous step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    suite = write_suite("""\
    - name: t
      kind: train
      params: {steps: 5}
    """)
    out = tmp_path / "out"
    r = invoke("readiness", "--suite", suite, "--out", out)
    assert r.exit_code == 3
    data = results_of(out)
    assert data["summary"]["verdict"] == "NOT RUN"
    assert data["cases"][0]["reason"] == "not implemented yet (issue: x)"
    text = summary.read_text()
    assert text.startswith("previous step\n# nsa readiness: tiny")
    assert text.rstrip("\n").endswith((run_folder(out) / "report.md").read_text().rstrip("\n"))


def test_a_runner_crash_is_recorded_and_fails_the_run(invoke, write_suite, tmp_path,
                                                      monkeypatch):
    import nsabench.runners as runners

    def boom(spec, device):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(runners.RUNNERS, "env", boom)
    out = tmp_path / "out"
    r = invoke("readiness", "--suite", write_suite(ENV_ONLY), "--out", out)
    assert r.exit_code == 1
    (case,) = results_of(out)["cases"]
    assert case["status"] == "error" and case["reason"] == "RuntimeError: kernel exploded"
    assert "kernel exploded" in case["traceback"]
