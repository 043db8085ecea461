"""Print the README's measured tables from committed run folders (never typed by hand).

    python scripts/readme_tables.py reports/prefill-...-h200 reports/decode-...-h200
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def gpu_name(run: Path) -> str:
    env = json.loads((run / "env.json").read_text())
    gpus = env.get("gpus") or []
    return gpus[0].get("name", "?") if gpus else env.get("device", "?")


def rows(run: Path, table: str) -> list[dict[str, str]]:
    with open(run / f"{table}.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("status") in ("passed", "failed")]


def head_dims(run: Path) -> dict[str, str]:
    """Case id -> "d_k / d_v", from the run's resolved parameters (its CSVs name d_v only
    since the column was added)."""
    cases = json.loads((run / "results.json").read_text())["cases"]
    return {c["id"]: f"{c['params'].get('d_k')} / "
                     f"{c['params'].get('d_v') or c['params'].get('d_k')}" for c in cases}


def fmt(x: str, digits: int = 2) -> str:
    try:
        return f"{float(x):.{digits}f}"
    except ValueError:
        return x or "—"


def main(paths: list[str]) -> None:
    for p in map(Path, paths):
        kind = p.name.split("-")[0]
        dims = head_dims(p)
        print(f"{kind.capitalize()} on {gpu_name(p)}, from [`{p}`]({p}/report.md):\n")
        if kind == "prefill" and rows(p, "prefill") and rows(p, "prefill")[0].get("fla fwd ms"):
            print("| T | NSA no-window fwd ms | fla fwd ms | fla / NSA | "
                  "NSA no-window fwd+bwd ms | fla fwd+bwd ms | fla / NSA |")
            print("|---|---|---|---|---|---|---|")
            for r in rows(p, "prefill"):
                print(f"| {r['T']} | {fmt(r['NSA no-window fwd ms'])} | {fmt(r['fla fwd ms'])} "
                      f"| {fmt(r['fla / NSA fwd'])}x | {fmt(r['NSA no-window fwd+bwd ms'])} | "
                      f"{fmt(r['fla fwd+bwd ms'])} | {fmt(r['fla / NSA fwd+bwd'])}x |")
        elif kind == "prefill":
            peaks = {c["id"]: c.get("metrics") or {}
                     for c in json.loads((p / "results.json").read_text())["cases"]}
            table = rows(p, "prefill")
            graph = "NSA fwd ms (CUDA graph)" in table[0]  # runs since the graph timing
            print("| T | G | d_k / d_v | NSA fwd ms | dense fwd ms | dense / NSA | "
                  "NSA fwd+bwd ms | dense fwd+bwd ms | dense / NSA | "
                  "fwd+bwd peak GiB NSA / dense | fwd per query head / G = 16 |"
                  + (" NSA fwd ms, CUDA graph | same, per query head / G = 16 |" if graph
                     else ""))
            print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if graph else ""))

            def per_head(r, ref, col):
                # forward time per query head against the G = 16 row of the same T and d_k
                if ref is None or r["G"] == "16":
                    return "—"
                try:
                    return f"{float(r[col]) * 16 / (float(ref[col]) * int(r['G'])):.2f}x"
                except ValueError:
                    return "—"

            g16 = {(r["T"], r["d_k"]): r for r in table if r["G"] == "16"}
            for r in table:
                m = peaks.get(r["case"], {})
                peak = (f"{m['nsa_fwd_bwd_peak_gib']:.2f} / {m['dense_fwd_bwd_peak_gib']:.2f}"
                        if "nsa_fwd_bwd_peak_gib" in m else "—")
                ref = g16.get((r["T"], r["d_k"]))
                extra = (f" {fmt(r['NSA fwd ms (CUDA graph)'])} | "
                         f"{per_head(r, ref, 'NSA fwd ms (CUDA graph)')} |" if graph else "")
                print(f"| {r['T']} | {r['G']} | {dims[r['case']]} | {fmt(r['NSA fwd ms'])} | "
                      f"{fmt(r['dense fwd ms'])} | {fmt(r['speedup fwd'])}x | "
                      f"{fmt(r['NSA fwd+bwd ms'])} | {fmt(r['dense fwd+bwd ms'])} | "
                      f"{fmt(r['speedup fwd+bwd'])}x | {peak} | "
                      f"{per_head(r, ref, 'NSA fwd ms')} |" + extra)
        elif kind == "train":
            print("| case | T | B | steps | processes | NSA val loss | dense val loss | "
                  "NSA / dense | NSA tokens/s | dense tokens/s |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for r in rows(p, "train"):
                print(f"| {r['case']} | {r['T']} | {r['B']} | {r['steps']} | {r['processes']} "
                      f"| {fmt(r['NSA val loss'], 3)} | {fmt(r['dense val loss'], 3)} | "
                      f"{fmt(r['NSA / dense'], 3)} | {fmt(r['NSA tokens/s'], 0)} | "
                      f"{fmt(r['dense tokens/s'], 0)} |")
        elif kind == "decode":
            print("| context S | batch | d_k / d_v | NSA us | dense us | dense / NSA | "
                  "NSA tokens read | read fraction |")
            print("|---|---|---|---|---|---|---|---|")
            for r in rows(p, "decode"):
                if "check" in r["case"]:
                    continue
                print(f"| {r['S']} | {r['B']} | {dims[r['case']]} | "
                      f"{float(r['NSA ms']) * 1e3:.1f} | {float(r['dense ms']) * 1e3:.1f} | "
                      f"{fmt(r['speedup'])}x | "
                      f"{fmt(r['NSA tokens'], 0)} | {fmt(r['read fraction'], 3)} |")
            if (p / "generate.csv").is_file() and rows(p, "generate"):
                print("\nTiny LM generating after a prompt (tokens/s; dense runs eagerly "
                      "only):\n")
                print("| prompt | new tokens | NSA eager | dense eager | NSA / dense eager | "
                      "NSA CUDA graph | NSA graph / dense eager |")
                print("|---|---|---|---|---|---|---|")
                for r in rows(p, "generate"):
                    print(f"| {r['context']} | {r['new']} | {fmt(r['NSA eager tokens/s'], 0)} "
                          f"| {fmt(r['dense eager tokens/s'], 0)} | "
                          f"{fmt(r['NSA / dense (eager)'])}x | "
                          f"{fmt(r['NSA graph tokens/s'], 0)} | "
                          f"{fmt(r['NSA graph / dense eager'])}x |")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
