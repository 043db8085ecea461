"""`nsa prefill` against fla-core's parallel_nsa (``fla: true``), on the CPU.

fla-core's kernels need CUDA, so these tests check the plumbing with a fake ``fla``
package (a differentiable torch function with parallel_nsa's signature) and the CUDA
check bypassed: what is asked of fla, what is timed and recorded, how a failure of fla
and an fla that is not there read in the checks.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from nsabench import suites
from nsabench.runners import common, run_case
from tests.cli.conftest import results_of, run_folder

# the configuration fla supports, tiny: G = 16, l = d = l' = 16, n = 4 (l' >= 2 * 4)
FLA_CASE = """\
schema_version: 1
name: fla-tiny
cases:
  - name: pf
    kind: prefill
    params:
      device: cpu
      backend: reference
      threads: 1
      dtype: bfloat16
      T: 96
      H: 1
      G: 16
      d_k: 16
      l: 16
      d: 16
      l_sel: 16
      n: 4
      w: 32
      fla: true
      branches: false
      repeats: 1
      warmup: 0
      budget_s: 0.01
    thresholds:
      min_speedup_fwd_vs_fla: 1.0e-9
      min_speedup_fwd_bwd_vs_fla: 1.0e-9
"""

GOOD = {"G": 16, "l": 64, "d": 64, "l_sel": 64, "n": 16, "n_initial": 1, "n_local": 2,
        "d_k": 128}


def spec_of(text: str = FLA_CASE) -> suites.CaseSpec:
    (spec,) = suites.expand(suites.parse_suite(text, "fla-tiny.yaml"))
    return spec


def no_thresholds(text: str) -> str:
    return text[:text.index("    thresholds:")]


def fake_output(q, k, v, g_cmp, g_slc, scale):
    """[B, T, HQ, V], differentiable in every input (autograd.grad needs them all)."""
    G = q.shape[2] // k.shape[2]
    kr, vr = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    s = (q * kr).sum(-1, keepdim=True) * scale
    return vr * torch.sigmoid(s) * (g_cmp + g_slc).unsqueeze(-1)


def install_fake_fla(monkeypatch, impl=fake_output) -> list[dict]:
    """A fake fla / fla.ops / fla.ops.nsa in sys.modules; returns the list of calls."""
    calls: list[dict] = []

    def parallel_nsa(q, k, v, g_cmp=None, g_slc=None, g_swa=None, block_indices=None,
                     block_counts=16, block_size=64, window_size=0, scale=None,
                     cu_seqlens=None):
        calls.append({"shapes": (tuple(q.shape), tuple(k.shape), tuple(v.shape)),
                      "k_ptr": k.data_ptr(), "v_ptr": v.data_ptr(),
                      "g_swa": g_swa, "block_indices": block_indices,
                      "block_counts": block_counts, "block_size": block_size,
                      "window_size": window_size, "scale": scale, "cu_seqlens": cu_seqlens})
        return impl(q, k, v, g_cmp, g_slc, scale)

    fla, ops, nsa = (types.ModuleType(n) for n in ("fla", "fla.ops", "fla.ops.nsa"))
    nsa.parallel_nsa = parallel_nsa
    ops.nsa, fla.ops = nsa, ops
    for mod in (fla, ops, nsa):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return calls


@pytest.fixture
def any_device(monkeypatch):
    """fla_status: accept the CPU as if it were CUDA (the only check bypassed)."""
    monkeypatch.setattr(common, "fla_device_reason", lambda device: None)


# ----------------------------------------------------------------------------- fla_status

def test_fla_status_names_every_reason_and_the_offending_values(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)  # not importable, installed or not
    p = {**GOOD, "G": 12, "l": 32, "d": 16, "d_k": 320, "n": 40, "n_initial": 0}
    why = common.fla_status(torch.device("cpu"), torch.float32, p)
    assert why is not None
    assert "fla-core is not installed" in why and "pip install --no-deps fla_core" in why
    assert "needs a CUDA device, this case runs on cpu" in why
    assert "float16 or bfloat16, got float32" in why
    assert "power of two >= 16, got G=12" in why
    assert "l=32, d=16 differ from l_sel=64" in why
    assert "n_initial=0, n_local=2" in why
    assert "d_k <= 256, got d_k=320" in why
    assert "next_power_of_two(n) = 128, got l_sel=64, n=40" in why


@pytest.mark.parametrize("G, ok", [(8, False), (24, False), (16, True), (32, True)])
def test_fla_status_group_size(monkeypatch, any_device, G, ok):
    install_fake_fla(monkeypatch)
    why = common.fla_status(torch.device("cpu"), torch.bfloat16, {**GOOD, "G": G})
    assert (why is None) is ok
    if not ok:
        assert why == f"fla-core's parallel_nsa needs G = HQ / H a power of two >= 16, got G={G}"


def test_fla_status_block_sizes_name_only_what_differs(monkeypatch, any_device):
    install_fake_fla(monkeypatch)
    why = common.fla_status(torch.device("cpu"), torch.float16, {**GOOD, "d": 32})
    assert why == ("fla-core pools and selects blocks of one size (l = d = l'): d=32 differs "
                   "from l_sel=64")
    why = common.fla_status(torch.device("cpu"), torch.float16,
                            {**GOOD, "l": 32, "d": 32, "l_sel": 32, "n": 16})
    assert "l_sel >= 2 * next_power_of_two(n) = 32" not in (why or "")
    assert why is None  # 32 >= 2 * 16
    assert common.fla_status(torch.device("cpu"), torch.bfloat16, GOOD) is None


def test_fla_status_on_cpu_says_cuda(monkeypatch):
    install_fake_fla(monkeypatch)
    why = common.fla_status(torch.device("cpu"), torch.bfloat16, GOOD)
    assert why == "fla-core's parallel_nsa needs a CUDA device, this case runs on cpu"


# ----------------------------------------------------------------------------- the runner

def test_fla_is_timed_against_nsa_without_window(monkeypatch, any_device):
    calls = install_fake_fla(monkeypatch)
    used = []
    real = common.compress_mean

    def counting_compress_mean(x, l, d):
        used.append((x.data_ptr(), l, d))
        return real(x, l, d)

    from nsabench.runners import prefill

    monkeypatch.setattr(prefill, "compress_mean", counting_compress_mean)
    rec = run_case(spec_of())
    assert rec["status"] == "passed", rec["reason"]
    m = rec["metrics"]
    assert m["fla"] == "used" and m["fla_finite"] is True and m["finite"] is True
    for key in ("nsa_nowin_fwd_ms", "fla_fwd_ms", "speedup_fwd_vs_fla",
                "nsa_nowin_fwd_bwd_ms", "fla_fwd_bwd_ms", "speedup_fwd_bwd_vs_fla",
                "nsa_fwd_ms", "dense_fwd_ms", "nsa_fwd_bwd_ms"):
        assert m[key] > 0, key
    assert m["speedup_fwd_vs_fla"] == m["fla_fwd_ms"] / m["nsa_nowin_fwd_ms"]
    assert m["speedup_fwd_bwd_vs_fla"] == m["fla_fwd_bwd_ms"] / m["nsa_nowin_fwd_bwd_ms"]
    assert "fla_error" not in m
    # fla got the configuration NSA ran in: one k/v, no window, l' blocks, n of them
    assert calls
    for c in calls:
        assert c["window_size"] == 0 and c["g_swa"] is None and c["block_indices"] is None
        assert c["block_size"] == 16 and c["block_counts"] == 4 and c["cu_seqlens"] is None
        assert c["scale"] == pytest.approx(16 ** -0.5)
        assert c["shapes"] == ((1, 96, 16, 16), (1, 96, 1, 16), (1, 96, 1, 16))
    # NSA's no-window calls pool the very k and v fla gets, with l = d = 16
    assert (calls[0]["k_ptr"], 16, 16) in used and (calls[0]["v_ptr"], 16, 16) in used
    assert [k["name"] for k in rec["checks"] if k["passed"]] == [
        "outputs finite (no NaN/inf)", "min_speedup_fwd_vs_fla", "min_speedup_fwd_bwd_vs_fla"]


def test_fla_gets_the_same_inputs_and_gradients_flow_through_all_of_them(monkeypatch,
                                                                          any_device):
    seen = []

    def spy(q, k, v, g_cmp, g_slc, scale):
        seen.append((q.requires_grad, k.requires_grad, g_cmp.requires_grad))
        return fake_output(q, k, v, g_cmp, g_slc, scale)

    install_fake_fla(monkeypatch, spy)
    rec = run_case(spec_of(no_thresholds(FLA_CASE.replace("branches: false",
                                                          "modes: [fwd_bwd]"))))
    assert rec["status"] == "passed", rec["reason"]
    assert seen and all(s == (True, True, True) for s in seen)
    assert "fla_fwd_ms" not in rec["metrics"] and rec["metrics"]["fla_fwd_bwd_ms"] > 0


def test_an_fla_failure_is_recorded_and_nsa_numbers_stay(monkeypatch, any_device):
    def boom(*args):
        raise RuntimeError("fla kernel failed: shared memory\nsecond line of the error")

    install_fake_fla(monkeypatch, boom)
    rec = run_case(spec_of())
    m = rec["metrics"]
    assert m["fla"] == "used"
    assert m["fla_error"] == "RuntimeError: fla kernel failed: shared memory"
    for key in ("nsa_fwd_ms", "nsa_fwd_bwd_ms", "nsa_nowin_fwd_ms", "nsa_nowin_fwd_bwd_ms"):
        assert m[key] > 0, key
    assert not any(k in m for k in ("fla_fwd_ms", "fla_fwd_bwd_ms", "speedup_fwd_vs_fla"))
    # the fla thresholds read "not measured", with the error; the case fails, never passes
    assert rec["status"] == "failed"
    fla_checks = [k for k in rec["checks"] if k["name"].endswith("_vs_fla")]
    assert len(fla_checks) == 2
    for k in fla_checks:
        assert k["passed"] is False and k["value"] is None
        assert k["note"].startswith("not measured") and "fla kernel failed" in k["note"]


def test_without_fla_installed_the_thresholds_read_not_measured(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)
    rec = run_case(spec_of())
    m = rec["metrics"]
    assert m["fla"].startswith("not used: fla-core is not installed")
    assert "nsa_nowin_fwd_ms" not in m and m["nsa_fwd_ms"] > 0
    assert rec["status"] == "failed"
    for k in rec["checks"]:
        if k["name"].endswith("_vs_fla"):
            assert k["passed"] is False
            assert k["note"].startswith("not measured; fla not used: fla-core is not installed")


def test_fla_off_records_nothing_of_fla(monkeypatch):
    calls = install_fake_fla(monkeypatch)
    rec = run_case(spec_of(no_thresholds(FLA_CASE.replace("fla: true", "fla: false"))))
    assert rec["status"] == "passed", rec["reason"]
    assert not calls and rec["metrics"]["nsa_fwd_ms"] > 0
    assert not [k for k in rec["metrics"] if k == "fla" or "fla_" in k or k.endswith("_fla")]


# ----------------------------------------------------------------------------- suite, CLI

def test_the_prefill_fla_suite_is_the_configuration_fla_supports(monkeypatch, any_device):
    suite = suites.load_suite("prefill-fla")
    assert "prefill-fla" in suites.shipped_suites()
    (case,) = suite.cases
    assert case.devices == ["cuda"] and case.kind == "prefill"
    assert case.thresholds == {"min_speedup_fwd_vs_fla": 2.0,
                               "min_speedup_fwd_bwd_vs_fla": 1.0}
    specs = suites.expand(suite)
    assert [s.params["T"] for s in specs] == [8192, 16384, 32768, 65536]
    install_fake_fla(monkeypatch)
    for s in specs:
        p = s.params
        assert p["fla"] is True and p["branches"] is False
        assert p["modes"] == ["fwd", "fwd_bwd"] and p["dtype"] == "bfloat16"
        assert (p["B"], p["H"], p["G"], p["d_k"], p["l"], p["d"], p["l_sel"], p["n"]) == (
            1, 4, 16, 128, 64, 64, 64, 16)
        assert common.fla_status(torch.device("cuda"), torch.bfloat16, p) is None
    for name in ("readiness-cpu", "readiness-gpu"):
        assert not any(c.params.get("fla") for c in suites.load_suite(name).cases)


def test_fla_option_reaches_the_cases(invoke, write_suite, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)
    cases = """\
    - name: pf
      kind: prefill
      params:
        T: 48
        modes: [fwd]
        branches: false
        repeats: 1
        warmup: 0
        budget_s: 0.01
    """
    out = tmp_path / "out"
    r = invoke("prefill", "--suite", write_suite(cases), "--out", out, "--fla")
    assert r.exit_code == 0, r.stderr
    (case,) = results_of(out)["cases"]
    assert case["params"]["fla"] is True
    assert case["metrics"]["fla"].startswith("not used: fla-core is not installed")
    report = (run_folder(out) / "report.md").read_text()
    assert "| pf | not used: fla-core is not installed" in report

    out2 = tmp_path / "out2"
    on = cases.replace("branches: false", "branches: false\n        fla: true")
    r = invoke("prefill", "--suite", write_suite(on, name="fla-on"), "--out", out2, "--no-fla")
    assert r.exit_code == 0, r.stderr
    (case,) = results_of(out2)["cases"]
    assert case["params"]["fla"] is False and "fla" not in case["metrics"]


def test_fla_option_without_a_suite_runs_the_prefill_fla_suite(invoke, tmp_path):
    out = tmp_path / "out"
    r = invoke("prefill", "--fla", "--out", out, "--device", "cpu")
    data = results_of(out)
    assert data["suite"]["name"] == "prefill-fla"
    # a CUDA-only suite on the CPU: recorded as meant for other devices, nothing measured
    assert {c["case"] for c in data["cases"]} == {"prefill-fla"}
    assert all(c["status"] == "skipped" and c["applicable"] is False for c in data["cases"])
    assert r.exit_code == 3
