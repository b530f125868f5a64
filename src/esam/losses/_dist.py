"""Small torch.distributed helpers: every loss normaliser goes through here."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_mean_count(count: Tensor | float, device: torch.device,
                      minimum: float = 1.0) -> Tensor:
    """``max(global count, 1) / world_size`` (DETR's ``num_boxes``, clamped before dividing).

    Dividing a rank's local sum by this makes DDP's gradient average equal to the global
    ``sum / max(global count, 1)``. Without a process group it is ``max(count, 1)``.
    ``minimum`` replaces the clamp value 1 (e.g. for a sum of class weights).
    """
    c = torch.as_tensor(count, device=device).clone()
    if not c.is_floating_point():
        c = c.float()
    if not is_distributed():
        return c.clamp(min=minimum)
    dist.all_reduce(c)
    return c.clamp(min=minimum) / dist.get_world_size()
