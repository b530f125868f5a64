"""Batched sparse matching and mask losses for layers whose queries compete for one instance each.

In ESAM a query may only match the GT instance its seed superpoint lies in, so every query has
at most one candidate pair. Then every sum the mask costs and losses need is a per-row sum
(`esam.losses.fused.row_stats`), and the whole layer — B samples — can be costed, matched and
turned into per-pair losses with a fixed number of batched operations instead of a few hundred
per sample: one statistics pass per sample, then everything else on the concatenated rows.

`RowStats` holds those sums for one layer. `SparseMatcher.match_rows` builds it and selects each
instance's ``topk`` cheapest queries with two sorts over the batch; `rowwise_mask_losses` reads
the matched pairs' BCE, Dice and IoU from it and back-propagates analytically, one gradient pass
per sample. The values equal the general path's (`SparseMatcher.forward` and
`esam.losses.functional.matched_mask_losses`): the formulas are the same functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from esam.losses import functional as LF
from esam.losses import fused
from esam.structures import InstanceMasks

__all__ = ["RowStats", "row_instances", "row_stats_torch", "rowwise_mask_losses"]

NO_INSTANCE = fused.NO_INSTANCE
# `fused.row_stats` pays from here on (one compiled call per sample against ~15 torch ops over
# temporaries of the logits' size); its gradient pass only from `fused.MIN_ELEMENTS`
MIN_STATS_ELEMENTS = 1 << 15


def row_instances(query_masks: Tensor) -> Tensor | None:
    """``(Q,)`` the one instance each query may match (`NO_INSTANCE` where none), from
    ``query_masks (K, Q)``; None when some query may match several."""
    rows, inst = torch.nonzero(query_masks.bool().T).unbind(1)  # the allowed (query, instance)
    return fused.row_instances(rows, inst, query_masks.shape[1])


def row_stats_torch(x: Tensor, masks: InstanceMasks | Tensor, inst: Tensor) -> Tensor:
    """`esam.losses.fused.row_stats` with torch ops: ``(8, R)`` per-row sums of ``x (R, P)``
    (totals of softplus, sigmoid, sigmoid squared and ``[sigmoid >= 0.5]``; the same three of
    logits, sigmoid and hits over the positions of each row's instance ``inst (R,)``; the row
    totals of the logits).

    ``masks``: the GT masks (``ids`` encoding), or their ``(P,)`` ids. The row totals walk CPU
    logits in column blocks small enough to stay in cache (no temporary of the logits' size);
    the instance sums gather each row's instance members only (``sum_r |g_r|`` elements).
    """
    if isinstance(masks, Tensor):
        k = int(max(masks.max(), inst.max())) + 1 if masks.numel() and inst.numel() else 0
        masks = InstanceMasks(ids=masks, num_instances=max(k, 0))
    r, p = x.shape
    if x.device.type != "cpu" or r * p <= LF._SWEEP_BLOCK:
        totals = _block_totals(x)
    else:
        step = max(256, LF._SWEEP_BLOCK // max(r, 1))
        totals = _block_totals(x[:, :step])
        for start in range(step, p, step):
            totals += _block_totals(x[:, start:start + step])
    inside = x.new_zeros(3, r)
    rows = (inst >= 0).nonzero().squeeze(1)
    if len(rows) and p:
        row_inst = inst.index_select(0, rows)
        _, flat = masks.pair_positions(rows, row_inst, p)
        v = torch.take(x, flat)  # (T,) logits at every member of every row's instance
        qv = v.sigmoid()
        lengths = masks.members()[2].index_select(0, row_inst)
        sums = torch.segment_reduce(torch.stack([v, qv, (qv >= 0.5).to(x.dtype)], 1), "sum",
                                    lengths=lengths)  # (A, 3)
        inside.index_copy_(1, rows, sums.T)
    return torch.cat([totals[:4], inside, totals[4:]])


def _block_totals(x: Tensor) -> Tensor:
    q = x.sigmoid()
    return torch.stack([F.softplus(x).sum(1), q.sum(1), (q * q).sum(1),
                        (q >= 0.5).to(x.dtype).sum(1), x.sum(1)])


# entries below this many elements that share their GT masks (the layers of one sample at one
# mask level) take one `fused.row_stats` call on their rows stacked: each call costs a fixed
# ~0.1-0.2 ms beyond its elements, and stacking copies small layers only
_GROUP_MAX_ELEMENTS = 1 << 18


def _entry_stats(xs: Sequence[Tensor], masks: Sequence[InstanceMasks],
                 inst: Sequence[Tensor]) -> Tensor:
    """`RowStats`' ``(8, R)`` sums over the entries' concatenated rows."""
    parts: list[Tensor | None] = [None] * len(xs)
    least = min(MIN_STATS_ELEMENTS, fused.MIN_ELEMENTS)
    groups: dict[tuple, list[int]] = {}
    for e, (x, m, i) in enumerate(zip(xs, masks, inst)):
        if x.shape[0] == 0 or not bool((i != NO_INSTANCE).any()):
            parts[e] = x.new_zeros(8, x.shape[0])  # nothing to match in this entry
        elif not fused.applies(x, least):
            parts[e] = row_stats_torch(x, m, i)
        elif x.numel() < _GROUP_MAX_ELEMENTS:
            groups.setdefault((id(m.ids), x.shape[1], x.dtype), []).append(e)
        else:
            parts[e] = fused.row_stats(x, m.ids, i)
    for members in groups.values():
        stats = fused.row_stats(torch.cat([xs[e] for e in members]), masks[members[0]].ids,
                                torch.cat([inst[e] for e in members]))  # stacked rows
        if stats is None:
            continue
        for e, piece in zip(members, stats.split([xs[e].shape[0] for e in members], 1)):
            parts[e] = piece
            fused.record_row_totals(xs[e], piece[7])  # the watch knows the entry, not the stack
    for e, part in enumerate(parts):  # the kernel could not be compiled
        if part is None:
            parts[e] = row_stats_torch(xs[e], masks[e], inst[e])
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


class RowStats:
    """Per-row sums of one decoder layer over a batch, each row paired with at most one instance.

    Rows are the queries of all samples, concatenated (R = sum of Q_b). Exposes the `MaskSums`
    reads the mask cost terms use, as ``(R, 1)`` columns (each row's own pair): ``total``,
    ``inside``, ``gt_sizes`` and ``num_positions``.

    Args:
        logits: per sample ``(Q_b, P_b)`` mask logits (detached, contiguous, at least float32).
        masks: per sample the GT masks (``ids`` encoding) over the P_b positions.
        inst: per sample ``(Q_b,)`` the instance each query may match, `NO_INSTANCE` for none.
    """

    logits = None  # `MaskSums` attributes the cost terms pass along (unused with ``sums``)
    gt = None

    def __init__(self, logits: Sequence[Tensor], masks: Sequence[InstanceMasks],
                 inst: Sequence[Tensor]):
        self.x = list(logits)
        self.masks = list(masks)
        self.inst_per_sample = list(inst)
        dev = self.x[0].device
        dtype = self.x[0].dtype
        self.num_queries = [t.shape[0] for t in self.x]
        self.num_instances = [len(m) for m in self.masks]
        self.stats = _entry_stats(self.x, self.masks, self.inst_per_sample)  # (8, R)
        counts = torch.tensor(self.num_queries, device=dev)
        self.sample = torch.repeat_interleave(torch.arange(len(self.x), device=dev), counts,
                                              output_size=sum(self.num_queries))  # (R,)
        self.inst = torch.cat(self.inst_per_sample)  # (R,) local instance index
        self.query_offset = [sum(self.num_queries[:b]) for b in range(len(self.x))]
        self.instance_offset = [sum(self.num_instances[:b]) for b in range(len(self.x))]
        koff = torch.tensor(self.instance_offset, device=dev)
        has = self.inst >= 0
        # global instance index of each row's candidate (0 where none: read only where `has`)
        self.group = torch.where(has, self.inst + koff.index_select(0, self.sample),
                                 torch.zeros_like(self.inst))
        self.has = has
        sizes = torch.cat([m.sizes(dtype) for m in self.masks])  # (sum K,)
        self.instance_sizes = sizes
        self.sizes = (sizes.index_select(0, self.group) * has if len(sizes)
                      else torch.zeros(len(self.inst), dtype=dtype, device=dev))
        self.positions = torch.tensor([float(t.shape[1]) for t in self.x], dtype=dtype,
                                      device=dev).index_select(0, self.sample)  # (R,)
        self.num_positions = self.positions.unsqueeze(1)

    _TOTAL = {"softplus": 0, "probs": 1, "probs_sq": 2, "positive": 3, "logits": 7}
    _INSIDE = {"logits": 4, "probs": 5, "positive": 6}

    def total(self, name: str) -> Tensor:
        """``(R, 1)`` row sums of ``"softplus"``, ``"probs"``, ``"probs_sq"``, ``"positive"``
        or ``"logits"``."""
        return self.stats[self._TOTAL[name]].unsqueeze(1)

    def inside(self, name: str) -> Tensor:
        """``(R, 1)`` sums of ``"logits"``, ``"probs"`` or ``"positive"`` over each row's
        instance (0 for a row without one)."""
        if name not in self._INSIDE:
            raise ValueError(f"inside: the row statistics hold {sorted(self._INSIDE)}, "
                             f"not {name!r}")
        return self.stats[self._INSIDE[name]].unsqueeze(1)

    def gt_sizes(self) -> Tensor:
        """``(R, 1)`` number of positions of each row's instance."""
        return self.sizes.unsqueeze(1)

    def select_topk(self, cost: Tensor, topk: int) -> Tensor:
        """``(R,)`` bool: rows whose cost is strictly below the (topk+1)-th smallest cost of
        the rows competing for the same instance (every row of an instance with at most
        ``topk`` candidates), as `SparseMatcher` selects."""
        rows = self.has.nonzero().squeeze(1)  # (A,) rows with a candidate
        keep = torch.zeros_like(self.has)
        if len(rows) == 0:
            return keep
        c = cost.index_select(0, rows)
        g = self.group.index_select(0, rows)
        by_cost = torch.sort(c, stable=True).indices
        order = by_cost.index_select(0, torch.sort(g.index_select(0, by_cost), stable=True).indices)
        g_sorted = g.index_select(0, order)  # grouped by instance, cost ascending inside
        n = len(self.instance_sizes)
        counts = torch.bincount(g_sorted, minlength=n)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(rows), device=c.device) - starts.index_select(0, g_sorted)
        at_k = rank == topk
        kth = torch.full((n,), float("inf"), dtype=c.dtype, device=c.device)
        kth.index_put_((g_sorted[at_k],), c.index_select(0, order)[at_k])
        keep[rows] = c < kth.index_select(0, g)
        return keep


class _RowwiseMaskLoss(torch.autograd.Function):
    """Per-pair BCE and Dice of a batch from `RowStats`, with the analytic gradient of
    `esam.losses.functional._MatchedMaskLoss`, one pass per sample."""

    @staticmethod
    def forward(ctx, info, bce, dice, inter, q_term, sizes, positions, *logits):
        stats, rows, counts, form = info
        ctx.stats, ctx.counts, ctx.form = stats, counts, form
        ctx.dtypes = [t.dtype for t in logits]
        ctx.save_for_backward(rows, inter, q_term, sizes, positions)
        return bce.clone(), dice.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_bce, g_dice):
        rows, inter, q_term, sizes, positions = ctx.saved_tensors
        coef = LF._matched_grad_coef(g_bce, g_dice, inter, q_term, sizes, positions.clamp(min=1),
                                     ctx.form)  # (M, 5)
        s = ctx.stats
        grads = []
        start = 0
        for b, n in enumerate(ctx.counts):
            x = s.x[b]
            if n == 0:  # zeros, as the general path gives (not None)
                grads.append(x.new_zeros(x.shape, dtype=ctx.dtypes[b]))
                continue
            local = rows[start:start + n] - s.query_offset[b]
            inst = s.inst_per_sample[b].index_select(0, local)
            grads.append(_sample_grad(x, s.masks[b].ids, local, inst,
                                      coef[start:start + n]).to(ctx.dtypes[b]))
            start += n
        return (None,) * 7 + tuple(grads)


