"""torchrun entry point of one target-LM run, launched by the ``pretrain_checkpoints`` asset through Dagster Pipes.

Every rank reads the same run spec and trains its slice of each global batch (DDP: NCCL on GPUs, gloo on CPU);
rank 0 alone writes checkpoints, opens the Pipes connection, logs progress and reports the run (steps,
checkpoints, throughput) back to the asset, which then materializes from what is in storage.

Usage (what the asset runs): ``torchrun --standalone --nproc-per-node N -m groupmates_assets.workers.torchrun_pretrain
--spec run.json --storage-root ROOT``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.distributed as dist
from dagster_pipes import open_dagster_pipes

from groupmates_assets.lib.pretraining import RunSpec, run_training
from groupmates_assets.lib.storage import Storage


def _device(local_rank: int, requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="JSON file of a lib.pretraining.RunSpec")
    parser.add_argument("--storage-root", required=True)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process on the CPU (0: default)")
    args = parser.parse_args(argv)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = _device(int(os.environ.get("LOCAL_RANK", "0")), args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.spec, encoding="utf-8") as handle:
        spec = RunSpec.from_json(handle.read())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        pipes = open_dagster_pipes() if rank == 0 else contextlib.nullcontext(None)
        with pipes as session:
            log = session.log.info if session is not None else (lambda message: None)
            log(f"rank 0 of {world} on {device}: {spec.run_dir}")
            result = run_training(Storage(args.storage_root), spec, device, log=log, rank=rank, world=world)
            if session is not None:
                session.report_custom_message({
                    "run_dir": result.run_dir, "resumed_from": result.resumed_from, "final_step": result.final_step,
                    "checkpoints": result.checkpoints, "seconds": round(result.seconds, 2),
                    "tokens_per_second": result.tokens_per_second, "world_size": world, "device": str(device)})
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
