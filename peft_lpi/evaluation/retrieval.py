"""Retrieval evaluation: chunked top-k recall, per-task macro averages and continual-learning metrics.

Recall is computed without ever holding the full N x M similarity matrix: queries are processed in chunks of
`chunk_size` rows and only the top `max(ks)` indices of each chunk are kept, so memory is
O(chunk_size * max(N, M)). Recall values are reported in percent.

Continual metrics work on an accuracy matrix ``R[stage][task]`` where stage ``s`` trains task ``s`` and entries for
tasks not yet seen are NaN (a ragged list of lists, row ``s`` holding tasks ``0..s``, is also accepted). Entries for
tasks after the current stage (e.g. zero-shot evaluations of future tasks) are ignored by every metric.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "retrieval_recall",
    "per_task_recall",
    "final_average",
    "stage_averaged",
    "forgetting",
    "backward_transfer",
    "continual_metrics",
]


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"`ks` must be a non-empty sequence of positive integers, got {ks}.")
    return ks


def _hits_at_ks(match: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """(C, kmax) bool "retrieved item at rank j is relevant" -> (C, len(ks)) bool "a relevant item within top k"."""
    seen = match.cumsum(dim=1) > 0
    cols = [min(k, match.shape[1]) - 1 for k in ks]
    return seen[:, cols]


def retrieval_recall(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    text_groups: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Image-to-text and text-to-image Recall@k of a joint gallery, by cosine similarity.

    Args:
        image_embeds: `(N, D)` image embeddings (normalised here).
        text_embeds: `(M, D)` caption embeddings (normalised here).
        text_to_image: `(M,)` index of each caption's image (a row of `image_embeds`).
        ks: the cut-offs k.
        chunk_size: number of query rows scored at once.
        text_groups: optional `(M,)` ids, equal ids meaning identical caption text. When given, the
            "caption-equal" variants are reported as well: i2t counts a retrieved caption whose text equals one of
            the image's captions; t2i counts any retrieved image that has a caption identical to the query. They
            matter when captions repeat (the offline world), where strict index recall penalises exact ties.

    Returns:
        A dict with ``"ks"``; per-query hit tensors (bool, CPU) ``"i2t_hits"`` `(N, len(ks))` and ``"t2i_hits"``
        `(M, len(ks))` for per-task macro averages (`per_task_recall`); the means in percent as ``"i2t_R@{k}"`` and
        ``"t2i_R@{k}"``. With `text_groups`: ``"i2t_caption_equal_hits"``, ``"t2i_caption_equal_hits"``,
        ``"i2t_caption_equal_R@{k}"`` and ``"t2i_caption_equal_R@{k}"``.

    i2t: an image is a hit at k when any of its captions is in its top k (its best-ranked caption). t2i: a caption
    is a hit when its image is in its top k. Exact score ties are broken by `torch.topk`'s order; an image without
    any caption is always a miss (a warning is logged).
    """
    ks = _check_ks(ks)
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            f"Expected image_embeds (N, D) and text_embeds (M, D), got {tuple(image_embeds.shape)} and "
            f"{tuple(text_embeds.shape)}."
        )
    n_images, n_texts = image_embeds.shape[0], text_embeds.shape[0]
    if n_images == 0 or n_texts == 0:
        raise ValueError("retrieval_recall needs at least one image and one caption.")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be positive, got {chunk_size}.")
    device = image_embeds.device
    text_to_image = torch.as_tensor(text_to_image, device=device).long().reshape(-1)
    if text_to_image.numel() != n_texts:
        raise ValueError(f"text_to_image has {text_to_image.numel()} entries for {n_texts} captions.")
    if text_to_image.min() < 0 or text_to_image.max() >= n_images:
        raise ValueError(f"text_to_image must index the {n_images} images (values in [0, {n_images})).")
    if torch.unique(text_to_image).numel() < n_images:
        logger.warning("Some images have no caption in the gallery; they count as i2t misses.")

    images = F.normalize(image_embeds.float(), dim=-1)
    texts = F.normalize(text_embeds.to(device).float(), dim=-1)

    pair_keys = groups = None
    n_groups = 0
    if text_groups is not None:
        text_groups = torch.as_tensor(text_groups, device=device).long().reshape(-1)
        if text_groups.numel() != n_texts:
            raise ValueError(f"text_groups has {text_groups.numel()} entries for {n_texts} captions.")
        _, groups = torch.unique(text_groups, return_inverse=True)  # ids remapped to 0..G-1
        n_groups = int(groups.max()) + 1
        # Sorted set of (image, caption group) pairs, encoded as image * G + group, for membership tests.
        pair_keys = torch.unique(text_to_image * n_groups + groups)

    k_i2t, k_t2i = min(max(ks), n_texts), min(max(ks), n_images)
    out: dict[str, Any] = {"ks": ks}
    i2t_hits = torch.zeros(n_images, len(ks), dtype=torch.bool)
    t2i_hits = torch.zeros(n_texts, len(ks), dtype=torch.bool)
    i2t_eq = torch.zeros_like(i2t_hits) if pair_keys is not None else None
    t2i_eq = torch.zeros_like(t2i_hits) if pair_keys is not None else None

    for start in range(0, n_images, chunk_size):
        stop = min(start + chunk_size, n_images)
        top = (images[start:stop] @ texts.T).topk(k_i2t, dim=1).indices  # (C, k) caption indices
        query = torch.arange(start, stop, device=device).unsqueeze(1)
        i2t_hits[start:stop] = _hits_at_ks(text_to_image[top] == query, ks).cpu()
        if pair_keys is not None:
            keys = query * n_groups + groups[top]
            i2t_eq[start:stop] = _hits_at_ks(torch.isin(keys, pair_keys), ks).cpu()

    for start in range(0, n_texts, chunk_size):
        stop = min(start + chunk_size, n_texts)
        top = (texts[start:stop] @ images.T).topk(k_t2i, dim=1).indices  # (C, k) image indices
        t2i_hits[start:stop] = _hits_at_ks(top == text_to_image[start:stop].unsqueeze(1), ks).cpu()
        if pair_keys is not None:
            keys = top * n_groups + groups[start:stop].unsqueeze(1)
            t2i_eq[start:stop] = _hits_at_ks(torch.isin(keys, pair_keys), ks).cpu()

    variants = [("", i2t_hits, t2i_hits)]
    if pair_keys is not None:
        variants.append(("caption_equal_", i2t_eq, t2i_eq))
    for infix, i2t, t2i in variants:
        out[f"i2t_{infix}hits"] = i2t
        out[f"t2i_{infix}hits"] = t2i
        for direction, hits in (("i2t", i2t), ("t2i", t2i)):
            for j, k in enumerate(ks):
                out[f"{direction}_{infix}R@{k}"] = 100.0 * hits[:, j].double().mean().item()
    return out


