"""RefCOCO / RefCOCO+ / RefCOCOg as a continual grounding benchmark (one task per COCO supercategory).

Two public annotation formats are read; images are COCO 2014 (``train2014/``: every RefCOCO image is a train2014
image) and are never opened here (the ``image`` column holds paths, decoded on access).

* **MDETR's COCO-format files** (`build_refcoco_mdetr`), e.g. ``finetune_refcoco_{train,val,testA,testB}.json``,
  ``finetune_refcoco+_*.json``, ``finetune_refcocog_{train,val,test}.json`` (also distributed as
  ``final_refcoco*_{split}.json``). Written by MDETR's ``scripts/fine-tuning/refexp_coco_format.py`` (repository
  ashkamath/mdetr; read by ``datasets/refexp.py``): one ``images`` entry per expression (``id``, ``file_name`` =
  the COCO 2014 file, ``height``, ``width``, ``original_id`` = the COCO image id, ``caption`` = the expression,
  ``dataset_name``, ``tokens_negative``) and exactly one ``annotations`` entry for it (``image_id`` = that entry's
  id, ``bbox`` = COCO ``[x, y, w, h]`` of the referred object, ``category_id``, ``tokens_positive``,
  ``original_id`` = the COCO annotation id), plus COCO's ``categories`` with their ``supercategory``.
* **The original refer files** (`build_refcoco_refer`): ``refs(unc).p`` / ``refs(google).p`` / ``refs(umd).p``
  (a pickled list of refs: ``ref_id``, ``ann_id``, ``image_id``, ``category_id``, ``split``, ``sentences`` with
  ``sent``) and the dataset's ``instances.json`` (COCO ``images``, ``annotations``, ``categories``).

Task of a sample: the supercategory of the referred object's category, in the authors' order
(`peft_lpi.data.coco.COCO_TASK_ORDER`); optional per-task caps (the authors' logs: 2,000 train / 500 val) keep the
first samples of each task in file order (deterministic; pass ``shuffle_seed`` to draw a seeded random subset).

Bad input, documented skips (counts logged per reason): an empty expression, a degenerate box (width or height
<= 0), a box outside its image (by more than 1 pixel; boxes that overshoot by less are clipped), an expression
without an annotation (MDETR ``images`` entry with no ``annotations`` entry), a category outside the task order.
``on_invalid="raise"`` turns each of these into a `GroundingDataError` naming the entry. Two annotations for one
MDETR entry is a malformed file and always raises.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import datasets

from .coco import COCO_TASK_ORDER
from .grounding import GroundingDataError, check_box, clip_box, grounding_features

logger = logging.getLogger(__name__)

__all__ = ["build_refcoco_mdetr", "build_refcoco_refer", "REFCOCO_CAPS"]

REFCOCO_CAPS: dict[str, int] = {"train": 2000, "validation": 500}  # per task, as in the authors' logs


def _read_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: looked for {path!r}.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _Collector:
    """Validates samples, assigns tasks, applies caps and builds the dataset."""

    def __init__(self, task_order: Sequence[str], on_invalid: str, what: str) -> None:
        if on_invalid not in ("skip", "raise"):
            raise ValueError(f"`on_invalid` must be 'skip' or 'raise', got {on_invalid!r}.")
        self.names = list(task_order)
        self.on_invalid = on_invalid
        self.what = what
        self.rows: list[tuple[int, str, str, list[float], int]] = []  # task, image path, expression, box, image id
        self.dropped: Counter[str] = Counter()

    def bad(self, reason: str, detail: str) -> None:
        if self.on_invalid == "raise":
            raise GroundingDataError(f"{self.what}: {detail}. Fix the file or pass on_invalid='skip' to drop it.")
        self.dropped[reason] += 1

    def add(
        self,
        *,
        supercategory: str | None,
        path: str,
        expression: str,
        xywh: Sequence[float],
        width: float | None,
        height: float | None,
        image_id: int,
        where: str,
    ) -> None:
        if supercategory not in self.names:
            self.dropped[f"supercategory outside the task order ({supercategory})"] += 1
            return None
        text = " ".join(str(expression or "").split())
        if not text:
            return self.bad("empty expression", f"{where} has an empty expression")
        box = list(xywh) if len(xywh) == 4 else []
        xyxy = [box[0], box[1], box[0] + box[2], box[1] + box[3]] if box else box
        problem = check_box(xyxy, width, height)
        if problem is not None:
            return self.bad(problem.split(":")[0], f"{where}: {problem}")
        if width is not None and height is not None:
            xyxy = clip_box(xyxy, width, height)
        self.rows.append((self.names.index(supercategory), path, text, [float(v) for v in xyxy], int(image_id)))
        return None

    def dataset(self, cap: int | None, shuffle_seed: int | None) -> datasets.Dataset:
        for reason, n in sorted(self.dropped.items()):
            logger.warning("%s: dropped %d samples (%s).", self.what, n, reason)
        by_task: dict[int, list[int]] = defaultdict(list)
        for i, row in enumerate(self.rows):
            by_task[row[0]].append(i)
        keep: list[int] = []
        for task in sorted(by_task):
            indices = by_task[task]
            if shuffle_seed is not None:
                indices = random.Random(f"{shuffle_seed}-{task}").sample(indices, len(indices))
            keep += indices[:cap] if cap is not None else indices
        keep.sort()
        columns: dict[str, list] = {"image": [], "expression": [], "box": [], "task": [], "image_id": []}
        for i in keep:
            task, path, text, box, image_id = self.rows[i]
            columns["task"].append(task)
            columns["image"].append(path)
            columns["expression"].append(text)
            columns["box"].append(box)
            columns["image_id"].append(image_id)
        out = datasets.Dataset.from_dict(columns, features=grounding_features(self.names))
        logger.info("%s: %d samples over %d tasks.", self.what, len(out), len(by_task))
        return out


def build_refcoco_mdetr(
    annotation_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    task_order: Sequence[str] = COCO_TASK_ORDER,
    max_per_task: int | None = None,
    shuffle_seed: int | None = None,
    on_invalid: str = "skip",
) -> datasets.Dataset:
    """One split of RefCOCO / RefCOCO+ / RefCOCOg from an MDETR COCO-format file, in the shared REC schema.

    Args:
        annotation_file: e.g. ``mdetr_annotations/finetune_refcoco_val.json``.
        image_dir: the COCO ``train2014/`` folder (``image`` = ``image_dir/file_name``).
        task_order: supercategories in continual order (the ``task`` ClassLabel names).
        max_per_task: keep at most this many samples per task (`REFCOCO_CAPS` has the authors' caps).
        shuffle_seed: with a cap, draw the kept samples at random with this seed instead of the first ones.
        on_invalid: ``"skip"`` (documented skips, logged) or ``"raise"``.

    ``image_id`` is the COCO image id (``original_id``; the entry id when absent), so expressions of one photo
    share it. Rows keep the file's order.
    """
    path = os.fspath(annotation_file)
    data = _read_json(path, "MDETR referring-expression annotation file")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{path!r} is not an MDETR COCO-format file: it has no {key!r} list.")
    supercategory = {c["id"]: c.get("supercategory") for c in data["categories"]}
    annotations: dict[int, dict[str, Any]] = {}
    for ann in data["annotations"]:
        if ann["image_id"] in annotations:
            raise ValueError(
                f"{path!r}: two annotations for the expression entry {ann['image_id']}; an MDETR refexp file has "
                "exactly one referred box per expression."
            )
        annotations[ann["image_id"]] = ann
    collector = _Collector(task_order, on_invalid, f"RefCOCO (MDETR) {os.path.basename(path)}")
    for image in data["images"]:
        ann = annotations.get(image["id"])
        where = f"entry {image['id']} ({image.get('file_name')})"
        if ann is None:
            collector.bad("expression without annotation", f"{where} has no annotation (no referred box)")
            continue
        collector.add(
            supercategory=supercategory.get(ann["category_id"]),
            path=os.path.join(os.fspath(image_dir), image["file_name"]),
            expression=image.get("caption", ""),
            xywh=ann.get("bbox", []),
            width=image.get("width"),
            height=image.get("height"),
            image_id=image.get("original_id", image["id"]),
            where=where,
        )
    return collector.dataset(max_per_task, shuffle_seed)


def build_refcoco_refer(
    refs_file: str | os.PathLike,
    instances_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    splits: str | Sequence[str] = "train",
    task_order: Sequence[str] = COCO_TASK_ORDER,
    max_per_task: int | None = None,
    shuffle_seed: int | None = None,
    on_invalid: str = "skip",
) -> datasets.Dataset:
    """RefCOCO / RefCOCO+ / RefCOCOg from the refer toolkit's ``refs(...).p`` and ``instances.json``.

    One row per sentence of every ref whose ``split`` is in `splits` (e.g. ``"val"``, ``"testA"``). The referred
    box is the ref's annotation (``ann_id``) in ``instances.json``; the image file is that image's ``file_name``.
    An image of a ref missing from ``instances.json`` is an "image without annotations" skip. Other arguments as in
    `build_refcoco_mdetr`. The pickle is trusted input (only load files you downloaded from the dataset's source).
    """
    wanted = {splits} if isinstance(splits, str) else set(splits)
    refs_path = os.fspath(refs_file)
    if not os.path.isfile(refs_path):
        raise FileNotFoundError(f"refer refs file not found: looked for {refs_path!r}.")
    with open(refs_path, "rb") as f:
        refs = pickle.load(f)  # noqa: S301 - the dataset's own distribution format
    instances = _read_json(os.fspath(instances_file), "refer instances.json")
    images = {img["id"]: img for img in instances["images"]}
    anns = {ann["id"]: ann for ann in instances["annotations"]}
    supercategory = {c["id"]: c.get("supercategory") for c in instances["categories"]}
    collector = _Collector(task_order, on_invalid, f"RefCOCO (refer) {os.path.basename(refs_path)}")
    for ref in refs:
        if ref.get("split") not in wanted:
            continue
        where = f"ref {ref.get('ref_id')}"
        image = images.get(ref["image_id"])
        ann = anns.get(ref["ann_id"])
        if image is None or ann is None:
            collector.bad(
                "image without annotations",
                f"{where}: image {ref['image_id']} or annotation {ref['ann_id']} is missing from the instances file",
            )
            continue
        for sentence in ref.get("sentences", []):
            collector.add(
                supercategory=supercategory.get(ann["category_id"]),
                path=os.path.join(os.fspath(image_dir), image["file_name"]),
                expression=sentence.get("sent", ""),
                xywh=ann.get("bbox", []),
                width=image.get("width"),
                height=image.get("height"),
                image_id=image["id"],
                where=f"{where} sentence {sentence.get('sent_id')}",
            )
    return collector.dataset(max_per_task, shuffle_seed)
