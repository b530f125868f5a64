"""Fused kernels for the point-level mask terms of one-pair-per-row layers, and for the
gradient of the merge criteria's member-pooled centres (`member_grad`).

ESAM's sparse matcher lets each query compete for one GT instance only (the instance of its seed
superpoint), so on a ``(Q, N)`` point-level layer every sum the mask costs and losses need is a
per-row sum: the row totals of ``softplus(x)``, ``sigmoid(x)``, ``sigmoid(x)**2`` and of the
binarised mask, and the same sums over the members of the row's instance. One pass over the
logits computes all of them (`row_stats`), and its row totals of the logits stand in for their
NaN/Inf check (`watch_finite`); the analytic gradient of the matched BCE and Dice
losses is one more pass over the matched rows that writes them into an otherwise zero
``(Q, N)`` gradient (`row_grad`, in memory kept for reuse: `reusable_zeros`), with no gather of
the instances' members; it serves any matcher that gives each query at most one pair
(Hungarian matching too).

With torch ops this takes a blocked sweep of several passes plus a gather of each pair's
members. `torch.compile` (inductor) fuses each into one vectorised, multi-threaded loop that
allocates nothing of the logits' size beyond its output. The kernels are compiled on first use
(seconds; inductor caches them on disk) with dynamic shapes, so new N and Q do not recompile.

They are used only where they pay and are known to work: CPU tensors of float32 / float64 with
at least `MIN_ELEMENTS` elements. Everywhere else, and where compiling fails (no C++ compiler,
say: a warning says so once), the callers keep their torch-op paths, which compute the same
values. Set the environment variable ``ESAM_FUSED=0``, or call ``set_enabled(False)``, to turn
the kernels off.

The binarised mask is ``sigmoid(x) >= 0.5`` with the kernels' sigmoid, which may round
differently from PyTorch's eager one for ``|x|`` below about ``1e-7``; counts can then differ by
the number of such elements. Like the torch-op path, the float32 softplus sum loses the terms
below float32's resolution at 1 (``x`` below about -17, each term under 4e-8).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import mmap
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

__all__ = ["MIN_ELEMENTS", "MIN_MEMBER_ELEMENTS", "NO_INSTANCE", "FiniteWatch", "applies",
           "is_enabled", "lazy_zeros", "member_grad", "one_pair_per_row", "record_row_totals",
           "release_memory", "reusable_empty", "reusable_zeros", "row_grad", "row_grad_at",
           "row_instances", "row_stats", "set_enabled", "watch_finite"]

MIN_ELEMENTS = 1 << 20  # below this, per-call overhead outweighs the fusion
MIN_MEMBER_ELEMENTS = 1 << 16  # the same for `member_grad`'s (rows x features)
NO_INSTANCE = -2  # instance index of a row without a pair (position ids are >= -1)

_enabled = os.environ.get("ESAM_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")
_compiled: dict[str, Callable] = {}
_failed = False
_limit_warned = False


def set_enabled(enabled: bool) -> bool:
    """Turn the fused kernels on or off for this process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def is_enabled() -> bool:
    """Whether the fused kernels may be used (on, and not failed to compile)."""
    return _enabled and not _failed


def applies(x: Tensor, min_elements: int | None = None) -> bool:
    """Whether the fused kernels run on ``x`` (2-D; logits, or `member_grad`'s rows with
    ``min_elements=MIN_MEMBER_ELEMENTS``; default `MIN_ELEMENTS`)."""
    least = MIN_ELEMENTS if min_elements is None else min_elements
    return (is_enabled() and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.dim() == 2 and x.numel() >= least)


def one_pair_per_row(rows: Tensor, num_rows: int) -> bool:
    """Whether the pairs with rows ``rows (A,)`` give every row at most one pair."""
    return not len(rows) or int(torch.bincount(rows, minlength=num_rows).max()) <= 1


