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

  nsa prefill --fla --out runs    (GPU, fla-core installed: the prefill-fla suite)

  nsa prefill --fla --T 65536 --mode fwd --out runs

  nsa prefill --suite my.yaml --fla    (fla on in every prefill case of my.yaml)
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
    fla: Annotated[bool | None, typer.Option(
        "--fla/--no-fla",
        help="Also time fla-core's parallel_nsa against NSA in the configuration both "
             "support: mean-pooled compression with l = d = l' (one block size), no "
             "sliding window, G a power of two >= 16, CUDA, float16/bfloat16. Needs "
             "fla-core: `pip install --no-deps fla_core-*.whl einops-*.whl` (without it "
             "the case records why fla was not used). Without --suite: the shipped "
             "prefill-fla suite (HQ=64, H=4, d_k=128, bf16, l = d = l' = 64, n=16, T 8k to "
             "64k; needs fla / NSA >= 2 forward, >= 1 forward+backward). With --suite: "
             "turns the comparison on in that suite's prefill cases.")] = None,
) -> None:
    """Time nsa_attention (forward, forward+backward, each branch alone) against dense
    causal SDPA in the same run; report ms and speedup = dense / NSA, with CSV and plots.
    With --fla, also against fla-core's parallel_nsa (speedup = fla / NSA)."""
    with guard():
        overrides = {
            "T": one_or_list(parse_ints("--T", T)), "B": one_or_list(parse_ints("--batch", batch)),
            "G": one_or_list(parse_ints("--G", G)), "H": one_or_list(parse_ints("--H", H)),
            "d_k": one_or_list(parse_ints("--d-k", d_k)),
            "d_v": one_or_list(parse_ints("--d-v", d_v)),
            "repeats": repeats, "warmup": warmup, "seed": seed,
            "modes": parse_modes(mode), "deterministic": deterministic, "fla": fla,
        }
    default_suite = "prefill-fla" if fla else "prefill"
    measure_command("prefill", default_suite, {"prefill"}, suite=suite, out=out,
                    json_out=json_out, device=device, dtype=dtype, backend=backend,
                    label=label, overrides=overrides)
