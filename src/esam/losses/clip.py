"""CLIP consistency loss L_clip (`ClipConsCriterion`): NT-Xent between fused 3-D and image
features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from esam.losses import functional as LF
from esam.losses._dist import is_distributed
from esam.structures import FramePrediction

__all__ = ["ClipConsCriterion", "gather_with_grad"]


class _AllGather(torch.autograd.Function):
    """``all_gather`` of equal-shaped ``(M, d)`` rows whose backward sums every rank's gradient
    of this rank's rows (each rank's loss reads them)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, ...]:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> Tensor:
        stacked = torch.stack([g.contiguous() for g in grads])  # (world, M, d)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """Concatenate ``x (M_r, d)`` from every rank with this rank's rows first.

    Rows from other ranks carry gradient back to them: the backward of the gather all-reduces
    the gradients and each rank keeps those of its own rows. Returns the gathered rows and this
    rank's row count. Without a process group it returns ``x`` itself.
    """
    if not is_distributed():
        return x, x.shape[0]
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    m_max = int(max(s.item() for s in sizes))
    pad = torch.cat([x, x.new_zeros(m_max - x.shape[0], x.shape[1])])
    parts = _AllGather.apply(pad)
    rank = dist.get_rank()
    own = [parts[rank][: int(sizes[rank])]]
    others = [p[: int(s)] for r, (p, s) in enumerate(zip(parts, sizes)) if r != rank]
    return torch.cat(own + others), x.shape[0]


class ClipConsCriterion(nn.Module):
    """NT-Xent between ``fused_global (M, d)`` and ``clip_global (M, d)``.

    ``L_clip = -(1/M) sum_i log softmax_j(cos(f_i, c_j) / tau)_i``, one cross-entropy over the
    similarity matrix; gradients reach both sides. Rows of every sample (and, with
    ``gather_distributed``, of every rank) are negatives of each other.

    Args:
        temperature: tau (0.07).
        symmetric: average with the image-to-3-D direction.
        gather_distributed: under DDP, use the other ranks' image rows as extra negatives.
    """

    def __init__(self, *, temperature: float = 0.07, symmetric: bool = False,
                 gather_distributed: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {temperature}")
        self.temperature = temperature
        self.symmetric = symmetric
        self.gather_distributed = gather_distributed

    def loss(self, fused: Tensor, clip: Tensor) -> Tensor:
        """``fused (M, d)``, ``clip (M, d)`` -> scalar."""
        if fused.dim() != 2 or clip.shape != fused.shape:
            raise ValueError(f"clip_global: expected shape {tuple(fused.shape)} (as fused_global, "
                             f"(M, d)), got {tuple(clip.shape)}")
        with torch.autocast(fused.device.type, enabled=False):
            fused, clip = LF.upcast(fused), LF.upcast(clip)
            if self.gather_distributed and is_distributed():
                all_clip, m = gather_with_grad(clip)
                all_fused, _ = gather_with_grad(fused)
                loss = LF.nt_xent(fused, all_clip, temperature=self.temperature)
                if self.symmetric:
                    back = LF.nt_xent(clip, all_fused, temperature=self.temperature)
                    loss = (loss + back) / 2
                return loss
            return LF.nt_xent(fused, clip, temperature=self.temperature, symmetric=self.symmetric)

    def forward(self, predictions: Sequence[FramePrediction]) -> dict[str, Tensor]:
        """Pools every sample's rows into one set of negatives. Returns ``loss_clip`` and ``loss``."""
        # fp32 before the concatenation: CPU autocast cannot concatenate fp16 tensors.
        fused = [LF.upcast(p.fused_global) for p in predictions if p.fused_global is not None]
        clip = [LF.upcast(p.clip_global) for p in predictions if p.clip_global is not None]
        if not fused:
            raise ValueError("fused_global / clip_global: the CLIP term needs them, got None")
        d = fused[0].shape[1]
        for i, f in enumerate(fused):
            if f.shape[1] != d:
                raise ValueError(f"fused_global: expected (M, d={d}) in every sample (as the "
                                 f"first one), got {tuple(f.shape)} in sample {i}")
        loss = self.loss(torch.cat(fused), torch.cat(clip))
        return {"loss_clip": loss, "loss": loss}