def row_instances(rows: Tensor, inst: Tensor, num_rows: int) -> Tensor | None:
    """``(R,)`` the instance of each row's pair (`NO_INSTANCE` for a row without one), from
    pairs ``(rows (A,), inst (A,))``; None when some row has several pairs."""
    if not one_pair_per_row(rows, num_rows):
        return None
    out = torch.full((num_rows,), NO_INSTANCE, dtype=torch.long, device=rows.device)
    return out.index_put_((rows,), inst.long())


_CHUNK = 64  # positions per product in `row_stats` (each factor is in [1/2, 1]: no underflow)
_LANE_ROWS, _LANES = 32, 16  # `row_stats` groups: 32 x 16 positions, products down each lane


def _sums(x: Tensor, member: Tensor, chunked: bool, dim: int = -1) -> Tensor:
    """The eight per-row sums over dim ``dim`` of ``x`` (``(R, T)``, ``(R, C, L)`` chunks or
    ``(R, G, L, V)`` lane groups)."""
    # Every intermediate is written once per use on purpose: one shared node feeding several
    # reductions makes inductor store it as a buffer of the logits' size (10 MB per 20k-point
    # layer, page-faulted in on every call); separate uses are inlined, and the kernel's CSE
    # computes each once anyway.
    def e() -> Tensor:  # exp(-|x|), in (0, 1]
        return torch.exp(-x.abs())

    def r() -> Tensor:  # sigmoid(|x|), in [1/2, 1]
        return 1 / (1 + e())

    def q() -> Tensor:  # sigmoid(x)
        return torch.where(x >= 0, r(), e() * r())

    def hit() -> Tensor:
        return (q() >= 0.5).to(x.dtype)

    # softplus(x) = max(x, 0) + log(1 + exp(-|x|)) = max(x, 0) - log r. A logarithm per element
    # costs more than the rest of the pass together; over a chunk of L positions the sum of
    # -log r is -log of the product of the r, one logarithm per chunk.
    log_part = -torch.log(torch.prod(r(), dim)) if chunked else torch.log1p(e()).sum(dim)
    member = member.to(x.dtype)
    return torch.stack([x.clamp(min=0).sum(dim) + log_part, q().sum(dim), (q() * q()).sum(dim),
                        hit().sum(dim), (member * x).sum(dim), (member * q()).sum(dim),
                        (member * hit()).sum(dim), x.sum(dim)])


def _lane_stats(x: Tensor, ids: Tensor, inst: Tensor) -> Tensor:
    # x (R, G, L, V), ids (G, L, V), inst (R,). Reducing over L with the V lanes kept makes
    # inductor accumulate whole vectors down the lanes, with one horizontal reduction per
    # group instead of one per 64-position chunk.
    return _sums(x, ids.unsqueeze(0) == inst.view(-1, 1, 1, 1), True, dim=2).sum((-2, -1))


def _chunk_stats(x: Tensor, ids: Tensor, inst: Tensor) -> Tensor:
    # x (R, C, L), ids (C, L), inst (R,)
    return _sums(x, ids.unsqueeze(0) == inst.view(-1, 1, 1), True).sum(-1)


def _row_stats(x: Tensor, ids: Tensor, inst: Tensor) -> Tensor:
    # x (R, T), ids (T,), inst (R,)
    return _sums(x, ids.unsqueeze(0) == inst.unsqueeze(1), False)


def _grad(out: Tensor, x: Tensor, rows: Tensor, ids: Tensor, inst: Tensor, coef: Tensor
          ) -> Tensor:
    # writes rows ``rows`` of ``out`` in place: the gather, the formula and the scatter are
    # one loop over the selected rows, and no other row of ``out`` is touched
    xr = x.index_select(0, rows)  # (U, P)
    q = torch.sigmoid(xr)
    qq = q * (1 - q)
    member = (ids.unsqueeze(0) == inst.unsqueeze(1)).to(x.dtype)  # (U, P)
    a, b, c, gamma, beta = (coef[:, i:i + 1] for i in range(5))
    return out.index_copy_(0, rows, q * (a + q * b) + c * q * qq - member * (gamma + beta * qq))


