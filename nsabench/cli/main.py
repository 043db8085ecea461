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

app.command("env", epilog=env.EPILOG,
            short_help="Versions, GPUs, optional packages, backends and routing, explained."
            )(env.env)
app.command("parity", epilog=parity.EPILOG,
            short_help="Each backend against the float64 reference (forward, gradients)."
            )(parity.parity)
app.command("decode", epilog=decode.EPILOG,
            short_help="Decode step latency and bytes read against dense decode."
            )(decode.decode)
app.command("prefill", epilog=prefill.EPILOG,
            short_help="Prefill fwd and fwd+bwd time against dense attention, per branch."
            )(prefill.prefill)
app.command("needle", epilog=needle.EPILOG,
            short_help="Needle in a haystack through NSA attention: accuracy, recall, heat map."
            )(needle.needle)
app.command("train", epilog=train.EPILOG,
            short_help="Tiny byte-level LM with NSA and dense: loss curves, passkey, DDP."
            )(train.train)
app.command("readiness", epilog=readiness.EPILOG,
            short_help="A readiness suite end to end: one report, every check, a verdict."
            )(readiness.readiness)
app.command("report", epilog=report.EPILOG,
            short_help="Re-render a run folder from its results.json alone."
            )(report.report)
app.add_typer(suite.app, name="suite")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
