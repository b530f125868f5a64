"""Assignment of queries to ground-truth instances.

A matcher knows its cost terms and their weights only. It runs in float32 with autocast off and
no gradient, builds each sample's whole ``(Q, K)`` cost at once, moves all costs to the CPU in
one transfer (the only host round trip of the objective), and returns, for every sample, a pair
``(query_idx, gt_idx)`` of int64 tensors on the input device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from esam.losses import functional as LF
from esam.losses import fused
from esam.losses.rowwise import RowStats, row_instances
from esam.structures import InstanceMasks

__all__ = [
    "CostTerm",
    "QueryClassificationCost",
    "MaskBCECost",
    "MaskDiceCost",
    "HungarianMatcher",
    "SparseMatcher",
    "build_costs",
]

MatchIndices = tuple[Tensor, Tensor]

# Below this many multiply-adds (R * P * K) a layer's inside sums run as a GEMM even when the
# sparse matcher could gather its allowed pairs' members instead: the GEMM is one op.
_PAIR_MODE_MIN_WORK = 1 << 22
# ... and above this many gathered members per (row, position) the GEMM is cheaper again.
_PAIR_MODE_MAX_FRACTION = 0.25


class CostTerm:
    """A weighted pairwise cost ``(Q, K)`` between queries and GT instances."""

    def __init__(self, weight: float = 1.0):
        self.weight = float(weight)

    def __call__(self, cls_logits: Tensor, mask_logits: Tensor, labels: Tensor,
                 masks: InstanceMasks, sums: LF.MaskSums | None = None) -> Tensor:
        """``(Q, K)`` weighted cost; ``sums`` shares mask sums between terms of one sample."""
        if sums is None:
            sums = LF.MaskSums(mask_logits, masks)
        return self.weight * self.cost(cls_logits, sums, labels)

    def cost(self, cls_logits: Tensor, sums: LF.MaskSums, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def sums_needed(self) -> tuple[str, ...]:
        """The `MaskSums` sums this term reads (computed together in one sweep)."""
        return ()

    def row_cost(self, cls_logits: Tensor, sums: RowStats, labels: Tensor) -> Tensor | None:
        """``(R, 1)`` unweighted cost of each row against its one candidate instance, from
        `RowStats` (the same reads as `MaskSums`, one column per row) and ``labels (R,)``, the
        candidate's class; None when the term has no such form (the matcher then takes its
        general path)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight})"


class QueryClassificationCost(CostTerm):
    """``1 - softmax(c_j)[label_k]`` (seed, ``form="one_minus"``) or ``-softmax`` (ESAM)."""

    def __init__(self, weight: float = 1.0, form: Literal["one_minus", "negative"] = "one_minus"):
        super().__init__(weight)
        self.form = form

    def cost(self, cls_logits, sums, labels):
        return LF.class_cost(cls_logits, labels, self.form)

    def row_cost(self, cls_logits, sums, labels):
        return LF.row_class_cost(cls_logits, labels, self.form)


class MaskBCECost(CostTerm):
    """Mean sigmoid BCE between query and GT masks (``form="bce"``, the seed's name and ESAM's
    code), or the L1 form the seed prints (``"l1"``; ``"l1_as_printed"`` keeps its 1/N on the
    first term only)."""

    def __init__(self, weight: float = 1.0, form: Literal["bce", "l1", "l1_as_printed"] = "bce"):
        super().__init__(weight)
        if form not in ("bce", "l1", "l1_as_printed"):
            raise ValueError(f"form: expected 'bce', 'l1' or 'l1_as_printed', got {form!r}")
        self.form = form

    def sums_needed(self):
        return ("softplus", "logits") if self.form == "bce" else ("probs",)

    def row_cost(self, cls_logits, sums, labels):
        return self.cost(cls_logits, sums, labels)  # the mask formulas read (R, 1) columns

    def cost(self, cls_logits, sums, labels):
        if self.form == "bce":
            return LF.mask_bce_cost(sums.logits, sums.gt, sums=sums)
        return LF.mask_l1_cost(sums.logits, sums.gt, as_printed=self.form == "l1_as_printed",
                               sums=sums)


class MaskDiceCost(CostTerm):
    """Dice cost, seed form ``1 - 2<q,g>/(<q,q>+<g,g>+1)`` or ESAM's
    ``1 - (2<q,g>+1)/(sum q + sum g + 1)``."""

    def __init__(self, weight: float = 1.0, form: Literal["seed", "esam"] = "seed"):
        super().__init__(weight)
        self.form = form

    def sums_needed(self):
        return ("probs", "probs_sq") if self.form == "seed" else ("probs",)

    def cost(self, cls_logits, sums, labels):
        return LF.mask_dice_cost(sums.logits, sums.gt, self.form, sums=sums)

    def row_cost(self, cls_logits, sums, labels):
        return self.cost(cls_logits, sums, labels)


