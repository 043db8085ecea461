"""The run folder of the case being run, for runners that write files beside results.json
(checkpoints). Set by :func:`nsabench.runners.run_cases`; None outside a run, in which
case such files are not written."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

_FOLDER: ContextVar[Path | None] = ContextVar("nsabench_run_folder", default=None)


def current() -> Path | None:
    return _FOLDER.get()


@contextmanager
def run_folder(folder: Path | None) -> Iterator[None]:
    token = _FOLDER.set(None if folder is None else Path(folder))
    try:
        yield
    finally:
        _FOLDER.reset(token)
