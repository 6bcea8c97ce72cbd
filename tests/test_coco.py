"""Tests for the 12-task COCO builder on a tiny COCO-format fixture written to tmp_path."""

from __future__ import annotations

import json
import logging
import os

import datasets
import pytest
from PIL import Image

from peft_lpi.data.coco import COCO_TASK_ORDER, build_coco_continual, clean_caption

LONG = "A " + " ".join(f"w{i}," for i in range(40))  # 41 words with punctuation
CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 2, "name": "dog", "supercategory": "animal"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 4, "name": "toaster", "supercategory": "appliance"},
    {"id": 5, "name": "bicycle", "supercategory": "vehicle"},
]
# split -> image id -> (instances as (category, area), captions as (annotation id, text))
FIXTURE = {
    "train": {
        10: ([(1, 10.0), (1, 10.0), (2, 500.0)], [(102, "Two people, walking!"), (101, "A man's dog.")]),
        11: ([(2, 100.0), (3, 200.0)], [(110, "A dog   and a CAR")]),  # count tie -> larger area (vehicle)
        12: ([(2, 100.0), (5, 100.0)], [(120, "dog; bicycle")]),  # count and area tie -> task order (vehicle)
        13: ([], [(130, "nothing annotated")]),  # no instances: dropped
        14: ([(4, 50.0)], [(140, LONG), (141, "...")]),  # long caption cut; empty caption removed
    },
    "val": {
        20: ([(1, 30.0)], [(200, "A person (standing) on a hot-dog stand.")]),
        21: ([(2, 30.0), (5, 20.0), (5, 20.0)], [(210, "bikes")]),
    },
}


def _write_coco(root, karpathy: bool = False) -> None:
    os.makedirs(root / "annotations")
    for split, images in FIXTURE.items():
        os.makedirs(root / f"{split}2014")
        image_rows, instance_rows, caption_rows = [], [], []
        for image_id, (instances, captions) in images.items():
            file_name = f"COCO_{split}2014_{image_id:012d}.png"
            Image.new("RGB", (5 + image_id % 3, 4), (image_id, 0, 0)).save(root / f"{split}2014" / file_name)
            image_rows.append({"id": image_id, "file_name": file_name, "width": 5, "height": 4})
            for category, area in instances:
                instance_rows.append(
                    {"id": len(instance_rows) + 1, "image_id": image_id, "category_id": category, "area": area}
                )
            caption_rows += [{"id": ann_id, "image_id": image_id, "caption": text} for ann_id, text in captions]
        with open(root / "annotations" / f"instances_{split}2014.json", "w") as f:
            json.dump({"images": image_rows, "annotations": instance_rows, "categories": CATEGORIES}, f)
        with open(root / "annotations" / f"captions_{split}2014.json", "w") as f:
            json.dump({"images": image_rows, "annotations": caption_rows}, f)
    if karpathy:
        splits = {10: "train", 11: "restval", 12: "val", 14: "test", 20: "test", 21: "train"}
        images = [
            {"cocoid": i, "split": s, "filepath": "x", "filename": "x", "sentences": []} for i, s in splits.items()
        ]
        with open(root / "dataset_coco.json", "w") as f:
            json.dump({"images": images, "dataset": "coco"}, f)


def _path(root, split, image_id):
    return str(root / f"{split}2014" / f"COCO_{split}2014_{image_id:012d}.png")


def test_clean_caption():
    assert clean_caption("  A man's DOG,\tjumps!!  over-the fence. ") == "a mans dog jumps over the fence"
    assert clean_caption(LONG).split() == ["a"] + [f"w{i}" for i in range(29)]
    assert clean_caption("one two three", max_words=2) == "one two"
    assert clean_caption("?!") == ""


def test_build_coco_continual(tmp_path, caplog):
    _write_coco(tmp_path)
    with caplog.at_level(logging.WARNING, logger="peft_lpi.data.coco"):
        ds = build_coco_continual(tmp_path)
    assert "dropped 1 images with no instance annotations" in caplog.text
    assert set(ds) == {"train", "validation"}
    assert ds["train"].features["task"].names == COCO_TASK_ORDER
    rows = ds["train"].remove_columns("image").to_list()
    task = COCO_TASK_ORDER.index
    assert rows == [
        {"captions": ["a mans dog", "two people walking"], "task": task("person"), "image_id": 10},
        {"captions": ["a dog and a car"], "task": task("vehicle"), "image_id": 11},
        {"captions": ["dog bicycle"], "task": task("vehicle"), "image_id": 12},
        {"captions": [clean_caption(LONG)], "task": task("appliance"), "image_id": 14},
    ]
    assert ds["validation"].remove_columns("image").to_list() == [
        {"captions": ["a person standing on a hot dog stand"], "task": task("person"), "image_id": 20},
        {"captions": ["bikes"], "task": task("vehicle"), "image_id": 21},
    ]
    paths = ds["train"].cast_column("image", datasets.Image(decode=False))["image"]
    assert [p["path"] for p in paths] == [_path(tmp_path, "train", i) for i in (10, 11, 12, 14)]
    assert ds["validation"][1]["image"].size == (5, 4)  # decoded lazily from the path


def test_build_coco_continual_karpathy(tmp_path):
    _write_coco(tmp_path, karpathy=True)
    ds = build_coco_continual(tmp_path, karpathy_split=tmp_path / "dataset_coco.json", eval_split="test")
    assert ds["train"]["image_id"][:] == [10, 11, 21]  # train + restval, from both COCO folders
    assert ds["test"]["image_id"][:] == [14, 20]
    paths = ds["train"].cast_column("image", datasets.Image(decode=False))["image"]
    assert paths[2]["path"] == _path(tmp_path, "val", 21)


def test_missing_files_are_named(tmp_path):
    _write_coco(tmp_path)
    os.remove(tmp_path / "annotations" / "instances_val2014.json")
    with pytest.raises(FileNotFoundError, match=r"instances file not found.*instances_val2014\.json"):
        build_coco_continual(tmp_path)
    with pytest.raises(FileNotFoundError, match="Karpathy split file not found"):
        build_coco_continual(tmp_path, karpathy_split=tmp_path / "missing.json")
