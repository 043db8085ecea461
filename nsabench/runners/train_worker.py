"""One rank of a distributed `nsa train` case (started by torchrun, never by hand).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; this joins the process group (NCCL on
CUDA with one GPU per local rank, gloo on CPU), trains the case with
DistributedDataParallel and, on rank 0 only, writes the metrics JSON (and the
checkpoints into the run folder).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from nsabench.runners.train import train_all


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", required=True, type=Path)
    ap.add_argument("--result", required=True, type=Path)
    ap.add_argument("--case-id", required=True)
    ap.add_argument("--device", choices=("cpu", "cuda"), required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--folder", type=Path, default=None)
    args = ap.parse_args(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if args.device == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, args.threads))
        backend = "gloo"
    params = json.loads(args.params.read_text())
    dist.init_process_group(backend=backend)
    try:
        metrics = train_all(params, args.case_id, device, rank, world,
                            folder=args.folder if rank == 0 else None)
        if rank == 0:
            metrics["threads_per_rank"] = torch.get_num_threads() if args.device == "cpu" \
                else None
            args.result.write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
