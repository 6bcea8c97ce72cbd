"""Referring-expression grounding (REC) evaluation: box IoU helpers, Precision@k per task, continual metrics.

REC: one (image, expression) pair refers to exactly one box. A model ranks candidate boxes (e.g. OWL-ViT's per-patch
boxes by their score for the expression); the sample is a hit at k when one of its top-k boxes overlaps the target
with IoU >= 0.5 (MDETR's ``RefExpEvaluator``, ashkamath/mdetr ``datasets/refexp.py``, k in 1, 5, 10). Precision is
reported in percent, per task and macro-averaged over the tasks present.

One detail of MDETR's evaluator: it compares the *generalised* IoU (``util.box_ops.generalized_box_iou``) with the
threshold, not the IoU. gIoU <= IoU, so that criterion is slightly stricter; ``criterion="giou"`` reproduces it,
the default ``"iou"`` is the usual REC definition (and the one the paper's text names).

The continual post-processing (accuracy matrix ``P[stage][task]`` of Precision@1, final and stage-averaged figures,
forgetting, backward transfer) is the retrieval one, re-exported here: ``continual_metrics`` and friends from
``peft_lpi.evaluation.retrieval``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch

from .retrieval import backward_transfer, continual_metrics, final_average, forgetting, stage_averaged

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_xywh_to_xyxy",
    "box_area",
    "box_iou",
    "generalized_box_iou",
    "paired_box_iou",
    "paired_generalized_box_iou",
    "rec_precision",
    "continual_metrics",
    "final_average",
    "stage_averaged",
    "forgetting",
    "backward_transfer",
]


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre-x, centre-y, width, height -> x0, y0, x1, y1 (OWL-ViT's ``pred_boxes`` are cxcywh)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) x0, y0, x1, y1 -> centre-x, centre-y, width, height."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) COCO x, y, width, height -> x0, y0, x1, y1."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of xyxy boxes (..., 4); a degenerate box (x1 < x0 or y1 < y0) has area 0."""
    return (boxes[..., 2] - boxes[..., 0]).clamp_min(0) * (boxes[..., 3] - boxes[..., 1]).clamp_min(0)


def _inter_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union areas of broadcastable xyxy boxes."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, box_area(a) + box_area(b) - inter


