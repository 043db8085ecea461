"""Training data for `nsa train`: real text that ships with every Python installation, and
a synthetic passkey-retrieval task. Both are deterministic given a seed.

* :func:`stdlib_corpus`: the ``.py`` files of the running Python's standard library
  (source and docstrings; top level and packages, tests, site-packages and idle
  excluded), sorted by path, concatenated up to ``max_bytes``. The last
  ``val_fraction`` of the bytes is the validation split (a contiguous tail, so no
  validation window overlaps a training window). Its SHA-256 is recorded: the text
  differs between Python versions.
* :class:`Batches`: the batch order. Step s of a run draws its window starts from a
  generator seeded by (seed, s), so every model and every rank sees the same global
  batch at the same step; a rank takes its contiguous share of the rows.
* :func:`passkey_batch`: filler text with "The pass key is NNNNN." at a depth and the
  question at the end; the targets are the digits of the answer.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__",
              "lib2to3", "turtledemo", "ensurepip", "tkinter"}


@dataclass(frozen=True)
class Corpus:
    train: Tensor  # uint8 bytes
    val: Tensor
    source: str
    files: int
    sha256: str

    def describe(self) -> dict[str, object]:
        return {"source": self.source, "files": self.files, "bytes": int(self.train.numel()
                + self.val.numel()), "train_bytes": int(self.train.numel()),
                "val_bytes": int(self.val.numel()), "sha256": self.sha256}


def stdlib_files() -> list[Path]:
    """Sorted .py files of the standard library (pruned walk: site-packages, tests,
    idle and the like are never entered)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test")]
        out += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(out, key=lambda p: p.relative_to(root).parts)


def stdlib_corpus(max_bytes: int, val_fraction: float = 0.1) -> Corpus:
    """The standard library's Python source, sorted by path, up to max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total, n = [], 0, 0
    for path in stdlib_files():
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data[: max_bytes - total])
        total += len(chunks[-1])
        n += 1
        if total >= max_bytes:
            break
    blob = b"".join(chunks)
    if len(blob) < 4096:
        raise RuntimeError(f"standard library source under {root}: only {len(blob)} bytes "
                           f"found (need at least 4096)")
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    cut = int(len(blob) * (1 - val_fraction))
    return Corpus(train=data[:cut].clone(), val=data[cut:].clone(),
                  source=f"Python {sysconfig.get_python_version()} standard library "
                         f"source ({root})",
                  files=n, sha256=hashlib.sha256(blob).hexdigest())


@dataclass(frozen=True)
class Batches:
    """Deterministic global batches of B windows of T + 1 bytes."""

    data: Tensor
    T: int
    B: int
    seed: int

    def __post_init__(self) -> None:
        if self.data.numel() < self.T + 2:
            raise ValueError(f"corpus split of {self.data.numel()} bytes is shorter than one "
                             f"window of T + 1 = {self.T + 1} bytes")

    def global_batch(self, step: int) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.data.numel() - self.T - 1, (self.B,), generator=gen)
        idx = starts[:, None] + torch.arange(self.T + 1)
        return self.data[idx].long()

    def shard(self, step: int, rank: int, world: int) -> Tensor:
        """Rows [rank * B / world, (rank + 1) * B / world) of the global batch."""
        per = self.B // world
        return self.global_batch(step)[rank * per:(rank + 1) * per]


def val_windows(data: Tensor, T: int, count: int) -> Tensor:
    """count evenly spaced windows of T + 1 bytes over the validation split."""
    span = data.numel() - T - 1
    if span < 0:
        raise ValueError(f"validation split of {data.numel()} bytes is shorter than one "
                         f"window of T + 1 = {T + 1} bytes")
    starts = torch.linspace(0, span, count).long()
    return data[starts[:, None] + torch.arange(T + 1)].long()


# ----------------------------------------------------------------------------- passkey

FILLER = (b"The grass is green. The sky is blue. The sun is yellow. Here we go. "
          b"There and back again. ")
DIGITS = 5


def passkey_text(length: int, depth: float, key: str, offset: int) -> tuple[bytes, int]:
    """A prompt + answer of exactly ``length`` bytes: filler, the key sentence at ``depth``
    (fraction of the filler before it), more filler, the question, then the key's digits.
    Returns (bytes, index of the first answer byte)."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. ".encode()
    question = b" What is the pass key? The pass key is "
    n_fill = length - len(needle) - len(question) - len(key)
    if n_fill < 0:
        raise ValueError(f"passkey length {length} is shorter than the key and question "
                         f"({length - n_fill} bytes)")
    reps = (n_fill + offset) // len(FILLER) + 2
    filler = (FILLER * reps)[offset:offset + n_fill]
    before = int(round(depth * n_fill))
    text = filler[:before] + needle + filler[before:] + question + key.encode()
    assert len(text) == length
    return text, length - len(key)


def passkey_batch(B: int, length: int, gen: torch.Generator,
                  depth: float | None = None) -> tuple[Tensor, int]:
    """B sequences of ``length`` bytes with random keys (and random depths unless given);
    returns (tokens [B, length], index of the first answer byte)."""
    rows, first = [], 0
    for _ in range(B):
        key = "".join(str(int(d)) for d in torch.randint(0, 10, (DIGITS,), generator=gen))
        dep = float(torch.rand((), generator=gen)) if depth is None else depth
        offset = int(torch.randint(0, len(FILLER), (), generator=gen))
        text, first = passkey_text(length, dep, key, offset)
        rows.append(torch.frombuffer(bytearray(text), dtype=torch.uint8))
    return torch.stack(rows).long(), first
