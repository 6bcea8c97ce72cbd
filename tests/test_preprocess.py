"""Tests for `RetrievalCollator` and `flatten_captions` with an offline image processor and word-level tokenizer."""

from __future__ import annotations

import logging

import datasets
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from peft_lpi.data import RetrievalCollator, caption_id, continual_features, flatten_captions
from peft_lpi.data.backbone import word_level_tokenizer
from peft_lpi.data.preprocess import column_values, with_pixel_values

WORDS = "a red blue circle square on the left right big small".split()


def _tokenizer(model_max_length: int = 8) -> PreTrainedTokenizerFast:
    return word_level_tokenizer(WORDS, model_max_length)


@pytest.fixture(scope="module")
def image_processor():
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence the "torchvision not installed" fallback notice
    try:
        return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    finally:
        hf_logging.set_verbosity(verbosity)


def _rows():
    palette = Image.new("P", (40, 20))
    palette.putpalette([255, 0, 0] * 256)
    return [
        {"image": Image.new("RGB", (50, 33), (255, 0, 0)), "captions": ["a red circle", "a red square"], "task": 0},
        {"image": Image.new("L", (31, 64), 128), "captions": ["the blue square on the left"], "task": 1},
        {"image": Image.new("RGBA", (32, 32), (0, 0, 255, 0)), "captions": ["big blue"], "task": 1},  # transparent
        {"image": palette, "captions": ["small"], "task": 2},
    ]


def _with_ids(rows):
    return [dict(row, image_id=100 + i) for i, row in enumerate(rows)]


def test_batch_shapes_modes_and_processor_statistics(image_processor):
    collator = RetrievalCollator(image_processor, _tokenizer(), train=False)
    rows = _with_ids(_rows())
    batch = collator(rows)
    assert list(batch) == ["pixel_values", "input_ids", "attention_mask", "task", "caption_ids"]
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert torch.equal(batch["task"], torch.tensor([0, 1, 1, 2]))
    assert batch["caption_ids"].tolist() == [caption_id(row["captions"][0]) for row in rows]
    assert batch["input_ids"][0].tolist() == [2, 4, 5, 7, 3, 0, 0, 0]  # [BOS] a red circle [EOS] + padding
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    # The processor's own mean/std: a pure red image gives (1 - mean) / std in channel 0.
    mean, std = image_processor.image_mean, image_processor.image_std
    assert batch["pixel_values"][0, 0].mean().item() == pytest.approx((1 - mean[0]) / std[0], abs=1e-4)
    # Transparent RGBA is composited over white; the palette image is red.
    assert batch["pixel_values"][2, 0].mean().item() == pytest.approx((1 - mean[0]) / std[0], abs=1e-4)
    assert batch["pixel_values"][3, 1].mean().item() == pytest.approx((0 - mean[1]) / std[1], abs=1e-4)
    # The same rows give the same pixels at training time: no augmentation.
    train_batch = RetrievalCollator(image_processor, _tokenizer(), train=True)(rows)
    assert torch.equal(train_batch["pixel_values"], batch["pixel_values"])


def test_caption_choice_is_deterministic_and_changes_with_epoch(image_processor):
    captions = [f"{w} circle" for w in WORDS]
    rows = [{"image": Image.new("RGB", (8, 8)), "captions": captions, "task": 0, "image_id": i} for i in range(6)]
    first, second = RetrievalCollator(image_processor, _tokenizer()), RetrievalCollator(image_processor, _tokenizer())
    picks = [first.choose_caption(captions, i) for i in range(6)]
    assert picks == [second.choose_caption(captions, i) for i in range(6)]
    assert torch.equal(first(rows)["input_ids"], second(rows)["input_ids"])
    assert len(set(picks)) > 1
    first.set_epoch(1)
    assert [first.choose_caption(captions, i) for i in range(6)] != picks
    assert RetrievalCollator(image_processor, _tokenizer(), seed=1).choose_caption(captions, 0) in captions


def test_long_captions_are_truncated_with_one_warning(image_processor, caplog):
    collator = RetrievalCollator(image_processor, _tokenizer(model_max_length=6), train=False)
    rows = _with_ids(_rows())
    with caplog.at_level(logging.WARNING, logger="peft_lpi.data.preprocess"):
        batch = collator(rows)
        collator(rows)
    assert batch["input_ids"].shape[1] == 6
    assert batch["input_ids"][1].tolist() == [2, 10, 6, 8, 9, 3]  # [BOS] the blue square on [EOS]
    assert caplog.text.count("truncated") == 1
    assert RetrievalCollator(image_processor, _tokenizer(), max_length=4).tokenize(["a red circle"])[
        "input_ids"
    ].tolist() == [[2, 4, 5, 3]]


def test_flatten_captions():
    ds = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (4, 4))] * 3, "captions": [["a", "b"], ["c"], ["d", "e"]], "task": [0, 1, 1]},
    )
    ds = ds.add_column("image_id", [5, 6, 7]).cast(continual_features(["x", "y"]))
    texts, text_to_image, text_task = flatten_captions(ds)
    assert texts == ["a", "b", "c", "d", "e"]
    assert text_to_image.tolist() == [0, 0, 1, 2, 2]
    assert text_task.tolist() == [0, 0, 1, 1, 1]


def test_with_pixel_values_matches_processing_images_per_batch(image_processor):
    rows = _with_ids(_rows())
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "captions": datasets.Sequence(datasets.Value("string")),
            "task": datasets.ClassLabel(names=["a", "b", "c"]),
            "image_id": datasets.Value("int64"),
        }
    )
    dataset = datasets.Dataset.from_list(rows, features=features)
    processed = with_pixel_values(dataset, image_processor)
    assert "image" not in processed.column_names and processed.features["pixel_values"].shape == (3, 32, 32)
    collator = RetrievalCollator(image_processor, _tokenizer(), train=False)
    expected = collator([dataset[i] for i in range(len(dataset))])
    got = collator([processed[i] for i in range(len(processed))])  # rows carrying pixel_values
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    # Dataset input (the evaluation path) reads the column at once, with or without precomputed values.
    subset = [3, 0]
    torch.testing.assert_close(collator.pixel_values(processed.select(subset)), expected["pixel_values"][subset])
    torch.testing.assert_close(collator.pixel_values(dataset.select(subset)), expected["pixel_values"][subset])
    assert column_values(processed.select([2, 1]), "task") == [1, 1]
    with pytest.raises(ValueError, match="'image' column"):
        with_pixel_values(processed, image_processor)