def _anonymous(nbytes: int) -> mmap.mmap:
    """An anonymous mapping of ``nbytes`` zeros, private to this process.

    ``mmap.mmap(-1, n)`` alone is a *shared* anonymous mapping on Unix: a process forked while
    it exists (a data-loader worker, say) would write into the same pages as its parent.
    Private pages are copied on write instead.
    """
    if hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS"):
        return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mmap.mmap(-1, nbytes)  # Windows: anonymous memory is never shared with a child


class _MappingPool:
    """Anonymous memory mappings kept for reuse once no tensor uses them any more.

    Each hand-out wraps its mapping in a fresh ``memoryview`` that only the tensor's storage
    references (``torch.frombuffer`` holds it for as long as any tensor shares the memory); a
    finalizer on that view marks the mapping free again. Its pages stay mapped: a buffer of
    several MB that the system allocator would return to the OS on every free (and fault back
    in, one fault per 4 KiB, on the next call) is reused as it is.
    """

    def __init__(self, max_mappings: int = 8, max_bytes: int = 256 << 20):
        self.max_mappings, self.max_bytes = max_mappings, max_bytes
        self._free: list[mmap.mmap] = []  # kept, unused
        self._busy = 0  # kept, in use
        self._bytes = 0  # kept, in all
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> tuple[memoryview, bool]:
        """A view of ``nbytes`` of a kept mapping (a new one when none fits), and whether its
        memory was handed out before (else: a new mapping, zeros)."""
        with self._lock:
            fits = [m for m in self._free if nbytes <= len(m) <= 2 * nbytes]
            if fits:
                m = min(fits, key=len)
                self._free.remove(m)
                reused = True
            else:
                m, reused = _anonymous(nbytes), False
                while self._free and self._full(nbytes):
                    old = self._free.pop(0)  # the oldest unused one makes room
                    self._bytes -= len(old)
                    old.close()
                if self._full(nbytes):
                    return memoryview(m), False  # not kept: released with its tensors
                self._bytes += nbytes
            self._busy += 1
        out = memoryview(m)
        weakref.finalize(out, self._release, m)
        return out, reused

    def clear(self) -> int:
        """Release the kept mappings that no tensor uses; returns the bytes released."""
        with self._lock:
            freed = sum(len(m) for m in self._free)
            for m in self._free:
                m.close()
            self._free.clear()
            self._bytes -= freed
        return freed

    def _full(self, nbytes: int) -> bool:
        """Whether keeping one more mapping of ``nbytes`` would pass a limit."""
        return (len(self._free) + self._busy >= self.max_mappings
                or self._bytes + nbytes > self.max_bytes)

    def _release(self, m: mmap.mmap) -> None:
        with self._lock:
            self._busy -= 1
            self._free.append(m)


_mappings = _MappingPool()


def _pooled(pool: _MappingPool, shape: tuple[int, ...], dtype: torch.dtype
            ) -> tuple[Tensor, bool]:
    """A contiguous CPU tensor of ``shape`` in a mapping from ``pool``, and whether that memory
    was handed out before (else it reads as zeros)."""
    count = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if count == 0:
        return torch.zeros(shape, dtype=dtype), False
    view, reused = pool.take(count * itemsize)
    flat = torch.frombuffer(view, dtype=dtype, count=count)
    return flat.set_(flat.untyped_storage(), 0, shape), reused  # the shape itself, not a view


