"""Pure formulas of the ESAM objective.

Every function takes logits, works in log space where a log appears, states its tensor shapes,
and is safe on empty input (a mean over nothing is ``0 * input.sum()``, which keeps the graph).
Pairwise costs ``(Q, K)`` and matched losses ``(M,)`` share one private formula per term, so
the matcher and the loss can never drift apart.

Shape vocabulary: N points, S superpoints, P positions (N or S), Q queries, K GT instances,
M matched pairs, C classes, d features.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from esam.losses import fused
from esam.structures import InstanceMasks

Reduction = Literal["none", "mean", "sum"]
DiceForm = Literal["seed", "esam"]

__all__ = [
    "upcast",
    "reduce_loss",
    "class_cost",
    "row_class_cost",
    "MaskSums",
    "mask_bce_cost",
    "mask_l1_cost",
    "mask_dice_cost",
    "sigmoid_bce_loss",
    "dice_loss",
    "matched_mask_losses",
    "mask_iou",
    "score_loss",
    "box_l1_loss",
    "box_iou_loss",
    "box_giou_loss",
    "axis_aligned_box_iou",
    "boxes_to_corners",
    "semantic_cross_entropy",
    "nt_xent",
]


def upcast(t: Tensor | None) -> Tensor | None:
    """Half-precision tensors to float32 (losses are computed in at least fp32); others as is."""
    if t is not None and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


def reduce_loss(loss: Tensor, reduction: Reduction) -> Tensor:
    """Reduce a per-element loss; the mean of an empty tensor is a graph-connected zero."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean() if loss.numel() > 0 else 0.0 * loss.sum()
    raise ValueError(f"reduction: expected 'none', 'mean' or 'sum', got {reduction!r}")


# ---------------------------------------------------------------------------------------------
# Shared formulas (pairwise cost and matched loss both call these).


def _dice_from_sums(inter: Tensor, q_term: Tensor, g_sum: Tensor, form: DiceForm) -> Tensor:
    """Dice loss from its sums.

    seed: ``1 - 2<q,g> / (<q,q> + <g,g> + 1)``  (``q_term`` is ``<q,q>``)
    esam: ``1 - (2<q,g> + 1) / (sum q + sum g + 1)``  (``q_term`` is ``sum q``)
    ``g`` is binary, so ``<g,g> = sum g``.
    """
    if form == "seed":
        return 1 - 2 * inter / (q_term + g_sum + 1)
    if form == "esam":
        return 1 - (2 * inter + 1) / (q_term + g_sum + 1)
    raise ValueError(f"dice form: expected 'seed' or 'esam', got {form!r}")


def _dice_q_term(probs: Tensor, form: DiceForm) -> Tensor:
    # (R, P) -> (R,)
    return (probs * probs).sum(-1) if form == "seed" else probs.sum(-1)


# ---------------------------------------------------------------------------------------------
# Pairwise matching costs, (Q, K).


def class_cost(cls_logits: Tensor, labels: Tensor,
               form: Literal["one_minus", "negative"] = "one_minus") -> Tensor:
    """Classification cost.

    Args:
        cls_logits: ``(Q, C+1)`` logits.
        labels: ``(K,)`` GT classes in ``[0, C)``.
        form: ``"one_minus"`` — ``1 - softmax(c_j)[label_k]`` (seed); ``"negative"`` —
            ``-softmax(c_j)[label_k]`` (ESAM). The 1 is a constant that does not change the
            assignment.

    Returns:
        ``(Q, K)`` cost.
    """
    return _class_cost_of_prob(cls_logits.softmax(-1)[:, labels], form)  # (Q, K)


def row_class_cost(cls_logits: Tensor, labels: Tensor,
                   form: Literal["one_minus", "negative"] = "one_minus") -> Tensor:
    """`class_cost` of each query against one instance of its own.

    Args:
        cls_logits: ``(R, C+1)`` logits.
        labels: ``(R,)`` the GT class each row is costed against.

    Returns:
        ``(R, 1)`` cost.
    """
    return _class_cost_of_prob(cls_logits.softmax(-1).gather(1, labels.unsqueeze(1)), form)


def _class_cost_of_prob(prob: Tensor, form: str) -> Tensor:
    if form == "one_minus":
        return 1 - prob
    if form == "negative":
        return -prob
    raise ValueError(f"form: expected 'one_minus' or 'negative', got {form!r}")


_SWEEP_BLOCK = 1 << 18  # elements per block of `MaskSums._sweep` (1 MB in float32)