def build_costs(weights: dict[str, float], *, class_form: str = "one_minus",
                mask_form: str = "bce", dice_form: str = "seed") -> list[CostTerm]:
    """Cost terms from a ``{"cls": w, "bce": w, "dice": w}`` mapping; zero weights are dropped."""
    known = {"cls", "bce", "dice"}
    unknown = set(weights) - known
    if unknown:
        raise ValueError(f"matcher costs: unknown term(s) {sorted(unknown)}; expected {sorted(known)}")
    terms: list[CostTerm] = []
    if weights.get("cls", 0):
        terms.append(QueryClassificationCost(weights["cls"], class_form))
    if weights.get("bce", 0):
        terms.append(MaskBCECost(weights["bce"], mask_form))
    if weights.get("dice", 0):
        terms.append(MaskDiceCost(weights["dice"], dice_form))
    if not terms:
        raise ValueError("matcher costs: at least one cost weight must be non-zero")
    return terms


class _Matcher(nn.Module):
    def __init__(self, costs: Sequence[CostTerm]):
        super().__init__()
        if len(costs) == 0:
            raise ValueError("costs: expected at least one cost term, got none")
        self.costs = list(costs)

    def _cost(self, cls_logits: Tensor, mask_logits: Tensor, labels: Tensor,
              masks: InstanceMasks, sums: LF.MaskSums | None = None,
              loss_sums: bool = False) -> Tensor:
        # fp32, autocast off: half-precision softmax/sigmoid sums can flip assignments.
        with torch.autocast(cls_logits.device.type, enabled=False):
            c = LF.upcast(cls_logits)
            if sums is None:
                sums = LF.MaskSums(mask_logits, masks)  # shared by the mask terms
            # every sum the terms (and, with loss_sums, the matched losses) read: one sweep
            sums.prefetch(*(k for term in self.costs for k in term.sums_needed()),
                          *(("softplus", "logits", "probs") if loss_sums else ()))
            total = sum(term(c, sums.logits, labels, masks, sums) for term in self.costs)
        return torch.nan_to_num(total, nan=1e8, posinf=1e8, neginf=-1e8)

    @staticmethod
    def _check(cls_logits, mask_logits, gt_labels, gt_masks, query_masks) -> None:
        b = len(cls_logits)
        for name, seq in (("mask_logits", mask_logits), ("gt_labels", gt_labels),
                          ("gt_masks", gt_masks)):
            if len(seq) != b:
                raise ValueError(f"{name}: expected {b} samples (as cls_logits), got {len(seq)}")
        if query_masks is not None and len(query_masks) != b:
            raise ValueError(f"query_masks: expected {b} samples, got {len(query_masks)}")
        for i in range(b):
            if mask_logits[i].shape[1] != gt_masks[i].num_positions:
                raise ValueError(
                    f"mask_logits[{i}]: expected {gt_masks[i].num_positions} positions (as the GT "
                    f"masks), got shape {tuple(mask_logits[i].shape)}")
            if len(gt_labels[i]) != len(gt_masks[i]):
                raise ValueError(f"gt_labels[{i}]: expected {len(gt_masks[i])} labels (one per GT "
                                 f"mask), got {len(gt_labels[i])}")


class HungarianMatcher(_Matcher):
    """Minimum-cost one-to-one assignment of queries to GT instances (min(Q, K) pairs).

    Args:
        costs: weighted cost terms, summed.
    """

    @torch.no_grad()
    def forward(self, cls_logits: Sequence[Tensor], mask_logits: Sequence[Tensor],
                gt_labels: Sequence[Tensor], gt_masks: Sequence[InstanceMasks],
                query_masks: Sequence[Tensor | None] | None = None, *,
                return_sums: bool = False):
        """Match every sample of a batch.

        Args:
            cls_logits: per sample ``(Q_b, C+1)``.
            mask_logits: per sample ``(Q_b, P_b)``.
            gt_labels: per sample ``(K_b,)``.
            gt_masks: per sample K_b masks over P_b positions.
            query_masks: ignored (accepted for interface parity with `SparseMatcher`).
            return_sums: also return each sample's `MaskSums` (None where no cost was
                computed), which `matched_mask_losses` reuses.

        Returns:
            A list of size B of ``(query_idx (M_b,), gt_idx (M_b,))``, sorted by query; with
            ``return_sums``, ``(indices, sums)``.
        """
        self._check(cls_logits, mask_logits, gt_labels, gt_masks, query_masks)
        sums = [LF.MaskSums(m, g) if len(l) and len(c) else None
                for c, m, l, g in zip(cls_logits, mask_logits, gt_labels, gt_masks)]
        costs = [self._cost(c, m, l, g, s, return_sums) if s is not None else None
                 for c, m, l, g, s in zip(cls_logits, mask_logits, gt_labels, gt_masks, sums)]
        flat = [c.reshape(-1) for c in costs if c is not None]
        host = torch.cat(flat).cpu().numpy() if flat else np.empty(0)  # one transfer
        out: list[MatchIndices] = []
        offset = 0
        for c, l in zip(costs, gt_labels):
            if c is None:
                empty = torch.empty(0, dtype=torch.long, device=l.device)
                out.append((empty, empty.clone()))
                continue
            q, k = c.shape
            block = host[offset: offset + q * k].reshape(q, k)
            offset += q * k
            rows, cols = linear_sum_assignment(block)
            out.append((torch.as_tensor(rows, dtype=torch.long, device=l.device),
                        torch.as_tensor(cols, dtype=torch.long, device=l.device)))
        return (out, sums) if return_sums else out


