"""Suite files: shipped suites valid, strict schema errors located, grids, thresholds."""

from __future__ import annotations

import math
import textwrap

import pytest

from nsabench import suites
from nsabench.errors import SuiteError, UsageError
from nsabench.runners import evaluate

REQUIRED = {"cpu-smoke", "parity", "decode", "prefill", "needle", "readiness-cpu",
            "readiness-gpu"}


def parse(text: str) -> suites.Suite:
    return suites.parse_suite(textwrap.dedent(text), "s.yaml")


def problems(text: str) -> list[str]:
    with pytest.raises(SuiteError) as exc:
        parse(text)
    return exc.value.problems


GOOD = """\
schema_version: 1
name: good
defaults:
  device: cpu
  T: 64
cases:
  - name: p
    kind: parity
    params:
      T: [64, 100]
      dtype: [float32, bf16]
    thresholds:
      max_rel_err: {float32: 1e-5, bfloat16: 2.0e-2}
  - name: e
    kind: env
"""


def test_shipped_suites_are_all_valid_and_named_after_their_file():
    shipped = suites.shipped_suites()
    assert REQUIRED <= set(shipped)
    for name, path in shipped.items():
        s = suites.load_suite(name)
        assert s.name == name == path.stem
        assert suites.expand(s), name


def test_readiness_suites_hold_the_right_kinds():
    cpu = suites.load_suite("readiness-cpu")
    assert {c.kind for c in cpu.cases} == {"env", "parity", "prefill", "decode", "needle",
                                           "train"}
    gpu = suites.load_suite("readiness-gpu")
    kinds = {c.kind for c in gpu.cases}
    assert {"needle", "train", "parity", "prefill", "decode", "env"} <= kinds
    assert not suites.NOT_IMPLEMENTED  # every kind has a runner
    for s in (cpu, gpu):
        # a needle case that must fail (the ablation) sits beside the one that must pass
        needles = [c for c in s.cases if c.kind == "needle"]
        assert {c.params.get("ablation", "none") for c in needles} == {"none",
                                                                        "random_selection"}
        assert any("max_accuracy" in c.thresholds for c in needles)
        assert all(c.thresholds for c in s.cases if c.kind == "train")


def test_repo_level_links_point_at_the_package_data():
    from pathlib import Path

    root = Path(suites.__file__).resolve().parent.parent
    for name in ("suites", "templates"):
        link = root / name
        if not link.exists():
            pytest.skip("not a source checkout")
        assert link.is_symlink() and link.resolve() == (root / "nsabench" / name).resolve()


def test_grid_expansion_and_ids():
    s = parse(GOOD)
    specs = suites.expand(s)
    par = [x for x in specs if x.kind == "parity"]
    assert [(x.params["T"], x.params["dtype"]) for x in par] == [
        (64, "float32"), (100, "float32"), (64, "bfloat16"), (100, "bfloat16")]
    assert par[1].id == "p[T=100,dtype=float32]"
    env = [x for x in specs if x.kind == "env"]
    assert [x.id for x in env] == ["e"]
    # defaults only reach kinds that have the parameter; schema defaults fill the rest
    assert "T" not in env[0].params and env[0].params["device"] == "cpu"
    assert par[0].params["d_v"] == par[0].params["d_k"] == 64
    assert par[0].params["n"] == 16  # NSAConfig's default


def test_exponent_floats_without_a_dot_are_numbers():
    s = parse(GOOD)
    assert s.cases[0].thresholds["max_rel_err"] == {"float32": 1e-5, "bfloat16": 0.02}


def test_unknown_keys_are_named_with_file_and_line():
    text = GOOD.replace("    kind: parity\n", "    kind: parity\n    repeat: 3\n")
    (p,) = problems(text)
    assert p.startswith("s.yaml:9: cases[0] (p).repeat: unknown key")
    (p,) = problems(GOOD.replace("cases:", "casez: []\ncases:"))
    assert p.startswith("s.yaml:6: casez: unknown key")
    (p,) = problems(GOOD.replace("      T: [64, 100]\n", "      T: [64, 100]\n      Q: 1\n"))
    assert p.startswith("s.yaml:11: cases[0] (p).params.Q: unknown parameter for kind parity")


def test_wrong_types_and_values_are_rejected():
    (p,) = problems(GOOD.replace("T: [64, 100]", "T: [64, abc]"))
    assert p.startswith("s.yaml:10: cases[0] (p).params.T: expected an integer, got 'abc'")
    (p,) = problems(GOOD.replace("[float32, bf16]", "[float32, int8]"))
    assert "params.dtype: unknown dtype 'int8'" in p
    (p,) = problems(GOOD.replace("  T: 64\n", "  T: 0\n"))
    assert p.startswith("s.yaml:5: defaults.T: must be >= 1, got 0")
    (p,) = problems(GOOD.replace("kind: env", "kind: bench"))
    assert "s.yaml:15: cases[1] (e).kind: must be one of env, parity, prefill, decode, " \
        "generate, needle, train, got 'bench'" in p
    (p,) = problems(GOOD.replace("float32: 1e-5", "float32: low"))
    assert "thresholds.max_rel_err: expected a number, got 'low'" in p
    (p,) = problems(GOOD.replace("max_rel_err:", "max_speedup:"))
    assert "thresholds.max_speedup: unknown threshold for kind parity" in p
    (p,) = problems(GOOD.replace("{float32: 1e-5,", "{fp8: 1e-5,"))
    assert "per-dtype threshold keys must be dtypes" in p


