"""The authors' 12-task continual split of COCO 2014 (one task per supercategory), in the shared schema.

Reads the standard annotation files (``annotations/captions_{split}2014.json`` and
``annotations/instances_{split}2014.json``) and, optionally, Karpathy's ``dataset_coco.json``. Images are never
opened here: the ``image`` column holds paths (``{coco_root}/{split}2014/{file_name}``) decoded on access.

Task assignment (the paper does not say how a multi-supercategory image is assigned): an image belongs to the
supercategory with the most annotated instances (every instance annotation counts, crowd regions included); ties go
to the larger total annotated area, then to the earlier task in the task order. Images without instance
annotations, without a non-empty caption, or whose supercategory is not in the task order are dropped; the counts
are logged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import string
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import datasets

logger = logging.getLogger(__name__)

__all__ = ["COCO_TASK_ORDER", "clean_caption", "build_coco_continual", "continual_features"]

COCO_TASK_ORDER: list[str] = [
    "appliance",
    "sports",
    "outdoor",
    "electronic",
    "accessory",
    "indoor",
    "kitchen",
    "furniture",
    "vehicle",
    "food",
    "animal",
    "person",
]

_APOSTROPHES = re.compile(r"['\u2019\u2018`]")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}\u2013\u2014\u201c\u201d]")


def clean_caption(text: str, max_words: int = 30) -> str:
    """Lower-case, strip punctuation, collapse whitespace and keep at most `max_words` words.

    Apostrophes are deleted ("man's" -> "mans"); every other punctuation mark becomes a space ("hot-dog" ->
    "hot dog"), so words are never glued together.
    """
    text = _PUNCTUATION.sub(" ", _APOSTROPHES.sub("", text.lower()))
    return " ".join(text.split()[:max_words])


def continual_features(task_names: Sequence[str]) -> datasets.Features:
    """The shared continual-retrieval schema with the given task order."""
    return datasets.Features(
        {
            "image": datasets.Image(),
            "captions": datasets.Sequence(datasets.Value("string")),
            "task": datasets.ClassLabel(names=list(task_names)),
            "image_id": datasets.Value("int64"),
        }
    )


def _read_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"COCO {what} file not found: looked for {path!r}.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _assign_tasks(instances: dict[str, Any], task_order: Sequence[str]) -> dict[int, str]:
    """Image id -> supercategory with the most instances (ties: larger total area, then earlier in task order)."""
    supercategory = {cat["id"]: cat["supercategory"] for cat in instances["categories"]}
    count: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    area: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for ann in instances["annotations"]:
        sup = supercategory[ann["category_id"]]
        count[ann["image_id"]][sup] += 1
        area[ann["image_id"]][sup] += float(ann.get("area", 0.0))
    rank = {name: i for i, name in enumerate(task_order)}
    return {
        image_id: min(sups, key=lambda s: (-sups[s], -area[image_id][s], rank.get(s, len(rank)), s))
        for image_id, sups in count.items()
    }


def build_coco_continual(
    coco_root: str | os.PathLike,
    *,
    captions_file: str = "annotations/captions_{split}2014.json",
    instances_file: str = "annotations/instances_{split}2014.json",
    image_dir: str = "{split}2014",
    karpathy_split: str | os.PathLike | None = None,
    karpathy_train_splits: Sequence[str] = ("train", "restval"),
    karpathy_eval_splits: Sequence[str] = ("test",),
    train_split: str = "train",
    eval_split: str = "validation",
    task_order: Sequence[str] = COCO_TASK_ORDER,
    max_words: int = 30,
) -> datasets.DatasetDict:
    """Build the 12-task continual COCO benchmark as a `DatasetDict` with splits `train_split` and `eval_split`.

    Args:
        coco_root: the COCO folder holding ``annotations/``, ``train2014/`` and ``val2014/``.
        captions_file, instances_file, image_dir: paths relative to `coco_root`; ``{split}`` is replaced by the
            COCO source split (``train`` or ``val``).
        karpathy_split: optional path to Karpathy's ``dataset_coco.json``. With it, images in
            `karpathy_train_splits` form the training split and those in `karpathy_eval_splits` the evaluation split
            (default: the 5k test images the zero-shot anchors refer to); other images are left out. Without it,
            train2014 -> training and val2014 -> evaluation.
        train_split, eval_split: names of the output splits.
        task_order: supercategories in continual order (the `task` ClassLabel names).
        max_words: captions are cleaned with `clean_caption` and cut to this many words.

    Rows are sorted by image id; captions keep the annotation order (by annotation id).
    """
    root = os.fspath(coco_root)
    karpathy: dict[int, str] | None = None
    if karpathy_split is not None:
        data = _read_json(os.fspath(karpathy_split), "Karpathy split")
        routes = {name: train_split for name in karpathy_train_splits}
        routes.update({name: eval_split for name in karpathy_eval_splits})
        karpathy = {int(img["cocoid"]): routes[img["split"]] for img in data["images"] if img["split"] in routes}

    tasks = list(task_order)
    features = continual_features(tasks)
    rows: dict[str, dict[str, list]] = {
        split: {"image": [], "captions": [], "task": [], "image_id": []} for split in (train_split, eval_split)
    }
    dropped = defaultdict(int)
    for source, default_split in (("train", train_split), ("val", eval_split)):
        caps = _read_json(os.path.join(root, captions_file.format(split=source)), "captions")
        insts = _read_json(os.path.join(root, instances_file.format(split=source)), "instances")
        task_of = _assign_tasks(insts, tasks)
        captions: dict[int, list[tuple[int, str]]] = defaultdict(list)
        for ann in caps["annotations"]:
            captions[ann["image_id"]].append((ann["id"], ann["caption"]))
        for image in sorted(caps["images"], key=lambda img: img["id"]):
            image_id = image["id"]
            split = default_split if karpathy is None else karpathy.get(image_id)
            if split is None:
                continue
            cleaned = [clean_caption(text, max_words) for _, text in sorted(captions.get(image_id, []))]
            cleaned = [text for text in cleaned if text]
            task = task_of.get(image_id)
            if task is None:
                dropped["no instance annotations"] += 1
            elif task not in features["task"].names:
                dropped[f"supercategory outside the task order ({task})"] += 1
            elif not cleaned:
                dropped["no caption"] += 1
            else:
                row = rows[split]
                row["image"].append(os.path.join(root, image_dir.format(split=source), image["file_name"]))
                row["captions"].append(cleaned)
                row["task"].append(features["task"].str2int(task))
                row["image_id"].append(image_id)
    for reason, n in sorted(dropped.items()):
        logger.warning("COCO continual split: dropped %d images with %s.", n, reason)

    out = datasets.DatasetDict()
    for split, columns in rows.items():
        order = sorted(range(len(columns["image_id"])), key=columns["image_id"].__getitem__)
        columns = {name: [values[i] for i in order] for name, values in columns.items()}
        out[split] = datasets.Dataset.from_dict(columns, features=features)
        logger.info("COCO continual split %r: %d images.", split, len(out[split]))
    return out
