"""`nsa report DIR` re-renders from results.json alone; `nsa env`; `nsa suite`."""

from __future__ import annotations

import json

import pytest

import nsa.backends as backends
import nsabench.env as envmod
from nsa.backends import DeviceInfo
from tests.cli.conftest import run_folder

SMALL = """\
- name: e
  kind: env
- name: p
  kind: parity
  params: {T: 40, grad: false}
  thresholds: {max_rel_err: 1.0e-5}
- name: n
  kind: needle
  params: {T: 64}
  thresholds: {min_accuracy: 1.0}
- name: gpu-only
  kind: parity
  devices: [cuda]
  params: {T: 40}
"""


def test_report_rerender_equals_the_original(invoke, write_suite, tmp_path, monkeypatch):
    from nsabench import suites

    # a kind without a runner is recorded as skipped with the reason (none is pending now)
    monkeypatch.setitem(suites.NOT_IMPLEMENTED, "needle", "not implemented yet (issue: x)")
    out = tmp_path / "out"
    r = invoke("readiness", "--suite", write_suite(SMALL), "--out", out)
    folder = run_folder(out)
    data = json.loads((folder / "results.json").read_text())
    # needle made pending: recorded, skipped with the reason; the gpu-only case is skipped
    # as meant for another device and does not make the run incomplete
    by = {c["id"]: c for c in data["cases"]}
    assert by["n"]["status"] == "skipped"
    assert by["n"]["reason"] == "not implemented yet (issue: x)"
    assert by["gpu-only"]["status"] == "skipped" and by["gpu-only"]["applicable"] is False
    assert "meant for cuda devices" in by["gpu-only"]["reason"]
    assert data["summary"]["verdict"] == "INCOMPLETE" and r.exit_code == 0

    original = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".md", ".csv")}
    for name in original:
        (folder / name).unlink()
    r2 = invoke("report", folder)
    assert r2.exit_code == 0, r2.stderr
    again = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".md", ".csv")}
    assert again == original
    md = again["report.md"].decode()
    assert "| n | needle | not implemented yet (issue: x) |" in md

    r3 = invoke("report", folder, "--json")
    assert r3.stdout == (folder / "results.json").read_text()


def test_report_rejects_what_is_not_a_run_folder(invoke, tmp_path):
    r = invoke("report", tmp_path)
    assert r.exit_code == 2 and "no results.json" in r.stderr
    (tmp_path / "results.json").write_text(json.dumps({"schema_version": 99}))
    r = invoke("report", tmp_path)
    assert r.exit_code == 2 and "schema_version 99 is not supported" in r.stderr


