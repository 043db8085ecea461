"""Train: the tiny byte-level LM of :mod:`nsa.model` with NSA and with dense attention in the
same case, on the same batches in the same order from the same seed.

Tasks (``task``):

* ``lm``: next-byte prediction on the Python standard library's own source
  (:func:`nsabench.data.stdlib_corpus`; the last 10% of the bytes is validation).
  Metrics: each model's validation loss before training and at the end, the NSA / dense
  ratio, tokens per second (training steps only), the curve of train and validation
  loss (in results.json, rendered to CSV and PNG by the report), a checkpoint per model.
* ``passkey``: synthetic passkey retrieval (:func:`nsabench.data.passkey_batch`) at
  training length T, loss on the five answer digits only; then greedy generation
  (``TinyLM.generate``, cached decode) of the digits at every evaluation length and
  depth. Metrics: exact-match and digit accuracy per (model, length, depth), and the
  longest evaluated length where exact-match accuracy is still >= 0.5.

``nproc > 1`` launches ``python -m torch.distributed.run --standalone`` with that many
processes (:mod:`nsabench.runners.train_worker`): DistributedDataParallel over NCCL on
CUDA (one GPU per rank) or gloo on CPU. The global batch of B windows is the same as in
one process; rank r trains on rows [r B/N, (r+1) B/N), DDP averages the gradients, so
the loss curve equals the single-process one up to floating-point summation order.
Only rank 0 writes (checkpoints and the metrics handed back to this process).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from nsa.backends import to_dtype
from nsa.config import NSAConfig
from nsa.model import TinyLM
from nsabench import artifacts
from nsabench.data import DIGITS, Batches, passkey_batch, stdlib_corpus, val_windows
from nsabench.runners.common import CaseSkip
from nsabench.suites import CaseSpec

PASSKEY_PASS = 0.5  # "generalises to": the longest length with exact-match accuracy >= this


# ----------------------------------------------------------------------------- pieces

def model_config(p: dict[str, Any]) -> NSAConfig:
    return NSAConfig(l=p["l"], d=p["d"], l_sel=p["l_sel"], n=p["n"], n_initial=p["n_initial"],
                     n_local=p["n_local"], w=p["w"], hidden_size=p["hidden"],
                     n_heads=p["H"] * p["G"], n_kv_heads=p["H"], d_k=p["d_k"],
                     d_v=p["d_v"] or p["d_k"], phi=p["phi"])


def build_model(p: dict[str, Any], attention: str, device: torch.device) -> TinyLM:
    torch.manual_seed(p["seed"])  # same init for the parts both models share
    m = TinyLM(model_config(p), n_layers=p["layers"], attention=attention,
               backend=p["backend"])
    m = m.to(device)
    return m.double() if p["dtype"] == "float64" else m


def lr_at(step: int, p: dict[str, Any]) -> float:
    """Linear warm-up over lr_warmup steps, then cosine decay to lr / 10 at the last step."""
    lr, warm, steps = p["lr"], p["lr_warmup"], p["steps"]
    if step < warm:
        return lr * (step + 1) / warm
    frac = (step - warm) / max(1, steps - warm - 1)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def autocast_for(p: dict[str, Any], device: torch.device):
    dt = to_dtype(p["dtype"])
    if dt in (torch.float16, torch.bfloat16):
        return torch.autocast(device_type=device.type, dtype=dt)
    return nullcontext()


def row_losses(model: torch.nn.Module, x: Tensor, answer_at: int | None) -> Tensor:
    """Loss per row of x [b, T+1]: mean next-byte cross-entropy (lm), or over the answer
    digits x[:, answer_at : answer_at + DIGITS] only (passkey)."""
    if answer_at is None:
        logits = model(x[:, :-1])
        ce = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none")
        return ce.mean(dim=1)
    # only the logits that predict the digits are needed, but attention needs the prefix
    logits = model(x[:, : answer_at + DIGITS - 1])[:, answer_at - 1:]
    ce = F.cross_entropy(logits.float().transpose(1, 2), x[:, answer_at:answer_at + DIGITS],
                         reduction="none")
    return ce.mean(dim=1)


class Task:
    """Batches and validation windows of one task, identical on every rank and model."""

    def __init__(self, p: dict[str, Any]):
        self.p = p
        self.kind = p["task"]
        T, B = p["T"], p["B"]
        n_val = p["eval_batches"] * B
        self.corpus = None
        if self.kind == "lm":
            self.corpus = stdlib_corpus(p["corpus_bytes"])
            self.batches = Batches(self.corpus.train, T, B, p["seed"])
            self.val = val_windows(self.corpus.val, T, n_val)
            self.answer_at = None
        else:
            gen = torch.Generator().manual_seed(p["seed"] * 1_000_003 + 999_983)
            self.val, self.answer_at = passkey_batch(n_val, T + 1, gen)

    def global_batch(self, step: int) -> Tensor:
        if self.kind == "lm":
            return self.batches.global_batch(step)
        gen = torch.Generator().manual_seed(self.p["seed"] * 1_000_003 + step)
        return passkey_batch(self.p["B"], self.p["T"] + 1, gen)[0]

    def shard(self, step: int, rank: int, world: int) -> Tensor:
        per = self.p["B"] // world
        return self.global_batch(step)[rank * per:(rank + 1) * per]


def _all_reduce_sum(t: Tensor, world: int) -> Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def validation_loss(model: torch.nn.Module, task: Task, p: dict[str, Any],
                    device: torch.device, rank: int, world: int) -> float:
    """Mean of the per-window losses over all validation windows (sharded over ranks)."""
    was = model.training
    model.eval()
    mine = task.val[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    step = max(1, p["B"] // world)
    for i in range(0, mine.shape[0], step):
        x = mine[i:i + step].to(device)
        with autocast_for(p, device):
            rl = row_losses(model, x, task.answer_at)
        total[0] += rl.double().sum()
        total[1] += rl.numel()
    total = _all_reduce_sum(total, world)
    model.train(was)
    return float(total[0] / total[1])


@torch.no_grad()
def passkey_eval(model: TinyLM, p: dict[str, Any], device: torch.device,
                 attention: str) -> list[dict[str, Any]]:
    """Greedy generation of the key's digits at each evaluation length and depth."""
    model.eval()
    rows = []
    for L in p["eval_lengths"]:
        for depth in p["eval_depths"]:
            gen = torch.Generator().manual_seed(p["seed"] * 7919 + L * 31 + round(depth * 1000))
            x, first = passkey_batch(p["eval_trials"], L, gen, depth=depth)
            x = x.to(device)
            with autocast_for(p, device):
                out = model.generate(x[:, :first], DIGITS)
            want = x[:, first:first + DIGITS]
            rows.append({"model": attention, "T": L, "depth": depth,
                         "accuracy": float((out == want).all(dim=1).double().mean()),
                         "digit_accuracy": float((out == want).double().mean()),
                         "trials": p["eval_trials"]})
    return rows


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


