"""Straightforward loop-over-the-definition references for the tests (float64, small sizes).

Each function follows the formula as written in the spec, one query / instance / point at a
time, sharing no code with the library.
"""

from __future__ import annotations

import math

import torch


def log_sigmoid(x: float) -> float:
    # log(1 / (1 + e^-x)), written to stay finite for large |x|
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def bce(x: float, g: float) -> float:
    return -(g * log_sigmoid(x) + (1 - g) * log_sigmoid(-x))


def dense_masks(ids: torch.Tensor, k: int) -> list[list[float]]:
    return [[1.0 if int(ids[i]) == kk else 0.0 for i in range(len(ids))] for kk in range(k)]


def bce_cost(x: torch.Tensor, g: list[list[float]]) -> torch.Tensor:
    q, p = x.shape
    out = torch.zeros(q, len(g), dtype=torch.float64)
    for j in range(q):
        for k in range(len(g)):
            out[j, k] = sum(bce(float(x[j, i]), g[k][i]) for i in range(p)) / p
    return out


def dice(qs: list[float], g: list[float], form: str) -> float:
    inter = sum(a * b for a, b in zip(qs, g))
    if form == "seed":
        return 1 - 2 * inter / (sum(a * a for a in qs) + sum(b * b for b in g) + 1)
    return 1 - (2 * inter + 1) / (sum(qs) + sum(g) + 1)


def dice_cost(x: torch.Tensor, g: list[list[float]], form: str) -> torch.Tensor:
    q, p = x.shape
    out = torch.zeros(q, len(g), dtype=torch.float64)
    for j in range(q):
        qs = [sigmoid(float(x[j, i])) for i in range(p)]
        for k in range(len(g)):
            out[j, k] = dice(qs, g[k], form)
    return out


def l1_cost(x: torch.Tensor, g: list[list[float]], as_printed: bool) -> torch.Tensor:
    q, p = x.shape
    out = torch.zeros(q, len(g), dtype=torch.float64)
    for j in range(q):
        qs = [sigmoid(float(x[j, i])) for i in range(p)]
        for k in range(len(g)):
            fp = sum(qs[i] * (1 - g[k][i]) for i in range(p))
            fn = sum((1 - qs[i]) * g[k][i] for i in range(p))
            out[j, k] = fp / p + fn if as_printed else (fp + fn) / p
    return out


def class_cost(logits: torch.Tensor, labels: torch.Tensor, form: str) -> torch.Tensor:
    q = logits.shape[0]
    out = torch.zeros(q, len(labels), dtype=torch.float64)
    for j in range(q):
        z = [float(v) for v in logits[j]]
        mx = max(z)
        den = sum(math.exp(v - mx) for v in z)
        for k in range(len(labels)):
            p = math.exp(z[int(labels[k])] - mx) / den
            out[j, k] = 1 - p if form == "one_minus" else -p
    return out


def cross_entropy(z: list[float], y: int) -> float:
    mx = max(z)
    return -(z[y] - mx - math.log(sum(math.exp(v - mx) for v in z)))


def iou_binary(x: list[float], g: list[float]) -> float:
    a = [1.0 if sigmoid(v) >= 0.5 else 0.0 for v in x]
    inter = sum(u * v for u, v in zip(a, g))
    union = sum(a) + sum(g) - inter
    return inter / (union + 1e-6)


def box_iou(a: list[float], b: list[float]) -> float:
    inter = 1.0
    for d in range(3):
        lo = max(a[d] - a[d + 3] / 2, b[d] - b[d + 3] / 2)
        hi = min(a[d] + a[d + 3] / 2, b[d] + b[d + 3] / 2)
        inter *= max(hi - lo, 0.0)
    va = a[3] * a[4] * a[5]
    vb = b[3] * b[4] * b[5]
    return inter / max(va + vb - inter, 1e-6)


def instance_terms_seed(samples, dice_form="seed", no_object_weight=1.0, num_classes=1):
    """The seed's per-sample formulas averaged over samples, one pair at a time.

    samples: list of dicts with cls (Q, C+1), masks (Q, P), scores (Q,), boxes (Q, 6),
    gt_ids (P,), labels (K,), gt_boxes (K, 6), pairs [(j, k), ...].
    """
    acc = {"cls": 0.0, "bce": 0.0, "dice": 0.0, "score": 0.0, "bbox": 0.0}
    for s in samples:
        q, p = s["masks"].shape
        g = dense_masks(s["gt_ids"], len(s["labels"]))
        target = [num_classes] * q
        for j, k in s["pairs"]:
            target[j] = int(s["labels"][k])
        wsum = ce = 0.0
        for j in range(q):
            w = no_object_weight if target[j] == num_classes else 1.0
            ce += w * cross_entropy([float(v) for v in s["cls"][j]], target[j])
            wsum += w
        acc["cls"] += ce / wsum
        m = len(s["pairs"])
        for j, k in s["pairs"]:
            xs = [float(v) for v in s["masks"][j]]
            acc["bce"] += sum(bce(xs[i], g[k][i]) for i in range(p)) / p / q
            acc["dice"] += dice([sigmoid(v) for v in xs], g[k], dice_form) / q
            iou = iou_binary(xs, g[k])
            acc["score"] += (float(s["scores"][j]) - iou) ** 2 / m
            acc["bbox"] += sum(abs(float(s["boxes"][j, d]) - float(s["gt_boxes"][k, d]))
                               for d in range(6)) / m
    return {k: v / len(samples) for k, v in acc.items()}