def test_env_json_and_human_output(invoke):
    r = invoke("env", "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["versions"]["torch"] and d["python"]["version"]
    ref = next(b for b in d["backends"] if b["name"] == "reference")
    assert ref["devices"]["cpu"]["branches"]["sel"] == {"usable": True, "reasons": []}
    fa = d["optional"]["flash-attn"]
    if not fa["installed"]:
        assert "not installed" in fa["note"]
    assert d["routing"]["op"]["backend"] in ("reference", "triton")
    assert set(d["env_vars"]) >= {"NSA_TRITON_SEL_FORCE", "NSA_USE_FA2", "NSA_DEBUG"}
    kv = {row["what"]: row for row in d["kernel_variants"]["rows"]}
    assert kv["key/value tiles, prefill forward and dQ kernels"]["variant"] == "pointer loads"
    assert kv["key/value tiles, decode kernels"]["variant"] == "pointer loads"
    assert kv["selected attention, prefill forward"]["variant"] == "group-centric"
    r = invoke("env")
    assert r.exit_code == 0
    for text in ("Versions", "Backends", "Routing for", "Triton kernel variants",
                 "Environment variables read"):
        assert text in r.stdout


def test_env_explains_the_kernel_variants_of_an_sm90_gpu_and_the_override(invoke, monkeypatch):
    gpu = DeviceInfo("cuda", 0, "NVIDIA H200", (9, 0), 132)
    monkeypatch.setattr(envmod, "list_devices", lambda: [DeviceInfo("cpu", name="cpu"), gpu])
    monkeypatch.setattr(envmod, "probe_gpus", lambda: ([], {"available": False,
                                                            "reason": "faked"}))
    monkeypatch.delenv("NSA_KV_DESC", raising=False)
    monkeypatch.delenv("NSA_SEL_MODE", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rows = {r["what"]: r for r in json.loads(invoke("env", "--json").stdout)
            ["kernel_variants"]["rows"]}
    pre = rows["key/value tiles, prefill forward and dQ kernels"]
    assert pre["variant"] == "bulk tensor copies (descriptors)" and "SM 9.0" in pre["why"]
    assert rows["key/value tiles, decode kernels"]["variant"] == "pointer loads"
    assert rows["compressed block scores (Eq. 9/10)"]["variant"].startswith("tensor-core")
    assert rows["selected attention, prefill forward"]["variant"].startswith(
        "block-centric for G <= 8")
    monkeypatch.setenv("NSA_SEL_MODE", "group")
    rows = {r["what"]: r for r in json.loads(invoke("env", "--json").stdout)
            ["kernel_variants"]["rows"]}
    assert rows["selected attention, prefill forward"] == {
        "what": "selected attention, prefill forward", "variant": "group-centric",
        "why": "forced: NSA_SEL_MODE=group"}
    monkeypatch.delenv("NSA_SEL_MODE")
    monkeypatch.setenv("NSA_KV_DESC", "0")
    rows = {r["what"]: r for r in json.loads(invoke("env", "--json").stdout)
            ["kernel_variants"]["rows"]}
    pre = rows["key/value tiles, prefill forward and dQ kernels"]
    assert pre["variant"] == "pointer loads" and pre["why"] == "forced: NSA_KV_DESC=0"
    monkeypatch.setenv("NSA_KV_DESC", "1")
    r = invoke("env")
    assert "forced: NSA_KV_DESC=1" in " ".join(r.stdout.split())


def test_env_on_a_faked_rtx_4090_prints_the_selection_policy(invoke, monkeypatch):
    gpu = DeviceInfo("cuda", 0, "NVIDIA GeForce RTX 4090", (8, 9), 128)
    monkeypatch.setattr(envmod, "list_devices", lambda: [DeviceInfo("cpu", name="cpu"), gpu])
    monkeypatch.setattr(envmod, "probe_gpus", lambda: ([], {"available": False,
                                                            "reason": "faked"}))
    monkeypatch.setattr(backends, "module_status",
                        lambda m, import_it=False: None if m != "flash_attn" else
                        "module flash_attn not found")
    r = invoke("env", "--json")
    d = json.loads(r.stdout)
    assert d["routing"]["branches"]["sel"]["backend"] == "reference"
    assert d["routing"]["branches"]["win"]["backend"] == "triton"
    tri = next(b for b in d["backends"] if b["name"] == "triton")
    sel = tri["devices"]["cuda:0"]["branches"]["sel"]
    assert sel["usable"] is False and sel["reasons"] == [
        "policy sm89-triton-sel: SM 8.9 (RTX 4090): Triton selection disabled unless "
        "NSA_TRITON_SEL_FORCE=1"]
    r = invoke("env")
    assert "Triton selection disabled unless" in " ".join(r.stdout.split())
    monkeypatch.setenv("NSA_TRITON_SEL_FORCE", "1")
    d = json.loads(invoke("env", "--json").stdout)
    assert d["routing"]["branches"]["sel"]["backend"] == "triton"


def test_env_on_an_h100_with_a_too_old_triton_says_why_the_kernels_are_off(invoke,
                                                                            monkeypatch):
    gpu = DeviceInfo("cuda", 0, "NVIDIA H100 80GB HBM3", (9, 0), 132)
    monkeypatch.setattr(envmod, "list_devices", lambda: [DeviceInfo("cpu", name="cpu"), gpu])
    monkeypatch.setattr(envmod, "probe_gpus", lambda: ([], {"available": False,
                                                            "reason": "faked"}))
    monkeypatch.setattr(backends, "module_version",
                        lambda m: "3.3.1" if m == "triton" else None)
    d = json.loads(invoke("env", "--json").stdout)
    want = f"triton 3.3.1 is older than {backends.MIN_TRITON}"
    assert d["routing"]["op"]["backend"] == "reference" and want in d["routing"]["op"]["reason"]
    assert d["optional"]["triton"]["note"].startswith(want)
    tri = next(b for b in d["backends"] if b["name"] == "triton")
    assert all(not st["usable"] and st["reasons"][0].startswith(want)
               for st in tri["devices"]["cuda:0"]["branches"].values())
    assert want in " ".join(invoke("env").stdout.split())


@pytest.mark.parametrize("version, variant, why", [
    ("3.6.0", "programmatic dependent launch where", "measured faster at batch 1"),
    ("3.4.0", "plain launches", "Triton 3.4.0 cannot compile the kernels' gdc_* calls "
                                "(needs 3.5 or newer)"),
])
def test_env_says_whether_decode_uses_programmatic_dependent_launch(invoke, monkeypatch,
                                                                     version, variant, why):
    gpu = DeviceInfo("cuda", 0, "NVIDIA H100 80GB HBM3", (9, 0), 132)
    monkeypatch.setattr(envmod, "list_devices", lambda: [DeviceInfo("cpu", name="cpu"), gpu])
    monkeypatch.setattr(envmod, "probe_gpus", lambda: ([], {"available": False,
                                                            "reason": "faked"}))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backends, "module_version",
                        lambda m: version if m == "triton" else None)
    rows = {r["what"]: r for r in json.loads(invoke("env", "--json").stdout)
            ["kernel_variants"]["rows"]}
    row = rows["decode kernel launches"]
    assert row["variant"].startswith(variant) and why in row["why"], row
    a100 = DeviceInfo("cuda", 0, "NVIDIA A100-SXM4-80GB", (8, 0), 108)
    monkeypatch.setattr(envmod, "list_devices", lambda: [DeviceInfo("cpu", name="cpu"), a100])
    rows = {r["what"]: r for r in json.loads(invoke("env", "--json").stdout)
            ["kernel_variants"]["rows"]}
    assert rows["decode kernel launches"] == {
        "what": "decode kernel launches", "variant": "plain launches",
        "why": "SM 8.0: programmatic dependent launch needs SM 9.0+"}


def test_suite_list_and_validate(invoke, write_suite, tmp_path):
    r = invoke("suite", "list", "--json")
    names = {s["name"] for s in json.loads(r.stdout)}
    assert {"cpu-smoke", "parity", "decode", "prefill", "needle", "readiness-cpu",
            "readiness-gpu"} <= names
    good = write_suite(SMALL)
    r = invoke("suite", "validate", good)
    assert r.exit_code == 0 and "4 case(s), 4 grid point(s)" in r.stdout
    bad = write_suite(SMALL.replace("params: {T: 64}", "params: {T: 64, depth: 0.5}"),
                      name="bad")
    r = invoke("suite", "validate", bad)
    assert r.exit_code == 2
    assert f"{bad}:" in r.stderr and "cases[2] (n).params.depth: unknown parameter" in r.stderr
    # a measuring command rejects the same file before running anything
    r = invoke("parity", "--suite", bad, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "params.depth" in r.stderr
    assert not (tmp_path / "o").exists()