def _sample_grad(x: Tensor, ids: Tensor, rows: Tensor, inst: Tensor, coef: Tensor) -> Tensor:
    """``(Q, P)`` gradient of one sample: rows ``rows (n,)`` paired with ``inst (n,)`` get the
    row formula of `esam.losses.fused.row_grad` with coefficients ``coef (n, 5)``."""
    if fused.applies(x):
        grad = fused.row_grad_at(x, ids, rows, inst, coef)
        if grad is not None:
            return grad
    p = torch.sigmoid(x.index_select(0, rows))  # (n, P)
    pp = torch.addcmul(p, p, p, value=-1)  # p (1 - p)
    a, b, c, gamma, beta = coef.to(x.dtype).T.unsqueeze(-1)  # each (n, 1)
    # p (a + p b + c p (1 - p)) - [member] (gamma + beta p (1 - p)), in place on two buffers
    rows_grad = torch.addcmul(a, p, b).addcmul_(c, pp).mul_(p)
    member = torch.addcmul(gamma, beta, pp).mul_(ids.unsqueeze(0) == inst.unsqueeze(1))
    rows_grad.sub_(member)
    if x.device.type == "cpu" and x.numel() >= fused.MIN_ELEMENTS:
        out = fused.reusable_zeros(tuple(x.shape), x.dtype)  # mapped by earlier calls
    else:
        out = x.new_zeros(x.shape)
    return out.index_copy_(0, rows, rows_grad)


