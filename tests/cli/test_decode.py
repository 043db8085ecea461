"""`nsa decode`: NSA decode step vs dense decode; tokens read counted by the op."""

from __future__ import annotations

import sys

from tests.cli.conftest import results_of, run_folder

DECODE = """\
- name: dc
  kind: decode
  params:
    S: [20, 300]
    B: [1, 2]
    repeats: 2
    warmup: 0
    budget_s: 0.05
  thresholds:
    max_read_vs_spec: 1.0
    max_rel_err: 1.0e-5
"""


def test_decode_reads_and_bytes(invoke, write_suite, tmp_path):
    out = tmp_path / "out"
    r = invoke("decode", "--suite", write_suite(DECODE), "--out", out)
    assert r.exit_code == 0, r.stderr
    data = results_of(out)
    by = {c["id"]: c for c in data["cases"]}
    assert set(by) == {"dc[S=20,B=1]", "dc[S=300,B=1]", "dc[S=20,B=2]", "dc[S=300,B=2]"}
    for c in by.values():
        m = c["metrics"]
        assert c["status"] == "passed", c["reason"]
        assert m["nsa_ms"] > 0 and m["dense_ms"] > 0
        assert m["speedup"] == m["dense_ms"] / m["nsa_ms"]
        assert 0 < m["rel_err"] <= 1e-5 and m["sel_match"] == 1.0
        assert m["nsa_tokens"] == m["cmp_tokens"] + m["sel_tokens"] + m["win_tokens"]
        S, H, dk = c["params"]["S"], c["params"]["H"], c["params"]["d_k"]
        assert m["dense_tokens"] == S and m["dense_bytes"] == S * H * (dk + dk) * 4
        assert m["nsa_bytes"] == m["nsa_tokens"] * H * (dk + dk) * 4
    # at S=300 (t=299) with l=16, d=8, l'=16, n=3, w=32, the op read:
    # cmp (300-16)//8+1 = 36; sel 2 full blocks + 12 tokens of block 18 = 44; win 32
    m = by["dc[S=300,B=2]"]["metrics"]
    assert (m["cmp_tokens"], m["sel_tokens"], m["win_tokens"]) == (36, 44, 32)
    assert m["read_fraction"] == 112 / 300
    # S=20: one compressed token, every token in the selected blocks, window 20
    m = by["dc[S=20,B=1]"]["metrics"]
    assert (m["cmp_tokens"], m["sel_tokens"], m["win_tokens"]) == (1, 20, 20)
    folder = run_folder(out)
    assert (folder / "decode.csv").is_file() and (folder / "decode_speedup.png").is_file()
    assert "`cache.last_reads`" in (folder / "report.md").read_text()


def test_decode_without_the_decode_api_is_skipped_with_the_import_error(
        invoke, write_suite, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nsa.cache", None)  # import nsa.cache -> ImportError
    out = tmp_path / "out"
    r = invoke("decode", "--suite", write_suite(DECODE), "--out", out, "--S", "20",
               "--batch", "1")
    data = results_of(out)
    (case,) = data["cases"]
    assert case["status"] == "skipped"
    assert case["reason"].startswith("decode API not available:") and "nsa.cache" in \
        case["reason"]
    # nothing could be measured: exit 3, and the report says so
    assert r.exit_code == 3 and data["summary"]["verdict"] == "NOT RUN"
    assert "## Skipped cases" in (run_folder(out) / "report.md").read_text()


GENERATE = """\
- name: gen
  kind: generate
  params:
    context: 40
    new: 3
    B: 2
    layers: 1
    hidden: 32
    H: 2
    G: 2
    d_k: 8
    l: 8
    d: 4
    l_sel: 8
    n: 3
    w: 16
"""


def test_generate_reports_tokens_per_second(invoke, write_suite, tmp_path):
    out = tmp_path / "out"
    r = invoke("decode", "--suite", write_suite(GENERATE), "--out", out)
    assert r.exit_code == 0, r.stderr
    (c,) = results_of(out)["cases"]
    m = c["metrics"]
    assert c["status"] == "passed", c["reason"]
    assert m["nsa_eager_tok_s"] > 0 and m["dense_eager_tok_s"] > 0
    assert m["speedup_eager"] == m["nsa_eager_tok_s"] / m["dense_eager_tok_s"]
    assert m["graph"].startswith("not run: CUDA graphs need a CUDA device")
    assert "nsa_graph_tok_s" not in m
    folder = run_folder(out)
    assert (folder / "generate.csv").is_file()
    assert "not a like-for-like ratio" in (folder / "report.md").read_text()


def test_generate_times_the_models_own_greedy_continuation():
    """The runner's timed tokens are the greedy continuation TinyLM.generate produces
    (the steps after the warm-up), for both attentions."""
    import torch

    from nsa import NSAConfig
    from nsa.model import TinyLM
    from nsabench.runners.generate import tokens_per_s

    cfg = NSAConfig(hidden_size=32, n_heads=4, n_kv_heads=2, d_k=8, d_v=8, l=8, d=4,
                    l_sel=8, n=3, w=16)
    prompt = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    for attention in ("dense", "nsa"):
        torch.manual_seed(0)
        m = TinyLM(cfg, n_layers=2, attention=attention).eval()
        tps, toks, finite = tokens_per_s(m, prompt, 5, False, torch.device("cpu"))
        warm = 4 + 2 * cfg.d
        want = m.generate(prompt, warm + 6)[:, warm + 1:]
        assert tps > 0 and finite and toks.shape == (2, 5)
        assert torch.equal(toks, want), attention
