"""Batching rows of the shared schema with the backbone's own image processor and tokenizer.

Images always go through the backbone's processor (its own resize, crop, mean and std) with no augmentation, so
training and evaluation see the same transform (the reference code used ImageNet statistics and random crops at
evaluation). At training time one caption per image is picked per epoch, deterministically from
``(seed, epoch, image_id)``; evaluation encodes every caption, listed by `flatten_captions`.

`with_pixel_values` runs the processor once over a whole split (`datasets.map`), for small images that are
otherwise decoded and processed again at every epoch and evaluation; the collator uses its ``pixel_values`` column
when a row has one.
"""

from __future__ import annotations

import io
import logging
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = [
    "RetrievalCollator", "flatten_captions", "caption_id", "column_values", "image_size", "with_pixel_values",
    "PIXEL_VALUES",
]

PIXEL_VALUES = "pixel_values"

_NO_LIMIT = 1_000_000  # tokenizers without a configured limit report model_max_length ~ 1e30


def caption_id(text: str) -> int:
    """Stable id of a caption text (CRC32 of its UTF-8 bytes): equal texts get equal ids across runs/processes."""
    return zlib.crc32(text.encode("utf-8"))


def text_token_limit(model: Any, tokenizer: Any) -> int | None:
    """Most tokens a text may have: the smaller of the text tower's position table
    (`config.text_config.max_position_embeddings`) and the tokenizer's `model_max_length`; None when neither is set.
    Longer captions are truncated to it (with a warning), never a crash in the position embedding."""
    text_config = getattr(getattr(model, "config", None), "text_config", None)
    limits = [getattr(text_config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(v) for v in limits if isinstance(v, int) and 0 < v < _NO_LIMIT]
    return min(limits) if limits else None


def _open_image(image: Any) -> Image.Image:
    """A PIL image from a PIL image, a path or a datasets ``{"path", "bytes"}`` dict (opened lazily: PIL reads the
    header now and decodes the pixels on first access)."""
    if isinstance(image, dict):
        image = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
    return image if isinstance(image, Image.Image) else Image.open(image)


def image_size(image: Any) -> tuple[int, int]:
    """``(width, height)`` of a PIL image, a path or a datasets ``{"path", "bytes"}`` dict, read from the file header
    (no pixel is decoded), so sizing a COCO-scale dataset takes seconds, not minutes."""
    if isinstance(image, Image.Image):
        return image.size
    with _open_image(image) as opened:  # closes the file it opened
        return opened.size


def _to_rgb(image: Any) -> Image.Image:
    """PIL RGB image from a PIL image, a path or a datasets ``{"path", "bytes"}`` dict.

    Images with transparency (RGBA, LA, palette or greyscale with a transparent colour) are composited over white,
    so transparent pixels do not show whatever colour they happen to store; other modes use PIL's conversion.
    """
    image = _open_image(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class RetrievalCollator:
    """`collate_fn` turning rows of the shared schema into model inputs.

    Args:
        processor_or_image_processor: a processor with ``image_processor`` and ``tokenizer`` attributes (e.g.
            `CLIPProcessor`) or an image processor alone.
        tokenizer: the text tokenizer; defaults to the processor's.
        max_length: token limit; defaults to ``tokenizer.model_max_length``. Longer captions are truncated (a
            warning is logged once per collator), never an error.
        train: pick one caption per image per epoch; when False, the first caption (stable batches for
            evaluation and debugging; evaluation proper encodes every caption, see `flatten_captions`).
        seed: seed of the caption choice.

    A batch is ``{"pixel_values", "input_ids", "attention_mask", "task", "caption_ids"}``; ``caption_ids`` is
    `caption_id` of each chosen caption, so identical captions in a batch can be treated as positives.
    Call `set_epoch` at the start of every epoch (DataLoader workers receive a copy of the collator when the
    iterator is created, so do not use ``persistent_workers=True`` if the caption choice should change).
    """

    def __init__(
        self,
        processor_or_image_processor: Any,
        tokenizer: Any | None = None,
        *,
        max_length: int | None = None,
        train: bool = True,
        seed: int = 0,
    ) -> None:
        processor = processor_or_image_processor
        self.image_processor = getattr(processor, "image_processor", None) or processor
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError("No tokenizer: pass `tokenizer` or a processor that has one.")
        limit = max_length if max_length is not None else getattr(self.tokenizer, "model_max_length", None)
        if limit is None or limit >= _NO_LIMIT:
            logger.warning("The tokenizer declares no length limit; pass `max_length` to match the text tower.")
            limit = None
        self.max_length = limit
        self.train = train
        self.seed = seed
        self.epoch = 0
        self._warned_truncation = False

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose caption choice `__call__` uses."""
        self.epoch = int(epoch)

    def choose_caption(self, captions: Sequence[str], image_id: int) -> str:
        """The caption used for an image: deterministic in (seed, epoch, image_id) at training, the first at eval."""
        if not captions:
            raise ValueError(f"Image {image_id} has no caption.")
        if not self.train:
            return captions[0]
        return captions[zlib.crc32(f"{self.seed}:{self.epoch}:{int(image_id)}".encode()) % len(captions)]

    def process_images(self, images: Iterable[Any]) -> torch.Tensor:
        """`(B, 3, H, W)` pixel values from PIL images (any mode), paths or datasets image dicts."""
        return self.image_processor(images=[_to_rgb(image) for image in images], return_tensors="pt")["pixel_values"]

    def pixel_values(self, rows: Sequence[dict[str, Any]] | datasets.Dataset) -> torch.Tensor:
        """`(B, 3, H, W)` pixel values of rows (a list of rows or a Dataset): their precomputed ``pixel_values``
        (`with_pixel_values`) when they have them, else their processed ``image``."""
        if isinstance(rows, datasets.Dataset):  # read the one column needed, at once
            if PIXEL_VALUES in rows.column_names:
                return rows.select_columns([PIXEL_VALUES]).with_format("torch")[:][PIXEL_VALUES]
            return self.process_images(column_values(rows, "image"))
        if rows and PIXEL_VALUES in rows[0]:
            return torch.stack([torch.as_tensor(row[PIXEL_VALUES]) for row in rows])
        return self.process_images(row["image"] for row in rows)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` (padded to the batch's longest, truncated to `max_length`) and
        ``caption_ids`` of the given captions."""
        texts = list(texts)
        encoded = self.tokenizer(
            texts,
            padding=True,
            truncation=self.max_length is not None,
            max_length=self.max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        if self.max_length is not None and not self._warned_truncation and self._truncated(texts, encoded):
            self._warned_truncation = True
            logger.warning("Some captions are longer than %d tokens and were truncated (warned once).", self.max_length)
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "caption_ids": torch.tensor([caption_id(text) for text in texts], dtype=torch.long),
        }

    def _truncated(self, texts: list[str], encoded: Any) -> bool:
        encodings = getattr(encoded, "encodings", None)
        if encodings:  # fast tokenizers keep the cut-off pieces
            return any(enc.overflowing for enc in encodings)
        return any(len(ids) > self.max_length for ids in self.tokenizer(texts)["input_ids"])

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = self.tokenize([self.choose_caption(row["captions"], row["image_id"]) for row in rows])
        return {
            "pixel_values": self.pixel_values(rows),
            "input_ids": texts["input_ids"],
            "attention_mask": texts["attention_mask"],
            "task": torch.tensor([int(row["task"]) for row in rows], dtype=torch.long),
            "caption_ids": texts["caption_ids"],
        }


def column_values(dataset: datasets.Dataset, name: str) -> list[Any]:
    """One column as a Python list, read without decoding the other columns (images).

    ``dataset[name]`` on a `select`-ed split reads row by row (about 1 s per 10k rows); this reads the column at once.
    """
    return dataset.select_columns([name]).to_dict()[name]


def with_pixel_values(dataset: datasets.Dataset, processor: Any, *, batch_size: int = 256) -> datasets.Dataset:
    """`dataset` with its ``image`` column replaced by the processor's ``pixel_values`` (float32, torch format).

    The processor runs once per image (`datasets.map`) instead of once per epoch and per evaluation, which removes
    image decoding and processing from every training step. It stores `(N, 3, H, W)` float32 values: right for small
    images (the offline world: 12 KB per image), not for COCO at 224 px (600 KB per image).
    """
    if "image" not in dataset.column_names:
        raise ValueError(f"with_pixel_values needs an 'image' column; the dataset has {dataset.column_names}.")
    image_processor = getattr(processor, "image_processor", None) or processor

    def process(batch: dict[str, list[Any]]) -> dict[str, np.ndarray]:
        images = [_to_rgb(image) for image in batch["image"]]
        return {PIXEL_VALUES: image_processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32)}

    shape = process(dataset[:1])[PIXEL_VALUES].shape[1:]
    features = dataset.features.copy()
    del features["image"]
    features[PIXEL_VALUES] = datasets.Array3D(shape=tuple(shape), dtype="float32")
    mapped = dataset.map(process, batched=True, batch_size=batch_size, remove_columns=["image"], features=features,
                         desc="preprocessing images")
    return mapped.with_format("torch", columns=[PIXEL_VALUES], output_all_columns=True)


def flatten_captions(dataset: datasets.Dataset) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Every caption of an evaluation split, for the caption side of a joint gallery.

    Returns:
        ``(texts, text_to_image, text_task)``: the captions in row order, the row index (position in `dataset`,
        i.e. the row of the image embeddings) of each caption's image, and each caption's task, as LongTensors.
        Images are not decoded.
    """
    columns = dataset.select_columns(["captions", "task"])
    texts: list[str] = []
    text_to_image: list[int] = []
    text_task: list[int] = []
    for row, (captions, task) in enumerate(zip(columns["captions"], columns["task"])):
        texts.extend(captions)
        text_to_image.extend([row] * len(captions))
        text_task.extend([int(task)] * len(captions))
    return texts, torch.tensor(text_to_image, dtype=torch.long), torch.tensor(text_task, dtype=torch.long)