def reusable_empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised CPU tensor for a buffer the caller overwrites in full, in memory that
    earlier calls have already mapped.

    Large temporaries that are freed and allocated again on every call (the merge criteria's
    ``(frames x Q, d)`` stacks, 4 MB in the benchmark) come back from the system allocator as
    fresh pages more often than not: a page fault per 4 KiB on the first write, which cost
    more than the arithmetic on them. Here they come from a few mappings kept for reuse (see
    `_MappingPool`); a mapping is handed out again only when no tensor uses it any more.
    Never read an element before writing it.
    """
    return _pooled(_mappings, shape, dtype)[0]


_zero_mappings = _MappingPool(max_mappings=16, max_bytes=512 << 20)


def reusable_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A CPU tensor of zeros in memory that earlier calls have already mapped, where possible.

    For the ``(Q, N)`` gradients of the point-level mask losses, which are allocated and freed
    on every backward pass: a new mapping costs a page fault per 4 KiB written (the matched
    rows: K of Q), which on a virtual machine took several times longer than the arithmetic
    (about 1 ms per 20k-point layer and sample). A mapping is reused only once no tensor uses
    it any more, and is then zeroed in full (one memset, about a third of the faults' time);
    a new one reads as zeros as it is (`lazy_zeros`). Kept mappings (at most 16, 512 MB) stay
    resident until `release_memory`.
    """
    out, reused = _pooled(_zero_mappings, shape, dtype)
    return out.zero_() if reused else out


def release_memory() -> int:
    """Release the memory mappings kept for reuse (`reusable_empty`, `reusable_zeros`) that no
    tensor uses; returns the number of bytes released."""
    return _mappings.clear() + _zero_mappings.clear()


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A CPU tensor of zeros whose memory the OS supplies on first write.

    An anonymous memory mapping reads as zeros until a page is written, so the rows of a
    gradient that stay zero cost neither a write nor a page fault. ``torch.zeros`` writes every
    byte: for a large, freshly allocated buffer that means one page fault per 4 KiB, which on
    the matched mask losses' ``(Q, N)`` gradients (K of Q rows non-zero) took more time than
    computing the rows that matter. The mapping is released with the tensor.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(_anonymous(nbytes), dtype=dtype).view(shape)


def _run(name: str, fn: Callable, *args: Tensor) -> Tensor | None:
    global _limit_warned
    try:
        if name not in _compiled:
            _compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True)
        return _compiled[name](*args)
    except Exception as err:
        if type(err).__name__ != "FailOnRecompileLimitHit":  # torch._dynamo.exc's
            _disable(err)
            return None
        # Shapes are dynamic, but sizes 0 and 1 (and each dtype) get graphs of their own; a
        # run of unusual shapes can exhaust torch._dynamo's recompile_limit. Those calls take
        # the torch-op path; the graphs compiled so far keep serving the usual shapes.
        if not _limit_warned:
            _limit_warned = True
            warnings.warn("esam.losses.fused: torch._dynamo's recompile_limit was reached for "
                          f"the {name!r} kernel; inputs of new size patterns use the torch-op "
                          "paths (same values, slower). Raise torch._dynamo.config."
                          "recompile_limit to compile more.", RuntimeWarning, stacklevel=3)
        return None


def _disable(err: Exception) -> None:
    """No compiler, an unsupported platform, ...: keep the torch-op paths from now on."""
    global _failed
    _failed = True
    warnings.warn(f"esam.losses.fused: compiling the fused mask kernels failed ({err!r:.200}); "
                  "using the torch-op paths (same values, slower). Set ESAM_FUSED=0 to skip "
                  "the attempt.", RuntimeWarning, stacklevel=4)