def _group_recall(hits: torch.Tensor, task: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Mean hit rate in percent per task, `(num_tasks, len(ks))`, NaN for tasks without queries."""
    hits = hits.cpu().double()
    task = torch.as_tensor(task).cpu().long().reshape(-1)
    if task.numel() != hits.shape[0]:
        raise ValueError(f"{task.numel()} task ids for {hits.shape[0]} queries.")
    if task.numel() and (task.min() < 0 or task.max() >= num_tasks):
        raise ValueError(f"task ids must lie in [0, {num_tasks}).")
    sums = torch.zeros(num_tasks, hits.shape[1], dtype=torch.float64).index_add_(0, task, hits)
    counts = torch.bincount(task, minlength=num_tasks).double().unsqueeze(1)
    return torch.where(counts > 0, 100.0 * sums / counts.clamp_min(1), torch.full_like(sums, math.nan))


def per_task_recall(
    hits_i2t: torch.Tensor,
    hits_t2i: torch.Tensor,
    image_task: torch.Tensor,
    text_task: torch.Tensor,
    num_tasks: int,
    ks: Sequence[int],
) -> dict[str, Any]:
    """Per-task i2t/t2i Recall@k in percent and their macro average over the tasks present.

    The hits come from `retrieval_recall` (either variant); queries are grouped by their own task. A task is present
    when it has at least one image or caption query; ``"rmean"`` is the mean of all 2 * len(ks) recalls.

    Returns:
        ``{"i2t": (T, len(ks)), "t2i": (T, len(ks))`` tensors (NaN for absent tasks), ``"tasks"`` (present task
        ids), ``"per_task": {task: {"i2t_R@k": ..., "t2i_R@k": ..., "rmean": ...}}`` and ``"macro"`` (same keys,
        averaged over present tasks)}.
    """
    ks = _check_ks(ks)
    for name, hits in (("hits_i2t", hits_i2t), ("hits_t2i", hits_t2i)):
        if hits.ndim != 2 or hits.shape[1] != len(ks):
            raise ValueError(f"{name} must be (queries, {len(ks)}), got {tuple(hits.shape)}.")
    i2t = _group_recall(hits_i2t, image_task, num_tasks)
    t2i = _group_recall(hits_t2i, text_task, num_tasks)
    present = [t for t in range(num_tasks) if not (i2t[t].isnan().all() and t2i[t].isnan().all())]

    def named(i2t_row: torch.Tensor, t2i_row: torch.Tensor) -> dict[str, float]:
        row = {f"i2t_R@{k}": i2t_row[j].item() for j, k in enumerate(ks)}
        row.update({f"t2i_R@{k}": t2i_row[j].item() for j, k in enumerate(ks)})
        row["rmean"] = torch.cat([i2t_row, t2i_row]).nanmean().item()
        return row

    per_task = {t: named(i2t[t], t2i[t]) for t in present}
    idx = torch.tensor(present, dtype=torch.long)
    macro = named(i2t[idx].nanmean(0), t2i[idx].nanmean(0)) if present else {}
    return {"i2t": i2t, "t2i": t2i, "tasks": present, "per_task": per_task, "macro": macro}


AccuracyMatrix = Sequence[Sequence[float]] | torch.Tensor | np.ndarray


def _as_matrix(R: AccuracyMatrix) -> torch.Tensor:
    """Float64 `(S, T)` tensor; ragged rows are padded with NaN."""
    if isinstance(R, torch.Tensor | np.ndarray):
        matrix = torch.as_tensor(R, dtype=torch.float64)
    else:
        rows = [list(map(float, row)) for row in R]
        width = max((len(row) for row in rows), default=0)
        matrix = torch.tensor([row + [math.nan] * (width - len(row)) for row in rows], dtype=torch.float64)
    if matrix.ndim != 2 or matrix.numel() == 0:
        raise ValueError(
            f"The accuracy matrix must be a non-empty (stages, tasks) matrix, got shape {tuple(matrix.shape)}."
        )
    return matrix


def final_average(R: AccuracyMatrix) -> float:
    """Mean accuracy at the last stage over the tasks learned so far (tasks 0..last)."""
    matrix = _as_matrix(R)
    last = matrix.shape[0] - 1
    return matrix[last, : last + 1].mean().item()


def stage_averaged(R: AccuracyMatrix) -> float:
    """The authors' figure: each task's accuracy averaged over every stage from the one it was learned on (NaN
    entries skipped), then averaged over the tasks learned so far."""
    matrix = _as_matrix(R)
    n_tasks = min(matrix.shape)
    return torch.stack([matrix[t:, t].nanmean() for t in range(n_tasks)]).mean().item()


def forgetting(R: AccuracyMatrix) -> float:
    """Average forgetting: per task t < last, best accuracy at stages t..last-1 minus the last stage's accuracy.

    Sign: positive means the task was forgotten (0 = nothing lost). (The method specification words it as "last minus
    best earlier", the negative of this; docs/method.md.) Returns 0.0 with a single stage, where nothing can be forgotten yet.
    """
    matrix = _as_matrix(R)
    last = matrix.shape[0] - 1
    if last == 0:
        return 0.0
    drops = [
        matrix[t:last, t].nan_to_num(nan=-math.inf).max() - matrix[last, t] for t in range(min(last, matrix.shape[1]))
    ]
    return torch.stack(drops).mean().item()


def backward_transfer(R: AccuracyMatrix) -> float:
    """Backward transfer: mean over tasks t < last of R[last][t] - R[t][t] (negative = forgetting).

    Returns 0.0 with a single stage.
    """
    matrix = _as_matrix(R)
    last = matrix.shape[0] - 1
    if last == 0:
        return 0.0
    tasks = torch.arange(min(last, matrix.shape[1]))
    return (matrix[last, tasks] - matrix[tasks, tasks]).mean().item()


def continual_metrics(R: AccuracyMatrix) -> dict[str, float]:
    """All continual metrics of an accuracy matrix, by name."""
    return {
        "final_average": final_average(R),
        "stage_averaged": stage_averaged(R),
        "forgetting": forgetting(R),
        "backward_transfer": backward_transfer(R),
    }


def grouped_continual_metrics(matrix: Sequence[Sequence[float]], schedule: list[list[int]]) -> dict[str, float]:
    """`continual_metrics` generalised to stages that learn several tasks (e.g. joint: one stage).

    A task is "learned at" the stage whose group contains it. final_average: mean of the last stage's row over the
    tasks learned so far; stage_averaged: per task, mean over the stages from its own on, then over tasks; forgetting
    (positive = forgotten) and backward transfer: over tasks learned before the last stage, 0.0 when there are none.
    With one task per stage in order this equals `continual_metrics`.
    """
    R = torch.tensor([[math.nan if v is None else float(v) for v in row] for row in matrix], dtype=torch.float64)
    last = R.shape[0] - 1
    learned_at = {t: s for s, group in enumerate(schedule[: last + 1]) for t in group}
    seen = sorted(learned_at)
    final = R[last, seen].mean().item()
    staged = torch.stack([R[learned_at[t]:, t].nanmean() for t in seen]).mean().item()
    earlier = [t for t in seen if learned_at[t] < last]
    if earlier:
        drops = [R[learned_at[t]:last, t].nan_to_num(nan=-math.inf).max() - R[last, t] for t in earlier]
        forgetting = torch.stack(drops).mean().item()
        bwt = torch.stack([R[last, t] - R[learned_at[t], t] for t in earlier]).mean().item()
    else:
        forgetting = bwt = 0.0
    return {"final_average": final, "stage_averaged": staged, "forgetting": forgetting, "backward_transfer": bwt}


def stage_metrics(matrix: Sequence[Sequence[float]], schedule: list[list[int]]) -> dict[str, float]:
    """Continual metrics of an accuracy matrix whose stages follow `schedule` (one task per stage in order, or
    groups of tasks such as joint training's single stage)."""
    if all(group == [t] for t, group in enumerate(schedule)):
        return continual_metrics(torch.tensor(matrix))
    return grouped_continual_metrics(matrix, schedule)
