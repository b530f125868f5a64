"""Online-merge losses: ESAM's contrastive merge criteria and the seed's per-point L_merge.

Shape vocabulary: B samples, V frames, Q queries, K instances (ground truth, or global instances
of the merge memory), N points, d feature dim. F = B * V frames of a batch, M members (queries)
of one instance in one frame.

Two families live here.

**ESAM's released criteria** (``ScanNetMergeCriterion_Fast``, ``ScanNetMergeCriterion_Seal``)
take, per sample and frame, the queries' merge features and the ground-truth-instance -> query
assignment, in the released layout:

* ``merge_feats[b][v]``: ``(Q, d)`` merge features of frame v of sample b (ESAM's ``MergeHead``
  L2-normalises them);
* ``ins_masks[b][v][k]``: 1-D integer tensor, the queries of frame v that belong to instance k
  (empty when k is absent from the frame); every frame of a sample lists the same K instances.

Both are InfoNCE terms written as one ``F.cross_entropy`` over rows of a similarity tensor,
absent columns masked:

* ``tmp`` (temporal): instance centres (mean of member features) of frame t against those of
  frame t+1, and back; rows are instances present in both frames, columns the instances present
  in the other frame.
* ``p2s`` (point to segment): each instance centre (element-wise max of its member features)
  against member features. ``_Fast`` steps i = 0..M_f-1 through the members (the i-th member of
  every instance, the last one repeated when an instance has fewer); ``_Seal`` scores each
  member against one random member of every other present instance.

**The seed's L_merge** (``merge_ce_loss``, ``global_point_logits``, ``align_global_ids``,
``MergeCECriterion``): a per-point cross-entropy over {background, global instances 1..K}.
"""

from __future__ import annotations

from dataclasses import dataclass
import functools
from functools import cached_property
import itertools
import operator
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from esam.losses import functional as LF
from esam.losses import fused

from esam.losses.functional import upcast

__all__ = [
    "axis_aligned_box_iou",
    "merge_tmp_infonce",
    "merge_p2s_infonce_fast",
    "merge_p2s_infonce_seal",
    "sample_seal_negatives",
    "ScanNetMergeCriterion_Fast",
    "ScanNetMergeCriterion_Seal",
    "merge_ce_loss",
    "global_point_logits",
    "align_global_ids",
    "MergeCECriterion",
]

MergeFeats = Sequence[Sequence[Tensor]]
InsMasks = Sequence[Sequence[Sequence[Tensor]]]


# --------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------

def axis_aligned_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-12) -> Tensor:
    """Pairwise 3-D IoU of axis-aligned boxes.

    Args:
        boxes1: ``(A, 6)`` boxes (cx, cy, cz, dx, dy, dz), sizes >= 0.
        boxes2: ``(B, 6)`` boxes in the same format.
        eps: floor of the union volume; two empty boxes have IoU 0.

    Returns:
        ``(A, B)`` IoU in [0, 1].
    """
    for name, b in (("boxes1", boxes1), ("boxes2", boxes2)):
        if b.dim() != 2 or b.shape[1] != 6:
            raise ValueError(f"{name}: expected shape (A, 6) boxes (cx, cy, cz, dx, dy, dz), "
                             f"got {tuple(b.shape)}")
    # the shared formula, with negative sizes read as empty boxes
    def clamp_sizes(b: Tensor) -> Tensor:
        return torch.cat([b[:, :3], b[:, 3:].clamp(min=0)], 1)

    return LF.axis_aligned_box_iou(clamp_sizes(boxes1), clamp_sizes(boxes2), eps=eps)  # (A, B)


# --------------------------------------------------------------------------------------------
# Packing the released layout into padded tensors
# --------------------------------------------------------------------------------------------

@dataclass
class _Packed:
    """The released nested layout flattened once.

    Frames are laid out on the padded (B, V) grid, frame f = b * V + v, each padded to Q rows.
    A "slot" is ``f * K + k``. Entries (instance, member) are stored frame by frame, slot by
    slot, in the order of the given lists.

    The index structure depends only on the lists' lengths, which the host knows without
    reading a tensor, so it is built on the host (numpy) and each piece is handed to the device
    once; ``host_*`` keep the host copies for the layouts built from them.
    """

    frames: list[list[Tensor]]  # the given (Q_f, d) merge features per sample, one dtype >= fp32
    max_queries: int  # Q
    dim: int  # d
    member_slot: Tensor  # (E,) slot of every entry
    member_query: Tensor  # (E,) query of every entry in its frame
    table_entry: Tensor  # (F, K, M) entry of the i-th member of k, its last one for shorter lists
    counts: Tensor  # (B, V, K) members per instance and frame
    num_instances: Tensor  # (B,) K_b
    num_frames: list[int]  # V_b per sample
    shape: tuple[int, int, int]  # (B, V, K) padded sizes
    host_slot: np.ndarray  # (E,) member_slot
    host_entry: np.ndarray  # (F, K, M) table_entry
    host_counts: np.ndarray  # (F, K) counts

    @property
    def present(self) -> Tensor:
        return self.counts > 0  # (B, V, K)

    @cached_property
    def layout(self) -> "_MemberLayout":
        """The member entries on a padded per-frame grid (see :class:`_MemberLayout`)."""
        return _member_layout(self)


def _check_index_lists(ins_masks: InsMasks) -> None:
    """Name the first malformed query-index tensor (slow path, only run on failure)."""
    for b, sample in enumerate(ins_masks):
        for v, lists in enumerate(sample):
            for k, idx in enumerate(lists):
                if (not isinstance(idx, Tensor) or idx.dim() != 1 or idx.is_floating_point()
                        or idx.dtype == torch.bool or idx.is_complex()):
                    got = (f"shape {tuple(idx.shape)} dtype {idx.dtype}"
                           if isinstance(idx, Tensor) else type(idx).__name__)
                    raise ValueError(f"ins_masks[{b}][{v}][{k}]: expected a 1-D integer tensor of "
                                     f"query indices, got {got}")


def _to_device(a: np.ndarray, device: torch.device) -> Tensor:
    """A host index array -> tensor on ``device`` (no copy on the CPU)."""
    return torch.from_numpy(a).to(device)


