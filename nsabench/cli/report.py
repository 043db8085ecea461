"""`nsa report DIR`: re-render a run folder from its results.json alone."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from nsabench import report as reportmod
from nsabench import results
from nsabench.cli.common import guard, out_console
from nsabench.cli.options import JsonOpt

EPILOG = """Examples:

  nsa report runs/readiness-20250101-120000

  nsa report copied-from-gpu-box/ --json | jq .summary
"""


def report(
    run_dir: Annotated[Path, typer.Argument(metavar="DIR",
                                            help="A run folder (holding results.json).")],
    json_out: JsonOpt = False,
) -> None:
    """Re-render report.md, the CSV tables and the plots of a run folder from its
    results.json alone (no GPU needed). Exits with the recorded run's code."""
    with guard():
        folder, data = results.load_results(run_dir)
        reportmod.render_all(data, folder)
        if json_out:
            sys.stdout.write((folder / "results.json").read_text())
        else:
            out_console().print(f"{data['summary']['verdict_text']}\nreport: "
                                f"{folder / 'report.md'}", markup=False)
    raise typer.Exit(data["summary"]["exit_code"])