def rowwise_mask_losses(stats: RowStats, rows: Tensor, form: str, with_iou: bool,
                        mask_logits: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-pair BCE, Dice and (detached) IoU of the matched rows of a layer.

    Args:
        stats: the layer's `RowStats`.
        rows: ``(M,)`` increasing matched rows of the concatenated batch (each paired with its
            row's instance).
        form: Dice form, ``"seed"`` or ``"esam"``.
        with_iou: also return the binarised masks' IoU.
        mask_logits: per sample the ``(Q_b, P_b)`` logits the gradient flows to.

    Returns:
        ``(bce (M,), dice (M,), iou (M,) or None)``.
    """
    with torch.no_grad():
        s = stats.stats.index_select(1, rows)  # (8, M)
        sizes = stats.sizes.index_select(0, rows)
        positions = stats.positions.index_select(0, rows)
        bce = (s[0] - s[4]) / positions.clamp(min=1)
        inter = s[5]
        q_term = s[2] if form == "seed" else s[1]
        dice = LF._dice_from_sums(inter, q_term, sizes, form)  # the shared Dice formula
        iou = s[6] / (s[3] + sizes - s[6] + 1e-6) if with_iou else None
        counts = torch.bincount(stats.sample.index_select(0, rows),
                                minlength=len(stats.x)).tolist()
    bce, dice = _RowwiseMaskLoss.apply((stats, rows, counts, form), bce, dice, inter, q_term,
                                       sizes, positions, *mask_logits)
    return bce, dice, iou