def _giou(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    inter, union = _inter_union(a, b)
    iou = inter / union.clamp_min(eps)
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp_min(0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull.clamp_min(eps)


def paired_box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """IoU of corresponding xyxy boxes, broadcasting over leading dims: (..., 4), (..., 4) -> (...)."""
    inter, union = _inter_union(a, b)
    return inter / union.clamp_min(eps)


def paired_generalized_box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Generalised IoU (Rezatofighi et al. 2019) of corresponding xyxy boxes: IoU - (hull - union) / hull."""
    return _giou(a, b, eps)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: (N, 4), (M, 4) -> (N, M)."""
    return paired_box_iou(boxes1[:, None, :], boxes2[None, :, :], eps)


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Pairwise generalised IoU of xyxy boxes: (N, 4), (M, 4) -> (N, M)."""
    return _giou(boxes1[:, None, :], boxes2[None, :, :], eps)


def rec_precision(
    pred_boxes: torch.Tensor,
    target_boxes: torch.Tensor,
    *,
    scores: torch.Tensor | None = None,
    tasks: torch.Tensor | Sequence[int] | None = None,
    num_tasks: int | None = None,
    ks: Sequence[int] = (1, 5, 10),
    iou_threshold: float = 0.5,
    criterion: Literal["iou", "giou"] = "iou",
) -> dict[str, Any]:
    """REC Precision@k: a sample is a hit at k when one of its k best candidate boxes has IoU >= `iou_threshold`.

    Args:
        pred_boxes: xyxy candidates, `(N, C, 4)` already ranked best first (or ranked by `scores`), or `(N, 4)` for
            one box per sample (then only k = 1 is meaningful; larger k give the same hits).
        target_boxes: `(N, 4)` xyxy referred boxes, in the same coordinates as `pred_boxes`.
        scores: optional `(N, C)` candidate scores; candidates are ranked by descending score (ties: lower index).
        tasks: optional `(N,)` task ids for the per-task figures; `num_tasks` defaults to ``max(tasks) + 1``.
        ks: the cut-offs k (k larger than C uses all C candidates, as MDETR's ``ious[:k]`` does).
        iou_threshold: the hit threshold (0.5 for REC).
        criterion: ``"iou"`` (default) or ``"giou"`` (MDETR's evaluator compares the generalised IoU).

    Returns:
        ``"ks"``; ``"hits"`` `(N, len(ks))` bool; ``"P@{k}"`` over all samples, in percent; with `tasks` also
        ``"per_task": {task: {"P@k": ...}}`` (tasks with samples only), ``"per_task_matrix"`` `(num_tasks,
        len(ks))` with NaN for absent tasks, and ``"macro": {"P@k": ...}`` averaged over present tasks.
    """
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"`ks` must be a non-empty sequence of positive integers, got {ks}.")
    if criterion not in ("iou", "giou"):
        raise ValueError(f"`criterion` must be 'iou' or 'giou', got {criterion!r}.")
    if pred_boxes.ndim == 2:
        pred_boxes = pred_boxes[:, None, :]
    if pred_boxes.ndim != 3 or pred_boxes.shape[-1] != 4:
        raise ValueError(f"pred_boxes must be (N, 4) or (N, C, 4) xyxy boxes, got {tuple(pred_boxes.shape)}.")
    n, c = pred_boxes.shape[:2]
    if target_boxes.shape != (n, 4):
        raise ValueError(f"target_boxes must be ({n}, 4) to match pred_boxes, got {tuple(target_boxes.shape)}.")
    if n == 0 or c == 0:
        raise ValueError("rec_precision needs at least one sample and one candidate box per sample.")
    pred = pred_boxes.detach().double()
    target = target_boxes.detach().to(pred.device).double()
    if scores is not None:
        if scores.shape != (n, c):
            raise ValueError(f"scores must be ({n}, {c}) to match pred_boxes, got {tuple(scores.shape)}.")
        order = torch.sort(scores.detach().to(pred.device), dim=1, descending=True, stable=True).indices
        pred = torch.gather(pred, 1, order[..., None].expand(-1, -1, 4))
    overlap = (paired_box_iou if criterion == "iou" else paired_generalized_box_iou)(pred, target[:, None, :])
    good = overlap >= iou_threshold  # (N, C)
    seen = good.cumsum(dim=1) > 0
    hits = seen[:, [min(k, c) - 1 for k in ks]].cpu()
    out: dict[str, Any] = {"ks": ks, "hits": hits}
    for j, k in enumerate(ks):
        out[f"P@{k}"] = 100.0 * hits[:, j].double().mean().item()
    if tasks is not None:
        task = torch.as_tensor(tasks).long().reshape(-1).cpu()
        if task.numel() != n:
            raise ValueError(f"{task.numel()} task ids for {n} samples.")
        if task.min() < 0:
            raise ValueError("task ids must be non-negative.")
        total = int(task.max()) + 1 if num_tasks is None else int(num_tasks)
        if task.max() >= total:
            raise ValueError(f"task ids must lie in [0, {total}), got {int(task.max())}.")
        sums = torch.zeros(total, len(ks), dtype=torch.float64).index_add_(0, task, hits.double())
        counts = torch.bincount(task, minlength=total).double()[:, None]
        matrix = torch.where(counts > 0, 100.0 * sums / counts.clamp_min(1), torch.full_like(sums, math.nan))
        present = [t for t in range(total) if counts[t, 0] > 0]
        out["per_task_matrix"] = matrix
        out["per_task"] = {t: {f"P@{k}": matrix[t, j].item() for j, k in enumerate(ks)} for t in present}
        out["macro"] = {f"P@{k}": matrix[present, j].mean().item() for j, k in enumerate(ks)}
    return out