def _check(x: Tensor, ids: Tensor, inst: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x: expected shape (R, P), got {tuple(x.shape)}")
    if ids.shape != (x.shape[1],):
        raise ValueError(f"ids: expected shape (P={x.shape[1]},), got {tuple(ids.shape)}")
    if inst.shape != (x.shape[0],):
        raise ValueError(f"inst: expected shape (R={x.shape[0]},), got {tuple(inst.shape)}")


def row_stats(x: Tensor, ids: Tensor, inst: Tensor) -> Tensor | None:
    """Per-row sums of one pass over the logits.

    Args:
        x: ``(R, P)`` mask logits.
        ids: ``(P,)`` instance of each position (-1: none).
        inst: ``(R,)`` the instance of each row's pair, `NO_INSTANCE` for a row without one.

    Returns:
        ``(8, R)``: the row totals of ``softplus(x)``, ``q = sigmoid(x)``, ``q**2`` and
        ``[q >= 0.5]``, then the sums of ``x``, ``q`` and ``[q >= 0.5]`` over the positions of
        the row's instance, then the row totals of ``x`` (finite exactly when every logit is,
        barring overflow: see `watch_finite`); None when the kernel could not be compiled.
    """
    _check(x, ids, inst)
    r, n = x.shape
    group = _LANE_ROWS * _LANES
    g = n // group
    a = g * group  # positions in whole lane groups
    c = (n - a) // _CHUNK
    b = a + c * _CHUNK  # ... and in whole chunks after them; the tail after that
    # one kernel per part present, so that no size is a special case inside a compiled graph
    # (each would be a recompilation)
    parts = []
    if g:
        parts.append(("stats_lanes", _lane_stats, x[:, :a].view(r, g, _LANE_ROWS, _LANES),
                      ids[:a].view(g, _LANE_ROWS, _LANES)))
    if c:
        parts.append(("stats", _chunk_stats, x[:, a:b].view(r, c, _CHUNK),
                      ids[a:b].view(c, _CHUNK)))
    if n > b:
        parts.append(("stats_tail", _row_stats, x[:, b:], ids[b:]))
    stats = x.new_zeros(8, r) if n == 0 else None
    for name, kernel, xs, part_ids in parts:
        part = _run(name, kernel, xs, part_ids, inst)
        if part is None:
            return None
        stats = part if stats is None else stats + part
    record_row_totals(x, stats[7])
    return stats


def record_row_totals(x: Tensor, row_totals: Tensor) -> None:
    """Hand the active `watch_finite` (if any) the row totals of ``x``: for a caller that ran
    `row_stats` on a copy of ``x`` (rows of several tensors stacked, say)."""
    watch = _watch.get()
    if watch is not None:
        watch.saw(x, row_totals)


class FiniteWatch:
    """Logits whose NaN/Inf check rides on `row_stats` (see `watch_finite`)."""

    def __init__(self, tensors: Iterable[Tensor]):
        self._pending = {_key(t) for t in tensors}

    def saw(self, x: Tensor, row_totals: Tensor) -> None:
        key = _key(x)
        if key in self._pending and bool(torch.isfinite(row_totals).all()):
            self._pending.discard(key)  # a finite sum of every element: each one is finite

    def unverified(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` still needs its own check: no pass saw it, or its row totals
        were not finite (a NaN/Inf, or an overflow that the exact check tells apart)."""
        return _key(tensor) in self._pending


def _key(t: Tensor) -> tuple:
    return (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


_watch: contextvars.ContextVar[FiniteWatch | None] = contextvars.ContextVar(
    "esam_fused_finite_watch", default=None)


@contextlib.contextmanager
def watch_finite(tensors: Iterable[Tensor]) -> Iterator[FiniteWatch]:
    """Let `row_stats` passes over any of ``tensors`` stand in for their NaN/Inf check.

    The pass is compute-bound, so the extra row sum is free, while a separate check is one more
    read of every logit. The caller checks what the watch leaves `unverified` afterwards: a
    tensor no pass read (another matcher, a copy in another dtype) or one whose totals were not
    finite.
    """
    watch = FiniteWatch(tensors)
    token = _watch.set(watch)
    try:
        yield watch
    finally:
        _watch.reset(token)


def row_grad(x: Tensor, ids: Tensor, inst: Tensor, coef: Tensor) -> Tensor | None:
    """Gradient of per-row mask losses from per-row coefficients, ``(R, P)``.

    With ``q = sigmoid(x)`` and ``g_i = [ids[i] == inst[r]]``, element ``(r, i)`` is
    ``q (a + b q) + c q^2 (1 - q) - g_i (gamma + beta q (1 - q))``: the matched BCE's
    ``gamma (q - g)`` plus either Dice form's gradient (see
    `esam.losses.functional._MatchedMaskLoss`). Rows whose coefficients are all zero get zeros.

    Args:
        x: ``(R, P)`` mask logits.
        ids: ``(P,)`` instance of each position (-1: none).
        inst: ``(R,)`` the instance of each row's pair, `NO_INSTANCE` for a row without one.
        coef: ``(R, 5)`` columns ``a, b, c, gamma, beta``.

    Returns:
        The gradient, or None when the kernel could not be compiled. Only the rows with a pair
        or non-zero coefficients are computed and written; the others are zeros (`reusable_zeros`).
    """
    _check(x, ids, inst)
    if coef.shape != (x.shape[0], 5):
        raise ValueError(f"coef: expected shape (R={x.shape[0]}, 5), got {tuple(coef.shape)}")
    rows = ((inst != NO_INSTANCE) | (coef != 0).any(1)).nonzero().squeeze(1)
    return row_grad_at(x, ids, rows, inst.index_select(0, rows), coef.index_select(0, rows))


def row_grad_at(x: Tensor, ids: Tensor, rows: Tensor, inst: Tensor, coef: Tensor
                ) -> Tensor | None:
    """`row_grad` for callers that know the rows to compute: ``rows (U,)`` distinct row
    indices, ``inst (U,)`` their pairs' instances and ``coef (U, 5)`` their coefficients;
    every other row is zero."""
    out = reusable_zeros(tuple(x.shape), x.dtype)
    if len(rows) == 0:
        return out
    # fresh tensors: a view (a slice of a larger coefficient table) would be a graph of its own
    done = _run("grad", _grad, out, x, rows, ids, inst, coef.to(x.dtype, copy=True))
    return None if done is None else out


def _member_grad(out: Tensor, x: Tensor, segment: Tensor, top: Tensor, share: Tensor,
                 spread: Tensor) -> Tensor:
    hit = top.index_select(0, segment) == x  # (P, d)
    out.add_(spread.index_select(0, segment) + hit.to(x.dtype) * share.index_select(0, segment))
    return hit.sum()


def member_grad(out: Tensor, x: Tensor, segment: Tensor, top: Tensor, share: Tensor,
                spread: Tensor) -> Tensor | None:
    """Add the gradient of per-segment means and element-wise maxima to ``out``, in place.

    Row j of ``out`` gets ``spread[s] + [x[j] == top[s]] * share[s]`` (element-wise) with
    ``s = segment[j]``: the mean's gradient already divided by the segment's size, and the
    max's gradient wherever row j holds the maximum. One pass over the rows with no
    temporaries of their size (the torch-op form takes five).

    Args:
        out: ``(P, d)`` gradient of the rows, updated in place.
        x: ``(P, d)`` the rows.
        segment: ``(P,)`` segment of each row, in ``[0, S)``.
        top: ``(S, d)`` each segment's maximum (NaN never matches: a row that must not
            receive the max's gradient can point at a NaN row).
        share, spread: ``(S, d)`` the max's and the mean's gradient per segment.

    Returns:
        The number of (row, feature) hits of the maximum, a 0-d int64 tensor (more than one per
        non-empty (segment, feature) means exact ties), or None when the kernel could not be
        compiled.
    """
    if x.dim() != 2 or out.shape != x.shape:
        raise ValueError(f"out, x: expected equal (P, d) shapes, got {tuple(out.shape)} and "
                         f"{tuple(x.shape)}")
    if segment.shape != (x.shape[0],):
        raise ValueError(f"segment: expected shape (P={x.shape[0]},), got {tuple(segment.shape)}")
    for name, t in (("top", top), ("share", share), ("spread", spread)):
        if t.dim() != 2 or t.shape[1] != x.shape[1]:
            raise ValueError(f"{name}: expected shape (S, d={x.shape[1]}), got {tuple(t.shape)}")
    return _run("member_grad", _member_grad, out, x, segment, top, share, spread)
