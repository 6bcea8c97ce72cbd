"""RefCOCO builders (MDETR COCO-format files and refer's refs(...).p + instances.json) on fixtures the tests write."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import datasets
import pytest
from PIL import Image, ImageFile

from peft_lpi.continual.grounding import prepare_grounding_dataset
from peft_lpi.data.coco import COCO_TASK_ORDER
from peft_lpi.data.grounding import GroundingDataError, as_grounding_dataset, grounding_features
from peft_lpi.data.refcoco import build_refcoco_mdetr, build_refcoco_refer

CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 62, "name": "chair", "supercategory": "furniture"},
    {"id": 99, "name": "thing", "supercategory": "not-a-task"},
]


def _images(root: Path) -> Path:
    folder = root / "train2014"
    folder.mkdir()
    for cid, colour in ((10, "red"), (11, "blue")):
        Image.new("RGB", (40, 30), colour).save(folder / f"COCO_train2014_{cid:012d}.jpg")
    return folder


def _mdetr_file(root: Path) -> Path:
    images, annotations = [], []

    def add(entry: int, coco_id: int, caption: str, bbox: list[float] | None, category: int) -> None:
        images.append(
            {
                "file_name": f"COCO_train2014_{coco_id:012d}.jpg",
                "height": 30,
                "width": 40,
                "id": entry,
                "original_id": coco_id,
                "caption": caption,
                "dataset_name": "refcoco",
                "tokens_negative": [[0, 3]],
            }
        )
        if bbox is not None:
            annotations.append(
                {
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                    "image_id": entry,
                    "category_id": category,
                    "id": 100 + entry,
                    "bbox": bbox,
                    "original_id": 5000 + entry,
                    "tokens_positive": [[0, 3]],
                }
            )

    add(0, 10, "man on the left", [1.0, 2.0, 10.0, 20.0], 1)
    add(1, 10, "dog  in   front", [20.0, 5.0, 15.0, 10.0], 18)
    add(2, 11, "left chair", [0.0, 0.0, 5.0, 5.0], 62)
    add(3, 11, "  ", [0.0, 0.0, 5.0, 5.0], 62)  # empty expression
    add(4, 11, "degenerate chair", [3.0, 3.0, 0.0, 4.0], 62)  # zero width
    add(5, 11, "chair outside", [30.0, 20.0, 30.0, 30.0], 62)  # outside the 40x30 image
    add(6, 11, "no box", None, 62)  # an expression entry without annotation
    add(7, 11, "a thing", [1.0, 1.0, 5.0, 5.0], 99)  # supercategory outside the task order
    add(8, 10, "the woman", [2.0, 2.0, 38.5, 28.4], 1)  # overshoots by < 1 px: clipped
    add(9, 10, "second man", [4.0, 4.0, 4.0, 4.0], 1)
    path = root / "finetune_refcoco_val.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


def test_mdetr_builder_schema_tasks_and_skips(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    image_dir = _images(tmp_path)
    with caplog.at_level(logging.WARNING):
        ds = build_refcoco_mdetr(_mdetr_file(tmp_path), image_dir)
    assert ds.features["task"].names == COCO_TASK_ORDER
    assert ds["expression"] == ["man on the left", "dog in front", "left chair", "the woman", "second man"]
    assert [ds.features["task"].int2str(t) for t in ds["task"]] == ["person", "animal", "furniture", "person", "person"]
    assert ds["image_id"] == [10, 10, 11, 10, 10]
    np_boxes = ds["box"]
    assert np_boxes[0] == pytest.approx([1.0, 2.0, 11.0, 22.0])  # xywh -> xyxy
    assert np_boxes[3] == pytest.approx([2.0, 2.0, 40.0, 30.0])  # clipped to the image
    row = ds[2]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (40, 30)
    log = caplog.text
    for reason in ("empty expression", "degenerate box", "box outside the image", "expression without annotation"):
        assert f"dropped 1 samples ({reason})" in log
    assert "supercategory outside the task order (not-a-task)" in log


@pytest.mark.parametrize(
    ("entry", "message"),
    [(3, "empty expression"), (4, "degenerate box"), (5, "outside the image.*40x30"), (6, "no annotation")],
)
def test_mdetr_builder_raise_names_the_entry(tmp_path: Path, entry: int, message: str) -> None:
    image_dir = _images(tmp_path)
    path = _mdetr_file(tmp_path)
    data = json.loads(path.read_text())
    bad = [img for img in data["images"] if img["id"] == entry]
    data["images"] = [img for img in data["images"] if img["id"] in (0, 1)] + bad
    path.write_text(json.dumps(data))
    with pytest.raises(GroundingDataError, match=message) as err:
        build_refcoco_mdetr(path, image_dir, on_invalid="raise")
    assert f"entry {entry}" in str(err.value)


def test_mdetr_builder_caps_per_task_and_rejects_malformed(tmp_path: Path) -> None:
    image_dir = _images(tmp_path)
    path = _mdetr_file(tmp_path)
    capped = build_refcoco_mdetr(path, image_dir, max_per_task=1)
    assert capped["expression"] == ["man on the left", "dog in front", "left chair"]  # first of each task
    drawn = build_refcoco_mdetr(path, image_dir, max_per_task=2, shuffle_seed=0)
    names = [drawn.features["task"].int2str(t) for t in drawn["task"]]
    assert names.count("person") == 2 and names.count("animal") == 1
    assert drawn["expression"] == build_refcoco_mdetr(path, image_dir, max_per_task=2, shuffle_seed=0)["expression"]
    data = json.loads(path.read_text())
    data["annotations"].append(dict(data["annotations"][0], id=999))
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="two annotations"):
        build_refcoco_mdetr(path, image_dir)
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="no 'annotations'"):
        build_refcoco_mdetr(path, image_dir)
    with pytest.raises(FileNotFoundError, match="looked for"):
        build_refcoco_mdetr(tmp_path / "missing.json", image_dir)


def test_refer_builder(tmp_path: Path) -> None:
    image_dir = _images(tmp_path)
    instances = {
        "images": [
            {"id": 10, "file_name": "COCO_train2014_000000000010.jpg", "width": 40, "height": 30},
            {"id": 11, "file_name": "COCO_train2014_000000000011.jpg", "width": 40, "height": 30},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 1, "bbox": [1.0, 2.0, 10.0, 20.0]},
            {"id": 2, "image_id": 11, "category_id": 18, "bbox": [5.0, 5.0, 10.0, 10.0]},
            {"id": 3, "image_id": 11, "category_id": 62, "bbox": [5.0, 5.0, 0.0, 10.0]},
        ],
        "categories": CATEGORIES,
    }
    refs = [
        {
            "ref_id": 0,
            "ann_id": 1,
            "image_id": 10,
            "category_id": 1,
            "split": "train",
            "sentences": [{"sent": "man", "sent_id": 0}, {"sent": "", "sent_id": 1}],
        },
        {
            "ref_id": 1,
            "ann_id": 2,
            "image_id": 11,
            "category_id": 18,
            "split": "val",
            "sentences": [{"sent": "the dog", "sent_id": 2}],
        },
        {
            "ref_id": 2,
            "ann_id": 3,
            "image_id": 11,
            "category_id": 62,
            "split": "train",
            "sentences": [{"sent": "flat chair", "sent_id": 3}],
        },
        {
            "ref_id": 3,
            "ann_id": 77,
            "image_id": 12,
            "category_id": 62,
            "split": "train",
            "sentences": [{"sent": "lost", "sent_id": 4}],
        },
    ]
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    with open(tmp_path / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    train = build_refcoco_refer(tmp_path / "refs(unc).p", tmp_path / "instances.json", image_dir)
    assert train["expression"] == ["man"]
    assert train["box"][0] == pytest.approx([1.0, 2.0, 11.0, 22.0])
    val = build_refcoco_refer(tmp_path / "refs(unc).p", tmp_path / "instances.json", image_dir, splits=["val"])
    assert val["expression"] == ["the dog"] and val.features["task"].int2str(val["task"][0]) == "animal"
    with pytest.raises(GroundingDataError, match="ref 0 sentence 1 has an empty expression"):
        build_refcoco_refer(
            tmp_path / "refs(unc).p", tmp_path / "instances.json", image_dir, splits="train", on_invalid="raise"
        )
    refs[0]["sentences"].pop()
    with open(tmp_path / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    with pytest.raises(GroundingDataError, match="ref 2 sentence 3: degenerate box"):
        build_refcoco_refer(
            tmp_path / "refs(unc).p", tmp_path / "instances.json", image_dir, splits="train", on_invalid="raise"
        )
    with pytest.raises(GroundingDataError, match="ref 3: image 12 or annotation 77 is missing"):
        build_refcoco_refer(
            tmp_path / "refs(unc).p",
            tmp_path / "instances.json",
            image_dir,
            splits="train",
            on_invalid="raise",
            task_order=["person"],  # ref 2 (furniture) is then a plain skip, not an error
        )


def test_adapter_from_any_dataset(caplog: pytest.LogCaptureFixture) -> None:
    source = datasets.Dataset.from_dict(
        {
            "img": [Image.new("RGB", (20, 10), "red")] * 4,
            "text": ["a cat", "", "a dog", "a bird"],
            "bbox": [[1, 1, 5, 5], [1, 1, 5, 5], [2, 2, 0, 3], [0, 0, 30, 5]],
            "label": ["cats", "cats", "dogs", "birds"],
            "width": [20] * 4,
            "height": [10] * 4,
        }
    )
    with caplog.at_level(logging.WARNING):
        ds = as_grounding_dataset(
            source,
            image_column="img",
            expression_column="text",
            box_column="bbox",
            task_column="label",
            box_format="xywh",
        )
    assert ds.features["task"].names == ["cats", "dogs", "birds"]
    assert ds["expression"] == ["a cat"] and ds["box"][0] == pytest.approx([1.0, 1.0, 6.0, 6.0])
    assert ds[0]["image"].size == (20, 10)
    for reason in ("empty expression", "degenerate box", "box outside the image"):
        assert f"dropped 1 rows ({reason})" in caplog.text
    with pytest.raises(GroundingDataError, match="Row 1: empty expression"):
        as_grounding_dataset(
            source,
            image_column="img",
            expression_column="text",
            box_column="bbox",
            task_column="label",
            on_invalid="raise",
        )
    with pytest.raises(ValueError, match="no column"):
        as_grounding_dataset(source)


def test_prepare_grounding_dataset_reads_sizes_from_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Targets are box / image size, with sizes from the file headers: no pixel is decoded (on full COCO, decoding
    every image only for its size costs minutes). Images of two sizes, from paths and from bytes."""
    sizes = [(40, 30), (64, 16)]
    paths = []
    for i, size in enumerate(sizes):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", size, "red").save(paths[-1])
    rows = {"image": paths, "expression": ["a", "b"], "box": [[4.0, 3.0, 20.0, 15.0], [8.0, 2.0, 32.0, 16.0]],
            "task": [0, 1], "image_id": [0, 1]}
    by_path = datasets.Dataset.from_dict(rows, features=grounding_features(["t0", "t1"]))
    by_bytes = by_path.cast_column("image", datasets.Image(decode=False)).map(
        lambda row: {"image": {"bytes": Path(row["image"]["path"]).read_bytes(), "path": None}}
    ).cast_column("image", datasets.Image())

    def no_decoding(self: Any) -> None:
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    out = prepare_grounding_dataset(datasets.DatasetDict({"train": by_path, "validation": by_bytes}))
    monkeypatch.undo()
    expected = [[box[0] / w, box[1] / h, box[2] / w, box[3] / h] for box, (w, h) in zip(rows["box"], sizes)]
    for split in ("train", "validation"):
        assert [value for box in out[split]["target"] for value in box] == pytest.approx(sum(expected, []))
        assert out[split]["captions"] == [["a"], ["b"]]
        assert isinstance(out[split].features["image"], datasets.Image) and out[split].features["image"].decode
        assert out[split][1]["image"].size == sizes[1]  # the image column still decodes afterwards