class SparseMatcher(_Matcher):
    """ESAM's sparse matcher: each GT instance takes its ``topk`` cheapest allowed queries.

    A query is allowed for instance k only where ``query_masks[k, j]`` is True (in ESAM: the
    query's seed superpoint lies in the instance). A query may match several instances. An
    instance keeps the queries whose cost is strictly below its (topk+1)-th smallest cost, as the
    released code does (ties at that boundary drop both). With ``Q <= topk`` every allowed query
    matches (the released code matches nothing there). Costs are computed only for the queries
    allowed for an instance with more than ``topk`` candidates; the others cannot change the
    result. With ``return_sums`` the sums also cover the queries of uncontested instances (they
    all match, and their losses read the sums).

    Args:
        costs: weighted cost terms, summed.
        topk: queries kept per GT instance.
    """

    def __init__(self, costs: Sequence[CostTerm], topk: int = 1):
        super().__init__(costs)
        if topk < 1:
            raise ValueError(f"topk: expected >= 1, got {topk}")
        self.topk = int(topk)

    @staticmethod
    def _pairs(allowed: Tensor, masks: InstanceMasks, logits: Tensor,
               ) -> tuple[Tensor, Tensor] | None:
        """The allowed ``(row, instance)`` pairs, when summing over their members alone is
        cheaper than a pass over every position per instance (the costs of other pairs are
        never read); None otherwise. ``logits``: the layer's ``(Q, P)`` mask logits."""
        positions = logits.shape[1]
        if allowed.shape[0] * positions * len(masks) < _PAIR_MODE_MIN_WORK:
            return None  # the GEMM is cheap: fewer ops than gathering
        row_inst = torch.argwhere(allowed)  # (A, 2)
        if (masks.ids is not None and fused.applies(logits)
                and fused.one_pair_per_row(row_inst[:, 0], allowed.shape[0])):
            # one pair per row: the fused kernels read every sum in one pass, no gather
            return row_inst[:, 0], row_inst[:, 1]
        members = int(masks.members()[2][row_inst[:, 1]].sum())
        if members > _PAIR_MODE_MAX_FRACTION * allowed.shape[0] * positions:
            return None
        return row_inst[:, 0], row_inst[:, 1]

    @torch.no_grad()
    def forward(self, cls_logits: Sequence[Tensor], mask_logits: Sequence[Tensor],
                gt_labels: Sequence[Tensor], gt_masks: Sequence[InstanceMasks],
                query_masks: Sequence[Tensor | None] | None = None, *,
                return_sums: bool = False):
        """Match every sample of a batch (arguments and return as `HungarianMatcher.forward`).

        Args:
            query_masks: per sample ``(K_b, Q_b)`` bool, required.
        """
        if query_masks is None:
            raise ValueError("query_masks: SparseMatcher needs per-sample (K, Q) bool masks, "
                             "got None")
        self._check(cls_logits, mask_logits, gt_labels, gt_masks, query_masks)
        out: list[MatchIndices] = []
        all_sums: list[LF.MaskSums | None] = []
        for i, (c, m, l, g, qm) in enumerate(
                zip(cls_logits, mask_logits, gt_labels, gt_masks, query_masks)):
            q, k = c.shape[0], len(l)
            if qm is None or qm.shape != (k, q):
                raise ValueError(f"query_masks[{i}]: expected shape (K={k}, Q={q}), "
                                 f"got {None if qm is None else tuple(qm.shape)}")
            sums = None
            if k == 0 or q == 0:
                empty = torch.empty(0, dtype=torch.long, device=l.device)
                out.append((empty, empty.clone()))
                all_sums.append(sums)
                continue
            allowed = qm.T.bool()  # (Q, K)
            # Only rows competing for a contested instance (more than topk allowed queries)
            # need a cost: an instance with at most topk candidates takes them all anyway.
            if return_sums:
                rows = allowed.any(1)  # (Q,)
            else:
                contested = torch.count_nonzero(allowed, dim=0) > self.topk  # (K,)
                rows = allowed[:, contested].any(1)  # (Q,)
            n_rows = int(torch.count_nonzero(rows))
            if 2 * n_rows > q:  # most rows: cheaper to cost them all than to gather them
                sums = LF.MaskSums(m, g, pairs=self._pairs(allowed, g, m))
                cost = self._cost(c, m, l, g, sums, return_sums)  # (Q, K)
            else:
                cost = c.new_zeros(q, k, dtype=torch.promote_types(c.dtype, torch.float32))
                r = rows.nonzero().flatten()
                if n_rows:
                    sums = LF.MaskSums(m.index_select(0, r), g, rows=r,
                                       pairs=self._pairs(allowed[r], g, m))
                    cost[r] = self._cost(c.index_select(0, r), sums.logits, l, g, sums,
                                         return_sums)
            cost = cost.masked_fill(~allowed, float("inf"))  # also hides unsummed pairs
            if q <= self.topk:
                keep = torch.isfinite(cost)
            else:
                kth = torch.topk(cost, self.topk + 1, dim=0, largest=False).values[-1:]  # (1, K)
                keep = cost < kth
            ids = torch.argwhere(keep)  # (M, 2), row-major: sorted by query
            out.append((ids[:, 0], ids[:, 1]))
            all_sums.append(sums)
        return (out, all_sums) if return_sums else out

    @torch.no_grad()
    def match_rows(self, cls_logits: Sequence[Tensor], mask_logits: Sequence[Tensor],
                   gt_labels: Sequence[Tensor], gt_masks: Sequence[InstanceMasks],
                   query_masks: Sequence[Tensor | None] | None,
                   candidates: Sequence[Tensor | None] | None = None,
                   ) -> tuple[list[MatchIndices], RowStats, Tensor] | None:
        """`forward` for a batch in which every query may match at most one instance (ESAM's
        seed-superpoint masks), batched over samples (see `esam.losses.rowwise`).

        Same arguments and assignment as ``forward``; returns ``(indices, stats, rows)``:
        the assignment, the layer's `RowStats` (which `rowwise_mask_losses` reads) and ``(M,)``
        the matched rows of the concatenated batch, in order. None when the batch does not
        qualify — some query allowed for several instances, a dense GT mask, a cost term
        without a row form, mixed dtypes — and ``forward`` must be used.

        ``candidates`` may pass each sample's `row_instances` of its ``query_masks`` when
        already known (layers of one batch share them).
        """
        if query_masks is None:
            raise ValueError("query_masks: SparseMatcher needs per-sample (K, Q) bool masks, "
                             "got None")
        self._check(cls_logits, mask_logits, gt_labels, gt_masks, query_masks)
        if not len(cls_logits) or any(type(t).row_cost is CostTerm.row_cost for t in self.costs):
            return None
        inst = []
        for i, (c, l, g, qm) in enumerate(zip(cls_logits, gt_labels, gt_masks, query_masks)):
            q, k = c.shape[0], len(l)
            if qm is None or qm.shape != (k, q):
                raise ValueError(f"query_masks[{i}]: expected shape (K={k}, Q={q}), "
                                 f"got {None if qm is None else tuple(qm.shape)}")
            if g.ids is None:
                return None
            r = row_instances(qm) if candidates is None else candidates[i]
            if r is None:
                return None
            inst.append(r)
        device = cls_logits[0].device
        with torch.autocast(device.type, enabled=False):
            xs = [LF.upcast(m.detach()).contiguous() for m in mask_logits]
            cs = [LF.upcast(c) for c in cls_logits]
            if len({x.dtype for x in xs}) > 1 or len({c.dtype for c in cs}) > 1:
                return None
            stats = RowStats(xs, gt_masks, inst)
            c = torch.cat(cs) if len(cs) > 1 else cs[0]  # (R, C+1)
            labels = torch.cat([l.long() for l in gt_labels])  # (sum K,)
            row_labels = (labels.index_select(0, stats.group) if len(labels)
                          else torch.zeros_like(stats.group))
            total = sum(term.weight * term.row_cost(c, stats, row_labels) for term in self.costs)
            total = torch.nan_to_num(total[:, 0], nan=1e8, posinf=1e8, neginf=-1e8)
            total = total.masked_fill(~stats.has, float("inf"))
        rows = stats.select_topk(total, self.topk).nonzero().squeeze(1)  # (M,) increasing
        sample = stats.sample.index_select(0, rows)
        counts = torch.bincount(sample, minlength=len(xs)).tolist()
        offsets = torch.tensor(stats.query_offset, device=device)
        query = (rows - offsets.index_select(0, sample)).split(counts)
        gt = stats.inst.index_select(0, rows).split(counts)
        return list(zip(query, gt)), stats, rows
