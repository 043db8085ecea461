"""Report pieces of the needle and train cases: per-depth and curve tables, heat maps,
loss curves. Like :mod:`nsabench.report`, everything here reads results.json alone.

Tables are returned as (name, title, headers, rows); :mod:`nsabench.report` writes them
as CSV and places the Markdown sections and plots.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from nsabench.results import fmt

NEEDLE_HEATMAP = "needle_heatmap.png"
TRAIN_LOSS = "train_loss.png"
TRAIN_GAP = "train_gap.png"
PASSKEY_HEATMAP = "train_passkey_heatmap.png"

# parameters that do not tell needle series apart
_NOT_SERIES = {"T", "seed", "threads", "device", "depths", "trials", "B"}


def needle_note(m: dict[str, Any]) -> str:
    """What the needle tests, with the logits the run used (from its metrics)."""
    nl, wl, sl = (fmt(m.get(k)) for k in ("needle_logit", "weak_logit", "spike_logit"))
    return (
        "Haystack: random keys, values are random codes. At each depth one selection block "
        f"of keys is aligned with the last query (logit exactly {nl} against N(0, 1) noise) "
        "and all its values carry the planted code. Distractor blocks carry wrong codes, in "
        "turn: half a block as aligned as the needle (a best-token selector ties it with the "
        "needle; Eq. 9's overlap-weighted block score does not), a whole block at logit "
        f"{wl}, and single tokens more aligned than the needle (logit {sl}: strong for "
        "dense attention, invisible to mean-pooled compressed keys). NSA runs "
        "`nsa_attention` with its own compressed scoring (phi = mean, nothing learned) and "
        "top-n selection; a trial is correct when the last query's output is nearest "
        "(cosine) to the planted code. Recall: the needle block is among that query's "
        "selected blocks. Dense attention over all keys is the control. Ablations must "
        "fail: `random_selection` (random block indices instead of the op's own; the "
        "forced initial and local blocks still catch depths 0 and 100%) and `unaligned` "
        "(the code is planted but nothing marks its block). The needle is never planted "
        "in the scores: it reaches the output through attention or not at all."
    )


def _ran(results: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [c for c in results["cases"]
            if c["kind"] == kind and c["status"] in ("passed", "failed")]


def needle_series(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Needle cases grouped by case name and the parameters (T aside) that vary."""
    ran = [c for c in _ran(results, "needle") if c["metrics"].get("per_depth")]
    if not ran:
        return {}
    keys = [k for k in ran[0]["params"] if k not in _NOT_SERIES]
    varying = [k for k in keys if len({repr(c["params"].get(k)) for c in ran}) > 1]
    groups: dict[str, list[dict[str, Any]]] = {}
    for c in ran:
        extra = ",".join(f"{k}={c['params'].get(k)}" for k in varying
                         if k not in ("ablation",))
        label = c["case"] + (f" [{extra}]" if extra else "")
        if c["params"].get("ablation", "none") != "none":
            label += f" (ablation {c['params']['ablation']}: must fail)"
        groups.setdefault(label, []).append(c)
    return groups


# ----------------------------------------------------------------------------- tables

def tables(results: dict[str, Any]) -> list[tuple[str, str, list[str], list[list[Any]]]]:
    out = []
    rows = [[c["id"], c["params"]["T"], d["depth"], d["block"], d["accuracy"], d["recall"],
             d["dense_accuracy"], c["params"]["ablation"]]
            for c in _ran(results, "needle") for d in c["metrics"].get("per_depth") or []]
    if rows:
        out.append(("needle_depths", "Needle per (length, depth)",
                    ["case", "T", "depth", "needle block", "NSA accuracy", "NSA recall",
                     "dense accuracy", "ablation"], rows))
    rows = [[c["id"], r["model"], r["step"], r["train_loss"], r["val_loss"]]
            for c in _ran(results, "train") for r in c["metrics"].get("curve") or []]
    if rows:
        out.append(("train_curve", "Training curves",
                    ["case", "model", "step", "train loss", "val loss"], rows))
    rows = [[c["id"], r["model"], r["T"], r["depth"], r["accuracy"], r["digit_accuracy"],
             r["trials"]]
            for c in _ran(results, "train") for r in c["metrics"].get("passkey") or []]
    if rows:
        out.append(("passkey", "Passkey retrieval after training",
                    ["case", "model", "T", "depth", "accuracy", "digit accuracy", "trials"],
                    rows))
    return out


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(v) if not isinstance(v, str) else v for v in row) + " |"
            for row in rows]
    return "\n".join(out)


