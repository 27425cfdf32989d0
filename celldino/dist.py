"""Small torch.distributed helpers shared by training and evaluation: everything works unchanged in a single
process (no group, or a group of one rank), and every helper takes an optional process group (None: the default).

Training sets up its group in celldino.train.distributed; evaluation only joins one a launcher describes
(`maybe_init_distributed`): features are then sharded over the ranks and gathered back, and kNN shards the train
set.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist


def is_enabled(group=None) -> bool:
    """Whether a process group exists (a 1-rank group counts: FSDP2 can run on one)."""
    return dist.is_available() and dist.is_initialized()


def several_ranks(group=None) -> bool:
    """Whether collectives have peers to talk to: with no group or one rank they are skipped."""
    return is_enabled(group) and dist.get_world_size(group) > 1


def rank_world(group=None):
    if not is_enabled(group):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_main_process(group=None) -> bool:
    return rank_world(group)[0] == 0


def comm_device(group=None) -> torch.device:
    """Device that collectives of this group need their tensors on (NCCL: the current CUDA device)."""
    if not is_enabled(group):
        return torch.device("cpu")
    backend = dist.get_backend(group)
    if "nccl" in str(backend).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier(group=None) -> None:
    if several_ranks(group):
        dist.barrier(group=group)


def broadcast_object(obj, src: int = 0, group=None):
    if not several_ranks(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=_global_rank(src, group), group=group)
    return box[0]


def all_gather_objects(obj, group=None) -> list:
    """[obj of rank 0, obj of rank 1, ...] ([obj] in a single process)."""
    if not several_ranks(group):
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `tensor` over the ranks in place (and return it)."""
    if several_ranks(group):
        dist.all_reduce(tensor, group=group)
    return tensor


def all_true(flag, group=None) -> bool:
    """Whether `flag` holds on every rank (collective): ranks take the same branch after a per-rank check."""
    return all(all_gather_objects(bool(flag), group))


def _global_rank(group_rank: int, group) -> int:
    if group is None:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def broadcast_tensor(tensor: Optional[torch.Tensor], src: int, shape, dtype, group=None) -> torch.Tensor:
    """Broadcast `tensor` (only meaningful on `src`) of known shape / dtype; returns it on the caller's
    original device (CPU tensors travel through the communication device when the backend needs it)."""
    device = comm_device(group)
    rank, _ = rank_world(group)
    if rank == src:
        buf = tensor.to(device=device, dtype=dtype).contiguous()
        out_device = tensor.device
    else:
        buf = torch.empty(tuple(shape), dtype=dtype, device=device)
        out_device = None
    dist.broadcast(buf, src=_global_rank(src, group), group=group)
    return buf if out_device is None else tensor


def gather_tensors(tensor: torch.Tensor, dst: int, group=None) -> Optional[List[torch.Tensor]]:
    """Gather equally-shaped tensors to `dst` (rank order); None on the other ranks."""
    device = comm_device(group)
    rank, world = rank_world(group)
    buf = tensor.to(device).contiguous()
    out = [torch.empty_like(buf) for _ in range(world)] if rank == dst else None
    dist.gather(buf, out, dst=_global_rank(dst, group), group=group)
    if out is None:
        return None
    return [t.to(tensor.device) for t in out]


def maybe_init_distributed() -> bool:
    """Join the process group a launcher (torchrun: RANK / WORLD_SIZE / LOCAL_RANK) describes; returns whether
    this process runs distributed. A plain single process stays without a group."""
    import os

    if is_enabled():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True

