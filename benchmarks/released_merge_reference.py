"""Loop reference of ESAM's released merge criteria (parity oracle and benchmark baseline).

A straightforward rendering of the *algorithm* of ``ScanNetMergeCriterion_Fast`` and
``ScanNetMergeCriterion_Seal`` from ESAM's ``oneformer3d/merge_criterion.py``: per-sample,
per-frame and per-instance Python loops, InfoNCE written as ``exp(.) / sum exp(.)`` where the
released code writes it so, the released temperatures and weights. It keeps the released quirks
(exact-zero tests, normalisations, Python-float accumulators) on purpose; it is not library code.

Input layout (the released ``__call__``):

* ``merge_feats[b][v]``: ``(Q, d)`` merge features of the Q queries of frame v of sample b;
* ``ins_masks[b][v][k]``: 1-D integer tensor, the indices of the queries of frame v that belong
  to ground-truth instance k (empty when instance k is absent from the frame). Every frame of a
  sample lists the same K instances.

The only change of substance: the Seal random negatives are injectable. ``negatives[b][v]`` is an
integer tensor ``(K, M, K)``; entry ``[r, i, c]`` is the position, in instance c's query list,
of the negative drawn for the i-th query of instance r (only entries with ``i < count_r``,
``c != r`` and ``count_c > 0`` are read). Without it a ``numpy`` generator draws them, as the
released code draws ``np.random.randint``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ReferenceMergeFast", "ReferenceMergeSeal"]

MergeFeats = Sequence[Sequence[Tensor]]
InsMasks = Sequence[Sequence[Sequence[Tensor]]]


def _zero(like: Tensor) -> Tensor:
    return torch.tensor(0.0, dtype=like.dtype, device=like.device)


class ReferenceMergeFast:
    """Loop form of ``ScanNetMergeCriterion_Fast`` (tmp: tau 0.07, both directions; p2s: tau 0.02).

    Returns the released dict: ``merge_loss_tmp`` and ``merge_loss_p2s`` are the per-sample sums
    over frames **already multiplied by their weights**, averaged over samples.
    """

    def __init__(self, tmp: bool = True, p2s: bool = True, tmp_weight: float = 2.0,
                 p2s_weight: float = 2.0):
        self.tmp = tmp
        self.p2s = p2s
        self.tmp_weight = tmp_weight
        self.p2s_weight = p2s_weight

    @staticmethod
    def tmp_loss(feats_t0: Tensor, ins_t0: Sequence[Tensor], feats_t1: Tensor,
                 ins_t1: Sequence[Tensor], tau: float = 0.07) -> Tensor:
        k = len(ins_t0)
        if k == 0:
            return _zero(feats_t0)
        c0, c1 = [], []
        for inst in range(k):
            c0.append(feats_t0[ins_t0[inst]].mean(0) if len(ins_t0[inst]) != 0
                      else torch.zeros_like(feats_t0[0]))
            c1.append(feats_t1[ins_t1[inst]].mean(0) if len(ins_t1[inst]) != 0
                      else torch.zeros_like(feats_t1[0]))
        c0 = torch.stack(c0)
        c1 = torch.stack(c1)
        out = (c0 @ c1.T) / tau
        target = torch.arange(k, device=out.device)
        keep = out.diag() != 0  # both centres present
        out, target = out[keep], target[keep]
        out = torch.where(out == 0, torch.full_like(out, -torch.inf), out)
        if len(target) == 0:
            return _zero(feats_t0)
        return F.cross_entropy(out, target)

    @staticmethod
    def p2s_loss(feats: Tensor, ins: Sequence[Tensor], tau: float = 0.02) -> Tensor:
        k = len(ins)
        if k == 0:
            return _zero(feats)
        counts, members, centres = [], [], []
        for inst in range(k):
            counts.append(len(ins[inst]))
            members.append(feats[ins[inst]])
            centres.append(members[-1].max(0)[0] if counts[-1] != 0
                           else torch.zeros_like(feats[0]))
        centres = torch.stack(centres)
        max_count = max(counts)
        if max_count == 0:
            return _zero(feats)
        losses = []
        for i in range(max_count):
            column = []
            for inst in range(k):
                if counts[inst] - 1 >= i:
                    column.append(members[inst][i])
                elif counts[inst] == 0:
                    column.append(torch.zeros_like(feats[0]))
                else:
                    column.append(members[inst][-1])
            column = torch.stack(column)
            out = (centres @ column.T) / tau
            target = torch.arange(k, device=out.device)
            keep = out.diag() != 0
            out, target = out[keep], target[keep]
            out = torch.where(out == 0, torch.full_like(out, -torch.inf), out)
            losses.append(F.cross_entropy(out, target) if len(target) > 0 else _zero(feats))
        return sum(losses) / len(losses)

    def __call__(self, merge_feats: MergeFeats, ins_masks: InsMasks) -> dict[str, Tensor]:
        tmp_losses, p2s_losses = [], []
        for feats, ins in zip(merge_feats, ins_masks):
            n_frames = len(ins)
            if self.tmp:
                total = 0.0
                for t in range(n_frames - 1):
                    total += self.tmp_loss(feats[t], ins[t], feats[t + 1], ins[t + 1])
                for t in range(1, n_frames):
                    total += self.tmp_loss(feats[t], ins[t], feats[t - 1], ins[t - 1])
                tmp_losses.append(total * self.tmp_weight)
            if self.p2s:
                total = 0.0
                for t in range(n_frames):
                    total += self.p2s_loss(feats[t], ins[t])
                p2s_losses.append(total * self.p2s_weight)
        out = {}
        if self.tmp:
            out["merge_loss_tmp"] = torch.mean(torch.stack(tmp_losses))
        if self.p2s:
            out["merge_loss_p2s"] = torch.mean(torch.stack(p2s_losses))
        return out


class ReferenceMergeSeal:
    """Loop form of ``ScanNetMergeCriterion_Seal`` (Seal's per-instance InfoNCE, random negatives).

    Returns the released dict ``merge_loss_tmp``, ``merge_loss_p2s``, ``merge_loss`` (their sum),
    each averaged over samples, unweighted.
    """

    def __init__(self, rng: np.random.Generator | None = None):
        self.rng = rng if rng is not None else np.random.default_rng()

    @staticmethod
    def tmp_loss(feats_t: Tensor, ins_t: Sequence[Tensor], feats_t1: Tensor,
                 ins_t1: Sequence[Tensor], tau: float = 0.07) -> Tensor:
        k = len(ins_t)
        if k < 1:
            return _zero(feats_t)
        loss = _zero(feats_t)
        for inst in range(k):
            if len(ins_t[inst]) == 0 or len(ins_t1[inst]) == 0:
                continue
            centre_t = feats_t[ins_t[inst]].mean(0)
            centre_t1 = feats_t1[ins_t1[inst]].mean(0)
            e_same = torch.exp((centre_t * centre_t1).sum(0) / tau)
            e_all = 0
            for j in range(k):
                if len(ins_t1[j]) == 0:
                    continue
                centre_j = feats_t1[ins_t1[j]].mean(0)
                e_all += torch.exp((centre_t * centre_j).sum(0) / tau)
            loss += -torch.log(e_same / e_all)
        return loss / k

    def p2s_loss(self, feats: Tensor, ins: Sequence[Tensor], negatives: Tensor | None = None,
                 tau: float = 0.02) -> Tensor:
        k = len(ins)
        if k < 1:
            return _zero(feats)
        loss = _zero(feats)
        for inst in range(k):
            if len(ins[inst]) == 0:
                continue
            members = feats[ins[inst]]
            centre = members.max(0)[0]
            for i in range(len(members)):
                e_same = torch.exp((centre * feats[ins[inst]][i]).sum(0) / tau)
                e_all = e_same.clone()
                for j in range(k):
                    if j == inst or len(ins[j]) == 0:
                        continue
                    if negatives is None:
                        pos = int(self.rng.integers(0, len(ins[j])))
                    else:
                        pos = int(negatives[inst, i, j])
                    feat_j = feats[ins[j]][pos]
                    e_all += torch.exp((centre * feat_j).sum(0) / tau)
                loss += -torch.log(e_same / e_all) / len(members)
        return loss / k

    def __call__(self, merge_feats: MergeFeats, ins_masks: InsMasks,
                 negatives: Sequence[Sequence[Tensor]] | None = None) -> dict[str, Tensor]:
        tmp_losses, p2s_losses, losses = [], [], []
        for b, (feats, ins) in enumerate(zip(merge_feats, ins_masks)):
            n_frames = len(ins)
            tmp = 0.0
            p2s = 0.0
            for t in range(n_frames - 1):
                tmp += self.tmp_loss(feats[t], ins[t], feats[t + 1], ins[t + 1])
            for t in range(1, n_frames):
                tmp += self.tmp_loss(feats[t], ins[t], feats[t - 1], ins[t - 1])
            for t in range(n_frames):
                neg = None if negatives is None else negatives[b][t]
                p2s += self.p2s_loss(feats[t], ins[t], neg)
            tmp_losses.append(tmp)
            p2s_losses.append(p2s)
            losses.append(tmp + p2s)
        return {
            "merge_loss_tmp": torch.mean(torch.stack(tmp_losses)),
            "merge_loss_p2s": torch.mean(torch.stack(p2s_losses)),
            "merge_loss": torch.mean(torch.stack(losses)),
        }
