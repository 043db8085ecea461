"""Option types shared by the commands (Typer ``Annotated`` aliases) and their parsers."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from nsabench.errors import UsageError

SuiteOpt = Annotated[str | None, typer.Option(
    "--suite", metavar="FILE|NAME",
    help="Suite file, or the name of a shipped suite (see `nsa suite list`).")]
OutOpt = Annotated[Path, typer.Option(
    "--out", metavar="DIR",
    help="Parent folder; each run writes a new folder DIR/<command>-YYYYmmdd-HHMMSS[-label].")]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print exactly the results.json written to disk on stdout, nothing else.")]
DeviceOpt = Annotated[str | None, typer.Option(
    "--device", metavar="DEVICE",
    help="auto | cpu | cuda | cuda:N; overrides the suite (exit 3 if not available).")]
DtypeOpt = Annotated[str | None, typer.Option(
    "--dtype", metavar="LIST",
    help="Comma list of float16, bfloat16, float32, float64 (or fp16, bf16, ...).")]
BackendOpt = Annotated[str | None, typer.Option(
    "--backend", metavar="LIST",
    help="Comma list of auto, reference, triton (auto = the routing policy).")]
LabelOpt = Annotated[str | None, typer.Option(
    "--label", help="Suffix of the run folder name.")]
T_Opt = Annotated[str | None, typer.Option(
    "--T", metavar="LIST", help="Sequence lengths, comma list (k = 1024), e.g. 512,4096,64k.")]
S_Opt = Annotated[str | None, typer.Option(
    "--S", metavar="LIST", help="Context lengths, comma list (k = 1024), e.g. 512,4096,64k.")]
BatchOpt = Annotated[str | None, typer.Option(
    "--batch", metavar="LIST", help="Batch sizes, comma list, e.g. 1,16.")]
G_Opt = Annotated[str | None, typer.Option(
    "--G", metavar="LIST", help="GQA group sizes (query heads per KV head), comma list.")]
H_Opt = Annotated[str | None, typer.Option(
    "--H", metavar="LIST", help="KV heads, comma list.")]
DkOpt = Annotated[str | None, typer.Option(
    "--d-k", metavar="LIST", help="Query/key head dims, comma list.")]
DvOpt = Annotated[str | None, typer.Option(
    "--d-v", metavar="LIST", help="Value head dims, comma list (default: d_k).")]
RepeatsOpt = Annotated[int | None, typer.Option(
    "--repeats", help="Timed calls per measurement (CPU; the median is reported).")]
WarmupOpt = Annotated[int | None, typer.Option(
    "--warmup", help="Untimed calls before each measurement.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed of the inputs.")]


def parse_ints(option: str, text: str | None) -> list[int] | None:
    """"512,4096,64k" -> [512, 4096, 65536]; UsageError naming the option otherwise."""
    if text is None:
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)([kK]?)", part)
        if not m:
            raise UsageError(f"{option}: expected a comma list of positive integers (k = 1024), "
                             f"got {text!r}")
        out.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    return out


def parse_strs(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [p.strip() for p in text.split(",") if p.strip()]


def one_or_list(xs: list | None):
    """A single value stays a scalar (no grid axis in case ids), several make a grid."""
    if xs is None:
        return None
    return xs[0] if len(xs) == 1 else xs
