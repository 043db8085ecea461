"""`nsa decode`: per-step decode latency and bytes read against dense decode."""

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
    S_Opt,
    SeedOpt,
    SuiteOpt,
    WarmupOpt,
    one_or_list,
    parse_ints,
)

EPILOG = """Examples:

  nsa decode --S 512,4096 --out runs

  nsa decode --S 512,4096,64k --batch 1,16 --dtype bfloat16 --out runs    (GPU)
"""


def decode(
    suite: SuiteOpt = None,
    out: OutOpt = Path("runs"),
    json_out: JsonOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    backend: BackendOpt = None,
    label: LabelOpt = None,
    S: S_Opt = None,
    batch: BatchOpt = None,
    G: G_Opt = None,
    H: H_Opt = None,
    d_k: DkOpt = None,
    d_v: DvOpt = None,
    repeats: RepeatsOpt = None,
    warmup: WarmupOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Time one NSA decode step against dense SDPA decode (one query over S cached keys)
    at each context length; report tokens and bytes actually read (counted by the op).
    A suite's generate cases (the decode suite has them) also time the tiny LM generating
    after a prompt: tokens/s with NSA (eager and CUDA graph) against dense."""
    with guard():
        overrides = {
            "S": one_or_list(parse_ints("--S", S)), "B": one_or_list(parse_ints("--batch", batch)),
            "G": one_or_list(parse_ints("--G", G)), "H": one_or_list(parse_ints("--H", H)),
            "d_k": one_or_list(parse_ints("--d-k", d_k)),
            "d_v": one_or_list(parse_ints("--d-v", d_v)),
            "repeats": repeats, "warmup": warmup, "seed": seed,
        }
    measure_command("decode", "decode", {"decode", "generate"}, suite=suite, out=out,
                    json_out=json_out,
                    device=device, dtype=dtype, backend=backend, label=label,
                    overrides=overrides)