def _pack(merge_feats: MergeFeats, ins_masks: InsMasks) -> _Packed:
    """Validate the released layout and flatten it.

    One pass over frames; per instance list only its length is read, the index tensors are
    concatenated once and checked as a whole.
    """
    if len(merge_feats) != len(ins_masks):
        raise ValueError(f"ins_masks: expected one entry per sample (B={len(merge_feats)}), "
                         f"got {len(ins_masks)}")
    num_samples = len(merge_feats)
    if num_samples == 0:
        raise ValueError("merge_feats: expected at least one sample, got an empty list")
    frames_per_sample, inst_per_sample = [], []
    q_max, d, ref = 0, None, None
    for b in range(num_samples):
        if len(merge_feats[b]) != len(ins_masks[b]):
            raise ValueError(f"ins_masks[{b}]: expected one entry per frame "
                             f"(V={len(merge_feats[b])}), got {len(ins_masks[b])}")
        frames_per_sample.append(len(merge_feats[b]))
        k_b = len(ins_masks[b][0]) if len(ins_masks[b]) else 0
        for v, (f, lists) in enumerate(zip(merge_feats[b], ins_masks[b])):
            if len(lists) != k_b:
                raise ValueError(f"ins_masks[{b}][{v}]: expected K={k_b} instance lists (the same "
                                 f"for every frame of a sample), got {len(lists)}")
            if not isinstance(f, Tensor) or f.dim() != 2 or not f.is_floating_point():
                got = (f"shape {tuple(f.shape)} dtype {f.dtype}" if isinstance(f, Tensor)
                       else type(f).__name__)
                raise ValueError(f"merge_feats[{b}][{v}]: expected a floating (Q, d) tensor, "
                                 f"got {got}")
            if d is None:
                d, ref = f.shape[1], f
            elif f.shape[1] != d:
                raise ValueError(f"merge_feats[{b}][{v}]: expected d={d} columns, got {f.shape[1]}")
            q_max = max(q_max, f.shape[0])
        inst_per_sample.append(k_b)
    v_max, k_max = max(frames_per_sample), max(inst_per_sample)
    device = ref.device if ref is not None else torch.device("cpu")
    d = d or 0
    n_frames = num_samples * v_max

    # per instance list: its slot and (Python) length; the lists themselves concatenated once
    lists, slots, list_q = [], [], []
    for b in range(num_samples):
        for v in range(frames_per_sample[b]):
            fi = b * v_max + v
            lists.extend(ins_masks[b][v])
            slots.append(range(fi * k_max, fi * k_max + inst_per_sample[b]))
            list_q.append((merge_feats[b][v].shape[0], inst_per_sample[b]))  # (Q_f, K_b)
    try:
        lens = list(map(Tensor.numel, lists))
        # empty tensors are left out: they send torch.cat down a much slower path
        local = torch.cat(list(itertools.compress(lists, lens))) if any(lens) else None
        dtypes = set(map(operator.attrgetter("dtype"), lists))
    except (AttributeError, IndexError, TypeError, RuntimeError):
        _check_index_lists(ins_masks)
        raise
    if any(dt.is_floating_point or dt.is_complex or dt == torch.bool
           for dt in dtypes) or (local is not None and local.dim() != 1):
        _check_index_lists(ins_masks)
    if local is None:
        local = torch.zeros(0, dtype=torch.long, device=device)
    local = local.to(device=device, dtype=torch.long)  # (E,) query of every entry in its frame
    lens_h = np.array(lens, dtype=np.int64)  # (L,) one per list
    uniform = all(k_b == k_max for k_b in inst_per_sample) and all(
        v_b == v_max for v_b in frames_per_sample)
    slot_h = (np.arange(len(lists), dtype=np.int64) if uniform
              else np.array([s for r in slots for s in r], dtype=np.int64))  # (L,)
    member_slot = np.repeat(slot_h, lens_h)  # (E,)
    if local.numel():
        if all(q == q_max for q, _ in list_q):
            lo, hi = torch.aminmax(local)
            bad = bool(lo < 0) or bool(hi >= q_max)
        else:
            q_of_list = np.array([q for q, k_b in list_q for _ in range(k_b)], dtype=np.int64)
            q_of_entry = _to_device(np.repeat(q_of_list, lens_h), device)  # (E,)
            bad = bool(((local < 0) | (local >= q_of_entry)).any())
        if bad:
            raise ValueError("ins_masks: expected query indices in [0, Q) of their frame; got an "
                             "index outside that range")
    counts = np.zeros(n_frames * k_max, dtype=np.int64)
    counts[slot_h] = lens_h
    # table[s, i]: the entry start_s + min(i, count_s - 1)
    m = max(lens, default=0)
    starts = np.zeros_like(counts)
    starts[slot_h] = np.cumsum(lens_h) - lens_h
    entry = starts[:, None] + np.minimum(np.arange(m)[None, :],
                                         np.maximum(counts - 1, 0)[:, None])  # (F*K, M)
    np.clip(entry, 0, max(local.numel() - 1, 0), out=entry)  # absent instances: any entry
    entry = entry.reshape(n_frames, k_max, m)

    # one dtype for every frame, fp32 at least (CPU autocast cannot cat fp16)
    dtype = functools.reduce(torch.promote_types, {upcast(f).dtype for sample in merge_feats
                                                   for f in sample}, torch.float32)
    return _Packed(
        frames=[[f.to(dtype) for f in sample] for sample in merge_feats],
        max_queries=q_max,
        dim=d,
        member_slot=_to_device(member_slot, device),
        member_query=local,
        table_entry=_to_device(entry, device),
        counts=_to_device(counts, device).view(num_samples, v_max, k_max),
        num_instances=torch.tensor(inst_per_sample, dtype=torch.long, device=device),
        num_frames=frames_per_sample,
        shape=(num_samples, v_max, k_max),
        host_slot=member_slot,
        host_entry=entry,
        host_counts=counts.reshape(n_frames, k_max),
    )


def _mean_centres(p: _Packed) -> Tensor:
    """Instance centres, the mean of the members' features -> ``(B, V, K, d)`` (0 when absent).

    One small matmul per frame with its averaging matrix: cheaper, forward and backward, than
    gathering the members (when nothing else needs them gathered), and no ``(F, Q, d)`` stack
    of the frames (a 4 MB copy and gradient for a batch).
    """
    b, v, k = p.shape
    if not any(p.frames):
        return torch.zeros(b, v, k, p.dim, device=p.counts.device)
    ref = next(f for sample in p.frames for f in sample)
    counts = p.counts.view(-1)  # (F*K,)
    weight = (1.0 / counts.clamp(min=1).to(ref.dtype))[p.member_slot]  # (E,)
    avg = ref.new_zeros(b * v * k, p.max_queries).index_put_(
        (p.member_slot, p.member_query), weight, accumulate=True)  # (F*K, Q); repeats add up
    avg = avg.view(b * v, k, p.max_queries)
    blank = ref.new_zeros(k, ref.shape[1])
    centres = []
    for i, sample in enumerate(p.frames):
        centres.extend(avg[i * v + t, :, :f.shape[0]] @ f for t, f in enumerate(sample))
        centres.extend(blank for _ in range(v - len(sample)))
    return torch.stack(centres).view(b, v, k, ref.shape[1])


def _mean_and_max_centres(p: _Packed) -> tuple[Tensor, Tensor, Tensor]:
    """Instance centres, the mean and the element-wise max of the members' features
    -> ``(B, V, K, d)`` and ``(F, K, d)`` (zero when the instance is absent), and the member rows
    ``(F, R, d)`` (see :class:`_MemberLayout`) that ``p.layout.table`` points into, for the terms
    that score members against centres.
    """
    b, v, k = p.shape
    frames = [f for sample in p.frames for f in sample]
    if not frames:
        zero = torch.zeros(b * v, k, p.dim, device=p.counts.device)
        return zero.view(b, v, k, p.dim), zero, zero.new_zeros(b * v, 1, p.dim)
    mean, top, x = _MemberPool.apply(p.layout, p.counts.view(-1), *frames)
    return mean.view(b, v, k, p.dim), top.view(b * v, k, p.dim), x


_CHUNK_ELEMENTS = 1 << 18  # rows x columns per block of `_MemberPool`'s torch-op backward
_STACK_MIN_MEMBERS = 0.5  # the stacked layout from this fraction of member rows on


