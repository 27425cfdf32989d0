"""Process-group set-up for training: torchrun (env://), SLURM (submitit) or a single process.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; under submitit the SLURM variables are
translated to the same names before calling `init`. A single process runs without a group (unsharded) unless
train.fsdp=true asks for FSDP2 on a 1-rank group (the reference always creates one).
"""
import datetime
import logging
import os
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

# the collectives are celldino.dist's (shared with evaluation), re-exported for the trainer's modules
from celldino.dist import (all_gather_objects, all_reduce_sum, all_true, barrier, broadcast_object, is_main_process,
                           rank_world)
from celldino.dist import is_enabled as is_initialized

__all__ = ["env_world", "select_device", "init", "destroy", "is_initialized", "world_size", "rank", "is_main_process",
           "barrier", "all_reduce_sum", "broadcast_object", "all_gather_objects", "all_true", "check_shared_directory"]

logger = logging.getLogger("celldino")


def env_world():
    """(rank, world_size, local_rank) from the environment (torchrun / SLURM translated), or (0, 1, 0)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return rank, world, local_rank


def select_device(requested="auto", local_rank=0):
    requested = str(requested or "auto")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={requested} but no CUDA GPU is visible (use train.device=cpu or auto)")
        device = torch.device("cuda", local_rank if requested == "cuda" else torch.device(requested).index)
        torch.cuda.set_device(device)
        return device
    if requested != "cpu":
        raise ValueError(f"train.device: expected auto, cpu or cuda[:N], got {requested!r}")
    return torch.device("cpu")


def with_index(device):
    """`device` with its index: a bare "cuda" is the current CUDA device (init_process_group refuses a device_id
    without an index)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def init(device, timeout_minutes=30, single_process_group=False):
    """Initialise the default process group when needed; returns (rank, world_size, we_created_it).

    single_process_group: whether a lone process gets a 1-rank group anyway (train.fsdp=true: FSDP2 then runs on
    it, as the reference always creates a group); by default a lone process has none and runs unsharded."""
    rank, world, _ = env_world()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if world == 1 and not single_process_group:
        return 0, 1, False
    backend = "nccl" if device.type == "cuda" else "gloo"
    device = with_index(device)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if world == 1 and "MASTER_ADDR" not in os.environ:
        # a lone rank needs no rendezvous: an in-memory store, not a TCP one on a port that another process could
        # bind between choosing it and listening on it
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    else:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    logger.info("process group: %s, rank %d of %d", backend, rank, world)
    return rank, world, True


def world_size():
    return rank_world()[1]


def rank():
    return rank_world()[0]


def check_shared_directory(path):
    """Every rank must see the output directory rank 0 writes (checkpoint shards are renamed into place by rank 0,
    and resume reads them on every rank): fail at start, naming the ranks that do not, instead of a checkpoint that
    silently lacks their shards. Collective; nothing to do in one process."""
    if not (is_initialized() and world_size() > 1):
        return
    token = Path(path) / f".celldino-shared-{uuid.uuid4().hex}" if is_main_process() else None
    if token is not None:
        token.write_text("written by rank 0\n")
    token = broadcast_object(None if token is None else str(token))
    blind = [r for r, seen in enumerate(all_gather_objects(os.path.exists(token))) if not seen]
    barrier()
    if is_main_process():
        os.remove(token)
    if blind:
        raise ValueError(f"output directory {path}: rank(s) {blind} cannot see a file rank 0 wrote there; put "
                         "--output-dir on a filesystem shared by every node")


def destroy():
    if is_initialized():
        dist.destroy_process_group()
