"""`nsa parity` on tiny sizes: files, JSON round trip, thresholds and NaN."""

from __future__ import annotations

import json

import torch

from nsabench import results as resultsmod
from tests.cli.conftest import results_of, run_folder

PARITY = """\
- name: p
  kind: parity
  params:
    T: [40, 70]
    dtype: [float32, bfloat16]
  thresholds:
    max_rel_err: {float32: 1.0e-5, bfloat16: 2.0e-2}
    max_grad_rel_err: {float32: 1.0e-5, bfloat16: 3.0e-2}
    min_sel_match: 0.9
"""


def test_parity_passes_and_writes_the_run_folder(invoke, write_suite, tmp_path):
    out = tmp_path / "out"
    r = invoke("parity", "--suite", write_suite(PARITY), "--out", out, "--label", "t 1")
    assert r.exit_code == 0, r.stderr
    folder = run_folder(out)
    assert folder.name.startswith("parity-") and folder.name.endswith("-t-1")
    for f in ("suite.resolved.yaml", "env.json", "results.json", "report.md", "parity.csv",
              "checks.csv", "cases.csv"):
        assert (folder / f).is_file(), f
    data = resultsmod.validate_results(json.loads((folder / "results.json").read_text()))
    cases = data["cases"]
    assert [c["id"] for c in cases] == ["p[T=40,dtype=float32]", "p[T=70,dtype=float32]",
                                        "p[T=40,dtype=bfloat16]", "p[T=70,dtype=bfloat16]"]
    for c in cases:
        m = c["metrics"]
        assert c["status"] == "passed"
        assert m["backend"] == "reference" and m["finite"] is True
        limit = 1e-5 if c["params"]["dtype"] == "float32" else 2e-2
        assert 0 < m["rel_err"] <= limit  # never exactly zero: the float64 oracle differs
        assert 0 < m["dq_rel_err"] and m["grad_rel_err"] == max(
            m[k] for k in ("dq_rel_err", "dk_rel_err", "dv_rel_err", "dgates_rel_err"))
        assert 0.9 <= m["sel_match"] <= 1.0
        assert len(c["checks"]) == 4 and all(k["passed"] for k in c["checks"])
    # bf16 is measurably worse than float32: the comparison is real
    assert cases[2]["metrics"]["rel_err"] > 100 * cases[0]["metrics"]["rel_err"]
    assert data["summary"]["verdict"] == "PASS"
    assert data["git"]["commit"] is not None or data["git"]["reason"]  # a copy without .git
    csv = (folder / "parity.csv").read_text().splitlines()
    assert csv[0].startswith("case,status,backend,dtype,T,") and len(csv) == 5
    report = (folder / "report.md").read_text()
    assert "max_rel_err" in report
    # which kernel variants ran is part of every report (here: pointer loads, off CUDA)
    assert "Triton kernel variants on" in report and "| pointer loads |" in report


def test_json_prints_exactly_the_results_file(invoke, write_suite, tmp_path):
    out = tmp_path / "out"
    r = invoke("parity", "--suite", write_suite(PARITY), "--out", out, "--json",
               "--T", "40", "--dtype", "float32")
    assert r.exit_code == 0, r.stderr
    folder = run_folder(out)
    assert r.stdout == (folder / "results.json").read_text()
    data = json.loads(r.stdout)
    assert [c["id"] for c in data["cases"]] == ["p"]  # one value per axis: no grid
    assert data["suite"]["overrides"] == {"T": 40, "dtype": "float32"}
    assert "[1/1] p: passed" in r.stderr  # progress goes to stderr, never stdout


def test_threshold_failure_exits_1_and_names_the_check(invoke, write_suite, tmp_path):
    strict = PARITY.replace("bfloat16: 2.0e-2}", "bfloat16: 1.0e-9}")
    out = tmp_path / "out"
    r = invoke("parity", "--suite", write_suite(strict), "--out", out, "--T", "40")
    assert r.exit_code == 1
    data = results_of(out)
    status = {c["id"]: c["status"] for c in data["cases"]}
    assert status == {"p[dtype=float32]": "passed", "p[dtype=bfloat16]": "failed"}
    failed = data["cases"][1]
    assert failed["reason"].startswith("max_rel_err: measured")
    assert "needs <= 1.000e-09" in failed["reason"]
    assert data["summary"]["verdict"] == "FAIL"
    report = (run_folder(out) / "report.md").read_text()
    assert report.startswith("# nsa parity: tiny\n\n**FAIL: 1 of 8 checks failed")
    assert "| p[dtype=bfloat16] | max_rel_err |" in report and "**FAIL**" in report


def test_nan_output_fails(invoke, write_suite, tmp_path, monkeypatch):
    import nsabench.runners.parity as parity_runner

    real = parity_runner.nsa_attention

    def poisoned(*args, **kw):
        out = real(*args, **kw)
        if kw["q"].dtype == torch.float64:
            return out
        bad = out[0] * float("nan") if isinstance(out, tuple) else out * float("nan")
        return (bad, out[1]) if isinstance(out, tuple) else bad

    monkeypatch.setattr(parity_runner, "nsa_attention", poisoned)
    out = tmp_path / "out"
    r = invoke("parity", "--suite", write_suite(PARITY), "--out", out, "--T", "40",
               "--dtype", "float32")
    assert r.exit_code == 1
    (case,) = results_of(out)["cases"]
    assert case["status"] == "failed"
    assert case["metrics"]["rel_err"] == "nan" and case["metrics"]["finite"] is False
    by = {k["name"]: k for k in case["checks"]}
    assert by["outputs finite (no NaN/inf)"]["passed"] is False
    assert by["max_rel_err"]["passed"] is False