# ----------------------------------------------------------------------------- training

def train_model(p: dict[str, Any], task: Task, attention: str, device: torch.device,
                rank: int = 0, world: int = 1) -> tuple[TinyLM, dict[str, Any]]:
    """Train one model; returns it (unwrapped) and its curve and numbers."""
    model = build_model(p, attention, device)
    net: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": p["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=p["lr"], betas=(0.9, 0.95))
    curve: list[dict[str, Any]] = []
    initial = validation_loss(model, task, p, device, rank, world)
    curve.append({"model": attention, "step": 0, "train_loss": None, "val_loss": initial})
    train_s = 0.0
    steps = p["steps"]
    for step in range(steps):
        x = task.shard(step, rank, world).to(device)
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, p)
        with autocast_for(p, device):
            loss = row_losses(net, x, task.answer_at).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if p["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), p["grad_clip"])
        opt.step()
        logged = _all_reduce_sum(loss.detach().double().reshape(1), world) / world
        value = float(logged)  # synchronises: the step's time is complete here
        train_s += time.perf_counter() - t0
        row = {"model": attention, "step": step + 1, "train_loss": value, "val_loss": None}
        if (step + 1) % p["eval_every"] == 0 or step + 1 == steps:
            row["val_loss"] = validation_loss(model, task, p, device, rank, world)
        curve.append(row)
    final = curve[-1]["val_loss"]
    tokens = steps * p["B"] * p["T"]
    info = {
        "curve": curve,
        "initial_val_loss": initial,
        "final_val_loss": final,
        "final_train_loss": curve[-1]["train_loss"],
        "train_s": train_s,
        "tokens_per_s": tokens / train_s if train_s > 0 else None,
        "params": sum(q.numel() for q in model.parameters()),
    }
    return model, info


def save_checkpoint(model: TinyLM, p: dict[str, Any], attention: str, case_id: str,
                    info: dict[str, Any], folder: Path) -> str:
    rel = Path("checkpoints") / f"{_safe(case_id)}-{attention}.pt"
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": model.config.to_dict(),
        "tiny_lm": {"n_layers": p["layers"], "attention": attention, "vocab_size": 256},
        "task": p["task"], "steps": p["steps"], "seed": p["seed"],
        "final_val_loss": info["final_val_loss"],
    }, path)
    return rel.as_posix()


