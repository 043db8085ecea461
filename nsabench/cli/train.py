"""`nsa train`: the tiny byte-level LM trained with NSA and with dense attention."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nsabench.cli.common import guard, measure_command
from nsabench.cli.needle import parse_depths
from nsabench.cli.options import (
    BackendOpt,
    BatchOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    LabelOpt,
    OutOpt,
    SeedOpt,
    SuiteOpt,
    T_Opt,
    one_or_list,
    parse_ints,
    parse_strs,
)
from nsabench.errors import UsageError
from nsabench.suites import TRAIN_TASKS

EPILOG = """Examples:

  nsa train --out runs                      (CPU: NSA and dense, a few minutes)

  nsa train --task passkey --out runs       (train on passkeys at T, evaluate longer)

  nsa train --nproc 2 --out runs            (torchrun, DDP: gloo on CPU, NCCL on GPU)

  nsa train --steps 50 --T 128 --batch 8 --out runs

Data: lm reads the running Python's standard library source (sorted .py files; the
last 10% of the bytes is validation; the corpus hash is recorded). Both models see the
same batches in the same order from --seed. passkey: filler text with "The pass key is
NNNNN." at a random depth; the loss is on the five answer digits; after training the
model generates the digits greedily (cached decode) at every --eval-lengths and
--depths. The run folder holds checkpoints/, the loss curve (train_curve.csv,
train_loss.png) and, for passkey, passkey.csv and train_passkey_heatmap.png.
"""

TaskOpt = Annotated[str | None, typer.Option(
    "--task", metavar="|".join(TRAIN_TASKS),
    help="lm (default suite: train) or passkey (default suite: passkey); with --suite, "
         "sets every train case's task.")]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="Optimizer steps per model.")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="Peak learning rate (AdamW).")]
AttentionOpt = Annotated[str | None, typer.Option(
    "--attention", metavar="LIST", help="Models to train: nsa,dense (default from the suite).")]
NprocOpt = Annotated[int | None, typer.Option(
    "--nproc", help="Processes: > 1 launches torchrun --standalone with DistributedDataParallel "
                    "(NCCL on GPU, one GPU per process; gloo on CPU). The global --batch is "
                    "split across them.")]
LayersOpt = Annotated[int | None, typer.Option("--layers", help="Transformer blocks.")]
HiddenOpt = Annotated[int | None, typer.Option("--hidden", help="Hidden size.")]
EvalEveryOpt = Annotated[int | None, typer.Option(
    "--eval-every", help="Validation every this many steps (and at the end).")]
EvalLengthsOpt = Annotated[str | None, typer.Option(
    "--eval-lengths", metavar="LIST", help="passkey: evaluation lengths, e.g. 1k,4k,16k.")]
DepthsOpt = Annotated[str | None, typer.Option(
    "--depths", metavar="N|LIST",
    help="passkey: evaluation depths, a count N >= 2 (evenly spaced) or fractions.")]
EvalTrialsOpt = Annotated[int | None, typer.Option(
    "--eval-trials", help="passkey: prompts per (length, depth).")]


def train(
    suite: SuiteOpt = None,
    out: OutOpt = Path("runs"),
    json_out: JsonOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    backend: BackendOpt = None,
    label: LabelOpt = None,
    task: TaskOpt = None,
    steps: StepsOpt = None,
    T: T_Opt = None,
    batch: BatchOpt = None,
    lr: LrOpt = None,
    attention: AttentionOpt = None,
    nproc: NprocOpt = None,
    layers: LayersOpt = None,
    hidden: HiddenOpt = None,
    eval_every: EvalEveryOpt = None,
    eval_lengths: EvalLengthsOpt = None,
    depths: DepthsOpt = None,
    eval_trials: EvalTrialsOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Train the tiny byte-level LM (nsa.model.TinyLM) with NSA and with dense attention on
    the same data; validation loss of both, NSA / dense ratio, tokens/s, loss curves,
    checkpoints. --task passkey trains on passkey retrieval at T and reports exact-match
    accuracy per evaluation length and depth, and the longest length where it holds."""
    with guard():
        if task is not None and task not in TRAIN_TASKS:
            raise UsageError(f"--task: must be one of {', '.join(TRAIN_TASKS)}, got {task!r}")
        default = "passkey" if task == "passkey" else "train"
        overrides = {
            "task": task if suite is not None else None,
            "steps": steps, "T": one_or_list(parse_ints("--T", T)),
            "B": one_or_list(parse_ints("--batch", batch)), "lr": lr,
            "attention": parse_strs(attention), "nproc": nproc,
            "layers": layers, "hidden": hidden,
            "eval_every": eval_every,
            "eval_lengths": parse_ints("--eval-lengths", eval_lengths),
            "eval_depths": parse_depths("--depths", depths), "eval_trials": eval_trials,
            "seed": seed,
        }
    measure_command("train", default, {"train"}, suite=suite, out=out, json_out=json_out,
                    device=device, dtype=dtype, backend=backend, label=label,
                    overrides=overrides)