@dataclass
class _MemberLayout:
    """The rows the merge terms score and pool: every frame's block of R rows, ``(F, R, d)``.

    Stacked (``stacked=True``, when no query is listed twice in a frame): block f is frame f
    itself, row q its query q (R = Q, shorter and missing frames padded with zero rows). The
    gather is one ``cat`` of the frames and the frames' gradients are slices of the rows'.

    Otherwise block f holds the frame's n_f entries, in entry order, in rows ``0 .. n_f - 1``
    (R = max_f n_f); the gather is one ``index_select`` per frame and the backward scatters
    each block into its frame's gradient.

    Rows that belong to no instance (non-members, padding) have the dummy slot ``F * K``.
    """

    stacked: bool
    rows: int  # R
    segment: Tensor  # (F * R,) slot f * K + k of each row; F * K (a dummy slot) for the others
    table: Tensor  # (F, K, M) row within block f of the i-th member of instance k
    blocks: list[tuple[int, int, int]]  # backward blocks: (first frame, stop, non-empty slots)
    present: list[bool]  # per grid frame: a frame of its sample (not grid padding)
    index: list[Tensor] | None = None  # entry layout: per frame, the queries of its entries
    padding: Tensor | None = None  # entry layout: the rows holding no entry

    def gather(self, frames: Sequence[Tensor]) -> Tensor:
        """The per-frame ``(Q_f, d)`` features (grid order, missing frames skipped) ->
        ``(F * R, d)`` rows."""
        d, r = frames[0].shape[1], self.rows
        it = iter(frames)
        if self.stacked:
            pieces = []
            for here in self.present:
                pad = r
                if here:
                    pieces.append(next(it))
                    pad -= pieces[-1].shape[0]
                if pad:  # shorter and missing frames: zero rows
                    pieces.append(frames[0].new_zeros(pad, d))
            return torch.cat(pieces, out=_workspace((len(self.present) * r, d), frames[0]))
        rows = _workspace((len(self.index) * r, d), frames[0])
        for f, (here, idx) in enumerate(zip(self.present, self.index)):
            if here:
                torch.index_select(next(it), 0, idx, out=rows.narrow(0, f * r, idx.numel()))
        return rows.index_fill_(0, self.padding, 0.0)

    def scatter(self, flat: Tensor, queries: list[int]) -> list[Tensor]:
        """Rows' gradient ``(F * R, d)`` -> each frame's ``(Q_f, d)`` gradient."""
        r, d = self.rows, flat.shape[1]
        grid = [f for f, here in enumerate(self.present) if here]
        if self.stacked:
            return [flat.narrow(0, f * r, q) for f, q in zip(grid, queries)]
        return [flat.new_zeros(q, d).index_add_(0, self.index[f],
                                                flat.narrow(0, f * r, self.index[f].numel()))
                for f, q in zip(grid, queries)]


