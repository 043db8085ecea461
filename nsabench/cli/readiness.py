"""`nsa readiness`: a readiness suite end to end, one report with every check."""

from __future__ import annotations

from pathlib import Path

from nsabench.cli.common import guard, measure_command, target_device
from nsabench.cli.options import (
    BackendOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    LabelOpt,
    OutOpt,
    SuiteOpt,
)

EPILOG = """Examples:

  nsa readiness --out reports

  nsa readiness --suite cpu-smoke --out runs --json > results.json
"""


def readiness(
    suite: SuiteOpt = None,
    out: OutOpt = Path("runs"),
    json_out: JsonOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    backend: BackendOpt = None,
    label: LabelOpt = None,
) -> None:
    """Run a readiness suite (default: readiness-gpu with CUDA, readiness-cpu without) and
    write one report stating every check's measured value, threshold and result, with an
    overall verdict. Exit 0 when nothing failed, 1 when a check failed, 3 when nothing
    could run here."""
    with guard():
        default = "readiness-gpu" if target_device(device).type == "cuda" else "readiness-cpu"
    measure_command("readiness", default, None, suite=suite, out=out, json_out=json_out,
                    device=device, dtype=dtype, backend=backend, label=label)
