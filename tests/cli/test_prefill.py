"""`nsa prefill` on tiny sizes: timings against dense in the same run, CSV and plots."""

from __future__ import annotations

import csv

import pytest

from tests.cli.conftest import results_of, run_folder

PREFILL = """\
- name: pf
  kind: prefill
  params:
    T: [48, 96]
    repeats: 2
    warmup: 0
    budget_s: 0.05
"""


def test_prefill_times_nsa_dense_and_each_branch(invoke, write_suite, tmp_path):
    out = tmp_path / "out"
    r = invoke("prefill", "--suite", write_suite(PREFILL), "--out", out)
    assert r.exit_code == 0, r.stderr
    data = results_of(out)
    assert [c["id"] for c in data["cases"]] == ["pf[T=48]", "pf[T=96]"]
    for c in data["cases"]:
        m = c["metrics"]
        assert c["status"] == "passed" and m["finite"] is True
        for key in ("nsa_fwd_ms", "dense_fwd_ms", "nsa_fwd_bwd_ms", "dense_fwd_bwd_ms",
                    "cmp_fwd_ms", "sel_fwd_ms", "win_fwd_ms"):
            assert m[key] > 0, key
        assert m["speedup_fwd"] == m["dense_fwd_ms"] / m["nsa_fwd_ms"]
        p = c["params"]
        assert m["nsa_fwd_us_per_head"] == pytest.approx(
            1e3 * m["nsa_fwd_ms"] / (p["B"] * p["H"] * p["G"]))
        assert m["speedup_fwd_bwd"] == m["dense_fwd_bwd_ms"] / m["nsa_fwd_bwd_ms"]
        assert m["timer_fwd"] == m["timer_fwd_bwd"] == "time.perf_counter"
        assert m["threads"] == 1
        assert m["flash_attn"].startswith("not used")
        # CUDA-graph timing is CUDA-only: on the CPU neither a time nor an error
        assert "nsa_fwd_graph_ms" not in m and "nsa_fwd_graph_error" not in m
    folder = run_folder(out)
    rows = list(csv.DictReader((folder / "prefill.csv").open()))
    assert [int(r["T"]) for r in rows] == [48, 96]
    assert float(rows[1]["NSA fwd ms"]) == data["cases"][1]["metrics"]["nsa_fwd_ms"]
    for png in ("prefill_latency.png", "prefill_speedup.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (folder / "report.md").read_text()
    assert "![prefill latency](prefill_latency.png)" in report
    assert "| pf[T=96] | passed | reference | float32 | 96 |" in report


def test_axis_options_override_the_suite(invoke, write_suite, tmp_path):
    out = tmp_path / "out"
    r = invoke("prefill", "--suite", write_suite(PREFILL), "--out", out, "--T", "64",
               "--G", "1,3", "--json")
    assert r.exit_code == 0, r.stderr
    data = results_of(out)
    assert [(c["params"]["T"], c["params"]["G"]) for c in data["cases"]] == [(64, 1), (64, 3)]
    assert "T=64" in (run_folder(out) / "suite.resolved.yaml").read_text().splitlines()[1]


def test_mode_option_selects_what_is_timed(invoke, write_suite, tmp_path):
    out = tmp_path / "out"
    r = invoke("prefill", "--suite", write_suite(PREFILL), "--out", out, "--T", "48",
               "--mode", "fwd+bwd", "--deterministic")
    assert r.exit_code == 0, r.stderr
    (case,) = results_of(out)["cases"]
    m = case["metrics"]
    assert case["params"]["modes"] == ["fwd_bwd"] and case["params"]["deterministic"] is True
    assert m["nsa_fwd_bwd_ms"] > 0 and m["deterministic"] is True
    assert "nsa_fwd_ms" not in m and "speedup_fwd" not in m
    assert "nsa_fwd_bwd_peak_gib" not in m  # peak memory is measured on CUDA only

    out2 = tmp_path / "out2"
    r = invoke("prefill", "--suite", write_suite(PREFILL), "--out", out2, "--T", "48",
               "--mode", "fwd")
    assert r.exit_code == 0, r.stderr
    m = results_of(out2)["cases"][0]["metrics"]
    assert m["nsa_fwd_ms"] > 0 and "nsa_fwd_bwd_ms" not in m


def test_bad_mode_is_a_usage_error_naming_the_option(invoke, write_suite, tmp_path):
    r = invoke("prefill", "--suite", write_suite(PREFILL), "--out", tmp_path / "o",
               "--mode", "fwd,backward")
    assert r.exit_code == 2
    assert "--mode" in r.stderr and "'backward'" in r.stderr and "fwd+bwd" in r.stderr
    assert not (tmp_path / "o").exists()


def test_graph_bench_needs_cuda():
    import torch

    from nsabench.runners.common import graph_bench

    t, why = graph_bench(lambda: None, torch.device("cpu"))
    assert t is None and "CUDA" in why
