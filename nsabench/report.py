"""Render a run folder (report.md, one CSV per table, PNG plots) from results.json alone.

Nothing here measures or probes: the same results give the same report.md, so
``nsa report DIR`` reproduces what the run wrote.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from nsabench import report_showcase as showcase
from nsabench.env import short_device
from nsabench.results import fmt


@dataclass(frozen=True)
class Col:
    header: str
    key: str
    source: str = "metrics"  # metrics | params | case
    optional: bool = False  # dropped when no row has a value


def _param_cols(*keys: str) -> list[Col]:
    return [Col(k, k, "params") for k in keys]


CASE_COLS = [Col("case", "id", "case"), Col("status", "status", "case")]
KIND_TABLES: dict[str, tuple[str, list[Col]]] = {
    "parity": ("Parity against the float64 reference", [
        *CASE_COLS, Col("backend", "backend"), *_param_cols("dtype", "T", "B", "H", "G",
                                                            "d_k", "d_v"),
        Col("rel err", "rel_err"), Col("max abs err", "max_abs_err"),
        Col("rel err (own selection)", "rel_err_free"), Col("sel match", "sel_match"),
        Col("dq rel", "dq_rel_err", optional=True), Col("dk rel", "dk_rel_err", optional=True),
        Col("dv rel", "dv_rel_err", optional=True),
        Col("dgates rel", "dgates_rel_err", optional=True),
    ]),
    "prefill": ("Prefill: NSA against dense causal attention (same run)", [
        *CASE_COLS, Col("backend", "backend"), *_param_cols("dtype", "T", "B", "H", "G", "d_k",
                                                            "d_v"),
        Col("NSA fwd ms", "nsa_fwd_ms", optional=True),
        Col("dense fwd ms", "dense_fwd_ms", optional=True),
        Col("speedup fwd", "speedup_fwd", optional=True),
        Col("NSA fwd us per query head", "nsa_fwd_us_per_head", optional=True),
        Col("NSA fwd ms (CUDA graph)", "nsa_fwd_graph_ms", optional=True),
        Col("NSA fwd us per query head (CUDA graph)", "nsa_fwd_graph_us_per_head",
            optional=True),
        Col("NSA fwd+bwd ms", "nsa_fwd_bwd_ms", optional=True),
        Col("dense fwd+bwd ms", "dense_fwd_bwd_ms", optional=True),
        Col("speedup fwd+bwd", "speedup_fwd_bwd", optional=True),
        Col("NSA fwd+bwd peak GiB", "nsa_fwd_bwd_peak_gib", optional=True),
        Col("dense fwd+bwd peak GiB", "dense_fwd_bwd_peak_gib", optional=True),
        Col("FA2 fwd ms", "fa2_fwd_ms", optional=True),
        Col("speedup vs FA2", "speedup_fwd_vs_fa2", optional=True),
        Col("FA2 fwd+bwd ms", "fa2_fwd_bwd_ms", optional=True),
        Col("NSA no-window fwd ms", "nsa_nowin_fwd_ms", optional=True),
        Col("fla fwd ms", "fla_fwd_ms", optional=True),
        Col("fla / NSA fwd", "speedup_fwd_vs_fla", optional=True),
        Col("NSA no-window fwd+bwd ms", "nsa_nowin_fwd_bwd_ms", optional=True),
        Col("fla fwd+bwd ms", "fla_fwd_bwd_ms", optional=True),
        Col("fla / NSA fwd+bwd", "speedup_fwd_bwd_vs_fla", optional=True),
        Col("fla finite", "fla_finite", optional=True),
        Col("fla error", "fla_error", optional=True),
        Col("cmp fwd ms", "cmp_fwd_ms", optional=True),
        Col("sel fwd ms", "sel_fwd_ms", optional=True),
        Col("win fwd ms", "win_fwd_ms", optional=True),
        Col("fwd+bwd not measured", "fwd_bwd_error", optional=True),
        Col("CUDA graph not measured", "nsa_fwd_graph_error", optional=True),
    ]),
    "decode": ("Decode: one step against dense decode (same run)", [
        *CASE_COLS, Col("backend", "backend"), *_param_cols("dtype", "S", "B", "H", "G", "d_k",
                                                            "d_v"),
        Col("NSA ms", "nsa_ms"), Col("dense ms", "dense_ms"), Col("speedup", "speedup"),
        Col("FA2 ms", "fa2_ms", optional=True),
        Col("speedup vs FA2", "speedup_vs_fa2", optional=True),
        Col("NSA tokens", "nsa_tokens"), Col("dense tokens", "dense_tokens"),
        Col("NSA bytes", "nsa_bytes"), Col("dense bytes", "dense_bytes"),
        Col("read fraction", "read_fraction"), Col("read / spec max", "read_vs_spec"),
        Col("rel err", "rel_err", optional=True),
        Col("sel match", "sel_match", optional=True),
    ]),
    "generate": ("Generate: tiny LM tokens/s, NSA against dense (same sizes, same run)", [
        *CASE_COLS, Col("backend", "backend"),
        *_param_cols("dtype", "context", "new", "B", "layers", "hidden", "H", "G", "d_k"),
        Col("NSA eager tokens/s", "nsa_eager_tok_s"),
        Col("dense eager tokens/s", "dense_eager_tok_s"),
        Col("NSA / dense (eager)", "speedup_eager"),
        Col("NSA graph tokens/s", "nsa_graph_tok_s", optional=True),
        Col("NSA graph / dense eager", "graph_vs_dense_eager", optional=True),
        Col("graph = eager tokens", "graph_token_match", optional=True),
        Col("graph", "graph", optional=True),
    ]),
    "needle": ("Needle: retrieval through NSA attention (dense attention is the control)", [
        *CASE_COLS, Col("backend", "backend"),
        *_param_cols("dtype", "T", "H", "G", "d_k", "n", "gates", "ablation", "distractors",
                     "trials"),
        Col("NSA accuracy", "accuracy"), Col("NSA recall", "recall"),
        Col("dense accuracy", "dense_accuracy"),
        Col("worst depth (NSA)", "worst_depth_accuracy"), Col("chance", "chance"),
        Col("selected fraction", "selected_fraction"),
    ]),
    "train": ("Training: tiny byte-level LM, NSA against dense (same data, same order)", [
        *CASE_COLS, *_param_cols("task", "T", "B", "steps", "nproc", "layers", "hidden"),
        Col("NSA val loss", "final_val_loss_nsa", optional=True),
        Col("dense val loss", "final_val_loss_dense", optional=True),
        Col("NSA / dense", "loss_ratio", optional=True),
        Col("NSA loss drop", "loss_drop", optional=True),
        Col("NSA tokens/s", "tokens_per_s_nsa", optional=True),
        Col("dense tokens/s", "tokens_per_s_dense", optional=True),
        Col("NSA passkey acc", "passkey_accuracy_nsa", optional=True),
        Col("NSA passkey digits", "passkey_digit_accuracy_nsa", optional=True),
        Col("NSA passkey >= 0.5 up to", "passkey_generalizes_to_nsa", optional=True),
        Col("dense passkey acc", "passkey_accuracy_dense", optional=True),
        Col("processes", "world_size", optional=True),
    ]),
}

def _fla_note(results: dict[str, Any]) -> str:
    """What the fla columns compare, and why fla-core was asked for but not used (only
    for prefill cases with ``fla: true``)."""
    asked = [c for c in results["cases"]
             if c["kind"] == "prefill" and c["metrics"].get("fla") is not None]
    if not asked:
        return ""
    out = ("\n\nfla = fla-core's `parallel_nsa` (compression by mean pooling, block = "
           "stride = selection block, no sliding window); NSA no-window is `nsa_attention` "
           "in that configuration (g_win = None, `compress_mean` inside the timed call, "
           "same q, k, v, g_cmp, g_sel); fla / NSA = fla ms / NSA no-window ms.")
    unused = [c for c in asked if c["metrics"]["fla"] != "used"]
    if unused:
        out += "\n\n" + md_table(["case", "fla-core"],
                                  [[c["id"], c["metrics"]["fla"]] for c in unused])
    return out


# plots: file -> (kind, x param, title, y label, [(metric, label)], log y)
PLOTS = {
    "prefill_latency.png": ("prefill", "T", "Prefill latency vs context", "ms", [
        ("nsa_fwd_ms", "NSA fwd"), ("dense_fwd_ms", "dense fwd"),
        ("nsa_fwd_bwd_ms", "NSA fwd+bwd"), ("dense_fwd_bwd_ms", "dense fwd+bwd"),
        ("fa2_fwd_ms", "FA2 fwd")], True),
    "prefill_speedup.png": ("prefill", "T", "Prefill speedup (dense / NSA) vs context",
                            "speedup", [("speedup_fwd", "fwd"),
                                        ("speedup_fwd_bwd", "fwd+bwd")], False),
    "prefill_vs_fla.png": ("prefill", "T", "fla-core parallel_nsa / NSA (no window) vs "
                           "context", "fla ms / NSA ms", [
                               ("speedup_fwd_vs_fla", "fwd"),
                               ("speedup_fwd_bwd_vs_fla", "fwd+bwd")], False),
    "decode_latency.png": ("decode", "S", "Decode step latency vs context", "ms", [
        ("nsa_ms", "NSA"), ("dense_ms", "dense"), ("fa2_ms", "FA2")], True),
    "decode_speedup.png": ("decode", "S", "Decode speedup (dense / NSA) vs context",
                           "speedup", [("speedup", "speedup")], False),
}


def _cell(v: Any) -> str:
    s = fmt(v)
    return s.replace("|", "\\|").replace("\n", " ")


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def csv_text(headers: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(headers)
    for row in rows:
        w.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def _value(case: dict[str, Any], col: Col) -> Any:
    if col.source == "case":
        return case.get(col.key)
    return case.get(col.source, {}).get(col.key)


@dataclass
class Table:
    name: str  # CSV file stem
    title: str
    headers: list[str]
    rows: list[list[Any]]


def tables(results: dict[str, Any]) -> list[Table]:
    cases = results["cases"]
    out = [
        Table("cases", "Cases", ["case", "kind", "status", "duration s", "reason"],
              [[c["id"], c["kind"], c["status"], c.get("duration_s"), c["reason"]]
               for c in cases]),
        Table("checks", "Checks", ["case", "check", "measured", "op", "threshold", "result",
                                   "note"],
              [[c["id"], k["name"], k["value"], k["op"], k["threshold"],
                {True: "pass", False: "FAIL", None: "no threshold"}[k["passed"]], k["note"]]
               for c in cases for k in c["checks"]]),
    ]
    for kind, (title, cols) in KIND_TABLES.items():
        rows_c = [c for c in cases if c["kind"] == kind]
        if not rows_c:
            continue
        keep = [col for col in cols
                if not col.optional or any(_value(c, col) is not None for c in rows_c)]
        out.append(Table(kind, title, [c.header for c in keep],
                         [[_value(c, col) for col in keep] for c in rows_c]))
    out += [Table(*t) for t in showcase.tables(results)]
    env = results.get("env") or {}
    brow = []
    for b in env.get("backends", []):
        for dev, info in b["devices"].items():
            for branch, st in info["branches"].items():
                brow.append([b["name"], dev, branch, "usable" if st["usable"] else "no",
                             "; ".join(st["reasons"])])
    if brow:
        out.append(Table("backends", "Backends", ["backend", "device", "branch", "usable",
                                                  "reasons"], brow))
    return out


# ----------------------------------------------------------------------------- plots

# parameters that do not tell series apart (timing knobs, switches)
_NOT_SERIES = {"seed", "threads", "warmup", "repeats", "budget_s", "check", "branches",
               "modes", "device", "grad", "fla"}


def _series(results: dict[str, Any], kind: str, x: str) -> dict[str, list[dict[str, Any]]]:
    """Cases of a kind that ran, grouped by the parameters that vary among them (x and
    timing knobs aside): points of equal configuration form one series across cases."""
    ran = [c for c in results["cases"]
           if c["kind"] == kind and c["status"] in ("passed", "failed")]
    if not ran:
        return {}
    keys = [k for k in ran[0]["params"] if k != x and k not in _NOT_SERIES]
    varying = [k for k in keys if len({repr(c["params"].get(k)) for c in ran}) > 1]
    groups: dict[str, list[dict[str, Any]]] = {}
    for c in ran:
        label = ",".join(f"{k}={c['params'].get(k)}" for k in varying)
        groups.setdefault(label, []).append(c)
    return groups


def plot_files(results: dict[str, Any], run_dir: Path) -> list[str]:
    """Write the PNG plots that have data; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    device = short_device(results.get("env") or {}, _device_of(results))
    for fname, (kind, x, title, ylabel, metrics, logy) in PLOTS.items():
        groups = _series(results, kind, x)
        lines = []
        for gi, (gkey, cs) in enumerate(groups.items()):
            for mi, (metric, mlabel) in enumerate(metrics):
                pts = sorted((c["params"][x], c["metrics"][metric]) for c in cs
                             if isinstance(c["metrics"].get(metric), (int, float)))
                if pts:
                    lines.append((f"{mlabel} {gkey}".strip(), pts, gi, mi))
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        styles = ("-", "--", ":", "-.")
        marks = ("o", "s", "^", "D", "v")
        for label, pts, gi, mi in lines:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{gi % 10}",
                    ls=styles[mi % 4], marker=marks[mi % 5], label=label)
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        else:
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(f"{x} (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\n{device}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run_dir / fname)
        plt.close(fig)
        written.append(fname)
    written += showcase.plots(results, run_dir, device)
    return written


def planned_plots(results: dict[str, Any]) -> list[str]:
    """The plot files the results have data for (same rule as plot_files)."""
    out = []
    for fname, (kind, x, _t, _y, metrics, _l) in PLOTS.items():
        if any(isinstance(c["metrics"].get(m), (int, float))
               for cs in _series(results, kind, x).values() for c in cs for m, _ in metrics):
            out.append(fname)
    return out + showcase.planned(results)


# ----------------------------------------------------------------------------- markdown

def _device_of(results: dict[str, Any]) -> str:
    """The device the cases ran on (the first that ran), else the machine's default."""
    for c in results["cases"]:
        if c["metrics"].get("device"):
            return c["metrics"]["device"]
    env = results.get("env") or {}
    return "cuda:0" if env.get("cuda", {}).get("available") else "cpu"


def _environment_md(env: dict[str, Any]) -> str:
    parts = []
    gpus = env.get("gpus", [])
    if gpus:
        parts.append("GPUs:\n\n" + md_table(
            ["index", "name", "SM", "SMs", "memory GiB", "SM clock max MHz", "mem clock max MHz",
             "source"],
            [[g.get("index"), g.get("name"), g.get("capability"), g.get("sm_count"),
              g.get("memory_total_gib"), g.get("clock_sm_max_mhz"), g.get("clock_mem_max_mhz"),
              g.get("source")] for g in gpus]))
    else:
        cuda = env.get("cuda", {})
        parts.append(f"GPUs: none usable ({cuda.get('reason') or 'no CUDA device'}). "
                     f"CPU: {env.get('platform', {}).get('cpu')}, "
                     f"{env.get('platform', {}).get('cpu_count')} cores, torch threads "
                     f"{env.get('platform', {}).get('torch_threads')}.")
    opt = env.get("optional", {})
    if opt:
        parts.append("Optional packages: " + "; ".join(
            f"{name}: " + (f"installed ({o.get('version')})" if o["installed"]
                           else f"not installed ({o.get('reason')})")
            for name, o in opt.items()) + ".")
    rows = []
    for b in env.get("backends", []):
        for dev, info in b["devices"].items():
            for branch, st in info["branches"].items():
                rows.append([b["name"], dev, branch, "usable" if st["usable"] else "no",
                             "; ".join(st["reasons"])])
    if rows:
        parts.append("Backends (default case per device: d_k = d_v = 128, G = 16; bfloat16 on "
                     "GPU, float32 on CPU):\n\n"
                     + md_table(["backend", "device", "branch", "usable", "reasons"], rows))
    routing = env.get("routing")
    if routing:
        rr = [["op", routing["op"]["backend"], routing["op"]["reason"]]]
        rr += [[b, c["backend"], c["reason"]] for b, c in routing["branches"].items()]
        case = routing["case"]
        parts.append(f"Routing for {case['device']}, {case['dtype']}, d_k={case['d_k']}, "
                     f"d_v={case['d_v']}, G={case['G']}:\n\n"
                     + md_table(["branch", "backend", "why"], rr))
    kv = env.get("kernel_variants")
    if kv:
        parts.append(f"Triton kernel variants on {kv['device']}:\n\n" + md_table(
            ["what", "variant", "why"], [[r["what"], r["variant"], r["why"]] for r in kv["rows"]]))
    evs = env.get("env_vars", {})
    if evs:
        parts.append("Environment variables read:\n\n" + md_table(
            ["variable", "value", "default", "meaning"],
            [[k, v["value"] if v["value"] is not None else "(unset)", v["default"],
              v["meaning"]] for k, v in evs.items()]))
    return "\n\n".join(parts)


def render_markdown(results: dict[str, Any], plots: list[str]) -> str:
    env = results.get("env") or {}
    versions = env.get("versions", {})
    summary = results["summary"]
    git = results.get("git") or {}
    git_s = (f"`{git['commit'][:12]}`" + (" (uncommitted changes)" if git.get("dirty") else "")
             if git.get("commit") else f"unknown ({git.get('reason')})")
    suite = results["suite"]
    overrides = suite.get("overrides") or {}
    ov = ("; options: " + ", ".join(f"{k}={v}" for k, v in overrides.items())) if overrides else ""
    counts = ", ".join(f"{n} {s}" for s, n in summary["counts"].items())

    check_rows = []
    for c in results["cases"]:
        for k in c["checks"]:
            res = {True: "pass", False: "**FAIL**", None: "no threshold"}[k["passed"]]
            note = f" ({k['note']})" if k.get("note") else ""
            check_rows.append([c["id"], k["name"], k["value"], f"{k['op']} {fmt(k['threshold'])}",
                               res + note])
    checks_md = ("\n" + md_table(["case", "check", "measured", "threshold", "result"], check_rows)
                 if check_rows else "\nNo check ran.")
    case_rows = [[c["id"], c["kind"], c["status"] if c["status"] != "failed" else "**failed**",
                  c.get("duration_s"), c["reason"]] for c in results["cases"]]
    cases_md = "\n" + md_table(["case", "kind", "status", "seconds", "reason"], case_rows)

    sections = []
    by_name = {t.name: t for t in tables(results)}
    for kind, (title, _cols) in KIND_TABLES.items():
        if kind not in by_name:
            continue
        t = by_name[kind]
        s = f"\n## {title}\n\n" + md_table(t.headers, t.rows) + f"\n\nCSV: `{kind}.csv`"
        if kind == "prefill":
            s += ("\n\nspeedup = dense ms / NSA ms; dense is "
                  "`scaled_dot_product_attention(is_causal=True, enable_gqa=True)` on "
                  "[B, HQ, T, D]; branch columns run the op with only that gate set (sel "
                  "includes its compressed scoring).")
            s += _fla_note(results)
        if kind == "decode":
            s += ("\n\nTokens are per sequence and KV head, counted by the op "
                  "(`cache.last_reads`); bytes per sequence = tokens x H x (d_k + d_v) x "
                  "element size; dense reads all S tokens. read / spec max = measured tokens "
                  "over the spec's bound N_cmp(t) + min(n l', t+1) + min(w, t+1).")
        if kind == "generate":
            s += ("\n\nTokens/s over the timed greedy steps after the prompt (warm-up "
                  "excluded), batch B. The dense model (SDPA over the cache) runs eagerly "
                  "only: its cache length is a host-side size, so its step cannot be "
                  "captured; the NSA graph column replays a CUDA-graph-captured step, so "
                  "NSA graph / dense eager is not a like-for-like ratio. Eager times are "
                  "mostly host time (Python, launches) and vary between machines. graph = "
                  "eager tokens: the fraction of greedy tokens the two NSA runs agree on.")
        if kind == "needle":
            s += "\n\n" + showcase.needle_md(results, plots)
        if kind == "train":
            s += "\n\n" + showcase.train_md(results, plots)
        for p in plots:
            if p.startswith(kind) and p in PLOTS:
                s += f"\n\n![{p[:-4].replace('_', ' ')}]({p})"
        sections.append(s + "\n")
    skipped = [c for c in results["cases"] if c["status"] == "skipped"]
    if skipped:
        sections.append("\n## Skipped cases\n\n" + md_table(
            ["case", "kind", "reason"], [[c["id"], c["kind"], c["reason"]] for c in skipped])
            + "\n")
    errors = [c for c in results["cases"] if c["status"] == "error"]
    if errors:
        sections.append("\n## Errors\n\n" + md_table(
            ["case", "error"], [[c["id"], c["reason"]] for c in errors]) + "\n")

    tmpl = Template(resources.files("nsabench").joinpath("templates", "report.md").read_text())
    return tmpl.substitute(
        command=results["command"],
        suite_name=suite.get("name"),
        suite_source=suite.get("source"),
        suite_description=(f"Suite: {suite['description']}" if suite.get("description")
                           else ""),
        overrides=ov,
        verdict_text=summary["verdict_text"],
        argv=" ".join(results.get("argv") or []),
        device=short_device(env, _device_of(results)),
        v_nsa=versions.get("nsa"), v_torch=versions.get("torch"),
        v_triton=versions.get("triton") or "not installed",
        v_cuda=versions.get("cuda_runtime") or "none",
        v_driver=versions.get("driver") or "none",
        v_python=(env.get("python") or {}).get("version"),
        git=git_s,
        started=results["started_utc"], finished=results["finished_utc"],
        duration=fmt(results.get("duration_s")),
        counts=counts,
        checks=checks_md,
        cases=cases_md,
        sections="".join(sections),
        environment=_environment_md(env),
        tool_version=results["tool"]["version"],
    )


def render_all(results: dict[str, Any], run_dir: Path) -> str:
    """Write report.md, every CSV and every plot into run_dir; returns the Markdown."""
    run_dir = Path(run_dir)
    for t in tables(results):
        (run_dir / f"{t.name}.csv").write_text(csv_text(t.headers, t.rows))
    plot_files(results, run_dir)
    md = render_markdown(results, planned_plots(results))
    (run_dir / "report.md").write_text(md)
    return md
