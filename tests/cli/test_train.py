"""`nsa train`: NSA and dense on the same data, curves, checkpoints, passkey, and
DistributedDataParallel over 2 gloo processes giving the single-process curve."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from nsa import NSAConfig
from nsa.model import TinyLM
from tests.cli.conftest import results_of, run_folder

PNG = b"\x89PNG\r\n\x1a\n"

TINY_TRAIN = """\
- name: tr
  kind: train
  params:
    task: lm
    steps: {steps}
    T: 64
    B: 4
    lr: 3.0e-3
    lr_warmup: 2
    layers: 1
    hidden: 32
    H: 1
    G: 2
    d_k: 16
    n: 3
    w: 16
    eval_every: 4
    eval_batches: 1
    corpus_bytes: 100000
    nproc: {nproc}
{extra}"""


def _suite(write_suite, steps=12, nproc=1, extra="", name="tiny"):
    return write_suite(TINY_TRAIN.format(steps=steps, nproc=nproc, extra=extra), name=name)


def test_train_lm_curves_checkpoints_and_report(invoke, write_suite, tmp_path):
    out = tmp_path / "out"
    suite = _suite(write_suite, extra="  thresholds:\n    max_loss_ratio: 1.2\n"
                                      "    min_loss_drop: 0.3\n")
    r = invoke("train", "--suite", suite, "--out", out)
    assert r.exit_code == 0, r.stderr + r.stdout
    folder = run_folder(out)
    assert folder.name.startswith("train-")
    (c,) = results_of(out)["cases"]
    m = c["metrics"]
    assert c["status"] == "passed", c["reason"]
    for a in ("nsa", "dense"):
        # the loss goes down for both models, on the same validation windows
        assert m[f"final_val_loss_{a}"] < m[f"initial_val_loss_{a}"] - 0.3
        assert m[f"tokens_per_s_{a}"] > 0 and m[f"params_{a}"] > 0
    assert m["loss_ratio"] == m["final_val_loss_nsa"] / m["final_val_loss_dense"]
    assert m["final_loss"] == m["final_val_loss_nsa"] and m["world_size"] == 1
    assert m["corpus"]["files"] > 0 and len(m["corpus"]["sha256"]) == 64
    curve = m["curve"]
    assert len(curve) == 2 * 13
    nsa_rows = [x for x in curve if x["model"] == "nsa"]
    assert [x["step"] for x in nsa_rows] == list(range(13))
    assert [x["step"] for x in nsa_rows if x["val_loss"] is not None] == [0, 4, 8, 12]
    # same batches in the same order: the very first training loss is nearly the same
    # (same embedding init; attention differs), and both curves go down
    assert all(x["train_loss"] is None for x in curve if x["step"] == 0)

    for name in ("train.csv", "train_curve.csv", "cases.csv", "checks.csv"):
        assert (folder / name).is_file(), name
    assert (folder / "train_loss.png").read_bytes()[:8] == PNG
    rows = list(csv.DictReader((folder / "train_curve.csv").open()))
    assert len(rows) == 26 and rows[0]["model"] == "nsa" and rows[-1]["model"] == "dense"
    report = (folder / "report.md").read_text()
    assert "## Training: tiny byte-level LM" in report
    assert "![loss curves](train_loss.png)" in report
    assert "| tr | max_loss_ratio |" in report

    # checkpoints load into a fresh TinyLM and reproduce the recorded validation loss
    for a in ("nsa", "dense"):
        ck = torch.load(folder / m[f"checkpoint_{a}"])
        model = TinyLM(NSAConfig.from_dict(ck["config"]), n_layers=ck["tiny_lm"]["n_layers"],
                       attention=a, backend="reference")
        model.load_state_dict(ck["model"])
        assert ck["final_val_loss"] == m[f"final_val_loss_{a}"]

    # results.json round trip
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".md", ".csv")}
    for name in before:
        (folder / name).unlink()
    r2 = invoke("report", folder)
    assert r2.exit_code == 0, r2.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()
            if p.suffix in (".md", ".csv")} == before


def test_ddp_two_gloo_processes_give_the_single_process_curve(invoke, write_suite, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = invoke("train", "--suite", _suite(write_suite, steps=8, name="a"), "--out", one)
    r2 = invoke("train", "--suite", _suite(write_suite, steps=8, name="b"), "--out", two,
                "--nproc", "2")
    assert r1.exit_code == 0, r1.stderr
    assert r2.exit_code == 0, r2.stderr + r2.stdout
    (c1,) = results_of(one)["cases"]
    (c2,) = results_of(two)["cases"]
    assert c1["metrics"]["world_size"] == 1 and c2["metrics"]["world_size"] == 2
    assert c2["metrics"]["ddp_backend"] == "gloo" and c2["params"]["nproc"] == 2
    pairs = list(zip(c1["metrics"]["curve"], c2["metrics"]["curve"], strict=True))
    assert len(pairs) == 18
    for a, b in pairs:
        assert (a["model"], a["step"]) == (b["model"], b["step"])
        for key in ("train_loss", "val_loss"):
            if a[key] is None:
                assert b[key] is None
            else:
                assert abs(a[key] - b[key]) < 1e-4, (a, b)
    # only rank 0 wrote: one checkpoint per model in the run folder, nothing else
    folder = run_folder(two)
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == \
        ["tr-dense.pt", "tr-nsa.pt"]


def test_passkey_task_is_evaluated_at_longer_lengths(invoke, write_suite, tmp_path):
    out = tmp_path / "out"
    suite = write_suite("""\
    - name: pk
      kind: train
      params:
        task: passkey
        attention: [nsa]
        steps: 3
        T: 128
        B: 4
        layers: 1
        hidden: 32
        H: 1
        G: 2
        d_k: 16
        n: 3
        w: 16
        eval_every: 3
        eval_batches: 1
        eval_lengths: [128, 256]
        eval_depths: [0.0, 1.0]
        eval_trials: 2
      thresholds:
        min_passkey_digit_accuracy: 0.0
    """)
    r = invoke("train", "--suite", suite, "--out", out)
    assert r.exit_code == 0, r.stderr + r.stdout
    folder = run_folder(out)
    (c,) = results_of(out)["cases"]
    m = c["metrics"]
    assert [(x["T"], x["depth"]) for x in m["passkey"]] == [(128, 0.0), (128, 1.0),
                                                             (256, 0.0), (256, 1.0)]
    assert all(0 <= x["accuracy"] <= x["digit_accuracy"] <= 1 for x in m["passkey"])
    assert "passkey_generalizes_to_nsa" in m and "loss_ratio" not in m
    assert 0.0 <= m["passkey_digit_accuracy"] <= 1.0
    assert (folder / "train_passkey_heatmap.png").read_bytes()[:8] == PNG
    assert len(list(csv.DictReader((folder / "passkey.csv").open()))) == 4
    assert "Passkey, nsa (exact match" in (folder / "report.md").read_text()


def test_threshold_failure_and_bad_split_are_recorded(invoke, write_suite, tmp_path):
    out = tmp_path / "out"
    suite = _suite(write_suite, steps=2, extra="  thresholds:\n    max_final_loss: 0.5\n")
    r = invoke("train", "--suite", suite, "--out", out, "--attention", "dense", "--json")
    assert r.exit_code == 1
    (c,) = json.loads(r.stdout)["cases"]
    assert c["status"] == "failed" and c["reason"].startswith("max_final_loss: measured")
    assert c["metrics"]["final_loss"] == c["metrics"]["final_val_loss_dense"]

    out2 = tmp_path / "out2"
    r = invoke("train", "--suite", _suite(write_suite, steps=2, name="odd"), "--out", out2,
               "--nproc", "3")
    (c,) = results_of(out2)["cases"]
    assert r.exit_code == 1 and c["status"] == "error"
    assert "B=4 must split evenly over nproc=3" in c["reason"]


@pytest.mark.parametrize("args, text", [
    (["--task", "chat"], "--task: must be one of lm, passkey"),
    (["--attention", "sparse"], "must be one of nsa, dense"),
    (["--nproc", "0"], "--nproc: must be >= 1"),
    (["--depths", "1"], "--depths: a count of depths must be >= 2"),
])
def test_bad_train_options_exit_2(invoke, tmp_path, args, text):
    r = invoke("train", *args, "--out", tmp_path)
    assert r.exit_code == 2 and text in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []
