"""The `nsa` command: this module only wires the commands (one module each)."""

from __future__ import annotations

import typer

from nsabench.cli import decode, env, needle, parity, prefill, readiness, report, suite, train

app = typer.Typer(
    name="nsa",
    help="Native Sparse Attention toolkit: environment, parity, decode/prefill benchmarks, "
         "needle retrieval, training showcase, readiness reports. Exit codes: 0 ok, 1 a "
         "check or threshold failed, 2 bad usage or suite file, 3 the environment cannot "
         "run what was asked. NSA_DEBUG=1 shows tracebacks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (name, module, function, one-line help): main.py only wires commands
COMMANDS = (
    ("env", env, env.env,
     "Versions, GPUs, optional packages, backends and routing, explained."),
    ("parity", parity, parity.parity,
     "Each backend against the float64 reference (forward, gradients)."),
    ("decode", decode, decode.decode,
     "Decode step latency and bytes read against dense decode."),
    ("prefill", prefill, prefill.prefill,
     "Prefill fwd and fwd+bwd time against dense attention, per branch."),
    ("needle", needle, needle.needle,
     "Needle in a haystack through NSA attention: accuracy, recall, heat map."),
    ("train", train, train.train,
     "Tiny byte-level LM with NSA and dense: loss curves, passkey, DDP."),
    ("readiness", readiness, readiness.readiness,
     "A readiness suite end to end: one report, every check, a verdict."),
    ("report", report, report.report,
     "Re-render a run folder from its results.json alone."),
)
for _name, _module, _fn, _help in COMMANDS:
    app.command(_name, epilog=_module.EPILOG, short_help=_help)(_fn)
app.add_typer(suite.app, name="suite")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
