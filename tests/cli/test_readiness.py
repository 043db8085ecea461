"""End to end: `nsa readiness --out DIR` with the CPU default suite, every artifact."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from nsabench import suites
from nsabench.results import validate_results
from tests.cli.conftest import run_folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU default suite is checked here")
def test_readiness_cpu_default_end_to_end(invoke, tmp_path):
    out = tmp_path / "reports"
    r = invoke("readiness", "--out", out)
    folder = run_folder(out)
    assert r.exit_code == 0, r.stderr + (folder / "report.md").read_text()
    assert folder.name.startswith("readiness-")

    data = validate_results(json.loads((folder / "results.json").read_text()))
    assert data["suite"]["name"] == "readiness-cpu" and data["command"] == "readiness"
    expected_ids = [s.id for s in suites.expand(suites.load_suite("readiness-cpu"))]
    assert [c["id"] for c in data["cases"]] == expected_ids  # no case dropped
    assert {c["status"] for c in data["cases"]} == {"passed"}
    assert data["summary"]["verdict"] == "PASS" and data["summary"]["exit_code"] == 0
    assert data["started_utc"] < data["finished_utc"]
    assert data["env"] == json.loads((folder / "env.json").read_text())

    resolved = yaml.safe_load((folder / "suite.resolved.yaml").read_text())
    assert resolved["name"] == "readiness-cpu" and len(resolved["cases"]) == 10

    expected_files = {"suite.resolved.yaml", "env.json", "results.json", "report.md",
                      "cases.csv", "checks.csv", "parity.csv", "prefill.csv", "decode.csv",
                      "backends.csv", "prefill_latency.png", "prefill_speedup.png",
                      "decode_latency.png", "decode_speedup.png", "needle.csv",
                      "needle_depths.csv", "needle_heatmap.png", "train.csv",
                      "train_curve.csv", "train_loss.png", "checkpoints"}
    assert expected_files <= {p.name for p in folder.iterdir()}

    # the report states every check's measured value, threshold and result
    report = (folder / "report.md").read_text()
    assert report.startswith("# nsa readiness: readiness-cpu\n\n**PASS: all 26 cases ran")
    rows = list(csv.DictReader((folder / "checks.csv").open()))
    n_checks = sum(len(c["checks"]) for c in data["cases"])
    assert len(rows) == n_checks == data["summary"]["checks"]["passed"]
    kinds = {c["kind"] for c in data["cases"]}
    assert kinds == {"env", "parity", "prefill", "decode", "needle", "train"}
    for c in data["cases"]:
        for k in c["checks"]:
            assert f"| {c['id']} | {k['name']} |" in report
    names = {row["check"] for row in rows}
    assert {"max_rel_err", "max_grad_rel_err", "min_sel_match", "max_read_vs_spec",
            "max_read_fraction", "backend reference usable", "min_accuracy", "max_accuracy",
            "min_recall", "max_loss_ratio", "min_loss_drop"} <= names
    # decode at 8192 with the paper's blocks: a quarter of the bytes, as counted
    d8k = next(c for c in data["cases"] if c["id"] == "decode-long[S=8192,B=1]")
    assert d8k["metrics"]["nsa_tokens"] == 511 + 1024 + 512
