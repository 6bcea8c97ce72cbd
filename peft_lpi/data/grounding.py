"""The shared schema of continual referring-expression grounding (REC) data, and an adapter for any dataset.

One row is one (image, expression, box) triple:

| column | type | meaning |
|---|---|---|
| ``image`` | ``datasets.Image`` | the image (a path or bytes, decoded on access) |
| ``expression`` | string | the referring expression, e.g. ``"the red letter k on the left"`` |
| ``box`` | 4 floats | the referred box, ``x0, y0, x1, y1`` in absolute pixels of the image |
| ``task`` | ``ClassLabel`` | the continual task (names in continual order) |
| ``image_id`` | int64 | id of the source image (several expressions may share one) |

Boxes are xyxy in pixels (COCO's ``[x, y, w, h]`` is converted by the builders); models that want normalised
cxcywh (OWL-ViT) divide by the image size.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import datasets

logger = logging.getLogger(__name__)

__all__ = ["grounding_features", "check_box", "clip_box", "as_grounding_dataset", "GroundingDataError"]


class GroundingDataError(ValueError):
    """A grounding sample that cannot be used (empty expression, box outside the image, degenerate box...)."""


def grounding_features(task_names: Sequence[str]) -> datasets.Features:
    """The shared REC schema with the given task order."""
    return datasets.Features(
        {
            "image": datasets.Image(),
            "expression": datasets.Value("string"),
            "box": datasets.Sequence(datasets.Value("float32"), length=4),
            "task": datasets.ClassLabel(names=list(task_names)),
            "image_id": datasets.Value("int64"),
        }
    )


def check_box(box: Sequence[float], width: float | None, height: float | None, *, tolerance: float = 1.0) -> str | None:
    """Why an xyxy pixel box is unusable, or None when it is fine.

    The message starts with its category (``"malformed box"``, ``"degenerate box"``, ``"box outside the image"``)
    and a colon. Unusable: not 4 finite numbers, degenerate (x1 <= x0 or y1 <= y0), or outside the image by more than
    `tolerance` pixels (when the image size is known). COCO boxes often end a fraction of a pixel past the border;
    the tolerance accepts those (clip them with `clip_box`).
    """
    if len(box) != 4 or not all(isinstance(v, int | float) and math.isfinite(v) for v in box):
        return f"malformed box: {list(box)!r} is not 4 finite numbers"
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        return f"degenerate box: {[x0, y0, x1, y1]} has x1 <= x0 or y1 <= y0"
    if width is not None and height is not None:
        if x0 < -tolerance or y0 < -tolerance or x1 > width + tolerance or y1 > height + tolerance:
            return f"box outside the image: {[x0, y0, x1, y1]} in a {width}x{height} image"
    return None


def clip_box(box: Sequence[float], width: float, height: float) -> list[float]:
    """Clip an xyxy box to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return [min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height)]


def as_grounding_dataset(
    dataset: datasets.Dataset,
    *,
    task_names: Sequence[str] | None = None,
    image_column: str = "image",
    expression_column: str = "expression",
    box_column: str = "box",
    task_column: str = "task",
    image_id_column: str | None = "image_id",
    box_format: str = "xyxy",
    on_invalid: str = "skip",
) -> datasets.Dataset:
    """Adapt any `datasets.Dataset` with image / expression / box / task columns to the shared REC schema.

    Args:
        dataset: the source rows.
        task_names: task order. Default: the ClassLabel names of `task_column` when it is one, else the distinct
            task values in order of first appearance (strings) or sorted (integers, named by their value).
        image_column, expression_column, box_column, task_column, image_id_column: source column names
            (`image_id_column=None` or a missing column: the row index is the image id).
        box_format: ``"xyxy"`` (x0, y0, x1, y1) or ``"xywh"`` (COCO's x, y, width, height), absolute pixels.
        on_invalid: ``"skip"`` drops rows with an empty expression or an unusable box (counts logged by reason),
            ``"raise"`` raises a `GroundingDataError` naming the first bad row.

    Boxes are checked against the image size only when the source rows carry ``width`` and ``height`` columns
    (decoding every image to learn its size would be slow); otherwise only degeneracy is checked. Tasks not in
    `task_names` are dropped (logged).
    """
    if box_format not in ("xyxy", "xywh"):
        raise ValueError(f"`box_format` must be 'xyxy' or 'xywh', got {box_format!r}.")
    if on_invalid not in ("skip", "raise"):
        raise ValueError(f"`on_invalid` must be 'skip' or 'raise', got {on_invalid!r}.")
    missing = [c for c in (image_column, expression_column, box_column, task_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The dataset has no column(s) {missing}; its columns are {dataset.column_names}. Name the right ones "
            "with image_column= / expression_column= / box_column= / task_column=."
        )
    task_feature = dataset.features[task_column]
    tasks_raw = dataset[task_column]
    if task_names is None:
        if isinstance(task_feature, datasets.ClassLabel):
            task_names = task_feature.names
        elif all(isinstance(t, str) for t in tasks_raw):
            task_names = list(dict.fromkeys(tasks_raw))
        else:
            task_names = [str(t) for t in sorted(set(tasks_raw))]
    names = list(task_names)
    features = grounding_features(names)
    as_name = (
        (lambda t: task_feature.int2str(t)) if isinstance(task_feature, datasets.ClassLabel) else (lambda t: str(t))
    )
    sizes = (dataset["width"], dataset["height"]) if {"width", "height"} <= set(dataset.column_names) else (None, None)
    ids = (
        dataset[image_id_column]
        if image_id_column is not None and image_id_column in dataset.column_names
        else list(range(len(dataset)))
    )
    keep: list[int] = []
    out_task: list[int] = []
    out_expr: list[str] = []
    out_box: list[list[float]] = []
    dropped: Counter[str] = Counter()
    for i, (expression, box, task) in enumerate(zip(dataset[expression_column], dataset[box_column], tasks_raw)):
        text = " ".join(str(expression or "").split())
        box = list(box) if box is not None else []
        if box_format == "xywh" and len(box) == 4:
            box = [box[0], box[1], box[0] + box[2], box[1] + box[3]]
        width = sizes[0][i] if sizes[0] is not None else None
        height = sizes[1][i] if sizes[1] is not None else None
        problem = "empty expression" if not text else check_box(box, width, height)
        if problem is None and width is not None:
            box = clip_box(box, width, height)
        name = as_name(task)
        if problem is None and name not in names:
            dropped[f"task {name!r} not in the task order"] += 1
            continue
        if problem is not None:
            if on_invalid == "raise":
                raise GroundingDataError(f"Row {i}: {problem}. Fix the row or pass on_invalid='skip' to drop it.")
            dropped[problem.split(":")[0]] += 1
            continue
        keep.append(i)
        out_task.append(names.index(name))
        out_expr.append(text)
        out_box.append([float(v) for v in box])
    for reason, n in sorted(dropped.items()):
        logger.warning("Grounding data: dropped %d rows (%s).", n, reason)
    source = dataset.select(keep)
    if isinstance(source.features[image_column], datasets.Image):  # keep paths / bytes: no decoding here
        source = source.cast_column(image_column, datasets.Image(decode=False))
    images = source[image_column]
    columns: dict[str, Any] = {
        "image": images,
        "expression": out_expr,
        "box": out_box,
        "task": out_task,
        "image_id": [int(ids[i]) for i in keep],
    }
    return datasets.Dataset.from_dict(columns, features=features)
