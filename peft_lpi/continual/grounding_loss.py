"""The referring-expression (REC) loss for OWL-ViT / OWLv2 style detectors, and their REC prediction.

``OwlViTForObjectDetection`` / ``Owlv2ForObjectDetection`` predict one box per image patch (``pred_boxes``: cxcywh,
normalised to [0, 1]) and score every patch against every text query (``logits``: batch x patches x queries). In REC
one expression refers to exactly one box, so for each (image, expression) pair:

1. **Matching.** The prediction matched to the target is the patch of minimum DETR matching cost
   ``w_cls * (-p) + w_l1 * L1 + w_giou * (-gIoU)`` (``p``: the patch's softmax probability over patches). With a
   single target, DETR's Hungarian matching reduces exactly to this argmin (OWL-ViT was trained with DETR's
   matcher). The matching is not differentiated.
2. **Box terms** on the matched patch: L1 on cxcywh plus ``1 - gIoU`` (DETR's weights 5 and 2).
3. **Classification over patches.** Default ``"softmax"``: cross-entropy of the expression's logits over the image's
   patches with the matched patch as the target. Why: REC is a one-of-N choice (the expression names one object, the
   evaluation takes the top-scoring patch's box), and a softmax over patches trains exactly "the matched patch
   scores highest", with every other patch (distractor objects included) as a negative. ``"focal"`` is OWL's
   detection-style sigmoid focal loss (matched patch positive, all others negative), kept for comparison.

The predicted box for evaluation is the top-scoring patch's box (`rec_predictions`), and candidates ranked by
score give Precision@5/10.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..evaluation.grounding import box_cxcywh_to_xyxy, paired_generalized_box_iou

__all__ = [
    "RECLossOutput",
    "global_mean_scale",
    "owl_rec_terms",
    "rec_loss",
    "rec_predictions",
    "select_query_pairs",
    "sigmoid_focal_loss",
]


@dataclass
class RECLossOutput:
    """The REC loss and its parts (each already averaged over pairs, before weighting) and the matched patches."""

    loss: torch.Tensor
    box_l1: torch.Tensor
    giou: torch.Tensor  # mean (1 - gIoU) of the matched boxes
    classification: torch.Tensor
    matched: torch.Tensor  # (P,) index of the matched patch per pair


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017), summed over the last dim: (P, N) logits and {0, 1} targets -> (P,)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum(dim=-1)


def rec_loss(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    target_boxes: torch.Tensor,
    *,
    l1_weight: float = 5.0,
    giou_weight: float = 2.0,
    cls_weight: float = 1.0,
    classification: Literal["softmax", "focal"] = "softmax",
    patch_mask: torch.Tensor | None = None,
) -> RECLossOutput:
    """REC loss of P (image, expression) pairs over N candidate patches.

    Args:
        logits: `(P, N)` score of each patch for the pair's expression.
        pred_boxes: `(P, N, 4)` predicted boxes, cxcywh normalised (OWL's ``pred_boxes`` rows of the pair's image).
        target_boxes: `(P, 4)` referred boxes, cxcywh normalised.
        l1_weight, giou_weight, cls_weight: weights of the terms, in the loss and in the matching cost (DETR: 5, 2, 1).
        classification: ``"softmax"`` (cross-entropy over patches, the default) or ``"focal"`` (sigmoid focal).
        patch_mask: optional `(P, N)` bool, False for patches that may not be matched or scored (e.g. padding).

    Returns:
        A `RECLossOutput`; ``loss = l1_weight * box_l1 + giou_weight * giou + cls_weight * classification``.
    """
    if logits.ndim != 2 or pred_boxes.shape != (*logits.shape, 4) or target_boxes.shape != (logits.shape[0], 4):
        raise ValueError(
            "rec_loss expects logits (P, N), pred_boxes (P, N, 4) and target_boxes (P, 4); got "
            f"{tuple(logits.shape)}, {tuple(pred_boxes.shape)} and {tuple(target_boxes.shape)}."
        )
    if classification not in ("softmax", "focal"):
        raise ValueError(f"`classification` must be 'softmax' or 'focal', got {classification!r}.")
    if logits.shape[0] == 0:
        raise ValueError("rec_loss needs at least one (image, expression) pair.")
    target_boxes = target_boxes.to(pred_boxes.dtype)
    masked_logits = logits if patch_mask is None else logits.masked_fill(~patch_mask, torch.finfo(logits.dtype).min)
    with torch.no_grad():
        target = target_boxes[:, None, :].expand_as(pred_boxes)
        l1 = (pred_boxes - target).abs().sum(-1)
        giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(target))
        prob = masked_logits.float().softmax(dim=-1) if classification == "softmax" else logits.float().sigmoid()
        cost = l1_weight * l1 - giou_weight * giou - cls_weight * prob.to(l1.dtype)
        if patch_mask is not None:
            cost = cost.masked_fill(~patch_mask, float("inf"))
        matched = cost.argmin(dim=-1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    box = pred_boxes[rows, matched]
    box_l1 = (box - target_boxes).abs().sum(-1).mean()
    giou_loss = (1 - paired_generalized_box_iou(box_cxcywh_to_xyxy(box), box_cxcywh_to_xyxy(target_boxes))).mean()
    if classification == "softmax":
        cls = F.cross_entropy(masked_logits, matched)
    else:
        onehot = F.one_hot(matched, logits.shape[1]).to(logits.dtype)
        per_patch_logits = logits if patch_mask is None else logits.masked_fill(~patch_mask, -1e4)  # ~0 loss there
        cls = sigmoid_focal_loss(per_patch_logits, onehot).mean()
    loss = l1_weight * box_l1 + giou_weight * giou_loss + cls_weight * cls
    return RECLossOutput(loss=loss, box_l1=box_l1, giou=giou_loss, classification=cls, matched=matched)


def select_query_pairs(
    logits: torch.Tensor, pred_boxes: torch.Tensor, query_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten OWL outputs with several queries per image into (image, expression) pairs.

    Args:
        logits: `(B, N, Q)` OWL ``logits`` (patch x query scores per image).
        pred_boxes: `(B, N, 4)` OWL ``pred_boxes`` (shared by all queries of an image).
        query_mask: optional `(B, Q)` bool, True for real queries (OWL pads every image to the same Q).

    Returns:
        ``pair_logits`` `(P, N)`, ``pair_boxes`` `(P, N, 4)` and ``image_index`` `(P,)`, pairs in row-major
        (image, query) order over the real queries.
    """
    b, n, q = logits.shape
    if pred_boxes.shape != (b, n, 4):
        raise ValueError(f"pred_boxes must be ({b}, {n}, 4) to match logits {tuple(logits.shape)}.")
    mask = torch.ones(b, q, dtype=torch.bool, device=logits.device) if query_mask is None else query_mask.bool()
    image_index, query_index = mask.nonzero(as_tuple=True)
    pair_logits = logits.permute(0, 2, 1)[image_index, query_index]  # (P, N)
    return pair_logits, pred_boxes[image_index], image_index