def _pct(depth: float) -> str:
    return f"{depth * 100:g}%"


def needle_md(results: dict[str, Any], plots: list[str]) -> str:
    series = needle_series(results)
    parts = []
    if series:
        parts.append(needle_note(next(iter(series.values()))[0]["metrics"]))
    for label, cs in series.items():
        cs = sorted(cs, key=lambda c: c["params"]["T"])
        depths = sorted({d["depth"] for c in cs for d in c["metrics"]["per_depth"]})
        cell = {(c["params"]["T"], d["depth"]): d for c in cs for d in c["metrics"]["per_depth"]}
        headers = ["depth"] + [f"T={c['params']['T']}" for c in cs]
        rows = []
        for dep in depths:
            row: list[Any] = [_pct(dep)]
            for c in cs:
                d = cell.get((c["params"]["T"], dep))
                row.append("—" if d is None else
                           f"{d['accuracy']:.2f} / {d['recall']:.2f} / {d['dense_accuracy']:.2f}")
            rows.append(row)
        p = cs[0]["params"]
        m0 = cs[0]["metrics"]
        what = "" if p["ablation"] != "none" else "NSA as specified; "
        parts.append(f"**{label}**: {what}gates {p['gates']}, l={p['l']}, d={p['d']}, "
                     f"l'={p['l_sel']}, n={p['n']}, H={p['H']}, G={p['G']}, d_k={p['d_k']}, "
                     f"{p['dtype']}, backend {m0.get('backend')}, {p['trials']} trial(s) x "
                     f"{p['H']} KV head(s) per cell, {p['distractors']} distractors, "
                     f"{p['codes']} codes (chance {fmt(m0.get('chance'))}). Cells: NSA "
                     f"accuracy / NSA recall / dense accuracy.\n\n" + _md_table(headers, rows))
    if NEEDLE_HEATMAP in plots:
        parts.append(f"![needle heat map]({NEEDLE_HEATMAP})")
    parts.append("Per (length, depth): `needle_depths.csv`.")
    return "\n\n".join(parts)


def train_md(results: dict[str, Any], plots: list[str]) -> str:
    parts = []
    cases = _ran(results, "train")
    for c in cases:
        m, p = c["metrics"], c["params"]
        models = p["attention"]
        lines = [f"**{c['id']}** (task {p['task']}, {m.get('world_size', 1)} process(es)"
                 + (f", {m['ddp_backend']} via `{m['launcher']}`" if m.get("launcher") else "")
                 + f"): {p['steps']} steps of B={p['B']} x T={p['T']} tokens, "
                 f"{p['layers']} layers, hidden {p['hidden']}, HQ={p['H'] * p['G']}, "
                 f"H={p['H']}, d_k={p['d_k']}, phi={p['phi']}, l={p['l']}, d={p['d']}, "
                 f"l'={p['l_sel']}, n={p['n']}, w={p['w']}, lr {fmt(p['lr'])}, seed "
                 f"{p['seed']}."]
        for a in models:
            if f"final_val_loss_{a}" not in m:
                continue
            lines.append(f"- {a}: validation loss {fmt(m[f'initial_val_loss_{a}'])} -> "
                         f"{fmt(m[f'final_val_loss_{a}'])}, {fmt(m.get(f'tokens_per_s_{a}'))} "
                         f"tokens/s, {fmt(m.get(f'params_{a}'))} parameters"
                         + (f", checkpoint `{m[f'checkpoint_{a}']}`"
                            if m.get(f"checkpoint_{a}") else ""))
            if f"passkey_accuracy_{a}" in m:
                gen = m.get(f"passkey_generalizes_to_{a}")
                lines.append(f"  passkey exact match at the training length "
                             f"{fmt(m[f'passkey_accuracy_{a}'])} (digits "
                             f"{fmt(m[f'passkey_digit_accuracy_{a}'])}, chance 0.1), at the "
                             f"longest length {fmt(m[f'passkey_accuracy_longest_{a}'])}; "
                             + (f"accuracy >= 0.5 up to {gen} tokens" if gen else
                                "accuracy >= 0.5 at no evaluated length"))
        if "loss_ratio" in m:
            lines.append(f"- NSA / dense final validation loss: {fmt(m['loss_ratio'])}")
        if m.get("corpus"):
            cp = m["corpus"]
            lines.append(f"- data: {cp['source']}, {cp['files']} files, {cp['bytes']} bytes "
                         f"(train {cp['train_bytes']}, validation {cp['val_bytes']}), "
                         f"sha256 {cp['sha256'][:16]}")
        parts.append("\n".join(lines))
        pk = m.get("passkey") or []
        for a in models:
            rows_a = [r for r in pk if r["model"] == a]
            if not rows_a:
                continue
            Ls = sorted({r["T"] for r in rows_a})
            deps = sorted({r["depth"] for r in rows_a})
            cell = {(r["T"], r["depth"]): r for r in rows_a}
            rows = [[_pct(dep)] + [f"{cell[(L, dep)]['accuracy']:.2f} "
                                   f"({cell[(L, dep)]['digit_accuracy']:.2f})"
                                   if (L, dep) in cell else "—" for L in Ls] for dep in deps]
            parts.append(f"Passkey, {a} (exact match, digit accuracy in brackets):\n\n"
                         + _md_table(["depth"] + [f"T={L}" for L in Ls], rows))
    for name, alt in ((TRAIN_LOSS, "loss curves"), (TRAIN_GAP, "NSA / dense loss vs T"),
                      (PASSKEY_HEATMAP, "passkey heat map")):
        if name in plots:
            parts.append(f"![{alt}]({name})")
    parts.append("Every step: `train_curve.csv`"
                 + ("; passkey per (model, length, depth): `passkey.csv`"
                    if any(c["metrics"].get("passkey") for c in cases) else "") + ".")
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- plots

