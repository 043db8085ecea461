"""`nsa prefill`: prefill forward and forward+backward time against dense attention."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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

  nsa prefill --mode fwd+bwd --T 8192,16384,32768,65536     (GPU, training)
"""

MODE_NAMES = {"fwd": "fwd", "fwd+bwd": "fwd_bwd", "fwd_bwd": "fwd_bwd"}


def parse_modes(text: str | None) -> list[str] | None:
    """--mode "fwd,fwd+bwd" -> ["fwd", "fwd_bwd"] (suite names); None keeps the suite's."""
    if text is None:
        return None
    from nsabench.errors import UsageError

    out = []
    for part in (x.strip() for x in text.split(",")):
        if part not in MODE_NAMES:
            raise UsageError(f"--mode: expected a comma list of fwd, fwd+bwd; got {part!r} "
                             f"in {text!r}")
        if MODE_NAMES[part] not in out:
            out.append(MODE_NAMES[part])
    return out


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
    mode: Annotated[str | None, typer.Option(
        "--mode", metavar="LIST",
        help="What to time: fwd, fwd+bwd or both (comma list); default: the suite's "
             "(both).")] = None,
    deterministic: Annotated[bool | None, typer.Option(
        "--deterministic/--no-deterministic",
        help="fwd+bwd: time the bitwise-reproducible backward (default: the suite's, off).")]
    = None,
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
            "modes": parse_modes(mode), "deterministic": deterministic,
        }
    measure_command("prefill", "prefill", {"prefill"}, suite=suite, out=out,
                    json_out=json_out, device=device, dtype=dtype, backend=backend,
                    label=label, overrides=overrides)
