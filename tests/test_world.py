"""The offline world (determinism, schema, vocabulary) and the cached world backbone (save/load, cache, atomicity)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

import peft_lpi.data.backbone as backbone
from peft_lpi.data.backbone import (
    METADATA_FILE,
    build_world_tokenizer,
    default_cache_dir,
    get_offline_backbone,
    pretrain_backbone,
    read_backbone_metadata,
)
from peft_lpi.data.world import (
    WORLD_TASKS,
    build_offline_benchmark,
    generate_pretraining_pairs,
    render_generic_arrays,
    render_task_arrays,
    world_caption_words,
)

TINY = {"steps": 3, "batch_size": 16, "num_pairs": 64, "heldout_pairs": 32, "progress": False}


def _bytes(split: datasets.Dataset) -> list[bytes]:
    return [row["bytes"] for row in list(split.cast_column("image", datasets.Image(decode=False))["image"])]


def test_benchmark_is_deterministic_by_seed() -> None:
    a = build_offline_benchmark(seed=0, train_per_task=4, val_per_task=2)
    b = build_offline_benchmark(seed=0, train_per_task=4, val_per_task=2)
    c = build_offline_benchmark(seed=1, train_per_task=4, val_per_task=2)
    for split in ("train", "validation"):
        assert _bytes(a[split]) == _bytes(b[split])
        assert list(a[split]["captions"]) == list(b[split]["captions"])
        assert _bytes(a[split]) != _bytes(c[split])
        assert list(a[split]["captions"]) != list(c[split]["captions"])


def test_generic_pairs_are_deterministic_by_seed() -> None:
    a, b, c = generate_pretraining_pairs(0, 8), generate_pretraining_pairs(0, 8), generate_pretraining_pairs(1, 8)
    assert _bytes(a) == _bytes(b) and list(a["captions"]) == list(b["captions"])
    assert _bytes(a) != _bytes(c)
    assert a.features["captions"] == datasets.Sequence(datasets.Value("string"))
    held, _ = render_generic_arrays(0, 8, stream=1)
    assert not np.array_equal(held, render_generic_arrays(0, 8)[0])  # the held-out stream is independent


def test_benchmark_schema() -> None:
    data = build_offline_benchmark(seed=0, train_per_task=3, val_per_task=2)
    names = [t.name for t in WORLD_TASKS]
    assert len(names) >= 6 and len(set(names)) == len(names)
    assert set(data) == {"train", "validation"}
    for split, per_task in (("train", 3), ("validation", 2)):
        part = data[split]
        assert isinstance(part.features["image"], datasets.Image)
        assert part.features["captions"] == datasets.Sequence(datasets.Value("string"))
        assert part.features["task"] == datasets.ClassLabel(names=names)
        assert part.features["image_id"] == datasets.Value("int64")
        assert list(part["task"]) == [t for t in range(len(names)) for _ in range(per_task)]
        image = part[0]["image"]
        assert image.size == (32, 32) and image.mode == "RGB"
    ids = list(data["train"]["image_id"]) + list(data["validation"]["image_id"])
    assert len(set(ids)) == len(ids)


def test_every_caption_word_is_in_the_tokenizer_vocabulary() -> None:
    tokenizer = build_world_tokenizer()
    assert world_caption_words() <= set(tokenizer.get_vocab())
    captions = render_generic_arrays(0, 300)[1]
    for t in range(len(WORLD_TASKS)):
        captions += render_task_arrays(t, 0, 50)[1]
    captions += [t.name for t in WORLD_TASKS]  # the task similarity embeds the names
    ids = tokenizer(captions)["input_ids"]
    assert all(tokenizer.unk_token_id not in row for row in ids)
    assert max(len(row) for row in ids) <= tokenizer.model_max_length
    assert tokenizer.eos_token_id != 2 and ids[0][0] == tokenizer.bos_token_id and ids[0][-1] == tokenizer.eos_token_id


@pytest.mark.slow
def test_pretrained_backbone_loads_like_a_real_clip(tmp_path) -> None:
    path = pretrain_backbone(tmp_path / "bb", **TINY)
    model = CLIPModel.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = AutoImageProcessor.from_pretrained(path)
    assert type(processor).__name__ == "CLIPImageProcessorPil"  # the PIL backend: no torchvision needed or warned about
    text = model.config.text_config
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert text.eos_token_id != 2 and tokenizer.model_max_length == text.max_position_embeddings
    images, captions = render_generic_arrays(0, 2)
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 32, 32)
    enc = tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixels, **enc)
    assert out.logits_per_image.shape == (2, 2) and torch.isfinite(out.logits_per_image).all()
    meta = read_backbone_metadata(path)
    assert meta["world_seed"] == 0 and meta["steps"] == TINY["steps"] and "i2t_r1" in meta["heldout_generic"]


@pytest.mark.slow
def test_cache_is_reused_and_refreshed_on_mismatch(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PEFT_LPI_CACHE", str(tmp_path / "root"))
    assert default_cache_dir(3) == tmp_path / "root" / "world-backbone-v1-seed3"
    first = get_offline_backbone(tmp_path / "cache", **TINY)
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("the cached backbone should have been reused")

    monkeypatch.setattr(backbone, "pretrain_backbone", fail)
    assert get_offline_backbone(tmp_path / "cache", **TINY) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    monkeypatch.undo()
    refreshed = get_offline_backbone(tmp_path / "cache", **{**TINY, "steps": 4})  # other settings: retrain
    assert read_backbone_metadata(refreshed)["steps"] == 4


@pytest.mark.parametrize("where", ["training", "saving"])
@pytest.mark.slow
def test_interrupted_pretraining_leaves_no_folder(tmp_path, monkeypatch, where: str) -> None:
    def boom(*args, **kwargs):
        raise KeyboardInterrupt("interrupted")

    name = "multi_positive_infonce" if where == "training" else "world_image_processor"
    monkeypatch.setattr(backbone, name, boom)
    with pytest.raises(KeyboardInterrupt):
        pretrain_backbone(tmp_path / "bb", **TINY)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary folder


@pytest.mark.slow
def test_failed_refresh_keeps_the_previous_backbone(tmp_path, monkeypatch) -> None:
    path = pretrain_backbone(tmp_path / "bb", **TINY)
    monkeypatch.setattr(backbone, "world_image_processor", lambda *a, **k: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError):
        pretrain_backbone(tmp_path / "bb", **{**TINY, "steps": 4})
    assert read_backbone_metadata(path)["steps"] == TINY["steps"] and (path / METADATA_FILE).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bb"]
