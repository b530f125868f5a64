"""Small torch.distributed helpers: every loss normaliser goes through here."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_mean_count(count: Tensor | float, device: torch.device) -> Tensor:
    """``max(global count, 1) / world_size`` (DETR's ``num_boxes``, clamped before dividing).

    Dividing a rank's local sum by this makes DDP's gradient average equal to the global
    ``sum / max(global count, 1)``. Without a process group it is ``max(count, 1)``.
    """
    c = torch.as_tensor(count, dtype=torch.float32, device=device).clone()
    if not is_distributed():
        return c.clamp(min=1.0)
    dist.all_reduce(c)
    return c.clamp(min=1.0) / dist.get_world_size()
