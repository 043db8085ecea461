"""`nsa needle`: the mechanism needle, retrieval through NSA attention (no training)."""

from __future__ import annotations

import re
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
    SeedOpt,
    SuiteOpt,
    one_or_list,
    parse_ints,
)
from nsabench.errors import UsageError
from nsabench.suites import NEEDLE_ABLATIONS, NEEDLE_GATES

EPILOG = """Examples:

  nsa needle --out runs                              (CPU: 1k and 4k, 11 depths)

  nsa needle --len 4k,16k,64k --depths 11 --out runs     (GPU)

  nsa needle --len 2k --ablation random_selection --out runs   (must fail: exit 1)

What it tests: haystack keys are random and values are random codes; at each depth one
selection block of keys is aligned with the last query and carries the planted code.
Distractor blocks carry wrong codes: half a block as aligned as the needle, a whole
block one logit weaker, single tokens more aligned than the needle. NSA must select
the needle block with its own compressed scores (phi = mean) and top-n, and its
output must be nearest to the planted code. Dense attention is the control. Thresholds
(exit 1 when one fails) come from the suite: accuracy, recall, dense accuracy.
"""

LenOpt = Annotated[str | None, typer.Option(
    "--len", metavar="LIST", help="Haystack lengths, comma list (k = 1024), e.g. 4k,16k,64k.")]
DepthsOpt = Annotated[str | None, typer.Option(
    "--depths", metavar="N|LIST",
    help="An integer N >= 2: N depths evenly spaced over 0..100%; or a comma list of "
         "fractions in [0, 1], e.g. 0,0.5,1.")]
TrialsOpt = Annotated[int | None, typer.Option(
    "--trials", help="Haystacks per KV head and (length, depth).")]
DistractorsOpt = Annotated[int | None, typer.Option(
    "--distractors", help="Distractor blocks per haystack (half / weak / spike, in turn).")]
CodesOpt = Annotated[int | None, typer.Option(
    "--codes", help="Codebook size (chance accuracy = 1 / codes).")]
GatesOpt = Annotated[str | None, typer.Option(
    "--gates", metavar="|".join(NEEDLE_GATES),
    help="sel: only the selection branch's gate on (default); all: the three at 1/3.")]
AblationOpt = Annotated[str | None, typer.Option(
    "--ablation", metavar="|".join(NEEDLE_ABLATIONS),
    help="Break the mechanism on purpose: random_selection or unaligned (must fail).")]


def parse_depths(option: str, text: str | None) -> list[float] | None:
    """"11" -> 11 depths 0, 0.1, .., 1; "0,0.5,1" -> those; UsageError otherwise."""
    if text is None:
        return None
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        n = int(text)
        if n < 2:
            raise UsageError(f"{option}: a count of depths must be >= 2 (or give a list of "
                             f"fractions such as 0.5), got {text!r}")
        return [round(i / (n - 1), 6) for i in range(n)]
    out = []
    for part in text.split(","):
        try:
            x = float(part)
        except ValueError:
            raise UsageError(f"{option}: expected a count N or a comma list of fractions in "
                             f"[0, 1], got {text!r}") from None
        if not 0.0 <= x <= 1.0:
            raise UsageError(f"{option}: depths are fractions in [0, 1], got {x:g}")
        out.append(x)
    return out


def needle(
    suite: SuiteOpt = None,
    out: OutOpt = Path("runs"),
    json_out: JsonOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    backend: BackendOpt = None,
    label: LabelOpt = None,
    length: LenOpt = None,
    depths: DepthsOpt = None,
    trials: TrialsOpt = None,
    batch: BatchOpt = None,
    G: G_Opt = None,
    H: H_Opt = None,
    d_k: DkOpt = None,
    d_v: DvOpt = None,
    distractors: DistractorsOpt = None,
    codes: CodesOpt = None,
    gates: GatesOpt = None,
    ablation: AblationOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Needle in a haystack through NSA attention: accuracy per (length, depth) of the
    code read from NSA's output (nearest code), the selection recall of the needle
    block, and dense attention as the control; table, CSV and heat map. --batch is the
    number of haystacks per op call."""
    with guard():
        overrides = {
            "T": one_or_list(parse_ints("--len", length)),
            "depths": parse_depths("--depths", depths),
            "trials": trials, "B": one_or_list(parse_ints("--batch", batch)),
            "G": one_or_list(parse_ints("--G", G)), "H": one_or_list(parse_ints("--H", H)),
            "d_k": one_or_list(parse_ints("--d-k", d_k)),
            "d_v": one_or_list(parse_ints("--d-v", d_v)),
            "distractors": distractors, "codes": codes, "gates": gates,
            "ablation": ablation, "seed": seed,
        }
    measure_command("needle", "needle", {"needle"}, suite=suite, out=out, json_out=json_out,
                    device=device, dtype=dtype, backend=backend, label=label,
                    overrides=overrides)
