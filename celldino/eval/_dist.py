"""Small torch.distributed helpers for evaluation: everything works unchanged in a single process.

Evaluation never starts a process group itself; when one is initialised (torchrun, or a test's gloo group)
features are sharded over its ranks and gathered back, and kNN shards the train set.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist


def is_enabled(group=None) -> bool:
    return dist.is_available() and dist.is_initialized()


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
    if is_enabled(group):
        dist.barrier(group=group)


def broadcast_object(obj, src: int = 0, group=None):
    if not is_enabled(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=_global_rank(src, group), group=group)
    return box[0]


def all_gather_objects(obj, group=None) -> list:
    if not is_enabled(group):
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


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