@torch.no_grad()
def rec_predictions(
    logits: torch.Tensor, pred_boxes: torch.Tensor, top_k: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top_k` best patches' boxes per pair, best first, as xyxy, and their scores.

    `logits` `(P, N)`, `pred_boxes` `(P, N, 4)` cxcywh -> boxes `(P, k, 4)` xyxy and scores `(P, k)`, k = min(top_k, N).
    The REC prediction is ``boxes[:, 0]``, the top-scoring patch's box.
    """
    k = min(int(top_k), logits.shape[-1])
    scores, index = logits.topk(k, dim=-1)
    boxes = torch.gather(pred_boxes, 1, index[..., None].expand(-1, -1, 4))
    return box_cxcywh_to_xyxy(boxes), scores


def global_mean_scale(count: int, device: torch.device) -> float:
    """The factor that turns a mean over this process's `count` pairs into its share of the mean over every
    process's pairs (DETR's ``num_boxes`` normalisation). DDP averages gradients over the W processes, so a process
    returning ``mean * count * W / total`` gives the gradient of the mean over all ``total`` pairs: pairs per
    process vary when training rows hold every expression of an image. 1.0 without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 1.0
    total = torch.tensor([float(count)], device=device)
    dist.all_reduce(total)  # every process computes a loss every step, so every process joins
    return count * dist.get_world_size() / max(total.item(), 1.0)


def owl_rec_terms(outputs: object, batch: dict[str, torch.Tensor], rec_kwargs: dict | None = None) -> dict:
    """OWL's REC loss of a batch (one query per image, or several with ``query_mask``) and its named parts
    {"rec", "box_l1", "giou", "classification"}, each the mean over ALL processes' pairs (`global_mean_scale`)."""
    logits, boxes, _ = select_query_pairs(outputs.logits, outputs.pred_boxes, batch.get("query_mask"))
    rec = rec_loss(logits.float(), boxes.float(), batch["boxes"].float(), **(rec_kwargs or {}))
    scale = global_mean_scale(logits.shape[0], logits.device)
    return {"rec": rec.loss * scale, "box_l1": rec.box_l1 * scale, "giou": rec.giou * scale,
            "classification": rec.classification * scale}
