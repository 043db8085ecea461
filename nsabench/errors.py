"""Known errors of the toolkit, each with the exit code the `nsa` command returns.

Exit codes (CLI.md): 0 ok, 1 a check or threshold failed, 2 bad usage or invalid suite
file, 3 the environment cannot run what was asked.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ENV = 3


class NSABenchError(Exception):
    """A known error: the command prints its message on one line and exits with code."""

    exit_code = EXIT_FAILED


class UsageError(NSABenchError):
    """Bad option value or bad argument (exit 2)."""

    exit_code = EXIT_USAGE


class SuiteError(UsageError):
    """An invalid suite file; ``problems`` holds one located message per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        first = self.problems[0] if self.problems else "invalid suite"
        more = f" (and {len(self.problems) - 1} more problem(s))" if len(self.problems) > 1 else ""
        super().__init__(first + more)


class EnvironmentUnavailable(NSABenchError):
    """The machine cannot run what was asked, e.g. --device cuda without CUDA (exit 3)."""

    exit_code = EXIT_ENV


class ResultsError(UsageError):
    """A run folder or results.json that cannot be read (exit 2)."""
