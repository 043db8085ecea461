"""Capability (nsa.backends) and routing policy (nsa.policy) on faked devices.

Devices are faked as DeviceInfo values (RTX 4090 SM 8.9, A100 SM 8.0, H100 SM 9.0, T4 SM
7.5, CPU) and installed modules through nsa.backends.module_status, so every decision and
its printed reason is checked on a CPU-only machine.
"""

from __future__ import annotations

import pytest
import torch

import nsa.backends as backends
import nsa.ops
from nsa import NSAConfig, nsa_attention
from nsa.backends import BACKEND_SPECS, BRANCHES, DeviceInfo, Flags, Shapes
from nsa.policy import (
    ENV_VARS,
    POLICY,
    PREFERENCE,
    choose_branch,
    choose_op_backend,
    debug_enabled,
    read_flags,
    route,
    step_summary_path,
)

RTX4090 = DeviceInfo("cuda", 0, "NVIDIA GeForce RTX 4090", (8, 9), 128)
A100 = DeviceInfo("cuda", 0, "NVIDIA A100-SXM4-80GB", (8, 0), 108)
H100 = DeviceInfo("cuda", 0, "NVIDIA H100 80GB HBM3", (9, 0), 132)
T4 = DeviceInfo("cuda", 0, "Tesla T4", (7, 5), 40)
CPU = DeviceInfo("cpu", name="cpu")
PAPER = Shapes(d_k=128, d_v=128, G=16)
OFF = Flags()

SEL_RULE = "SM 8.9 (RTX 4090): Triton selection disabled unless NSA_TRITON_SEL_FORCE=1"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def installed(monkeypatch):
    """installed("triton", "flash_attn"): fake which optional modules import."""

    def fake(*names: str) -> None:
        present = set(names)
        if "triton" in present:
            present.add("nsa.ops.triton_backend")
        else:
            monkeypatch.delitem(nsa.ops.BACKENDS, "triton", raising=False)

        def status(module: str, import_it: bool = False) -> str | None:
            return None if module in present else f"module {module} not found"

        monkeypatch.setattr(backends, "module_status", status)

    return fake


def test_h100_routes_every_branch_to_triton(installed):
    installed("triton")
    r = route(H100, torch.bfloat16, PAPER, OFF)
    assert r.op.backend == "triton"
    assert {b: c.backend for b, c in r.branches.items()} == {
        "cmp": "triton", "sel": "triton", "win": "triton"}
    # flash-attn was preferred for cmp/win and passed over, with its reasons printed
    assert "flash-attn not used (not installed: module flash_attn not found" in \
        r.branches["cmp"].reason
    assert "policy" not in r.op.reason


def test_4090_selection_goes_to_reference_unless_forced(installed):
    installed("triton")
    r = route(RTX4090, "bfloat16", PAPER, OFF)
    assert r.branches["sel"].backend == "reference"
    assert SEL_RULE in r.branches["sel"].reason
    assert r.branches["cmp"].backend == "triton" and r.branches["win"].backend == "triton"
    # the op still runs on Triton, and says that policy sends selection elsewhere
    assert r.op.backend == "triton"
    assert "sel branch to the reference" in r.op.reason and SEL_RULE in r.op.reason
    lines = r.lines()
    assert any(line.startswith("sel: reference (") and SEL_RULE in line for line in lines)

    forced = route(RTX4090, "bfloat16", PAPER, Flags(triton_sel_force=True))
    assert forced.branches["sel"].backend == "triton"
    assert "policy" not in forced.op.reason


def test_force_flag_is_read_from_the_environment(installed, monkeypatch):
    installed("triton")
    assert choose_branch("sel", RTX4090, "float16", PAPER).backend == "reference"
    monkeypatch.setenv("NSA_TRITON_SEL_FORCE", "1")
    assert read_flags().triton_sel_force
    assert choose_branch("sel", RTX4090, "float16", PAPER).backend == "triton"


@pytest.mark.parametrize("device", [A100, H100])
def test_sm89_rule_does_not_touch_other_gpus(installed, device):
    installed("triton")
    assert choose_branch("sel", device, "bfloat16", PAPER, OFF).backend == "triton"


