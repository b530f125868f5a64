"""Semantic segmentation loss L_sem (`ScanNetSemanticCriterion`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from esam.losses import functional as LF
from esam.structures import FramePrediction, FrameTarget

__all__ = ["ScanNetSemanticCriterion"]


class ScanNetSemanticCriterion(nn.Module):
    """Cross-entropy over labelled points (or superpoints), averaged over samples.

    ``L_sem = mean_b [ -(1/|valid_b|) sum_{i valid} log softmax(z_i)[y_i] ]``. Targets come from
    `FrameTarget.semantic_targets` at the prediction's level: point labels, or superpoint labels
    pooled by plurality vote (ESAM's argmax over per-superpoint class frequencies).

    Args:
        num_classes: C semantic classes.
        ignore_index: label of unlabeled positions (default C, as ESAM).
        drop_last_column: logits may carry C+1 columns; the last is dropped, as ESAM does when
            ``ignore_index >= 0``. With C columns nothing is dropped.

    A sample without a single labelled position contributes nothing (the released code returns NaN
    there); a batch without any gives a zero connected to the graph.
    """

    def __init__(self, *, num_classes: int, ignore_index: int | None = None,
                 drop_last_column: bool = True):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = num_classes if ignore_index is None else ignore_index
        self.drop_last_column = drop_last_column

    def sample_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean CE of one sample: logits ``(P, C)`` or ``(P, C+1)``, targets ``(P,)``."""
        c = self.num_classes
        if logits.dim() != 2 or logits.shape[1] not in (c, c + 1):
            raise ValueError(f"semantic_logits: expected shape (P, C={c}) or (P, C+1={c + 1}), "
                             f"got {tuple(logits.shape)}")
        if logits.shape[1] == c + 1:
            if not self.drop_last_column:
                raise ValueError(f"semantic_logits: got C+1={c + 1} columns with "
                                 "drop_last_column=False; expected C columns")
            logits = logits[:, :-1]
        if targets.shape != (logits.shape[0],):
            raise ValueError(f"semantic targets: expected shape ({logits.shape[0]},) to match "
                             f"semantic_logits, got {tuple(targets.shape)}")
        bad = (targets != self.ignore_index) & ((targets < 0) | (targets >= c))
        if bool(bad.any()):
            raise ValueError(f"semantic targets: expected values in [0, {c}) or ignore_index="
                             f"{self.ignore_index}, got {int(targets[bad][0])}")
        with torch.autocast(logits.device.type, enabled=False):
            return LF.semantic_cross_entropy(LF.upcast(logits), targets.long(),
                                             ignore_index=self.ignore_index)

    def forward(self, predictions: Sequence[FramePrediction],
                targets: Sequence[FrameTarget]) -> dict[str, Tensor]:
        """Returns ``{"loss_sem": L_sem, "loss": L_sem}`` (weights are applied by the caller)."""
        if len(predictions) != len(targets):
            raise ValueError(f"targets: expected {len(predictions)} samples, got {len(targets)}")
        losses, anchor = [], None
        for i, (p, t) in enumerate(zip(predictions, targets)):
            if p.semantic_logits is None:
                raise ValueError(f"semantic_logits: needed for the semantic loss, got None "
                                 f"(sample {i})")
            y = t.semantic_targets(p.semantic_level, self.ignore_index, self.num_classes)
            # fp32 like the loss: a half anchor would make an all-unlabeled batch half
            anchor = LF.upcast(p.semantic_logits).sum() * 0.0 if anchor is None else anchor
            if bool((y != self.ignore_index).any()):
                losses.append(self.sample_loss(p.semantic_logits, y))
            else:
                self.sample_loss(p.semantic_logits[:0], y[:0])  # still validate the shapes
        loss = torch.stack(losses).mean() + anchor if losses else anchor
        return {"loss_sem": loss, "loss": loss}