def _pair_totals(values: Tensor, gt: InstanceMasks, instance_idx: Tensor) -> Tensor:
    """Sum of ``values (T,)``, laid out as `InstanceMasks.pair_positions` lists the members of
    pairs with instances ``instance_idx (A,)``, over each pair -> ``(A,)`` (no gradient).

    Each pair's members are contiguous, so this is a segment reduction over known lengths:
    several times faster than an ``index_add_`` of T values into A bins.
    """
    if len(instance_idx) == 0:
        return values.new_zeros(0)
    lengths = gt.members()[2].index_select(0, instance_idx)  # (A,)
    return torch.segment_reduce(values, "sum", lengths=lengths)


class MaskSums:
    """Sums over one sample's ``(Q, P)`` mask logits shared by the mask costs and losses.

    Each sum is computed once, on first use: the BCE and Dice costs of the same layer read the
    logits and their sigmoid once each, and row totals ride on the same sweep. The matched
    losses (`matched_mask_losses`) then read their values at the matched pairs instead of
    recomputing them. Sums carry no gradient and are computed in at least float32 with
    autocast off, whatever the caller's context.

    Per-instance ("inside") sums come in two modes. Without ``pairs`` they cover every
    (row, instance) pair: one GEMM against the GT masks per block of columns. With ``pairs`` —
    the only pairs a sparse matcher can assign — they cover those pairs alone, as a gather of
    each pair's mask members (``sum_a |g_a|`` elements, at most R*P for non-overlapping
    instances): the ``inside`` matrices then hold zeros at every other pair.

    Args:
        mask_logits: ``(R, P)``: all Q queries, or the subset ``rows`` of them.
        gt: K GT masks over the same P positions.
        rows: ``(R,)`` increasing query indices of the rows of ``mask_logits``; None: all.
        pairs: ``(row (A,), instance (A,))``, rows local to ``mask_logits``; None: all pairs.
    """

    def __init__(self, mask_logits: Tensor, gt: InstanceMasks, rows: Tensor | None = None,
                 pairs: tuple[Tensor, Tensor] | None = None):
        if mask_logits.dim() != 2 or mask_logits.shape[1] != gt.num_positions:
            raise ValueError(f"mask_logits: expected shape (Q, P={gt.num_positions}), got "
                             f"{tuple(mask_logits.shape)}")
        if rows is not None and rows.shape != mask_logits.shape[:1]:
            raise ValueError(f"rows: expected shape ({mask_logits.shape[0]},) (one query index "
                             f"per row of mask_logits), got {tuple(rows.shape)}")
        if pairs is not None and (len(pairs) != 2 or pairs[0].shape != pairs[1].shape
                                  or pairs[0].dim() != 1):
            raise ValueError("pairs: expected (row (A,), instance (A,)) index tensors, got "
                             f"shapes {[tuple(t.shape) for t in pairs]}")
        self.logits = upcast(mask_logits.detach()).contiguous()
        self.gt = gt
        self.rows = rows
        self.pairs = pairs
        self.num_positions = mask_logits.shape[1]
        self._cache: dict[str, Tensor | tuple[Tensor, Tensor]] = {}

    def _get(self, key: str, fn):
        if key not in self._cache:
            with torch.no_grad(), torch.autocast(self.logits.device.type, enabled=False):
                self._cache[key] = fn()
        return self._cache[key]

    @property
    def probs(self) -> Tensor:
        """``(R, P)`` sigmoid of the logits (materialised only when asked for)."""
        return self._get("probs", self.logits.sigmoid)

    def prefetch(self, *names: str) -> MaskSums:
        """Compute the sums of several of ``"softplus"`` (row totals), ``"logits"`` (inside
        sums), ``"probs"`` (inside sums and row totals) and ``"probs_sq"`` (row totals) in one
        sweep.

        The sweep walks blocks of columns small enough to stay in cache, so neither
        ``softplus(x)`` nor ``sigmoid(x)`` is ever materialised at ``(R, P)``: a 20k-point layer
        would otherwise allocate (and page-fault in) 10 MB per temporary.
        """
        done = {"softplus": "total_softplus", "logits": "inside_logits",
                "probs": "total_probs", "probs_sq": "total_probs_sq"}
        unknown = set(names) - set(done)
        if unknown:
            raise ValueError(f"prefetch: unknown sum(s) {sorted(unknown)}")
        todo = [n for n in dict.fromkeys(names) if done[n] not in self._cache]
        if todo:
            with torch.no_grad(), torch.autocast(self.logits.device.type, enabled=False):
                self._sweep(todo)
        return self

    def _fused_rows(self) -> Tensor | None:
        """``(R,)`` the instance of each row's pair when the fused kernels apply (ids masks,
        at most one pair per row, a large CPU layer); None otherwise."""
        if self.pairs is None or self.gt.ids is None or not fused.applies(self.logits):
            return None
        row, inst = self.pairs
        return fused.row_instances(row, inst, self.logits.shape[0])

    def _fused_sweep(self) -> bool:
        """Every sum at once from one fused pass (see `esam.losses.fused`); False when the
        kernels do not apply."""
        per_row = self._fused_rows()
        if per_row is None:
            return False
        stats = fused.row_stats(self.logits, self.gt.ids, per_row)
        if stats is None:
            return False
        row, inst = self.pairs
        x = self.logits
        for i, n in enumerate(("softplus", "probs", "probs_sq", "positive")):
            self._cache.setdefault("total_" + n, stats[i].unsqueeze(1))
        for i, n in zip((4, 5, 6), ("logits", "probs", "positive")):
            self._cache.setdefault("inside_" + n, x.new_zeros(x.shape[0], len(self.gt))
                                   .index_put_((row, inst), stats[i].index_select(0, row)))
        return True

    def _sweep(self, names: list[str]) -> None:
        if self._fused_sweep():
            return
        x = self.logits
        r, p = x.shape
        k = len(self.gt)
        want = set(names)
        # softplus(x) = relu(x) - log(max(q, 1 - q)): reuses q = sigmoid(x), so the only extra
        # transcendental per element is a log
        need_q = bool(want & {"softplus", "probs", "probs_sq"})
        gemm = self.pairs is None
        totals = {n: x.new_zeros(r) for n in ("relu", "logmax", "probs", "probs_sq")}
        inside_t = {n: x.new_zeros(k, r) for n in want & {"logits", "probs"}} if gemm else {}
        step = max(p, 1) if p * r <= _SWEEP_BLOCK else max(256, _SWEEP_BLOCK // max(r, 1))
        for start in range(0, p if need_q or inside_t else 0, step):
            xc = x[:, start:start + step]
            if "logits" in inside_t:
                self.gt.segment_accumulate(inside_t["logits"], xc, start)
            if need_q:
                qc = xc.sigmoid()
                if "probs" in want:
                    totals["probs"] += qc.sum(1)
                    if "probs" in inside_t:
                        self.gt.segment_accumulate(inside_t["probs"], qc, start)
                if "probs_sq" in want:
                    totals["probs_sq"] += (qc * qc).sum(1)
                if "softplus" in want:  # q is not needed again: in place
                    totals["relu"] += xc.clamp(min=0).sum(1)
                    totals["logmax"] += qc.sub_(0.5).abs_().add_(0.5).log_().sum(1)
        totals["softplus"] = totals["relu"] - totals["logmax"]
        for n in names:
            if n != "logits":
                self._cache["total_" + n] = totals[n].unsqueeze(1)
            if n in inside_t:
                self._cache["inside_" + n] = inside_t[n].T
        if not gemm and want & {"logits", "probs"}:
            # the binarised masks' hits ride on the same gather (the score loss's IoU reads them)
            for n, v in self._pair_inside(want & {"logits", "probs"} | {"positive"}).items():
                self._cache.setdefault("inside_" + n, v)

    def _pair_inside(self, names: set[str]) -> dict[str, Tensor]:
        """``(R, K)`` inside sums at ``pairs`` (zeros elsewhere) from one gather of members."""
        x = self.logits
        row, inst = self.pairs
        _, flat = self.gt.pair_positions(row, inst, x.shape[1])
        vals = torch.take(x, flat)  # (T,) logits at every member of every pair
        names = {n for n in names if "inside_" + n not in self._cache}
        values = {"logits": vals}
        if names & {"probs", "positive"}:
            values["probs"] = vals.sigmoid()
            values["positive"] = (values["probs"] >= 0.5).to(x.dtype)
        out = {}
        for n in names:
            per_pair = _pair_totals(values[n], self.gt, inst)  # (A,)
            out[n] = x.new_zeros(x.shape[0], len(self.gt)).index_put_((row, inst), per_pair)
        return out

    def pair_positive(self, query_idx: Tensor, gt_idx: Tensor) -> Tensor | None:
        """``(M,)`` number of positions of each pair's GT mask where ``sigmoid(x) >= 0.5`` (the
        binarised mask's hits), for pairs among ``pairs``; None without ``pairs``."""
        if self.pairs is None:
            return None
        if "inside_positive" not in self._cache:
            with torch.no_grad(), torch.autocast(self.logits.device.type, enabled=False):
                self._cache["inside_positive"] = self._pair_inside({"positive"})["positive"]
        return self._cache["inside_positive"][self.local(query_idx), gt_idx]

    def row_positive(self, query_idx: Tensor) -> Tensor | None:
        """``(M,)`` number of positions where ``sigmoid(x) >= 0.5`` in the rows of the given
        queries, when a fused sweep counted them; None otherwise."""
        total = self._cache.get("total_positive")
        return None if total is None else total[self.local(query_idx), 0]

    def inside(self, name: str) -> Tensor:
        """``(R, K)`` sums of ``"logits"``, ``"probs"`` or ``"probs_sq"`` over each GT mask
        (with ``pairs``: only at those pairs)."""
        if name == "probs_sq":
            return self._get("inside_probs_sq",
                             lambda: self.gt.segment_sum(self.probs * self.probs))
        return self.prefetch(name)._cache["inside_" + name]

    def total(self, name: str) -> Tensor:
        """``(R, 1)`` row sums of ``"logits"``, ``"probs"``, ``"probs_sq"`` or ``"softplus"``."""
        if name == "logits":  # no cost reads it: one pass of its own when asked
            return self._get("total_logits", lambda: self.logits.sum(1, keepdim=True))
        return self.prefetch(name)._cache["total_" + name]

    def gt_sizes(self) -> Tensor:
        """``(1, K)`` number of positions of each GT mask."""
        return self._get("sizes", lambda: self.gt.sizes(self.logits.dtype).unsqueeze(0))

    def local(self, query_idx: Tensor) -> Tensor:
        """Row of each of the given query indices (which must be among ``rows``)."""
        if self.rows is None:
            return query_idx
        return torch.searchsorted(self.rows, query_idx)

    def pair_sums(self, query_idx: Tensor, gt_idx: Tensor, form: DiceForm,
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Sums of matched pairs ``(query_idx[m], gt_idx[m])``, each ``(M,)``.

        Returns:
            ``(sum softplus(x) - sum_{i in g} x, <q, g>, q_term, |g|)`` with ``q_term`` the
            Dice form's ``<q, q>`` (seed) or ``sum q`` (esam).
        """
        r = self.local(query_idx)
        bce = self.total("softplus")[r, 0] - self.inside("logits")[r, gt_idx]
        inter = self.inside("probs")[r, gt_idx]
        if form == "seed":
            q_term = self.total("probs_sq")[r, 0]
        else:
            q_term = self.total("probs")[r, 0]
        return bce, inter, q_term, self.gt_sizes()[0, gt_idx]


def _positions(sums) -> int | Tensor:
    """P, at least 1: an int, or per row ``(R, 1)`` for `esam.losses.rowwise.RowStats`."""
    p = sums.num_positions
    return p.clamp(min=1) if isinstance(p, Tensor) else max(p, 1)


def mask_bce_cost(mask_logits: Tensor, gt: InstanceMasks, *, sums: MaskSums | None = None,
                  ) -> Tensor:
    """Mean sigmoid binary cross-entropy of every query mask against every GT mask.

    ``cost[j, k] = (1/P) sum_i BCE(sigmoid(x_ji), g_ki)``. Since ``BCE = softplus(x) - x g``,
    this is ``(sum_i softplus(x_ji) - sum_{i in k} x_ji) / P``: one segment sum, O(Q*P).

    Args:
        mask_logits: ``(Q, P)``.
        gt: K masks over the same P positions.
        sums: shared `MaskSums` of the same inputs, to reuse work across cost terms.

    Returns:
        ``(Q, K)`` cost.
    """
    s = sums or MaskSums(mask_logits, gt)
    return (s.total("softplus") - s.inside("logits")) / _positions(s)


def mask_l1_cost(mask_logits: Tensor, gt: InstanceMasks, *, as_printed: bool = False,
                 sums: MaskSums | None = None) -> Tensor:
    """L1 mask cost, the form the seed prints for its "mask BCE" cost.

    ``(1/P) (<q, 1-g> + <1-q, g>)`` with ``q = sigmoid(x)``: the mean absolute difference
    between soft and true masks. ``as_printed=True`` keeps the print literally,
    ``(1/P)<q, 1-g> + <1-q, g>``, whose second term is not normalised.

    Args:
        mask_logits: ``(Q, P)``.
        gt: K masks over P positions.
        sums: shared `MaskSums`.

    Returns:
        ``(Q, K)`` cost.
    """
    s = sums or MaskSums(mask_logits, gt)
    p = _positions(s)
    inter = s.inside("probs")  # (Q, K) <q, g>
    false_pos = s.total("probs") - inter  # <q, 1-g>
    false_neg = s.gt_sizes() - inter  # <1-q, g>
    if as_printed:
        return false_pos / p + false_neg
    return (false_pos + false_neg) / p


def mask_dice_cost(mask_logits: Tensor, gt: InstanceMasks, form: DiceForm = "seed", *,
                   sums: MaskSums | None = None) -> Tensor:
    """Dice cost of every query mask against every GT mask (see `_dice_from_sums`).

    Args:
        mask_logits: ``(Q, P)``.
        gt: K masks over P positions.
        form: ``"seed"`` or ``"esam"``.
        sums: shared `MaskSums`.

    Returns:
        ``(Q, K)`` cost.
    """
    s = sums or MaskSums(mask_logits, gt)
    q_term = s.total("probs_sq" if form == "seed" else "probs")  # (Q, 1)
    return _dice_from_sums(s.inside("probs"), q_term, s.gt_sizes(), form)


# ---------------------------------------------------------------------------------------------
# Matched-pair losses, (M,) before reduction.


def _check_pairs(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b}: expected shape {tuple(a.shape)} (same as {name_a}), "
                         f"got {tuple(b.shape)}")


def sigmoid_bce_loss(mask_logits: Tensor, targets: Tensor,
                     reduction: Reduction = "mean") -> Tensor:
    """Per-pair mean binary cross-entropy ``(1/P) sum_i BCE(sigmoid(x_i), g_i)``.

    Args:
        mask_logits: ``(M, P)`` logits.
        targets: ``(M, P)`` in {0, 1}.

    Returns:
        ``(M,)`` for ``reduction="none"``, else a scalar over pairs.
    """
    _check_pairs(mask_logits, targets, "mask_logits", "targets")
    if mask_logits.shape[1] == 0:
        per_pair = mask_logits.sum(1) * 0.0
    else:
        per_pair = F.binary_cross_entropy_with_logits(
            mask_logits, targets.to(mask_logits.dtype), reduction="none").mean(1)
    return reduce_loss(per_pair, reduction)


def dice_loss(mask_logits: Tensor, targets: Tensor, form: DiceForm = "seed",
              reduction: Reduction = "mean") -> Tensor:
    """Per-pair Dice loss (see `_dice_from_sums` for the two forms).

    Args:
        mask_logits: ``(M, P)`` logits.
        targets: ``(M, P)`` in {0, 1}.

    Returns:
        ``(M,)`` for ``reduction="none"``, else a scalar over pairs.
    """
    _check_pairs(mask_logits, targets, "mask_logits", "targets")
    return reduce_loss(_dice_of_probs(mask_logits.sigmoid(), targets, form), reduction)


def _dice_of_probs(probs: Tensor, targets: Tensor, form: DiceForm) -> Tensor:
    # probs, targets (M, P) -> (M,)
    t = targets.to(probs.dtype)
    return _dice_from_sums((probs * t).sum(1), _dice_q_term(probs, form), t.sum(1), form)


@torch.no_grad()
def mask_iou(mask_logits: Tensor, targets: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of binarised predicted masks (``sigmoid >= 0.5``) with binary targets.

    Args:
        mask_logits: ``(M, P)`` logits.
        targets: ``(M, P)``; values above 0.5 count as inside.

    Returns:
        ``(M,)`` IoU ``|A & B| / (|A | B| + eps)``, without gradient.
    """
    _check_pairs(mask_logits, targets, "mask_logits", "targets")
    return _iou_of_probs(mask_logits.sigmoid(), targets, eps)


@torch.no_grad()
def _iou_of_probs(probs: Tensor, targets: Tensor, eps: float = 1e-6) -> Tensor:
    pred = probs >= 0.5
    gt = targets > 0.5
    # count_nonzero: a bool .sum() would first copy the whole mask to int64
    inter = torch.count_nonzero(pred & gt, dim=1).to(probs.dtype)
    union = (torch.count_nonzero(pred, dim=1) + torch.count_nonzero(gt, dim=1)).to(probs.dtype)
    return inter / (union - inter + eps)


class _MatchedMaskLoss(torch.autograd.Function):
    """Per-pair BCE and Dice from precomputed sums, with their analytic gradient.

    The forward pass only hands the sums' values through. The backward pass never rebuilds an
    autograd graph over the elementwise work; per matched pair it splits the gradient into a
    part every position of the query's row gets and a part only the GT mask's members get:

        dBCE/dx_i  = (q_i - g_i) / P
        dDice/dx_i = q_i (1 - q_i) * ((2I + 1) / D^2 - 2 g_i / D)    esam, D = sum q + |g| + 1
                   = q_i (1 - q_i) * (4 I q_i / D^2 - 2 g_i / D)       seed, D = <q,q> + |g| + 1

    The row part is a few fused passes over the matched rows (pairs that share a query add up);
    the member part touches ``sum_m |g_m|`` elements through `InstanceMasks.pair_positions`.
    """

    @staticmethod
    def forward(ctx, logits, x, query_idx, gt_idx, gt, bce, dice, inter, q_term, sizes, form):
        ctx.save_for_backward(x, query_idx, gt_idx, inter, q_term, sizes)
        ctx.gt, ctx.form, ctx.logits_dtype = gt, form, logits.dtype
        return bce.clone(), dice.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_bce, g_dice):
        x, query_idx, gt_idx, inter, q_term, sizes = ctx.saved_tensors
        p = x.shape[1]
        coef = _matched_grad_coef(g_bce, g_dice, inter, q_term, sizes, max(p, 1), ctx.form)
        grad = _fused_matched_grad(ctx.gt, x, query_idx, gt_idx, coef)
        if grad is not None:
            return (grad.to(ctx.logits_dtype),) + (None,) * 10
        rows, inverse = torch.unique(query_idx, return_inverse=True)  # (U,), (M,)
        # the row part's coefficients summed over pairs that share a query, each (U, 1)
        a, b, c = coef.new_zeros(len(rows), 3).index_add_(0, inverse, coef[:, :3]).T.unsqueeze(-1)
        q = x.index_select(0, rows).sigmoid_()  # (U, P)
        grad_rows = torch.addcmul(a, q, b).addcmul_(c, torch.addcmul(q, q, q, value=-1)).mul_(q)
        grad = x.new_zeros(x.shape).index_copy_(0, rows, grad_rows)
        pair, flat = ctx.gt.pair_positions(query_idx, gt_idx, p)
        qm = torch.take(x, flat).sigmoid_()  # (T,) q at every member of every pair
        member = torch.addcmul(coef[:, 3].index_select(0, pair), qm - qm * qm,
                               coef[:, 4].index_select(0, pair))  # (T,)
        grad.view(-1).index_add_(0, flat, member, alpha=-1)
        return (grad.to(ctx.logits_dtype),) + (None,) * 10


def _matched_grad_coef(g_bce: Tensor, g_dice: Tensor, inter: Tensor, q_term: Tensor,
                       sizes: Tensor, positions: int | Tensor, form: DiceForm) -> Tensor:
    """``(M, 5)`` coefficients ``a, b, c, gamma, beta`` of the matched BCE and Dice gradient:
    with ``q = sigmoid(x)`` and ``g`` the pair's GT mask, position i of the pair's row gets
    ``q (a + b q + c q (1 - q)) - g_i (gamma + beta q (1 - q))`` (`esam.losses.fused.row_grad`).

    ``positions``: P, at least 1 (an int, or per pair ``(M,)``). The losses' incoming
    gradients are ``g_bce``, ``g_dice`` and their sums ``inter``, ``q_term``, ``sizes``
    (see `_MatchedMaskLoss`).
    """
    den = q_term + sizes + 1  # (M,)
    gamma = g_bce / positions  # BCE: gamma q on the row, -gamma on members
    beta = g_dice * 2 / den  # Dice: -beta q (1 - q) on members
    zero = torch.zeros_like(gamma)
    if form == "seed":  # row part gamma q + delta q^2 (1 - q)
        return torch.stack([gamma, zero, g_dice * 4 * inter / den ** 2, gamma, beta], 1)
    alpha = g_dice * (2 * inter + 1) / den ** 2  # row part q ((alpha + gamma) - alpha q)
    return torch.stack([alpha + gamma, -alpha, zero, gamma, beta], 1)


def _fused_matched_grad(gt: InstanceMasks, x: Tensor, query_idx: Tensor, gt_idx: Tensor,
                        coef: Tensor) -> Tensor | None:
    """`_MatchedMaskLoss`'s gradient in one fused pass (`esam.losses.fused.row_grad`) from
    the pairs' coefficients ``coef (M, 5)`` when each query has at most one pair; None when the
    kernel does not apply."""
    if gt.ids is None or not fused.applies(x) or len(query_idx) == 0:
        return None
    q = x.shape[0]
    inst = fused.row_instances(query_idx, gt_idx, q)
    if inst is None:
        return None
    return fused.row_grad(x, gt.ids, inst, x.new_zeros(q, 5).index_put_((query_idx,), coef))


def matched_mask_losses(mask_logits: Tensor, query_idx: Tensor, gt_idx: Tensor,
                        gt: InstanceMasks, form: DiceForm, with_iou: bool, *,
                        sums: MaskSums | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-pair BCE, Dice and (detached) IoU of matched masks.

    Equal to `sigmoid_bce_loss`, `dice_loss` and `mask_iou` of the matched rows, but reads the
    BCE and Dice sums from the matcher's `MaskSums` when given (no second pass over the logits),
    sums over a GT mask only where its members are, and back-propagates analytically.

    Args:
        mask_logits: ``(Q, P)`` logits of one sample.
        query_idx, gt_idx: ``(M,)`` matched pairs.
        gt: K GT masks over the P positions.
        form: Dice form, ``"seed"`` or ``"esam"``.
        with_iou: also return the IoU of the binarised masks (the score loss's target).
        sums: the matcher's sums over these logits (covering every matched pair), or None.

    Returns:
        ``(bce (M,), dice (M,), iou (M,) or None)``.
    """
    with torch.no_grad(), torch.autocast(mask_logits.device.type, enabled=False):
        x = upcast(mask_logits.detach()).contiguous()
        p = x.shape[1]
        members = None

        def pair_sum(fn) -> Tensor:  # sum of fn(logits) over each pair's mask members, (M,)
            nonlocal members
            if members is None:
                members = torch.take(x, gt.pair_positions(query_idx, gt_idx, p)[1])  # (T,)
            return _pair_totals(fn(members), gt, gt_idx)

        rows = inverse = xr = None
        if sums is not None:
            bce_sum, inter, q_term, sizes = sums.pair_sums(query_idx, gt_idx, form)
        else:
            sizes = gt.sizes(x.dtype)[gt_idx]  # (M,)
            rows, inverse = torch.unique(query_idx, return_inverse=True)  # (U,), (M,)
            xr = x.index_select(0, rows)  # (U, P)
            bce_sum = F.softplus(xr).sum(1)[inverse] - pair_sum(lambda v: v)
            inter = pair_sum(torch.sigmoid)
            q_term = _dice_q_term(xr.sigmoid(), form)[inverse]
        bce = bce_sum / max(p, 1)
        dice = _dice_from_sums(inter, q_term, sizes, form)
        iou = None
        if with_iou:  # of the binarised masks, sigmoid(x) >= 0.5: only the matched rows
            positive = sums.row_positive(query_idx) if sums is not None else None
            if positive is None:
                if rows is None:
                    rows, inverse = torch.unique(query_idx, return_inverse=True)
                    xr = x.index_select(0, rows)  # (U, P)
                binary = xr.sigmoid_() >= 0.5  # (U, P); xr is not needed again
                positive = binary.sum(1, dtype=torch.int32)[inverse].to(x.dtype)
            hit = sums.pair_positive(query_idx, gt_idx) if sums is not None else None
            if hit is None:
                hit = pair_sum(lambda v: (v.sigmoid() >= 0.5).to(x.dtype))
            iou = hit / (positive + sizes - hit + 1e-6)
    bce, dice = _MatchedMaskLoss.apply(mask_logits, x, query_idx, gt_idx, gt, bce, dice, inter,
                                       q_term, sizes, form)
    return bce, dice, iou


def score_loss(scores: Tensor, target_iou: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Squared error between predicted mask quality and the (detached) mask IoU.

    Args:
        scores: ``(M,)`` predicted scores.
        target_iou: ``(M,)`` IoU targets; no gradient flows into them.
    """
    _check_pairs(scores, target_iou, "scores", "target_iou")
    return reduce_loss((scores - target_iou.detach()) ** 2, reduction)


def boxes_to_corners(boxes: Tensor) -> Tensor:
    """``(..., 6)`` (cx, cy, cz, dx, dy, dz) -> ``(..., 6)`` (x1, y1, z1, x2, y2, z2)."""
    half = boxes[..., 3:] / 2
    return torch.cat([boxes[..., :3] - half, boxes[..., :3] + half], -1)


def _volume(corners: Tensor) -> Tensor:
    d = corners[..., 3:] - corners[..., :3]
    return d[..., 0] * d[..., 1] * d[..., 2]


def _aligned_iou_and_hull(a: Tensor, b: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    # a, b: (..., 6) corners -> IoU, union, hull volume, elementwise over leading dims.
    lo = torch.maximum(a[..., :3], b[..., :3])
    hi = torch.minimum(a[..., 3:], b[..., 3:])
    wh = (hi - lo).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1] * wh[..., 2]
    union = (_volume(a) + _volume(b) - overlap).clamp(min=eps)
    hull_wh = (torch.maximum(a[..., 3:], b[..., 3:]) - torch.minimum(a[..., :3], b[..., :3]))
    hull = (hull_wh[..., 0] * hull_wh[..., 1] * hull_wh[..., 2]).clamp(min=eps)
    return overlap / union, union, hull


def axis_aligned_box_iou(boxes1: Tensor, boxes2: Tensor, *, aligned: bool = False,
                         eps: float = 1e-6) -> Tensor:
    """IoU of axis-aligned 3-D boxes given as (cx, cy, cz, dx, dy, dz).

    Args:
        boxes1: ``(A, 6)``.
        boxes2: ``(B, 6)``; with ``aligned=True`` the same shape as ``boxes1``.

    Returns:
        ``(A, B)``, or ``(A,)`` when aligned.
    """
    a, b = boxes_to_corners(boxes1), boxes_to_corners(boxes2)
    if not aligned:
        a, b = a.unsqueeze(1), b.unsqueeze(0)
    return _aligned_iou_and_hull(a, b, eps)[0]


def box_l1_loss(pred_boxes: Tensor, gt_boxes: Tensor, reduction: Reduction = "mean") -> Tensor:
    """``||b_j - b_k||_1`` over the 6 box parameters, per pair.

    Args:
        pred_boxes, gt_boxes: ``(M, 6)``.
    """
    _check_pairs(pred_boxes, gt_boxes, "pred_boxes", "gt_boxes")
    return reduce_loss((pred_boxes - gt_boxes).abs().sum(-1), reduction)


def box_iou_loss(pred_boxes: Tensor, gt_boxes: Tensor, reduction: Reduction = "mean",
                 eps: float = 1e-6) -> Tensor:
    """``1 - IoU`` of axis-aligned boxes, per pair (ESAM's `AxisAlignedIoULoss`).

    Args:
        pred_boxes, gt_boxes: ``(M, 6)`` as (cx, cy, cz, dx, dy, dz).
    """
    _check_pairs(pred_boxes, gt_boxes, "pred_boxes", "gt_boxes")
    iou = _aligned_iou_and_hull(boxes_to_corners(pred_boxes), boxes_to_corners(gt_boxes), eps)[0]
    return reduce_loss(1 - iou, reduction)


def box_giou_loss(pred_boxes: Tensor, gt_boxes: Tensor, reduction: Reduction = "mean",
                  eps: float = 1e-6) -> Tensor:
    """``1 - GIoU`` of axis-aligned boxes, per pair: ``GIoU = IoU - (hull - union) / hull``.

    Args:
        pred_boxes, gt_boxes: ``(M, 6)`` as (cx, cy, cz, dx, dy, dz).
    """
    _check_pairs(pred_boxes, gt_boxes, "pred_boxes", "gt_boxes")
    iou, union, hull = _aligned_iou_and_hull(
        boxes_to_corners(pred_boxes), boxes_to_corners(gt_boxes), eps)
    return reduce_loss(1 - (iou - (hull - union) / hull), reduction)


# ---------------------------------------------------------------------------------------------
# Semantic and contrastive terms.


def semantic_cross_entropy(logits: Tensor, targets: Tensor, *, ignore_index: int,
                           reduction: Reduction = "mean") -> Tensor:
    """Cross-entropy over labelled positions, ``-(1/|valid|) sum_i log softmax(z_i)[y_i]``.

    Args:
        logits: ``(P, C)``.
        targets: ``(P,)`` in ``[0, C)`` or ``ignore_index``.

    Returns:
        The mean over labelled positions (a graph-connected zero when none is labelled), or
        ``(P,)`` with zeros at ignored positions for ``reduction="none"``.
    """
    per_pos = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    if reduction == "mean":
        n_valid = (targets != ignore_index).sum()
        if int(n_valid) == 0:
            return 0.0 * logits.sum()
        return per_pos.sum() / n_valid
    return reduce_loss(per_pos, reduction)


def nt_xent(features: Tensor, targets: Tensor, *, temperature: float = 0.07,
            symmetric: bool = False, reduction: Reduction = "mean") -> Tensor:
    """NT-Xent / InfoNCE between paired embeddings.

    ``L = -(1/M) sum_i log softmax_j(cos(f_i, c_j) / tau)_i`` — one cross-entropy over the
    ``(M, M)`` cosine-similarity matrix with the diagonal as labels. ``symmetric=True`` averages
    it with the same loss from the other side (rows of ``targets`` against all ``features``).

    Args:
        features: ``(M, d)`` embeddings (e.g. pooled fused 3-D features).
        targets: ``(M_t, d)`` embeddings; rows ``0..M-1`` are the positives of ``features`` and
            any extra rows are extra negatives (e.g. gathered from other ranks).
        temperature: tau > 0.

    Returns:
        Scalar (or ``(M,)`` for ``reduction="none"``).
    """
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    m = features.shape[0]
    f = F.normalize(features, dim=-1)
    c = F.normalize(targets, dim=-1)
    logits = f @ c.T / temperature  # (M, M_t)
    labels = torch.arange(m, device=features.device)
    loss = F.cross_entropy(logits, labels, reduction="none") if m else logits.sum(1) * 0.0
    if symmetric:
        back = logits[:, :m].T  # (M, M): rows are targets 0..M-1 against every feature
        loss_b = F.cross_entropy(back, labels, reduction="none") if m else loss
        loss = (loss + loss_b) / 2
    return reduce_loss(loss, reduction)
