"""Tests for `from_datasets`: any small in-memory `datasets` dataset converted to the shared schema."""

from __future__ import annotations

import datasets
import pytest
from PIL import Image

from peft_lpi.data import continual_features, first_tasks, from_datasets


def _images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (4 + i, 4), (10 * i, 0, 0)) for i in range(n)]


def _source(tasks=("b", "a", "b", "c"), captions=None) -> datasets.Dataset:
    n = len(tasks)
    captions = captions or [f"Caption  {i}" for i in range(n)]
    return datasets.Dataset.from_dict(
        {"img": _images(n), "text": captions, "task": list(tasks), "extra": list(range(n))}
    )


def test_string_tasks_first_appearance_and_single_captions():
    source = datasets.DatasetDict({"train": _source(), "validation": _source(("c", "a"))})
    out = from_datasets(source, image_column="img", caption_column="text")
    assert set(out) == {"train", "validation"}
    for split in out.values():
        assert split.features == continual_features(["b", "a", "c"])
    train = out["train"].remove_columns("image").to_list()
    assert train == [
        {"captions": ["Caption 0"], "task": 0, "image_id": 0},
        {"captions": ["Caption 1"], "task": 1, "image_id": 1},
        {"captions": ["Caption 2"], "task": 0, "image_id": 2},
        {"captions": ["Caption 3"], "task": 2, "image_id": 3},
    ]
    assert out["validation"]["image_id"][:] == [4, 5]  # unique across splits
    assert out["validation"]["task"][:] == [2, 1]
    assert out["train"][1]["image"].size == (5, 4)


def test_task_names_multiple_caption_columns_and_ids(tmp_path):
    source = datasets.Dataset.from_dict(
        {
            "image": _images(3),
            "c1": ["A dog!", "", "x"],
            "c2": [["two", "three"], [], None],
            "task": [1, 1, 0],
            "id": [7, 8, 9],
        }
    )
    source = datasets.DatasetDict({"train": source, "test": source})
    source.save_to_disk(str(tmp_path / "saved"))
    out = from_datasets(
        str(tmp_path / "saved"),
        caption_column=["c1", "c2"],
        task_names=["first", "second"],
        eval_split="test",
        image_id_column="id",
        clean_captions=True,
    )
    assert out["train"].features["task"].names == ["first", "second"]
    rows = out["train"].remove_columns("image").to_list()
    assert rows == [  # the row without any caption is dropped
        {"captions": ["a dog", "two", "three"], "task": 1, "image_id": 7},
        {"captions": ["x"], "task": 0, "image_id": 9},
    ]


def test_empty_task_missing_column_and_unknown_task():
    with pytest.raises(ValueError, match="empty task.*'z'"):
        from_datasets(
            _source(), caption_column="text", image_column="img", task_names=["a", "b", "c", "z"], eval_size=1
        )
    with pytest.raises(ValueError, match=r"'caption'.*available columns: \['img', 'text', 'task', 'extra'\]"):
        from_datasets(datasets.DatasetDict({"train": _source(), "validation": _source()}), image_column="img")
    with pytest.raises(ValueError, match="Task 'q'.*not one of"):
        from_datasets(
            datasets.DatasetDict({"train": _source(), "validation": _source(("q",))}),
            image_column="img",
            caption_column="text",
        )
    with pytest.raises(ValueError, match="pass `eval_size`"):
        from_datasets(_source(), image_column="img", caption_column="text")


def test_class_label_column_and_held_out_split():
    source = _source(tasks=("a", "b") * 4).cast_column("task", datasets.ClassLabel(names=["b", "a"]))
    out = from_datasets(source, image_column="img", caption_column="text", eval_size=0.5, seed=1)
    assert out["train"].features["task"].names == ["b", "a"]
    assert sorted(out["train"]["task"][:]) == [0, 0, 1, 1]  # stratified
    assert sorted(out["train"]["image_id"][:] + out["validation"]["image_id"][:]) == list(range(8))


def test_first_tasks():
    source = datasets.DatasetDict({"train": _source(), "validation": _source(("c", "a"))})
    out = first_tasks(from_datasets(source, image_column="img", caption_column="text"), 2)
    assert out["train"].features["task"].names == ["b", "a"]
    assert out["train"]["image_id"][:] == [0, 1, 2]
    assert out["validation"]["task"][:] == [1]
