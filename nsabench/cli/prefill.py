"""`nsa prefill`: prefill forward and forward+backward time against dense attention."""

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
    RepeatsOpt,
    SeedOpt,
    SuiteOpt,
    T_Opt,
    WarmupOpt,
    one_or_list,
    parse_ints,
)

EPILOG = """Examples:

  nsa prefill --out runs

  nsa prefill --T 8192,65536 --dtype bfloat16 --out runs    (GPU)
"""


def prefill(
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
    repeats: RepeatsOpt = None,
    warmup: WarmupOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Time nsa_attention (forward, forward+backward, each branch alone) against dense
    causal SDPA in the same run; report ms and speedup = dense / NSA, with CSV and plots."""
    with guard():
        overrides = {
            "T": one_or_list(parse_ints("--T", T)), "B": one_or_list(parse_ints("--batch", batch)),
            "G": one_or_list(parse_ints("--G", G)), "H": one_or_list(parse_ints("--H", H)),
            "d_k": one_or_list(parse_ints("--d-k", d_k)),
            "d_v": one_or_list(parse_ints("--d-v", d_v)),
            "repeats": repeats, "warmup": warmup, "seed": seed,
        }
    measure_command("prefill", "prefill", {"prefill"}, suite=suite, out=out,
                    json_out=json_out, device=device, dtype=dtype, backend=backend,
                    label=label, overrides=overrides)
