"""Several expressions of one image in one OWL forward: training rows grouped by image, and their collator.

OWL detectors score every patch of an image against every text query of that image, so the expressions of one
image (RefCOCO's several referred objects of a photo, the grounding world's every describable object of a scene)
cost one image forward instead of one each. `group_pairs_by_image` turns a prepared REC split (one row per
(image, expression) pair, `peft_lpi.continual.grounding.prepare_grounding_dataset`) into one row per image with
all its pairs; `SceneQueryCollator` turns such rows into OWL's padded query layout and a query mask, which
`select_query_pairs` (and so the methods' REC loss) reads. Rows of the ungrouped schema collate as before (one
query per image), so one collator serves the grouped training split and the validation pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data.preprocess import column_values
from ..evaluation.grounding import box_xyxy_to_cxcywh
from .grounding import GroundingCollator

__all__ = ["PAIR_TARGETS", "SceneQueryCollator", "group_pairs_by_image"]

PAIR_TARGETS = "targets"  # the column of a grouped row: the target box (xyxy / image size) of each of its captions


def group_pairs_by_image(split: Any) -> Any:
    """One row per (``image_id``, ``task``) of a prepared REC split: ``captions`` lists every expression of the
    image in that task and ``targets`` their boxes (same order); the other columns are the group's first row's.
    Groups keep the order of their first row. A photo whose expressions fall into several tasks (RefCOCO: the task
    is the referred object's supercategory) gives one row per task, so every row trains one task's prompts; a
    split whose images have one pair each comes back with one-element lists."""
    import datasets

    ids, tasks = column_values(split, "image_id"), column_values(split, "task")
    expressions, targets = column_values(split, "expression"), column_values(split, "target")
    groups: dict[tuple[int, int], list[int]] = {}
    for row, (image_id, task) in enumerate(zip(ids, tasks)):
        groups.setdefault((int(image_id), int(task)), []).append(row)
    members = list(groups.values())
    first = split.select([rows[0] for rows in members])
    features = first.features.copy()
    features["captions"] = datasets.Sequence(datasets.Value("string"))
    features[PAIR_TARGETS] = datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4))

    def add(batch: dict[str, list[Any]], index: list[int]) -> dict[str, list[Any]]:
        return {"captions": [[expressions[r] for r in members[i]] for i in index],
                PAIR_TARGETS: [[targets[r] for r in members[i]] for i in index]}

    return first.map(add, with_indices=True, batched=True, features=features, desc="pairs by image")


class SceneQueryCollator(GroundingCollator):
    """`GroundingCollator` for rows of one image with several expressions (`group_pairs_by_image`).

    A batch of B images with at most Q expressions each: ``input_ids`` / ``attention_mask`` (B * Q, L) in OWL's
    row-major (image, query) order, padding queries all padding tokens with
    a zero attention mask (OWL's "no query", as `scene_queries` pads); ``query_mask`` (B, Q) True for real queries;
    ``boxes`` (pairs, 4) cxcywh and ``target`` (pairs, 4) xyxy of the real queries in the same order; ``task`` (B,)
    each image's task (per-sample prompts of a mixed batch). Ungrouped rows: the parent's batch plus ``task``.
    """

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = list(rows)
        task = torch.tensor([int(row["task"]) for row in rows], dtype=torch.long)
        if not rows or PAIR_TARGETS not in rows[0]:
            return {**super().__call__(rows), "task": task}
        counts = [len(row["captions"]) for row in rows]
        if min(counts) < 1 or any(len(row[PAIR_TARGETS]) != n for row, n in zip(rows, counts)):
            raise ValueError("Every grouped row needs at least one caption and one target per caption.")
        q = max(counts)
        text = self.tokenizer([c for row in rows for c in row["captions"]], padding=True,
                              truncation=self.max_length is not None, max_length=self.max_length, return_tensors="pt")
        query_mask = torch.arange(q)[None, :] < torch.tensor(counts)[:, None]
        real = query_mask.reshape(-1).nonzero(as_tuple=True)[0]
        input_ids = torch.full((len(rows) * q, text["input_ids"].shape[1]), self.tokenizer.pad_token_id or 0)
        attention_mask = torch.zeros_like(input_ids)
        input_ids[real], attention_mask[real] = text["input_ids"], text["attention_mask"]
        target = torch.tensor([list(box) for row in rows for box in row[PAIR_TARGETS]], dtype=torch.float32)
        return {
            "pixel_values": self.pixel_values(rows),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "query_mask": query_mask,
            "boxes": box_xyxy_to_cxcywh(target),
            "target": target,
            "task": task,
        }