def _workspace(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised buffer for ``like``'s device and dtype that the caller overwrites in
    full; on CPU in memory that earlier calls already mapped (`fused.reusable_empty`)."""
    if like.device.type == "cpu":
        return fused.reusable_empty(shape, like.dtype)
    return like.new_empty(shape)


def _blocks(p: _Packed, r: int) -> list[tuple[int, int, int]]:
    """Blocks of whole frames of about _CHUNK_ELEMENTS rows x features, each with its count of
    non-empty slots (for the tie test of the max's gradient)."""
    nf = p.shape[0] * p.shape[1]
    per_block = max(1, _CHUNK_ELEMENTS // max(r * p.dim, 1))
    if p.counts.device.type != "cpu":
        per_block = max(nf, 1)  # the blocks only bound the CPU's temporaries
    filled = np.cumsum((p.host_counts > 0).sum(1))  # (F,)
    return [(f0, min(f0 + per_block, nf),
             int(filled[min(f0 + per_block, nf) - 1] - (filled[f0 - 1] if f0 else 0)))
            for f0 in range(0, nf, per_block)] or [(0, 0, 0)]


def _member_layout(p: _Packed) -> _MemberLayout:
    """The stacked layout where no query is listed twice in a frame and at least
    `_STACK_MIN_MEMBERS` of the stack's rows are members, else the entry layout (with few
    members, scoring every query would cost more than gathering the members).

    The entry layout is built on the host from ``p``'s host index arrays; the stacked one
    places the entries by their (device) query indices, and its test for repeats is the one
    host sync.
    """
    b, v, k = p.shape
    nf = b * v
    device = p.counts.device
    slot = p.host_slot  # (E,)
    frame = slot // max(k, 1)  # (E,)
    present = [f % v < p.num_frames[f // v] for f in range(nf)]
    q = max(p.max_queries, 1)
    if slot.size and slot.size >= _STACK_MIN_MEMBERS * nf * q:
        row = _to_device(frame * q, device) + p.member_query  # (E,) its row, stacked
        owner = torch.full((nf * q,), -1, dtype=torch.long, device=device)
        entries = torch.arange(slot.size, device=device)
        owner[row] = entries
        if torch.equal(owner[row], entries):  # no row claimed twice
            segment = torch.full((nf * q,), nf * k, dtype=torch.long, device=device)
            segment[row] = p.member_slot
            return _MemberLayout(stacked=True, rows=q, segment=segment,
                                 table=p.member_query[p.table_entry], blocks=_blocks(p, q),
                                 present=present)
    per_frame = np.bincount(frame, minlength=nf)  # (F,)
    r = max(1, int(per_frame.max(initial=0)))
    in_frame = np.arange(slot.size) - (np.cumsum(per_frame) - per_frame)[frame]  # (E,) its row
    segment = np.full(nf * r, nf * k, dtype=np.int64)
    segment[frame * r + in_frame] = slot
    table = in_frame[p.host_entry] if slot.size else np.zeros_like(p.host_entry)  # (F, K, M)
    return _MemberLayout(stacked=False, rows=r, segment=_to_device(segment, device),
                         table=_to_device(table, device), blocks=_blocks(p, r), present=present,
                         index=list(p.member_query.split(per_frame.tolist())),
                         padding=_to_device(np.flatnonzero(segment == nf * k), device))


class _MemberPool(torch.autograd.Function):
    """Frames -> the mean and the element-wise max of each slot's member rows, and the rows.

    ``frames`` the per-frame ``(Q_f, d)`` features (in grid order, missing frames skipped) ->
    ``mean (S, d)``, ``top (S, d)`` (0 for an empty slot) and ``x (F, R, d)`` the rows (see
    :class:`_MemberLayout`), S = F * K.

    Forward: the layout's gather, then a scatter-add and a scatter-max over the rows' slots.
    Backward, one node for the rows' three uses: the members' share of the centres' gradient
    (the mean's spread over the members, the max's given to the rows holding it) is added
    straight into the rows' own gradient (the point-to-segment scores'), where autograd would
    zero-fill a second rows-sized buffer and sum the two: one compiled pass on CPU
    (`fused.member_grad`), else torch ops in blocks of whole frames (small temporaries, reused
    rather than page-faulted in on every call). Stacked, the frames' gradients are then slices
    of that buffer. On exact ties of the max the gradient is shared equally by the tied
    entries (the released ``max(0)`` gives it to the first one).
    """

    @staticmethod
    def forward(ctx, layout: _MemberLayout, counts: Tensor, *frames: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        rows = layout.gather(frames)  # (F * R, d)
        d, r = rows.shape[1], layout.rows
        s, segment = counts.shape[0], layout.segment
        inv = 1.0 / counts.clamp(min=1).to(rows.dtype).unsqueeze(1)  # (S, 1)
        mean = rows.new_zeros(s + 1, d).index_add_(0, segment, rows)[:s].mul_(inv)
        top = rows.new_zeros(s + 1, d).scatter_reduce_(
            0, segment.view(-1, 1).expand_as(rows), rows, "amax", include_self=False)
        top[s] = float("nan")  # the dummy slot: its rows never hold the max
        ctx.save_for_backward(rows, top, inv)
        ctx.layout = layout
        ctx.queries = [f.shape[0] for f in frames]
        return mean, top[:s], rows.view(-1, r, d)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_mean: Tensor | None, g_top: Tensor | None, g_x: Tensor | None
                 ) -> tuple[Tensor | None, ...]:
        rows, top, inv = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        if not any(needs):
            return (None,) * (2 + len(needs))
        flat = _member_rows_grad(ctx.layout, rows, top, inv, g_mean, g_top, g_x)
        grads = ctx.layout.scatter(flat, ctx.queries)
        return (None, None, *(g if need else None for g, need in zip(grads, needs)))


def _member_rows_grad(layout: _MemberLayout, rows: Tensor, top: Tensor, inv: Tensor,
                      g_mean: Tensor | None, g_top: Tensor | None, g_x: Tensor | None
                      ) -> Tensor:
    """The rows' gradient ``(F * R, d)``: their own gradient plus their share of the
    centres' gradient (mean: equal parts; max: the rows that hold it, ties equal)."""
    segment, r, d, s = layout.segment, layout.rows, rows.shape[1], inv.shape[0]
    if g_x is None:
        flat = torch.zeros_like(rows)
    elif g_x._base is None and g_x.is_contiguous() and not g_x.requires_grad:
        flat = g_x.view(-1, d)  # a fresh buffer of the engine's: added into in place
    else:
        flat = g_x.reshape(-1, d).clone()
    spread = share = None  # per slot, with a zero row for the dummy slot
    if g_mean is not None:
        spread = g_mean.new_empty(s + 1, d)
        torch.mul(g_mean, inv, out=spread[:s])
        spread[s].zero_()
    if g_top is not None:
        share = g_top.new_empty(s + 1, d)
        share[:s] = g_top
        share[s].zero_()
    if share is None and spread is None:
        return flat
    if _fused_member_grad(flat, rows, segment, top, share, spread,
                          sum(n for *_, n in layout.blocks)):
        return flat
    for f0, f1, filled in layout.blocks:
        a, b = f0 * r, f1 * r
        seg = segment[a:b]
        gathered = None
        if share is not None:
            # 1.0 where a row holds its slot's max: a comparison written straight into the
            # float buffer of the gathered maxima (a bool result is slow on CPU)
            hit = top.index_select(0, seg)  # (c, d)
            torch.eq(hit, rows[a:b], out=hit)
            # every (non-empty slot, column) has one hit, more only on exact ties; the test
            # is a host sync, so only the CPU (where it is free) skips the division when
            # nothing ties. A float32 sum of 0/1 values is exact below 2**24 elements.
            exact = hit.numel() < 2 ** 24 or hit.dtype == torch.float64
            per_slot = share
            if rows.device.type != "cpu" or bool(
                    (hit.sum() if exact else hit.sum(dtype=torch.float64)) > filled * d):
                ties = torch.zeros_like(top).index_add_(0, seg, hit)  # (S + 1, d)
                per_slot = share / ties.clamp(min=1)
            gathered = per_slot.index_select(0, seg)  # (c, d)
            flat[a:b].addcmul_(hit, gathered)
        if spread is not None:
            if gathered is None:
                gathered = spread.index_select(0, seg)
            else:  # reuse the gather buffer
                torch.index_select(spread, 0, seg, out=gathered)
            flat[a:b].add_(gathered)
    return flat


def _fused_member_grad(flat: Tensor, rows: Tensor, segment: Tensor, top: Tensor,
                       share: Tensor | None, spread: Tensor | None, num_filled: int) -> bool:
    """The members' gradient added into ``flat`` by `fused.member_grad`; False (nothing
    written) when the kernel does not apply. ``share``/``spread``: ``(S + 1, d)`` or None;
    ``num_filled``: the non-empty slots."""
    if not fused.applies(flat, fused.MIN_MEMBER_ELEMENTS):
        return False
    zero = flat.new_zeros(top.shape) if share is None or spread is None else None
    hits = fused.member_grad(flat, rows, segment, top, zero if share is None else share,
                             zero if spread is None else spread)
    if hits is None:
        return False
    if share is not None and int(hits) > num_filled * flat.shape[1]:
        # exact ties (rare): the kernel gave each tied row the whole share
        hit = torch.eq(top.index_select(0, segment), rows).to(flat.dtype)
        ties = torch.zeros_like(top).index_add_(0, segment, hit)
        flat.addcmul_(hit, (share / ties.clamp(min=1) - share).index_select(0, segment))
    return True


# --------------------------------------------------------------------------------------------
# Functional InfoNCE terms on padded tensors
# --------------------------------------------------------------------------------------------

class _NextFrameProducts(torch.autograd.Function):
    """``c (F, K, d)`` -> ``(F - 1, K, K)``, the products ``c[t] @ c[t + 1].T`` of every frame
    with the next.

    As ``torch.bmm(c[:-1], c[1:].mT)`` the two slices' backward would each zero-fill a
    ``c``-sized buffer and add them; here both halves of the gradient go into one buffer.
    """

    @staticmethod
    def forward(ctx, c: Tensor) -> Tensor:
        ctx.save_for_backward(c)
        return torch.bmm(c[:-1], c[1:].transpose(1, 2))

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor) -> Tensor:
        (c,) = ctx.saved_tensors
        grad = torch.empty_like(c, memory_format=torch.contiguous_format)
        torch.bmm(g, c[1:], out=grad[:-1])  # as the row frame t
        grad[-1].zero_()
        grad[1:].baddbmm_(g.transpose(1, 2), c[:-1])  # as the column frame t + 1
        return grad


def merge_tmp_infonce(centres: Tensor, present: Tensor, tau: float = 0.07, *,
                      normalize_by: str = "present", num_instances: Tensor | None = None,
                      mask_zero_logits: bool = False) -> Tensor:
    """Temporal InfoNCE between instance centres of consecutive frames, both directions.

    For each sample, each pair (t, t+1) and each direction, rows are the instances present in
    both frames, columns the instances present in the target frame, logits
    ``<c_t[r], c_{t+1}[c]> / tau`` and the label of row r is column r.

    Args:
        centres: ``(B, V, K, d)`` instance centres (padding rows may hold anything finite).
        present: ``(B, V, K)`` bool, instance k is observed in frame v.
        tau: temperature.
        normalize_by: ``"present"`` — mean over the valid rows of each (pair, direction)
            (``_Fast``); ``"instances"`` — sum over valid rows divided by ``num_instances[b]``,
            the sample's K including absent instances (``_Seal``).
        num_instances: ``(B,)`` K_b, required for ``"instances"``.
        mask_zero_logits: also treat an exactly-zero logit as absent — a row whose own logit is
            0 is dropped, a zero column is set to -inf (the released ``_Fast``, which detects
            absent instances by ``logit == 0``).

    Returns:
        ``(B,)`` per-sample loss: summed over frame pairs and both directions.
    """
    if normalize_by not in ("present", "instances"):
        raise ValueError(f"normalize_by: expected 'present' or 'instances', got {normalize_by!r}")
    if normalize_by == "instances" and num_instances is None:
        raise ValueError("num_instances: expected (B,) K_b with normalize_by='instances', got None")
    bsz, v, k, d = centres.shape
    if v < 2 or k == 0:
        return centres.sum((1, 2, 3)) * 0.0
    # frames t and t+1 of the flat (B*V) layout, one bmm over shifted views; the pairs that
    # straddle two samples get no valid row
    flat = centres.reshape(bsz * v, k, d)
    n = bsz * v - 1  # consecutive pairs of the flat layout
    logits = _NextFrameProducts.apply(flat) / tau  # (n, K, K) rows: frame t
    logits = torch.cat([logits, logits.transpose(1, 2)])  # (2n, K, K) both directions
    dtype = logits.dtype
    pres = present.reshape(bsz * v, k)
    src = torch.cat([pres[:-1], pres[1:]])  # (2n, K) rows' frame
    dst = torch.cat([pres[1:], pres[:-1]])  # (2n, K) columns' frame
    pair = torch.arange(2 * n, device=centres.device) % n  # (2n,) t on the flat layout
    sample = torch.div(pair, v, rounding_mode="floor")  # (2n,)
    same_sample = (pair % v != v - 1).view(-1, 1)  # (2n, 1)
    row_valid = (src & dst & same_sample).to(dtype)  # (2n, K)
    hide = (~dst).to(dtype).unsqueeze(1)  # (2n, 1, K) absent columns
    if mask_zero_logits and _has_zero(logits):
        zero = _zeros_of(logits)  # (2n, K, K)
        row_valid = row_valid * (1.0 - zero.diagonal(dim1=1, dim2=2))
        hide = torch.maximum(hide, zero)
    # Mask on valid rows only: their own column stays finite, and invalid rows (weight 0)
    # never become all masked.
    logits = _masked(logits, hide * row_valid.unsqueeze(-1))
    target = torch.arange(k, device=centres.device).repeat(2 * n)  # (2n*K,)
    ce = F.cross_entropy(logits.view(-1, k), target, reduction="none").view(2 * n, k)
    if normalize_by == "present":
        w = row_valid / row_valid.sum(-1, keepdim=True).clamp(min=1)
    else:
        w = row_valid / num_instances.to(dtype).clamp(min=1)[sample].unsqueeze(1)
    per_pair = (ce * w).sum(1)  # (2n,)
    return torch.zeros(bsz, dtype=dtype, device=centres.device).index_add(0, sample, per_pair)


def _has_zero(logits: Tensor) -> bool:
    """Whether any logit is exactly 0 (then the released zero-logit masking changes something).
    Only the CPU answers (the host sync is free there); elsewhere the masking always runs."""
    return logits.device.type != "cpu" or torch.count_nonzero(logits) < logits.numel()


def _zeros_of(logits: Tensor) -> Tensor:
    """1.0 where a logit is exactly 0, else 0.0 (a float mask: bool ops are slow on CPU)."""
    return torch.eq(logits.detach(), 0, out=torch.empty_like(logits))


def _masked(logits: Tensor, hide: Tensor) -> Tensor:
    """Logits with the entries where ``hide`` is 1.0 (0.0 elsewhere) pushed to the dtype's
    lowest value: their softmax weight underflows to exactly the 0 of ``-inf``, but a row
    whose every entry is hidden stays finite. An addition: cheaper than ``masked_fill``."""
    return logits + hide * torch.finfo(logits.dtype).min


class _RowScores(torch.autograd.Function):
    """``feats (F, R, d)``, ``centres (F, K, d)`` -> ``feats @ centres.T * scale`` ``(F, R, K)``.

    The scale rides in the products (``baddbmm``'s alpha), and both gradients come out
    contiguous: as ``bmm`` of a transposed view, the centres' gradient would be a transposed
    view that the following reshape copies.
    """

    @staticmethod
    def forward(ctx, centres: Tensor, feats: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(centres, feats)
        ctx.scale = scale
        return torch.baddbmm(feats.new_empty(()), feats, centres.transpose(1, 2), beta=0,
                             alpha=scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        centres, feats = ctx.saved_tensors
        g_c = g_x = None
        none = g.new_empty(())
        if ctx.needs_input_grad[0]:
            g_c = torch.baddbmm(none, g.transpose(1, 2), feats, beta=0, alpha=ctx.scale)
        if ctx.needs_input_grad[1]:
            g_x = torch.baddbmm(none, g, centres, beta=0, alpha=ctx.scale,
                                out=_workspace(feats.shape, feats))
        return g_c, g_x, None


def _row_scores(centres: Tensor, feats: Tensor, tau: float) -> Tensor:
    """``<feats_j, centre_r> / tau`` for every row and instance of a frame -> ``(F, R, K)``."""
    return _RowScores.apply(centres, feats, 1.0 / tau)


def _rows_ce(logits: Tensor) -> Tensor:
    """Cross-entropy of ``(F, M, K_c, K_r)`` logits (classes c) against label r -> (F, M, K_r)."""
    nf, m, k, _ = logits.shape
    target = torch.arange(k, device=logits.device).expand(nf * m, k)  # (F*M, K_r)
    ce = F.cross_entropy(logits.reshape(nf * m, k, k), target, reduction="none")
    return ce.view(nf, m, k)


def merge_p2s_infonce_fast(centres: Tensor, feats: Tensor, table: Tensor, counts: Tensor,
                           tau: float = 0.02, *, mask_zero_logits: bool = False) -> Tensor:
    """``_Fast`` point-to-segment InfoNCE, stepping through members in order.

    Frame f with M_f = max_k count[f, k] contributes ``(1/M_f) sum_{i<M_f} mean_r CE(row r)`` over
    present instances r, where row r holds ``<centre_r, member_c^(i)> / tau`` for every present
    instance c, ``member_c^(i)`` being c's i-th member (its last one when it has fewer).

    Args:
        centres: ``(F, K, d)`` element-wise max of each instance's member features.
        feats: ``(F, R, d)`` per frame, the feature rows ``table`` points into: the frame's
            queries, or its member entries (as the criteria pass them).
        table: ``(F, K, M)`` row in ``feats`` of the i-th member of instance k (padding: any
            row in ``[0, R)``).
        counts: ``(F, K)`` members per instance.
        tau: temperature.
        mask_zero_logits: also treat an exactly-zero logit as absent (released ``_Fast``); the
            mean at step i is then over the rows valid at that step.

    Returns:
        ``(F,)`` per-frame loss.
    """
    nf, k = counts.shape
    m = table.shape[-1]
    n_rows = feats.shape[1]
    if k == 0 or m == 0 or n_rows == 0:
        return centres.sum((1, 2)) * 0.0 + feats.sum((1, 2)) * 0.0
    scores = _row_scores(centres, feats, tau)  # (F, R, K_r)
    steps = torch.arange(m, device=counts.device)
    # the i-th member of instance c, or its last one for shorter lists
    pos = torch.minimum(steps.view(1, 1, m), (counts.unsqueeze(-1) - 1).clamp(min=0))  # (F,K_c,M)
    member = table.gather(2, pos).transpose(1, 2)  # (F, M, K_c) row in feats
    present = counts > 0  # (F, K)
    num_steps = counts.max(1).values  # (F,) M_f
    # only the rows that can count: (frame f, step i < M_f, present instance r) -> (N,) each
    f, i, r = (present.view(nf, 1, k) & (steps.view(1, m, 1) < num_steps.view(nf, 1, 1))
               ).nonzero(as_tuple=True)
    # logits[n, c] = scores[f, member[f, i, c], r], one gather from the flat scores
    base = (member + (torch.arange(nf, device=counts.device) * n_rows).view(nf, 1, 1)) * k
    flat = base.reshape(nf * m, k).index_select(0, f * m + i) + r.unsqueeze(1)  # (N, K_c)
    logits = scores.reshape(-1).index_select(0, flat.view(-1)).view(-1, k)  # (N, K_c)
    # float masks throughout (bool tensors take a slow path on CPU)
    hide = (~present).to(logits.dtype).index_select(0, f)  # (N, K_c) absent columns
    row_valid = torch.ones_like(r, dtype=logits.dtype)  # (N,)
    if mask_zero_logits and _has_zero(logits):
        zero = _zeros_of(logits)  # (N, K_c)
        row_valid = 1.0 - zero.gather(1, r.unsqueeze(1)).squeeze(1)  # own logit non-zero
        # on valid rows a zero column counts as absent; invalid rows (weight 0) keep their own
        # column and stay finite
        hide = torch.maximum(hide, zero * row_valid.unsqueeze(1))
    ce = F.cross_entropy(_masked(logits, hide), r, reduction="none")  # (N,)
    # mean over the valid rows of each step, mean over the M_f steps
    step = f * m + i  # (N,)
    per_step = torch.zeros(nf * m, dtype=ce.dtype, device=ce.device).index_add_(0, step, row_valid)
    w = row_valid / (per_step[step].clamp(min=1) * num_steps[f].clamp(min=1))  # (N,)
    return torch.zeros(nf, dtype=ce.dtype, device=ce.device).index_add(0, f, ce * w)


def merge_p2s_infonce_seal(centres: Tensor, feats: Tensor, table: Tensor, counts: Tensor,
                           negatives: Tensor, num_instances: Tensor, tau: float = 0.02) -> Tensor:
    """``_Seal`` point-to-segment InfoNCE with one random negative per other instance.

    Frame f contributes ``(1/K) sum_r (1/count_r) sum_{i<count_r} CE(row (r, i))`` over present r,
    where row (r, i) holds the positive ``<centre_r, member_r^(i)> / tau`` in column r and, in
    every other present column c, ``<centre_r, member_c^(negatives[f, r, i, c])> / tau``.

    Args:
        centres: ``(F, K, d)`` element-wise max of each instance's member features.
        feats: ``(F, R, d)`` per frame, the feature rows ``table`` points into: the frame's
            queries, or its member entries (as the criteria pass them).
        table: ``(F, K, M)`` row in ``feats`` of the i-th member of instance k (padding: any
            row in ``[0, R)``).
        counts: ``(F, K)`` members per instance.
        negatives: ``(F, K, M, K)`` positions in ``[0, count_c)``; unread entries may hold
            anything in ``[0, M)``.
        num_instances: ``(F,)`` the K of each frame's sample (the divisor).
        tau: temperature.

    Returns:
        ``(F,)`` per-frame loss.
    """
    nf, k = counts.shape
    m = table.shape[-1]
    if k == 0 or m == 0 or feats.shape[1] == 0:
        return centres.sum((1, 2)) * 0.0 + feats.sum((1, 2)) * 0.0
    scores = _row_scores(centres, feats, tau)  # (F, R, K_r)
    pos = scores.gather(1, table.transpose(1, 2))  # (F, M, K_r): <centre_r, member_r^(i)>
    # row of each negative, laid out (F, M, K_c, K_r): table[f, c, negatives[f, r, i, c]]
    flat = (negatives.clamp(0, m - 1).permute(0, 2, 3, 1)
            + m * torch.arange(k, device=counts.device).view(1, 1, k, 1))  # (F, M, K_c, K_r)
    row = table.reshape(nf, k * m).gather(1, flat.reshape(nf, -1)).view(nf, m * k, k)
    neg = scores.gather(1, row).view(nf, m, k, k)  # (F, M, K_c, K_r)
    eye = torch.eye(k, dtype=torch.bool, device=counts.device).view(1, 1, k, k)
    logits = torch.where(eye, pos.unsqueeze(2), neg)  # (F, M, K_c, K_r)
    ce = _rows_ce(logits.masked_fill(~eye & ~(counts > 0).view(nf, 1, k, 1), float("-inf")))
    valid = torch.arange(m, device=counts.device).view(1, m, 1) < counts.view(nf, 1, k)  # (F,M,K_r)
    w = valid.to(ce.dtype) / (counts.clamp(min=1)
                              * num_instances.clamp(min=1).view(nf, 1)).view(nf, 1, k).to(ce.dtype)
    return (ce * w).sum((1, 2))


def sample_seal_negatives(ins_masks: InsMasks, generator: torch.Generator | None = None
                          ) -> list[list[Tensor]]:
    """Draw the Seal p2s negatives in the released layout, for reproducible runs and tests.

    Args:
        ins_masks: ``ins_masks[b][v][k]`` query indices of instance k (the released layout).
        generator: CPU ``torch.Generator``; None uses the global generator.

    Returns:
        ``negatives[b][v]``: int64 ``(K, M_f, K)``, ``M_f`` the frame's largest member count;
        entry ``[r, i, c]`` is a uniform position in ``[0, count_c)`` (0 when c is absent).
    """
    out = []
    for sample in ins_masks:
        frames = []
        for lists in sample:
            counts = torch.tensor([len(t) for t in lists], dtype=torch.long)  # (K,)
            m = int(counts.max()) if counts.numel() else 0
            frames.append(_draw_negatives(counts.view(1, -1), m, generator)[0])
        out.append(frames)
    return out


def _pack_negatives(negatives: Sequence[Sequence[Tensor]], p: _Packed) -> Tensor:
    """Released-layout negatives -> padded ``(F, K, M, K)`` positions, validated."""
    b, v, k = p.shape
    m = p.table_entry.shape[-1]
    if len(negatives) != b:
        raise ValueError(f"negatives: expected one entry per sample (B={b}), got {len(negatives)}")
    out = torch.zeros(b, v, k, m, k, dtype=torch.long, device=p.counts.device)
    for i, sample in enumerate(negatives):
        if len(sample) != p.num_frames[i]:
            raise ValueError(f"negatives[{i}]: expected one entry per frame "
                             f"(V={p.num_frames[i]}), got {len(sample)}")
        k_b = int(p.num_instances[i])
        for t, neg in enumerate(sample):
            need = int(p.host_counts[i * v + t].max()) if k else 0
            if neg.dim() != 3 or neg.shape[0] != k_b or neg.shape[2] != k_b or neg.shape[1] < need:
                raise ValueError(f"negatives[{i}][{t}]: expected shape (K={k_b}, M>={need}, "
                                 f"K={k_b}), got {tuple(neg.shape)}")
            mm = min(neg.shape[1], m)
            out[i, t, :k_b, :mm, :k_b] = neg[:, :mm].to(out.device)
    out = out.view(b * v, k, m, k)
    counts = p.counts.view(b * v, k)
    read = ((torch.arange(m, device=out.device).view(1, 1, m) < counts.unsqueeze(-1)).unsqueeze(-1)
            & (counts > 0).view(b * v, 1, 1, k)
            & ~torch.eye(k, dtype=torch.bool, device=out.device).view(1, k, 1, k))  # (F,K,M,K)
    bad = read & ((out < 0) | (out >= counts.view(b * v, 1, 1, k)))
    if bool(bad.any()):
        raise ValueError("negatives: expected entry [r, i, c] in [0, count_c) wherever it is read "
                         "(i < count_r, c != r present); got an out-of-range position")
    return out


def _draw_negatives(counts: Tensor, m: int, generator: torch.Generator | None) -> Tensor:
    """Uniform positions in ``[0, count_c)`` -> ``(F, K, M, K)`` (0 where c is absent)."""
    nf, k = counts.shape
    device = generator.device if generator is not None else counts.device
    u = torch.rand((nf, k, m, k), generator=generator, dtype=torch.float64, device=device)
    c = counts.view(nf, 1, 1, k).to(device)
    return (u * c).floor().long().minimum((c - 1).clamp(min=0)).to(counts.device)

# --------------------------------------------------------------------------------------------
# Criteria (released names)
# --------------------------------------------------------------------------------------------

class ScanNetMergeCriterion_Fast(nn.Module):  # noqa: N801 - ESAM's public name
    """ESAM's fast contrastive merge criterion, vectorised.

    ``tmp``: InfoNCE (tau 0.07) between instance-mean merge features of consecutive frames, both
    directions, averaged over the instances present in both frames of a pair, summed over pairs
    and directions. ``p2s``: point-to-segment InfoNCE (tau 0.02) of max-pooled instance centres
    against the members (see :func:`merge_p2s_infonce_fast`), summed over frames. Each term is a
    mean over samples; ``loss = tmp_weight * tmp + p2s_weight * p2s`` (released weights 2, 2).

    Returns a dict with the raw terms ``loss_merge_tmp`` / ``loss_merge_p2s`` (the enabled ones)
    and ``loss``. The released ``merge_loss_tmp`` / ``merge_loss_p2s`` equal our
    ``tmp_weight * loss_merge_tmp`` / ``p2s_weight * loss_merge_p2s``.

    Differences from the released code, all outside its normal operating range:

    * a sample with a single frame: the released ``torch.stack`` of a Python ``0.0`` raises a
      ``TypeError``; we return a zero connected to the graph. No instances (K = 0), no instance
      present in both frames of any pair, or no member at all: the released code returns a
      constant zero with no graph; ours is connected to the graph (gradients are zero).

    Args:
        tmp, p2s: enable each term (a disabled term is absent from the dict).
        tmp_weight, p2s_weight: weights in ``loss``.
        tmp_tau, p2s_tau: temperatures.
        mask_zero_logits: the released code finds absent instances by testing ``logit == 0``, so
            an exactly-zero similarity (orthogonal features) also counts as "absent": a row whose
            own logit is 0 is dropped and a zero column gets -inf. True (default) reproduces it;
            False decides by presence only (an instance with at least one query in the frame),
            the plain InfoNCE. The two agree unless a dot product is exactly 0.
    """

    def __init__(self, *, tmp: bool = True, p2s: bool = True, tmp_weight: float = 2.0,
                 p2s_weight: float = 2.0, tmp_tau: float = 0.07, p2s_tau: float = 0.02,
                 mask_zero_logits: bool = True):
        super().__init__()
        if not (tmp or p2s):
            raise ValueError("tmp, p2s: expected at least one term enabled, got both False")
        self.tmp, self.p2s = tmp, p2s
        self.tmp_weight, self.p2s_weight = tmp_weight, p2s_weight
        self.tmp_tau, self.p2s_tau = tmp_tau, p2s_tau
        self.mask_zero_logits = mask_zero_logits

    def forward(self, merge_feats: MergeFeats, ins_masks: InsMasks) -> dict[str, Tensor]:
        """Compute the terms.

        Args:
            merge_feats: ``merge_feats[b][v]`` ``(Q, d)`` merge features (released layout).
            ins_masks: ``ins_masks[b][v][k]`` 1-D query indices of instance k.
        """
        p = _pack(merge_feats, ins_masks)
        with torch.autocast(p.counts.device.type, enabled=False):  # fp32 math
            b, v, k = p.shape
            if self.p2s:
                centres, top, feats = _mean_and_max_centres(p)  # (B,V,K,d), (F,K,d), (F,R,d)
            else:
                centres = _mean_centres(p)  # (B, V, K, d)
            out: dict[str, Tensor] = {}
            loss = 0.0
            if self.tmp:
                tmp = merge_tmp_infonce(centres, p.present, self.tmp_tau,
                                        mask_zero_logits=self.mask_zero_logits).mean()
                out["loss_merge_tmp"] = tmp
                loss = loss + self.tmp_weight * tmp
            if self.p2s:
                per_frame = merge_p2s_infonce_fast(
                    top, feats, p.layout.table, p.counts.view(b * v, k), self.p2s_tau,
                    mask_zero_logits=self.mask_zero_logits)  # (F,)
                p2s = per_frame.view(b, v).sum(1).mean()
                out["loss_merge_p2s"] = p2s
                loss = loss + self.p2s_weight * p2s
            out["loss"] = loss
            return out


class ScanNetMergeCriterion_Seal(nn.Module):  # noqa: N801 - ESAM's public name
    """ESAM's Seal-style contrastive merge criterion, vectorised.

    ``tmp``: the temporal InfoNCE of ``_Fast`` (tau 0.07, both directions) but each (pair,
    direction) divided by the sample's K (absent instances included) instead of the number of
    valid rows. ``p2s``: each member of each present instance against its max-pooled centre,
    with one random member of every other present instance as negative (tau 0.02), averaged over
    the instance's members, summed over instances and divided by K (see
    :func:`merge_p2s_infonce_seal`). Sums over frames, means over samples;
    ``loss = tmp_weight * tmp + p2s_weight * p2s`` (released: both 1, ``merge_loss``).

    Randomness: pass ``negatives`` (released layout, see :func:`sample_seal_negatives`) to fix the
    draw, or a ``generator``; the released code draws with ``np.random``, so only fixed draws (or
    one member per instance, where the draw is forced) reproduce it exactly.

    Differences from the released code: a sample with a single frame makes its ``torch.stack``
    of a Python ``0.0`` raise ``TypeError``, and ``exp(<c, f> / tau)`` overflows to inf / NaN for
    unnormalised features (|<c, f>| / tau > ~88 in float32); we return a zero connected to the
    graph and stay finite (log-sum-exp). No instances: zero connected to the graph.

    Args:
        tmp_weight, p2s_weight: weights in ``loss``.
        tmp_tau, p2s_tau: temperatures.
    """

    def __init__(self, *, tmp_weight: float = 1.0, p2s_weight: float = 1.0, tmp_tau: float = 0.07,
                 p2s_tau: float = 0.02):
        super().__init__()
        self.tmp_weight, self.p2s_weight = tmp_weight, p2s_weight
        self.tmp_tau, self.p2s_tau = tmp_tau, p2s_tau

    def forward(self, merge_feats: MergeFeats, ins_masks: InsMasks, *,
                negatives: Sequence[Sequence[Tensor]] | None = None,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Compute the terms.

        Args:
            merge_feats: ``merge_feats[b][v]`` ``(Q, d)`` merge features (released layout).
            ins_masks: ``ins_masks[b][v][k]`` 1-D query indices of instance k.
            negatives: ``negatives[b][v]`` ``(K, M_f, K)`` positions (see
                :func:`sample_seal_negatives`), or None to draw them.
            generator: generator for the draw when ``negatives`` is None.
        """
        p = _pack(merge_feats, ins_masks)
        with torch.autocast(p.counts.device.type, enabled=False):  # fp32 math
            b, v, k = p.shape
            centres, top, feats = _mean_and_max_centres(p)  # (B,V,K,d), (F,K,d), (F,R,d)
            tmp = merge_tmp_infonce(centres, p.present, self.tmp_tau, normalize_by="instances",
                                    num_instances=p.num_instances).mean()
            counts = p.counts.view(b * v, k)
            if negatives is not None:
                neg = _pack_negatives(negatives, p)
            else:
                neg = _draw_negatives(counts, p.table_entry.shape[-1], generator)
            per_frame = merge_p2s_infonce_seal(
                top, feats, p.layout.table, counts, neg,
                p.num_instances.repeat_interleave(v), self.p2s_tau)  # (F,)
            p2s = per_frame.view(b, v).sum(1).mean()
            loss = self.tmp_weight * tmp + self.p2s_weight * p2s
            return {"loss_merge_tmp": tmp, "loss_merge_p2s": p2s, "loss": loss}


# --------------------------------------------------------------------------------------------
# The seed's L_merge: per-point cross-entropy over global instances
# --------------------------------------------------------------------------------------------

def merge_ce_loss(point_logits: Tensor, global_id_gt: Tensor, reduction: str = "mean") -> Tensor:
    """Seed L_merge = -(1/N) sum_i log softmax(point_logits[i])[global_id_gt[i]].

    Args:
        point_logits: ``(N, 1+K)`` logits over {background, global instances 1..K}.
        global_id_gt: ``(N,)`` integer target in ``{0..K}`` (0: background).
        reduction: ``"mean"`` (empty-safe), ``"sum"`` or ``"none"`` (``(N,)``).

    Returns:
        Scalar, or ``(N,)`` for ``"none"``.
    """
    if point_logits.dim() != 2 or point_logits.shape[1] < 1:
        raise ValueError(f"point_logits: expected shape (N, 1+K), got {tuple(point_logits.shape)}")
    n, c = point_logits.shape
    if global_id_gt.shape != (n,) or global_id_gt.is_floating_point():
        raise ValueError(f"global_id_gt: expected an integer tensor of shape (N={n},), got shape "
                         f"{tuple(global_id_gt.shape)} dtype {global_id_gt.dtype}")
    if n and (int(global_id_gt.min()) < 0 or int(global_id_gt.max()) >= c):
        raise ValueError(f"global_id_gt: expected values in [0, {c - 1}], got "
                         f"[{int(global_id_gt.min())}, {int(global_id_gt.max())}]")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    loss = F.cross_entropy(point_logits, global_id_gt.long(), reduction="none")  # (N,)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean() if n > 0 else point_logits.sum() * 0.0


def global_point_logits(mask_logits: Tensor, query_global_ids: Tensor, num_global: int,
                        background_logit: float = 0.0, *, empty_logit: float = -1e4) -> Tensor:
    """Per-point logits of the global instances from the queries merged into them.

    The logit of global instance g at point i is ``max_{q: id(q) = g} mask_logits[q, i]``;
    queries with id 0 (not merged) are ignored.

    Args:
        mask_logits: ``(Q, N)`` mask logits.
        query_global_ids: ``(Q,)`` integer global id in ``{0..K}`` of each query.
        num_global: K.
        background_logit: the constant logit of class 0 (background).
        empty_logit: logit of a global instance that no query was merged into (very negative,
            finite so that the loss stays finite).

    Returns:
        ``(N, 1+K)`` logits.
    """
    if mask_logits.dim() != 2:
        raise ValueError(f"mask_logits: expected shape (Q, N), got {tuple(mask_logits.shape)}")
    q, n = mask_logits.shape
    if query_global_ids.shape != (q,) or query_global_ids.is_floating_point():
        raise ValueError(f"query_global_ids: expected an integer tensor of shape (Q={q},), got "
                         f"shape {tuple(query_global_ids.shape)} dtype {query_global_ids.dtype}")
    if num_global < 0:
        raise ValueError(f"num_global: expected K >= 0, got {num_global}")
    if q and (int(query_global_ids.min()) < 0 or int(query_global_ids.max()) > num_global):
        raise ValueError(f"query_global_ids: expected values in [0, {num_global}], got "
                         f"[{int(query_global_ids.min())}, {int(query_global_ids.max())}]")
    out = mask_logits.new_full((1 + num_global, n), empty_logit)  # (1+K, N)
    index = query_global_ids.long().view(q, 1).expand(q, n)  # (Q, N)
    out = out.scatter_reduce(0, index, mask_logits, reduce="amax", include_self=False)
    background = mask_logits.new_full((1, n), background_logit)
    return torch.cat([background, out[1:]], 0).T  # (N, 1+K)


@torch.no_grad()
def align_global_ids(pred_boxes: Tensor, gt_boxes: Tensor, gt_point_ids: Tensor,
                     iou_threshold: float = 0.25) -> Tensor:
    """Align GT instances to predicted global instances through their boxes.

    Hungarian assignment maximising the summed 3-D IoU, restricted to pairs with
    ``IoU >= iou_threshold`` (and IoU > 0); a GT instance left without a partner maps to 0.

    Args:
        pred_boxes: ``(K_p, 6)`` predicted global instance boxes (cx, cy, cz, dx, dy, dz).
        gt_boxes: ``(K_g, 6)`` ground-truth instance boxes.
        gt_point_ids: ``(N,)`` GT instance of each point in ``{-1..K_g-1}`` (-1: none).
        iou_threshold: minimal IoU of an aligned pair.

    Returns:
        ``(N,)`` int64 ``global_id_gt`` in ``{0..K_p}``: 1 + the predicted instance aligned to the
        point's GT instance, 0 for background or unaligned GT instances.
    """
    k_g = gt_boxes.shape[0] if gt_boxes.dim() == 2 else -1
    if gt_point_ids.dim() != 1 or gt_point_ids.is_floating_point():
        raise ValueError(f"gt_point_ids: expected an integer tensor of shape (N,), got shape "
                         f"{tuple(gt_point_ids.shape)} dtype {gt_point_ids.dtype}")
    iou = axis_aligned_box_iou(pred_boxes, gt_boxes)  # (K_p, K_g)
    if gt_point_ids.numel() and (int(gt_point_ids.min()) < -1 or int(gt_point_ids.max()) >= k_g):
        raise ValueError(f"gt_point_ids: expected values in [-1, {k_g - 1}], got "
                         f"[{int(gt_point_ids.min())}, {int(gt_point_ids.max())}]")
    gt_to_pred = torch.zeros(k_g + 1, dtype=torch.long, device=gt_point_ids.device)  # slot 0: -1
    if iou.numel():
        ok = (iou >= iou_threshold) & (iou > 0)
        gain = torch.where(ok, iou, torch.zeros_like(iou)).double().cpu().numpy()
        rows, cols = linear_sum_assignment(gain, maximize=True)
        keep = ok.cpu().numpy()[rows, cols]
        rows = torch.as_tensor(rows[keep], dtype=torch.long, device=gt_point_ids.device)
        cols = torch.as_tensor(cols[keep], dtype=torch.long, device=gt_point_ids.device)
        gt_to_pred[cols + 1] = rows + 1
    return gt_to_pred[gt_point_ids.long() + 1]


class MergeCECriterion(nn.Module):
    """Seed L_merge: per-point cross-entropy over {background, global instances}.

    ``forward`` takes per-sample query mask logits, the global id each query was merged into and
    the aligned per-point target (see :func:`align_global_ids`), builds per-point logits with
    :func:`global_point_logits` and returns ``{"loss_merge_ce": ..., "loss": weight * ...}``; with
    several samples, the per-sample means are averaged.

    Args:
        weight: weight of the term in ``loss``.
        background_logit: constant logit of the background class.
        empty_logit: logit of a global instance with no query.
    """

    def __init__(self, *, weight: float = 1.0, background_logit: float = 0.0,
                 empty_logit: float = -1e4):
        super().__init__()
        self.weight = weight
        self.background_logit = background_logit
        self.empty_logit = empty_logit

    def forward(self, mask_logits: Tensor | Sequence[Tensor],
                query_global_ids: Tensor | Sequence[Tensor],
                global_id_gt: Tensor | Sequence[Tensor],
                num_global: int | Sequence[int] | None = None) -> dict[str, Tensor]:
        """Compute the term.

        Args:
            mask_logits: ``(Q, N)`` or a list over B samples.
            query_global_ids: ``(Q,)`` in ``{0..K}`` or a list.
            global_id_gt: ``(N,)`` in ``{0..K}`` or a list.
            num_global: K per sample; default the largest id in the two id tensors.
        """
        if isinstance(mask_logits, Tensor):
            mask_logits, query_global_ids = [mask_logits], [query_global_ids]
            global_id_gt = [global_id_gt]
            num_global = [num_global]
        if not (len(mask_logits) == len(query_global_ids) == len(global_id_gt)) or not mask_logits:
            raise ValueError("mask_logits, query_global_ids, global_id_gt: expected the same "
                             f"non-zero number of samples, got {len(mask_logits)}, "
                             f"{len(query_global_ids)}, {len(global_id_gt)}")
        if num_global is None:
            num_global = [None] * len(mask_logits)
        if len(num_global) != len(mask_logits):
            raise ValueError(f"num_global: expected one K per sample (B={len(mask_logits)}), got "
                             f"{len(num_global)}")
        losses = []
        for logits, qid, gt, k in zip(mask_logits, query_global_ids, global_id_gt, num_global):
            if k is None:
                k = max(int(qid.max()) if qid.numel() else 0, int(gt.max()) if gt.numel() else 0)
            point_logits = global_point_logits(upcast(logits), qid, k, self.background_logit,
                                               empty_logit=self.empty_logit)
            losses.append(merge_ce_loss(point_logits, gt))
        ce = torch.stack(losses).mean()
        return {"loss_merge_ce": ce, "loss": self.weight * ce}