def _lm_gap_cases(results: dict[str, Any]) -> list[dict[str, Any]]:
    cs = [c for c in _ran(results, "train") if isinstance(c["metrics"].get("loss_ratio"), float)]
    return cs if len({c["params"]["T"] for c in cs}) >= 2 else []


def planned(results: dict[str, Any]) -> list[str]:
    out = []
    if needle_series(results):
        out.append(NEEDLE_HEATMAP)
    if any(c["metrics"].get("curve") for c in _ran(results, "train")):
        out.append(TRAIN_LOSS)
    if _lm_gap_cases(results):
        out.append(TRAIN_GAP)
    if any(c["metrics"].get("passkey") for c in _ran(results, "train")):
        out.append(PASSKEY_HEATMAP)
    return out


def _heat(ax, grid, xlabels, ylabels, title, plt) -> None:
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    ax.set_xticks(range(len(xlabels)), xlabels, fontsize=7)
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=7)
    ax.set_title(title, fontsize=9)
    if len(xlabels) * len(ylabels) <= 120:
        for i in range(len(ylabels)):
            for j in range(len(xlabels)):
                v = grid[i][j]
                if v == v:  # not NaN
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
    return im


def _len_label(T: int) -> str:
    return f"{T // 1024}k" if T % 1024 == 0 else str(T)


