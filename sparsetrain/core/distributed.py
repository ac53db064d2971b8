"""The few collectives a sparse run needs, on ``torch.distributed``'s default process group.

Every training loop we drive (Lightning's DDP strategies, Fabric, ``torchrun`` with a plain loop, the Hugging
Face Trainer through Accelerate) initialises the default group; without one (a single process) every function
here is the identity. Collectives run on the device the backend needs: the current CUDA device for NCCL, the
CPU otherwise.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank ``src``'s ``value`` on every rank."""
    if world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_device())
    dist.broadcast(t, src=src)
    return int(t.item())


def all_reduce_max(values: Tensor) -> Tensor:
    """The element-wise maximum over the ranks (a new tensor on the collective's device)."""
    if world_size() == 1:
        return values.clone()
    out = values.to(device=_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out