def test_config_rules_apply_to_every_grid_point():
    text = GOOD.replace("dtype: [float32, bf16]", "d: [16, 24]")
    (p,) = problems(text)
    assert "cases[0] (p).params" in p and "must divide l=32" in p and "d=24" in p


def test_schema_version_name_and_cases_are_required():
    ps = problems("name: x\ncases: []\n")
    assert any("schema_version: missing" in p for p in ps)
    assert any("cases: missing or empty" in p for p in ps)
    (p,) = problems(GOOD.replace("schema_version: 1", "schema_version: 2"))
    assert "unsupported version 2" in p


def test_duplicates_and_yaml_errors_are_located():
    (p,) = problems(GOOD.replace("  - name: e\n", "  - name: p\n"))
    assert "duplicate case name 'p'" in p
    (p,) = problems(GOOD.replace("  device: cpu\n", "  device: cpu\n  device: cuda\n"))
    assert p.startswith("s.yaml:5: device: duplicate key (first at line 4)")
    (p,) = problems("schema_version: 1\ncases: [\n")
    assert p.startswith("s.yaml:3: invalid YAML")


def test_all_problems_are_reported_at_once():
    text = GOOD.replace("kind: env", "kind: env\n    params: {T: 3}").replace(
        "T: [64, 100]", "T: [64, -1]")
    ps = problems(text)
    assert len(ps) == 2
    assert any("params.T: unknown parameter for kind env" in p for p in ps)


def test_needle_and_train_are_accepted_by_the_schema():
    s = parse("""\
        schema_version: 1
        name: pending
        cases:
          - name: n
            kind: needle
            params: {T: [1024, 4096], depths: [0.0, 0.5, 1.0]}
            thresholds: {min_accuracy: 1.0}
          - name: t
            kind: train
            params: {steps: 10}
            thresholds: {max_loss_ratio: 1.1}
        """)
    specs = suites.expand(s)
    assert [x.id for x in specs] == ["n[T=1024]", "n[T=4096]", "t"]
    assert specs[0].params["depths"] == [0.0, 0.5, 1.0]  # a list parameter, not a grid


def test_overrides_replace_values_where_the_kind_has_them():
    s = suites.apply_overrides(parse(GOOD), {"T": [32, 48, 64], "B": 2, "dtype": None})
    par = [x for x in suites.expand(s) if x.kind == "parity"]
    assert sorted({x.params["T"] for x in par}) == [32, 48, 64]
    assert {x.params["B"] for x in par} == {2}
    assert len(par) == 6  # dtype from the suite still expands
    assert s.overrides == {"T": [32, 48, 64], "B": 2}
    with pytest.raises(UsageError, match="--T: must be >= 1"):
        suites.apply_overrides(parse(GOOD), {"T": [0]})
    with pytest.raises(UsageError, match="invalid config"):
        suites.apply_overrides(parse(GOOD), {"l_sel": 40})


def test_resolved_yaml_is_a_suite_that_gives_the_same_cases():
    s = suites.apply_overrides(parse(GOOD), {"B": [1, 2]})
    text = suites.resolved_yaml(s)
    assert text.startswith("# Resolved from s.yaml\n# with options: B=[1, 2]")
    again = suites.parse_suite(text, "resolved.yaml")
    assert [(x.id, x.params) for x in suites.expand(again)] == \
        [(x.id, x.params) for x in suites.expand(s)]
    assert again.cases[0].thresholds == s.cases[0].thresholds


def _spec(thresholds, dtype="float32"):
    s = parse(GOOD)
    spec = suites.expand(s)[0]
    return suites.CaseSpec(spec.id, spec.case, spec.kind, "", None,
                           {**spec.params, "dtype": dtype}, thresholds)


def test_thresholds_resolve_per_dtype_and_nan_never_passes():
    thr = {"max_rel_err": {"float32": 1e-5, "bfloat16": 2e-2}, "min_sel_match": 0.9}
    checks = evaluate(_spec(thr, "bfloat16"), {"rel_err": 1e-2, "sel_match": 0.95,
                                               "finite": True})
    by = {c["name"]: c for c in checks}
    assert by["max_rel_err"]["threshold"] == 2e-2 and by["max_rel_err"]["passed"] is True
    assert by["min_sel_match"]["passed"] is True
    assert by["outputs finite (no NaN/inf)"]["passed"] is True

    checks = evaluate(_spec(thr), {"rel_err": 1e-2, "sel_match": math.nan, "finite": False})
    by = {c["name"]: c for c in checks}
    assert by["max_rel_err"]["passed"] is False  # float32 threshold 1e-5
    assert by["min_sel_match"]["passed"] is False and by["min_sel_match"]["value"] == "nan"
    assert by["outputs finite (no NaN/inf)"]["passed"] is False

    checks = evaluate(_spec(thr, "float16"), {"rel_err": 1e-3, "sel_match": 1.0})
    by = {c["name"]: c for c in checks}
    assert by["max_rel_err"]["passed"] is None and "no threshold for dtype float16" in \
        by["max_rel_err"]["note"]
    checks = evaluate(_spec({"max_grad_rel_err": 1e-3}), {})
    assert checks[0]["passed"] is False and checks[0]["note"] == "not measured"