def test_a100_flash_attn_only_when_installed_and_enabled(installed):
    installed("triton", "flash_attn")
    off = route(A100, "bfloat16", PAPER, OFF)
    assert off.branches["cmp"].backend == "triton"
    assert "policy fa2-opt-in" in off.branches["cmp"].reason
    assert "NSA_USE_FA2=1" in off.branches["cmp"].reason

    on = route(A100, "bfloat16", PAPER, Flags(use_fa2=True))
    assert on.branches["cmp"].backend == "flash-attn"
    assert on.branches["win"].backend == "flash-attn"
    assert on.branches["sel"].backend == "triton"  # flash-attn implements no selection

    fp32 = route(A100, "float32", PAPER, Flags(use_fa2=True))
    assert fp32.branches["cmp"].backend == "triton"
    assert "dtype float32 not supported (supported: float16, bfloat16)" in \
        fp32.branches["cmp"].reason


def test_flash_attn_enabled_but_missing_falls_through(installed):
    installed("triton")
    r = route(A100, "bfloat16", PAPER, Flags(use_fa2=True))
    assert r.branches["win"].backend == "triton"
    assert "not installed: module flash_attn not found" in r.branches["win"].reason


def test_cpu_uses_the_reference_and_says_why(installed):
    installed("triton")
    r = route(CPU, torch.float32, PAPER, OFF)
    assert r.op.backend == "reference"
    assert {c.backend for c in r.branches.values()} == {"reference"}
    assert "TRITON_INTERPRET=1" in r.op.reason
    assert "needs a CUDA device with compute capability >= 8.0 (got cpu)" in \
        r.branches["win"].reason
    # the interpreter makes Triton usable on the CPU, except in bfloat16
    interp = route(CPU, torch.float32, PAPER, Flags(triton_interpret=True))
    assert interp.op.backend == "triton"
    assert interp.branches["sel"].backend == "triton"
    bf16 = route(CPU, torch.bfloat16, PAPER, Flags(triton_interpret=True))
    assert bf16.op.backend == "reference"
    assert "bfloat16 on CPU: the Triton interpreter computes it wrongly" in bf16.op.reason
    # ... which is a CPU matter only
    assert route(H100, torch.bfloat16, PAPER, Flags(triton_interpret=True)).op.backend == \
        "triton"


def test_triton_not_installed_is_a_reason(installed):
    installed()
    r = route(H100, "bfloat16", PAPER, OFF)
    assert r.op.backend == "reference"
    assert "not installed: module nsa.ops.triton_backend not found" in r.op.reason
    assert r.branches["sel"].backend == "reference"


@pytest.mark.parametrize("text, want", [
    ("3.6.0", (3, 6, 0)), ("3.5.0+git1a2b3c", (3, 5, 0)), ("3.4.0rc1", (3, 4, 0)),
    ("3.4", (3, 4)), ("  3.10.2 ", (3, 10, 2)), ("nightly", ()), ("", ()),
])
def test_version_tuple(text, want):
    assert backends.version_tuple(text) == want


@pytest.fixture
def triton_version(monkeypatch):
    """triton_version("3.3.1"): fake the installed Triton's version."""

    def fake(version: str | None) -> None:
        monkeypatch.setattr(backends, "module_version",
                            lambda module: version if module == "triton" else None)

    return fake


