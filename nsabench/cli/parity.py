"""`nsa parity`: each backend against the float64 reference, forward and gradients."""

from __future__ import annotations

from pathlib import Path

from nsabench.cli.common import guard, measure_command
from nsabench.cli.options import (
    BackendOpt,
    BatchOpt,
    DeviceOpt,
    DkOpt,
    DtypeOpt,
    DvOpt,
    G_Opt,
    H_Opt,
    JsonOpt,
    LabelOpt,
    OutOpt,
    SeedOpt,
    SuiteOpt,
    T_Opt,
    one_or_list,
    parse_ints,
)

EPILOG = """Examples:

  nsa parity --out runs

  nsa parity --T 256,1024 --G 1,4 --dtype float32,bfloat16 --json > parity.json
"""


def parity(
    suite: SuiteOpt = None,
    out: OutOpt = Path("runs"),
    json_out: JsonOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    backend: BackendOpt = None,
    label: LabelOpt = None,
    T: T_Opt = None,
    batch: BatchOpt = None,
    G: G_Opt = None,
    H: H_Opt = None,
    d_k: DkOpt = None,
    d_v: DvOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Compare each backend with the float64 reference: forward max-abs and relative
    error, gradient relative errors (dq, dk, dv, gates) and the fraction of selected
    blocks equal to the reference's. Exit 1 if an error exceeds its threshold or is NaN."""
    with guard():
        overrides = {
            "T": one_or_list(parse_ints("--T", T)), "B": one_or_list(parse_ints("--batch", batch)),
            "G": one_or_list(parse_ints("--G", G)), "H": one_or_list(parse_ints("--H", H)),
            "d_k": one_or_list(parse_ints("--d-k", d_k)),
            "d_v": one_or_list(parse_ints("--d-v", d_v)), "seed": seed,
        }
    measure_command("parity", "parity", {"parity"}, suite=suite, out=out, json_out=json_out,
                    device=device, dtype=dtype, backend=backend, label=label,
                    overrides=overrides)
