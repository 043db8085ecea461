"""`nsa env`: versions, GPUs, optional packages, backends and routing, explained."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.markup import escape
from rich.table import Table

from nsabench import env as envmod
from nsabench.cli.common import guard, out_console
from nsabench.cli.options import JsonOpt

EPILOG = """Examples:

  nsa env

  nsa env --json > env.json
"""


def env(json_out: JsonOpt = False) -> None:
    """Print Python/torch/Triton/CUDA/driver versions, each GPU (name, compute capability,
    SMs, memory, clocks), optional packages, whether each backend and branch is usable
    (or why not), and the routing the policy would choose for a default case and why."""
    with guard():
        data = envmod.probe()
        if json_out:
            sys.stdout.write(json.dumps(data, indent=2) + "\n")
            return
        render(data)


def _t(title: str, *cols: str) -> Table:
    t = Table(title=title, title_justify="left", title_style="bold")
    for c in cols:
        t.add_column(c, overflow="fold")
    return t


def render(d: dict[str, Any]) -> None:
    con = out_console()
    v = d["versions"]
    t = _t("Versions", "component", "version")
    for name, key in (("Python", None), ("nsa", "nsa"), ("torch", "torch"),
                      ("Triton", "triton"), ("CUDA runtime (torch)", "cuda_runtime"),
                      ("driver", "driver"), ("CUDA (driver)", "cuda_driver"),
                      ("cuDNN", "cudnn"), ("nvidia-ml-py", "nvidia-ml-py")):
        val = d["python"]["version"] if key is None else v.get(key)
        t.add_row(name, escape(str(val)) if val is not None else "[dim]none[/]")
    p = d["platform"]
    t.add_row("CPU", escape(f"{p['cpu']} ({p['cpu_count']} cores, torch threads "
                            f"{p['torch_threads']})"))
    con.print(t)

    if d["gpus"]:
        g = _t("GPUs", "index", "name", "SM", "SMs", "memory GiB", "SM clock MHz now (max)",
               "mem clock MHz now (max)", "source")
        for x in d["gpus"]:
            g.add_row(*(escape(str(x.get(k))) if x.get(k) is not None else "-" for k in
                        ("index", "name", "capability", "sm_count", "memory_total_gib")),
                      f"{x.get('clock_sm_mhz', '-')} ({x.get('clock_sm_max_mhz', '-')})",
                      f"{x.get('clock_mem_mhz', '-')} ({x.get('clock_mem_max_mhz', '-')})",
                      escape(str(x.get("source"))))
        con.print(g)
    else:
        con.print(f"[bold]GPUs[/]: none usable ({escape(str(d['cuda']['reason']))}); "
                  f"NVML: {escape(str(d['cuda']['nvml'].get('reason') or 'available'))}")

    o = _t("Optional packages", "package", "status")
    for name, info in d["optional"].items():
        status = (f"installed {info['version']}" if info["installed"]
                  else f"[yellow]not installed[/] ({escape(str(info['reason']))})")
        if info.get("note"):
            status += f"; {escape(info['note'])}"
        o.add_row(name, status)
    con.print(o)

    b = _t("Backends (default case per device: d_k = d_v = 128, G = 16; bfloat16 on GPU, "
           "float32 on CPU)", "backend", "device", "branch", "usable / why not")
    for be in d["backends"]:
        for dev, info in be["devices"].items():
            for branch, st in info["branches"].items():
                why = ("[green]usable[/]" if st["usable"]
                       else "[red]no[/]: " + escape("; ".join(st["reasons"])))
                b.add_row(be["name"], dev, branch, why)
    con.print(b)

    r = d["routing"]
    c = r["case"]
    rt = _t(f"Routing for {c['device']}, {c['dtype']}, d_k={c['d_k']}, d_v={c['d_v']}, "
            f"G={c['G']}", "branch", "backend", "why")
    rt.add_row("op (nsa_attention auto)", r["op"]["backend"], escape(r["op"]["reason"]))
    for br, ch in r["branches"].items():
        rt.add_row(br, ch["backend"], escape(ch["reason"]))
    con.print(rt)

    kv = d.get("kernel_variants")
    if kv:
        kt = _t(f"Triton kernel variants on {kv['device']}", "what", "variant", "why")
        for row in kv["rows"]:
            kt.add_row(escape(row["what"]), escape(row["variant"]), escape(row["why"]))
        con.print(kt)

    pol = _t("Policy rules", "rule", "applies to")
    for rule in d["policy"]:
        pol.add_row(escape(rule["rule"]), f"{rule['backend']}: {', '.join(rule['branches'])}")
    con.print(pol)

    ev = _t("Environment variables read", "variable", "value", "default", "meaning")
    for name, info in d["env_vars"].items():
        ev.add_row(name, escape(str(info["value"])) if info["value"] is not None else "(unset)",
                   info["default"], escape(info["meaning"]))
    con.print(ev)