def plots(results: dict[str, Any], run_dir: Path, device: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    nan = float("nan")
    series = needle_series(results)
    if series:
        rows = list(series.items())[:8]
        fig, axes = plt.subplots(len(rows), 3, figsize=(11, 1.2 + 3.2 * len(rows)), dpi=110,
                                 squeeze=False, layout="constrained")
        im = None
        for r, (label, cs) in enumerate(rows):
            cs = sorted(cs, key=lambda c: c["params"]["T"])
            depths = sorted({d["depth"] for c in cs for d in c["metrics"]["per_depth"]})
            for col, (key, name) in enumerate((("accuracy", "NSA accuracy"),
                                               ("recall", "NSA selection recall"),
                                               ("dense_accuracy", "dense accuracy"))):
                cell = {(c["params"]["T"], d["depth"]): d[key]
                        for c in cs for d in c["metrics"]["per_depth"]}
                grid = [[cell.get((c["params"]["T"], dep), nan) for c in cs] for dep in depths]
                im = _heat(axes[r][col], grid, [_len_label(c["params"]["T"]) for c in cs],
                           [_pct(d) for d in depths],
                           f"{name}\n" + "\n".join(textwrap.wrap(label, 40)), plt)
                axes[r][col].set_xlabel("context length", fontsize=8)
                if col == 0:
                    axes[r][col].set_ylabel("needle depth", fontsize=8)
        fig.suptitle(f"Needle through NSA attention\n{device}", fontsize=10)
        if im is not None:
            fig.colorbar(im, ax=axes, shrink=0.6)
        fig.savefig(run_dir / NEEDLE_HEATMAP)
        plt.close(fig)
        written.append(NEEDLE_HEATMAP)

    cases = [c for c in _ran(results, "train") if c["metrics"].get("curve")]
    if cases:
        n = len(cases)
        ncols = min(3, n)
        nrows = -(-n // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), dpi=110,
                                 squeeze=False)
        for i, c in enumerate(cases):
            ax = axes[i // ncols][i % ncols]
            for mi, model in enumerate(c["params"]["attention"]):
                pts = [r for r in c["metrics"]["curve"] if r["model"] == model]
                tr = [(r["step"], r["train_loss"]) for r in pts
                      if isinstance(r["train_loss"], (int, float))]
                va = [(r["step"], r["val_loss"]) for r in pts
                      if isinstance(r["val_loss"], (int, float))]
                color = f"C{mi}"
                if tr:
                    ax.plot([s for s, _ in tr], [v for _, v in tr], color=color, alpha=0.35,
                            lw=0.8, label=f"{model} train")
                if va:
                    ax.plot([s for s, _ in va], [v for _, v in va], color=color, marker="o",
                            ms=3, lw=1.5, label=f"{model} validation")
            ax.set_xlabel("step")
            ax.set_ylabel("loss (nats)" + (" on the answer digits"
                                           if c["params"]["task"] == "passkey" else
                                           " per byte"))
            m = c["metrics"]
            sub = f" (ratio {m['loss_ratio']:.3f})" if isinstance(m.get("loss_ratio"),
                                                                float) else ""
            ax.set_title(f"{c['id']}: T={c['params']['T']}{sub}", fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        for j in range(n, nrows * ncols):
            axes[j // ncols][j % ncols].axis("off")
        fig.suptitle(f"Tiny byte-level LM: NSA against dense attention\n{device}", fontsize=10)
        fig.tight_layout()
        fig.savefig(run_dir / TRAIN_LOSS)
        plt.close(fig)
        written.append(TRAIN_LOSS)

    gap = _lm_gap_cases(results)
    if gap:
        pts = sorted((c["params"]["T"], c["metrics"]["loss_ratio"]) for c in gap)
        fig, ax = plt.subplots(figsize=(6, 3.8), dpi=110)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training context T (tokens)")
        ax.set_ylabel("NSA / dense final validation loss")
        ax.set_title(f"Loss gap vs context length\n{device}", fontsize=10)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / TRAIN_GAP)
        plt.close(fig)
        written.append(TRAIN_GAP)

    panels = [(c, a) for c in _ran(results, "train") for a in c["params"]["attention"]
              if any(r["model"] == a for r in c["metrics"].get("passkey") or [])]
    if panels:
        fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels), 7.4), dpi=110,
                                 squeeze=False, layout="constrained")
        im = None
        for i, (c, a) in enumerate(panels):
            rows_a = [r for r in c["metrics"]["passkey"] if r["model"] == a]
            Ls = sorted({r["T"] for r in rows_a})
            deps = sorted({r["depth"] for r in rows_a})
            for row, (key, what) in enumerate((("accuracy", "exact match"),
                                               ("digit_accuracy", "digit accuracy"))):
                cell = {(r["T"], r["depth"]): r[key] for r in rows_a}
                grid = [[cell.get((L, d), nan) for L in Ls] for d in deps]
                im = _heat(axes[row][i], grid, [_len_label(L) for L in Ls],
                           [_pct(d) for d in deps],
                           f"{c['id']}: {a} {what}\ntrained at T={c['params']['T']}", plt)
                axes[row][i].set_xlabel("evaluation length", fontsize=8)
                axes[row][i].set_ylabel("key depth", fontsize=8)
        fig.suptitle(f"Passkey retrieval after training (digit chance 0.1)\n{device}",
                     fontsize=10)
        if im is not None:
            fig.colorbar(im, ax=axes, shrink=0.6)
        fig.savefig(run_dir / PASSKEY_HEATMAP)
        plt.close(fig)
        written.append(PASSKEY_HEATMAP)
    return written