@pytest.mark.parametrize("version", ["3.3.1", "3.2.0", "3.0.0"])
def test_triton_older_than_the_kernels_need_routes_to_the_reference(installed, triton_version,
                                                                     version, monkeypatch):
    installed("triton")
    triton_version(version)
    spec = BACKEND_SPECS["triton"]
    want = (f"triton {version} is older than {backends.MIN_TRITON}, the oldest release these "
            f"kernels build with")
    why = spec.not_supported_reasons(H100, "bfloat16", PAPER, flags=OFF)
    assert len(why) == 1 and why[0].startswith(want), why
    assert f"install 'triton>={backends.MIN_TRITON}' or use backend='reference'" in why[0]
    r = route(H100, "bfloat16", PAPER, OFF)
    assert r.op.backend == "reference" and want in r.op.reason
    assert {c.backend for c in r.branches.values()} == {"reference"}
    # the kernels' module imported already (the backend registered): still refused
    monkeypatch.setitem(nsa.ops.BACKENDS, "triton", lambda *args, **kwargs: None)
    assert spec.install_reasons() == why
    # nothing is loaded for "auto"; the decode route gives the same sentence
    assert nsa.ops.load_backend("auto") is False
    from nsa.ops.decode import _triton_reasons

    assert _triton_reasons(torch.zeros(1, 4, 8), None) == why


@pytest.mark.parametrize("version", ["3.4.0", "3.5.1", "3.6.0", "4.0.0", None, "dev"])
def test_triton_from_the_oldest_supported_release_routes_to_triton(installed, triton_version,
                                                                   version):
    """None / unparsable: a source build without metadata is given the benefit of the
    doubt (its own compile errors will say more than a guess here)."""
    installed("triton")
    triton_version(version)
    assert BACKEND_SPECS["triton"].version_reasons() == []
    assert route(H100, "bfloat16", PAPER, OFF).op.backend == "triton"


def test_triton_version_is_read_from_the_installed_metadata():
    import importlib.metadata

    import triton

    backends.module_version.cache_clear()
    got = backends.module_version("triton")
    assert got == importlib.metadata.version("triton")
    assert backends.version_tuple(got)[:2] == backends.version_tuple(triton.__version__)[:2]
    assert backends.module_version("surely_not_a_module_nsa") is None


def test_old_gpu_is_below_the_required_capability(installed):
    installed("triton")
    why = BACKEND_SPECS["triton"].not_supported_reasons(T4, "float16", PAPER, flags=OFF)
    assert why == ["SM 7.5 (Tesla T4) is below the required SM 8.0"]


@pytest.mark.parametrize(
    "shapes, dtype, expected",
    [
        (Shapes(128, 128, 16), "bfloat16", []),
        (Shapes(192, 128, 16), "bfloat16", []),
        (Shapes(32, 32, 1), "float32", []),  # any power of two >= 16
        (Shapes(96, 64, 3), "float16", ["d_k=96 not supported (supported: 64, 128, 192, 256 "
                                        "or any power of two >= 16)"]),
        (Shapes(128, 256, 4), "bfloat16", ["d_v=256 must be <= d_k=128"]),
        (Shapes(64, 64, 4), "float64", ["dtype float64 not supported (supported: float16, "
                                        "bfloat16, float32)"]),
        (Shapes(64, 64, 0), "float32", ["group size G=0 below the minimum 1"]),
        (Shapes(64, 64, 128), "float32", []),
        (Shapes(64, 64, 129), "float32", ["group size G=129 above the maximum 128 (one GQA "
                                          "group must fit one program)"]),
    ],
)
def test_triton_capability_table(installed, shapes, dtype, expected):
    installed("triton")
    assert BACKEND_SPECS["triton"].not_supported_reasons(H100, dtype, shapes, flags=OFF) == \
        expected


def test_reference_runs_anything_floating():
    for dev in (CPU, T4, RTX4090):
        for dt in ("float16", "bfloat16", "float32", "float64"):
            assert BACKEND_SPECS["reference"].not_supported_reasons(
                dev, dt, Shapes(96, 200, 7), flags=OFF) == []


def test_flash_attn_declares_cmp_and_win_only(installed):
    installed("flash_attn")
    why = BACKEND_SPECS["flash-attn"].not_supported_reasons(A100, "bfloat16", PAPER,
                                                            branch="sel", flags=OFF)
    assert why == ["branch 'sel' not implemented (implements: cmp, win)"]