def train_all(p: dict[str, Any], case_id: str, device: torch.device, rank: int = 0,
              world: int = 1, folder: Path | None = None) -> dict[str, Any]:
    """Train every model of the case (and, for passkey, evaluate it); metrics on rank 0."""
    if p["B"] % world:
        raise ValueError(f"train: the global batch B={p['B']} must split evenly over "
                         f"nproc={world} processes")
    task = Task(p)
    m: dict[str, Any] = {"task": p["task"], "world_size": world, "curve": []}
    if task.corpus is not None:
        m["corpus"] = task.corpus.describe()
    finite = True
    passkey: list[dict[str, Any]] = []
    for attention in p["attention"]:
        model, info = train_model(p, task, attention, device, rank, world)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        if rank != 0:
            continue
        m["curve"] += info.pop("curve")
        for key, value in info.items():
            m[f"{key}_{attention}"] = value
        finite = finite and all(math.isfinite(v) for v in
                                (info["final_val_loss"], info["initial_val_loss"]))
        if folder is not None:
            m[f"checkpoint_{attention}"] = save_checkpoint(model, p, attention, case_id, info,
                                                           folder)
        if p["task"] == "passkey":
            rows = passkey_eval(model, p, device, attention)
            passkey += rows
            _passkey_summary(m, rows, p, attention)
        del model
    if rank != 0:
        return {}
    first = p["attention"][0]
    main = "nsa" if "nsa" in p["attention"] else first
    m["final_loss"] = m[f"final_val_loss_{main}"]
    m["loss_drop"] = m[f"initial_val_loss_{main}"] - m[f"final_val_loss_{main}"]
    if {"nsa", "dense"} <= set(p["attention"]):
        m["loss_ratio"] = m["final_val_loss_nsa"] / m["final_val_loss_dense"]
    if passkey:
        m["passkey"] = passkey
        m["passkey_accuracy"] = m[f"passkey_accuracy_{main}"]
        m["passkey_digit_accuracy"] = m[f"passkey_digit_accuracy_{main}"]
    m["finite"] = finite
    return m


def _passkey_summary(m: dict[str, Any], rows: list[dict[str, Any]], p: dict[str, Any],
                     attention: str) -> None:
    """Accuracy at the training length (lengths <= T), at the longest length, and the
    longest length whose exact-match accuracy is >= PASSKEY_PASS (None: none)."""
    by_len: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_len.setdefault(r["T"], []).append(r)
    mean = {L: sum(r["accuracy"] for r in rs) / len(rs) for L, rs in by_len.items()}
    digit = {L: sum(r["digit_accuracy"] for r in rs) / len(rs) for L, rs in by_len.items()}
    short = [L for L in mean if L <= p["T"] + 1] or [min(mean)]
    m[f"passkey_accuracy_{attention}"] = sum(mean[L] for L in short) / len(short)
    m[f"passkey_digit_accuracy_{attention}"] = sum(digit[L] for L in short) / len(short)
    longest = max(mean)
    m[f"passkey_accuracy_longest_{attention}"] = mean[longest]
    ok = [L for L in sorted(mean) if mean[L] >= PASSKEY_PASS]
    m[f"passkey_generalizes_to_{attention}"] = max(ok) if ok else None


# ----------------------------------------------------------------------------- the case

def run(spec: CaseSpec, device: torch.device) -> dict[str, Any]:
    p = spec.params
    if p["nproc"] > 1:
        return launch(spec, device)
    return train_all(p, spec.id, device, folder=artifacts.current())


def launch(spec: CaseSpec, device: torch.device) -> dict[str, Any]:
    """Run the case under torchrun with nproc processes; rank 0 hands the metrics back."""
    p = spec.params
    N = p["nproc"]
    if p["B"] % N:
        raise ValueError(f"train: the global batch B={p['B']} must split evenly over "
                         f"nproc={N} processes")
    if device.type == "cuda" and torch.cuda.device_count() < N:
        raise CaseSkip(f"nproc={N} needs {N} CUDA devices, this machine has "
                       f"{torch.cuda.device_count()}")
    threads = p["threads"] or max(1, (os.cpu_count() or 1) // N)
    with tempfile.TemporaryDirectory(prefix="nsa-train-") as tmp:
        tmpd = Path(tmp)
        (tmpd / "params.json").write_text(json.dumps(p))
        folder = artifacts.current()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={N}", "-m", "nsabench.runners.train_worker",
               "--params", str(tmpd / "params.json"), "--result", str(tmpd / "result.json"),
               "--case-id", spec.id, "--device", device.type,
               "--threads", str(threads)]
        if folder is not None:
            cmd += ["--folder", str(folder)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
            raise RuntimeError(f"torchrun with {N} processes exited with {proc.returncode}: "
                               f"{tail}")
        m = json.loads((tmpd / "result.json").read_text())
    m["launcher"] = f"torch.distributed.run --standalone --nproc-per-node={N}"
    m["ddp_backend"] = "nccl" if device.type == "cuda" else "gloo"
    return m
