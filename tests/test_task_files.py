"""One task as a standalone file (save_task / load_task / import_task): round trip, refusals, atomic save."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_same_state,
    bank_of,
    features,
    random_batch,
    snapshot,
    tiny_clip,
    tiny_siglip,
    wrap,
)
from safetensors import safe_open
from safetensors.torch import save_file

import peft_lpi
from peft_lpi.io import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)


# ========================================================================================== task files
def _task_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_save_and_load_task_round_trip(tmp_path):
    model = wrap(tiny_clip(), num_tasks=3)
    model.set_task_keys(1, vision=torch.randn(5, 16), text=torch.randn(5, 16))
    path = tmp_path / "task1.safetensors"
    model.save_task(1, path)
    metadata = _task_metadata(path)
    for field in (
        "format",
        "format_version",
        "library_version",
        "model_type",
        "towers",
        "vision_hidden_size",
        "text_hidden_size",
        "rank",
        "prompt_length",
        "prompt_depth",
        "share_layer_factor",
        "interaction",
    ):
        assert field in metadata, field
    assert metadata["model_type"] == "clip" and metadata["rank"] == "2" and metadata["vision_hidden_size"] == "48"
    assert metadata["library_version"] == peft_lpi.__version__
    expected = {k: v.clone() for k, v in model.task_prompts([1]).items()}
    keys = bank_of(model).vision_keys[1].clone()
    with torch.no_grad():  # scramble task 1, then restore it from the file
        for p in bank_of(model).tasks[1].parameters():
            p.add_(1.0)
        bank_of(model).vision_keys[1] = 0.0
        bank_of(model).has_keys[1] = False
    assert model.load_task(1, path) == 1
    for modality, value in model.task_prompts([1]).items():
        assert torch.equal(value, expected[modality])
    assert torch.equal(bank_of(model).vision_keys[1], keys) and bool(bank_of(model).has_keys[1])


@pytest.mark.parametrize(
    "make_other, field",
    [
        (lambda: wrap(tiny_clip(), num_tasks=1, rank=3), "rank"),
        (lambda: wrap(tiny_clip(), num_tasks=1, prompt_length=4), "prompt_length"),
        (lambda: wrap(tiny_clip(), num_tasks=1, prompt_depth=1), "prompt_depth"),
        (lambda: wrap(tiny_clip(vision_hidden=64), num_tasks=1), "vision_hidden_size"),
        (lambda: wrap(tiny_clip(text_hidden=48), num_tasks=1), "text_hidden_size"),
        (lambda: wrap(tiny_siglip(hidden=32), num_tasks=1), "model_type"),
        (lambda: wrap(tiny_clip(), num_tasks=1, towers="vision"), "towers"),
    ],
)
def test_incompatible_task_file_is_refused(tmp_path, make_other, field):
    other = make_other()
    path = tmp_path / "foreign_task.safetensors"
    other.save_task(0, path)
    target = wrap(tiny_clip(vision_hidden=32) if field == "model_type" else tiny_clip(), num_tasks=2)
    before = snapshot(target)
    for task in (0, None):
        with pytest.raises(CheckpointError, match=field):
            target.load_task(task, path)
    assert target.base_model.num_tasks == 2
    assert_same_state(before, target)


def test_corrupt_truncated_and_foreign_task_files_are_refused(tmp_path):
    model = wrap(tiny_clip(), num_tasks=2)
    good = tmp_path / "good.safetensors"
    model.save_task(0, good)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(64))
    truncated = tmp_path / "truncated.safetensors"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    header_only = tmp_path / "header_cut.safetensors"
    header_only.write_bytes(data[:20])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.randn(3, 3)}, str(foreign), metadata={"format": "pt"})
    before = snapshot(model)
    for path, match in (
        (garbage, "not a readable"),
        (truncated, "not a readable"),
        (header_only, "not a readable"),
        (foreign, "not a peft_lpi task file"),
        (tmp_path / "missing.safetensors", "does not exist"),
    ):
        for task in (1, None):
            with pytest.raises(CheckpointError, match=match):
                model.load_task(task, path)
        assert model.base_model.num_tasks == 2
        assert_same_state(before, model)


def test_task_file_with_wrong_tensors_is_refused(tmp_path):
    model = wrap(tiny_clip(), num_tasks=2)
    path = tmp_path / "t.safetensors"
    model.save_task(0, path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors.pop("factors.layer_factor")
    save_file(tensors, str(path), metadata=metadata)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        model.load_task(None, path)
    assert_same_state(before, model)


def test_import_task_appends_copy_of_source_task(tmp_path):
    base = tiny_clip()
    source = wrap(copy.deepcopy(base), seed=1, num_tasks=3)
    source.set_task_keys(2, vision=torch.randn(5, 16), text=torch.randn(5, 16))
    source.save_task(2, tmp_path / "t2.safetensors")
    target = wrap(copy.deepcopy(base), seed=2, num_tasks=1)
    old = snapshot(target)
    new = target.import_task(tmp_path / "t2.safetensors")
    assert new == 1 and target.base_model.num_tasks == 2 and target.peft_config["default"].num_tasks == 2
    for modality, value in target.task_prompts([1]).items():
        assert torch.equal(value, source.task_prompts([2])[modality])
    assert torch.equal(bank_of(target).text_keys[1], bank_of(source).text_keys[2])
    assert bank_of(target).has_keys.tolist() == [False, True]
    for key, value in old.items():  # task 0 untouched
        if ".tasks.0." in key:
            assert torch.equal(value, target.state_dict()[key])
    batch = random_batch("clip", 2, 8)
    source.set_task(2)
    target.set_task(1)
    for got, exp in zip(features(target, batch), features(source, batch), strict=True):
        assert torch.equal(got, exp)


def test_atomic_task_save(tmp_path, monkeypatch):
    model = wrap(tiny_clip(), num_tasks=2)
    path = tmp_path / "task.safetensors"
    model.save_task(0, path)
    expected = {k: v.clone() for k, v in model.task_prompts([0]).items()}

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("disk went away mid-write")

    import peft_lpi.io

    monkeypatch.setattr(peft_lpi.io, "save_file", failing_save)
    with torch.no_grad():
        bank_of(model).tasks[0].token_factors["vision"].add_(1.0)
    with pytest.raises(RuntimeError, match="mid-write"):
        model.save_task(0, path)
    assert sorted(os.listdir(tmp_path)) == ["task.safetensors"]
    monkeypatch.undo()
    fresh = wrap(tiny_clip(), seed=3, num_tasks=1)
    fresh.load_task(0, path)
    for modality, value in fresh.task_prompts([0]).items():
        assert torch.equal(value, expected[modality])