def test_requested_backend_falls_back_to_reference_with_reason(installed):
    installed("triton")
    c = choose_branch("sel", RTX4090, "bfloat16", PAPER, OFF, requested="triton")
    assert c.backend == "reference" and SEL_RULE in c.reason
    c = choose_branch("cmp", H100, "bfloat16", PAPER, OFF, requested="triton")
    assert c.backend == "triton" and c.reason.startswith("requested triton")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        choose_branch("cmp", H100, "bfloat16", PAPER, OFF, requested="cuDNN")


def test_choose_op_backend_on_this_cpu(installed, monkeypatch):
    q = torch.randn(1, 8, 4, 64)
    cfg = NSAConfig()
    installed("triton")
    choice = choose_op_backend(q, cfg)
    assert choice.backend == "reference" and "TRITON_INTERPRET=1" in choice.reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_op_backend(q, cfg).backend == "triton"
    # an unsupported head dim keeps the reference even under the interpreter
    assert choose_op_backend(torch.randn(1, 8, 4, 48), cfg).backend == "reference"
    # d_v and KV heads are only checked when given
    assert choose_op_backend(q, cfg, d_v=128).backend == "reference"
    installed()
    assert choose_op_backend(q, cfg).backend == "reference"


def test_auto_backend_of_the_op_equals_the_reference_on_cpu():
    g = torch.Generator().manual_seed(0)
    cfg = NSAConfig(l=16, d=8, l_sel=16, n=3, w=32)
    B, T, H, G, D = 1, 70, 1, 2, 16
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    kc = torch.randn(B, (T - 16) // 8 + 1, H, D, generator=g)
    args = dict(q=r(B, T, H * G, D), k_sel=r(B, T, H, D), v_sel=r(B, T, H, D),
                k_win=r(B, T, H, D), v_win=r(B, T, H, D), k_cmp=kc, v_cmp=kc.clone(),
                g_cmp=torch.rand(B, T, H * G, generator=g),
                g_sel=torch.rand(B, T, H * G, generator=g),
                g_win=torch.rand(B, T, H * G, generator=g), config=cfg)
    auto = nsa_attention(**args, backend="auto")
    ref = nsa_attention(**args, backend="reference")
    assert torch.equal(auto, ref)


def test_environment_readers(monkeypatch):
    assert read_flags() == Flags()
    assert not debug_enabled() and step_summary_path() is None
    monkeypatch.setenv("NSA_USE_FA2", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "true")
    monkeypatch.setenv("NSA_DEBUG", "1")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", "/tmp/summary.md")
    assert read_flags() == Flags(use_fa2=True, triton_interpret=True)
    assert debug_enabled() and step_summary_path() == "/tmp/summary.md"
    monkeypatch.setenv("NSA_USE_FA2", "0")
    assert not read_flags().use_fa2


def test_policy_tables_name_real_backends_branches_and_flags():
    for rule in POLICY:
        assert rule.backend in BACKEND_SPECS
        assert set(rule.branches) <= set(BACKEND_SPECS[rule.backend].branches)
        assert rule.lifted_by is None or rule.lifted_by in ENV_VARS
        Flags().is_on(rule.lifted_by)  # a flag Flags knows (KeyError otherwise)
    for branch, order in PREFERENCE.items():
        assert branch in BRANCHES
        assert order[-1] == "reference"
        assert all(branch in BACKEND_SPECS[name].branches for name in order)


@pytest.mark.parametrize("value,want", [("1", True), ("on", True), ("0", False), ("off", False),
                                        ("", None), ("auto", None)])
def test_kv_desc_env_reads_the_descriptor_switch(value, want, monkeypatch):
    from nsa.ops import descriptors
    from nsa.policy import kv_desc_env

    monkeypatch.setenv("NSA_KV_DESC", value)
    # (kernel modules imported now must come up interpreted, as the kernel tests expect)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kv_desc_env() is want
    k = torch.randn(1, 8, 1, 32)
    # CPU tensors: only the switch can turn descriptors on (the interpreter runs them)
    assert descriptors.resolve_desc("t", None, k, k, 32, 32) is bool(want)
    monkeypatch.setattr(descriptors, "USE_DESC", False)  # the programmatic override wins
    assert descriptors.resolve_desc("t", None, k, k, 32, 32) is False
