"""`nsa suite list` and `nsa suite validate FILE`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from nsabench import suites
from nsabench.cli.common import guard, out_console
from nsabench.cli.options import JsonOpt
from nsabench.errors import EXIT_USAGE, SuiteError

app = typer.Typer(help="Suite files: list the shipped ones, validate your own.",
                  no_args_is_help=True, add_completion=False)


@app.command("list", epilog="Example:\n\n  nsa suite list")
def list_(json_out: JsonOpt = False) -> None:
    """List the suites shipped with the package (name, kinds, cases, description)."""
    with guard():
        rows = []
        for name, path in suites.shipped_suites().items():
            s = suites.load_suite(path)
            rows.append({"name": name, "path": str(path), "description": s.description,
                         "kinds": sorted({c.kind for c in s.cases}),
                         "cases": len(s.cases), "instances": len(suites.expand(s))})
        if json_out:
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
            return
        t = Table(title="Shipped suites (use --suite NAME)", title_justify="left")
        for col in ("name", "kinds", "cases", "grid points", "description"):
            t.add_column(col, overflow="fold")
        for r in rows:
            t.add_row(r["name"], ", ".join(r["kinds"]), str(r["cases"]), str(r["instances"]),
                      escape(r["description"]))
        out_console().print(t)


@app.command("validate", epilog="Example:\n\n  nsa suite validate my-suite.yaml")
def validate(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Suite YAML file to check.")],
) -> None:
    """Check a suite file against the schema; every problem is printed with file, line,
    key and reason (exit 2), otherwise the cases and grid sizes (exit 0)."""
    with guard():
        if not file.is_file():
            raise suites.UsageError(f"{file}: no such file")
        try:
            s = suites.load_suite(file)
        except SuiteError as exc:
            for problem in exc.problems:
                sys.stderr.write(f"nsa: error: {problem}\n")
            raise typer.Exit(EXIT_USAGE) from None
        con = out_console()
        n = len(suites.expand(s))
        con.print(f"OK: {file}: suite {s.name!r}, schema_version {s.schema_version}, "
                  f"{len(s.cases)} case(s), {n} grid point(s)", markup=False)
        for c in s.cases:
            inst = suites.expand_case(c)
            con.print(f"  {c.name} ({c.kind}): {len(inst)} point(s)"
                      + (f", thresholds: {', '.join(c.thresholds)}" if c.thresholds else "")
                      + (f" [{suites.NOT_IMPLEMENTED[c.kind]}]" if c.kind in
                         suites.NOT_IMPLEMENTED else ""), markup=False)
