"""`nsa needle`: the mechanism needle retrieves through NSA attention, dense is the control,
and the test can fail (ablations and a broken scoring function score low)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from tests.cli.conftest import results_of, run_folder

PNG = b"\x89PNG\r\n\x1a\n"

# 16-token blocks: T=512 holds 32 selection blocks; n=6 leaves 3 free slots after the
# forced initial and two local blocks
NEEDLE = """\
- name: nd
  kind: needle
  params:
    T: [256, 512]
    n: 6
    depths: [0.0, 0.25, 0.5, 0.75, 1.0]
    trials: 2
    B: 5
    distractors: 6
    codes: 16
  thresholds:
    min_accuracy: 1.0
    min_recall: 1.0
    min_dense_accuracy: 1.0
"""


def _case(ablation: str, T: int = 512, thresholds: str = "") -> str:
    return f"""\
- name: broken
  kind: needle
  params:
    T: {T}
    n: 6
    depths: [0.25, 0.4, 0.5, 0.6, 0.75]
    trials: 2
    B: 5
    distractors: 6
    codes: 16
    ablation: {ablation}
{thresholds}"""


def test_needle_retrieves_through_nsa_and_dense(invoke, write_suite, tmp_path):
    out = tmp_path / "out"
    r = invoke("needle", "--suite", write_suite(NEEDLE), "--out", out)
    assert r.exit_code == 0, r.stderr + r.stdout
    folder = run_folder(out)
    data = results_of(out)
    assert [c["id"] for c in data["cases"]] == ["nd[T=256]", "nd[T=512]"]
    for c in data["cases"]:
        m = c["metrics"]
        assert c["status"] == "passed", c["reason"]
        assert m["accuracy"] == m["dense_accuracy"] == m["recall"] == 1.0
        assert m["chance"] == 1 / 16 and m["haystacks"] == 2 * 1 * 5
        assert [d["depth"] for d in m["per_depth"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
        # depth 0 is the first block, depth 1 the last full one
        nb = c["params"]["T"] // 16
        assert [d["block"] for d in m["per_depth"]][::4] == [0, nb - 1]
        assert {k["name"] for k in c["checks"]} >= {"min_accuracy", "min_recall",
                                                     "min_dense_accuracy"}
    assert data["cases"][1]["metrics"]["selected_fraction"] == 6 / 32
    assert (folder / "needle_heatmap.png").read_bytes()[:8] == PNG
    rows = list(csv.DictReader((folder / "needle_depths.csv").open()))
    assert len(rows) == 10 and {r["NSA accuracy"] for r in rows} == {"1.0"}
    report = (folder / "report.md").read_text()
    assert "## Needle: retrieval through NSA attention" in report
    assert "![needle heat map](needle_heatmap.png)" in report
    assert "never planted in the scores" in report
    assert "| 50% | 1.00 / 1.00 / 1.00 | 1.00 / 1.00 / 1.00 |" in report

    # results.json round trip: the report renders the same files from it alone
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".md", ".csv")}
    for name in before:
        (folder / name).unlink()
    (folder / "needle_heatmap.png").unlink()
    r2 = invoke("report", folder)
    assert r2.exit_code == 0, r2.stderr
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".md", ".csv")}
    assert after == before
    assert (folder / "needle_heatmap.png").read_bytes()[:8] == PNG


def test_random_selection_fails_and_the_run_exits_1(invoke, write_suite, tmp_path):
    out = tmp_path / "out"
    suite = write_suite(_case("random_selection", thresholds="  thresholds:\n"
                                                             "    min_accuracy: 1.0\n"))
    r = invoke("needle", "--suite", suite, "--out", out)
    assert r.exit_code == 1
    (c,) = results_of(out)["cases"]
    m = c["metrics"]
    assert c["status"] == "failed" and "min_accuracy: measured" in c["reason"]
    # 3 random slots among 29 candidate blocks: the needle is rarely there; dense still finds it
    assert m["accuracy"] <= 0.4 and m["recall"] <= 0.4
    assert m["dense_accuracy"] == 1.0


def test_unaligned_needle_is_found_by_neither(invoke, write_suite, tmp_path):
    out = tmp_path / "out"
    r = invoke("needle", "--suite", write_suite(_case("unaligned", T=256)), "--out", out)
    assert r.exit_code == 0  # no threshold declared: measured and recorded
    (c,) = results_of(out)["cases"]
    assert c["metrics"]["accuracy"] <= 0.1 and c["metrics"]["dense_accuracy"] <= 0.1


def test_a_broken_block_score_is_caught(invoke, write_suite, tmp_path, monkeypatch):
    """Eq. 9 replaced by zeros inside the library: selection falls back to the lowest
    block indices, and the needle test sees it (it does not trust the scores)."""
    import nsa.ops.reference as ref

    monkeypatch.setattr(ref, "block_scores",
                        lambda p_cmp, nb, l, d, ls: p_cmp.new_zeros(*p_cmp.shape[:-1], nb))
    out = tmp_path / "out"
    suite = write_suite(_case("none", thresholds="  thresholds:\n    min_accuracy: 1.0\n"))
    r = invoke("needle", "--suite", suite, "--out", out)
    assert r.exit_code == 1
    (c,) = results_of(out)["cases"]
    assert c["metrics"]["accuracy"] == 0.0 and c["metrics"]["recall"] == 0.0
    assert c["metrics"]["dense_accuracy"] == 1.0


def test_random_selection_cannot_fail_when_every_block_is_selected(invoke, write_suite,
                                                                   tmp_path):
    out = tmp_path / "out"
    r = invoke("needle", "--suite", write_suite(_case("random_selection", T=96)), "--out",
               out)
    (c,) = results_of(out)["cases"]
    assert r.exit_code == 3 and c["status"] == "skipped"
    assert "every block is selected" in c["reason"]


def test_options_len_depths_and_json(invoke, write_suite, tmp_path):
    out = tmp_path / "out"
    r = invoke("needle", "--suite", write_suite(NEEDLE), "--out", out, "--len", "128",
               "--depths", "3", "--trials", "1", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data == results_of(out)
    (c,) = data["cases"]
    assert c["params"]["T"] == 128 and c["params"]["depths"] == [0.0, 0.5, 1.0]
    assert data["suite"]["overrides"]["trials"] == 1


@pytest.mark.parametrize("args, text", [
    (["--depths", "1"], "--depths: a count of depths must be >= 2"),
    (["--depths", "0,1.5"], "--depths: depths are fractions in [0, 1], got 1.5"),
    (["--len", "4q"], "--len: expected a comma list of positive integers"),
    (["--ablation", "sloppy"], "--ablation: must be one of none, random_selection, unaligned"),
])
def test_bad_needle_options_exit_2(invoke, tmp_path, args, text):
    r = invoke("needle", *args, "--out", tmp_path)
    assert r.exit_code == 2 and text in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU cases of the suite")
def test_shipped_needle_suite_runs_its_cpu_cases_only(invoke, tmp_path):
    out = tmp_path / "out"
    r = invoke("needle", "--out", out, "--len", "2k", "--depths", "0.3,0.5,0.7", "--trials",
               "2")
    data = results_of(out)
    by = {c["id"]: c for c in data["cases"]}
    assert r.exit_code == 0, r.stderr
    assert by["needle-cpu"]["status"] == "passed"
    assert by["needle-cpu-ablation"]["status"] == "passed"  # it failed to retrieve, as it must
    assert by["needle-cpu-ablation"]["metrics"]["accuracy"] <= 0.6
    assert by["needle-gpu"]["applicable"] is False
