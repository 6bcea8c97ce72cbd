"""Any `datasets` image-caption dataset with a task column, converted to the shared continual-retrieval schema.

The output is a `DatasetDict` with splits ``"train"`` and ``"validation"`` and the columns ``image`` (Image),
``captions`` (list of strings), ``task`` (ClassLabel in continual order) and ``image_id`` (int64); see
`peft_lpi.data.coco.continual_features`.

Task order: `task_names` when given; otherwise a ClassLabel column keeps its own names, an integer column keeps the
numeric order (names ``"0"``, ``"1"``, ...), and a string column takes the order of first appearance in the training
split (so a dataset sorted by task gives the natural order; pass `task_names` to fix it explicitly).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import datasets

from .coco import clean_caption, continual_features

logger = logging.getLogger(__name__)

__all__ = ["from_datasets", "first_tasks"]

_DEFAULT_TASK = "task_0"


def _load(source: Any, data_dir: str | None, load_kwargs: dict[str, Any]) -> datasets.DatasetDict:
    if isinstance(source, datasets.DatasetDict):
        return source
    if isinstance(source, datasets.Dataset):
        return datasets.DatasetDict({"train": source})
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        if os.path.isdir(path) and any(
            os.path.isfile(os.path.join(path, name)) for name in ("dataset_dict.json", "state.json")
        ):
            loaded = datasets.load_from_disk(path)
        else:
            loaded = datasets.load_dataset(path, data_dir=data_dir, **load_kwargs)
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    raise TypeError(
        f"Expected a datasets.Dataset, a datasets.DatasetDict, a Hub name or a local path, got {type(source).__name__}."
    )


def _task_order(train: datasets.Dataset, task_column: str | None, task_names: Sequence[str] | None) -> list[str]:
    if task_column is None:
        return list(task_names or [_DEFAULT_TASK])
    if task_names is not None:
        return list(task_names)
    feature = train.features[task_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = list(train[task_column])
    if all(isinstance(v, int) for v in values):
        return [str(i) for i in range(max(values, default=-1) + 1)]
    return list(dict.fromkeys(str(v) for v in values))  # first appearance


def _task_name(value: Any, feature: Any, task_column: str | None, task_names: Sequence[str] | None) -> str:
    """The task name of one raw task value (ClassLabel ids via their names; ints index `task_names`)."""
    if task_column is None:
        return task_names[0] if task_names else _DEFAULT_TASK
    if isinstance(feature, datasets.ClassLabel):
        return feature.int2str(int(value))
    if isinstance(value, int) and not isinstance(value, bool):
        if task_names is not None and 0 <= value < len(task_names):
            return task_names[value]
        return str(value)
    return str(value)


def _captions(values: Sequence[Any], clean: bool) -> list[str]:
    out: list[str] = []
    for value in values:
        items = [] if value is None else [value] if isinstance(value, str) else list(value)
        for text in items:
            text = clean_caption(text) if clean else " ".join(str(text).split())
            if text:
                out.append(text)
    return out


def _convert(
    ds: datasets.Dataset,
    split: str,
    *,
    image_column: str,
    caption_columns: list[str],
    task_column: str | None,
    task_names: Sequence[str] | None,
    image_id_column: str | None,
    features: datasets.Features,
    id_offset: int,
    clean: bool,
) -> datasets.Dataset:
    """One split in the shared schema (images are carried over untouched, never decoded)."""
    wanted = [image_column, *caption_columns, task_column, image_id_column]
    missing = [c for c in wanted if c is not None and c not in ds.column_names]
    if missing:
        raise ValueError(f"Column(s) {missing} not found in split {split!r}; available columns: {ds.column_names}.")
    task_feature = ds.features[task_column] if task_column is not None else None
    label = features["task"]
    inputs = [c for c in [*caption_columns, task_column, image_id_column] if c is not None]
    n_captions = len(caption_columns)

    def convert(*columns_and_indices):
        *columns, indices = columns_and_indices
        captions = [_captions(row, clean) for row in zip(*columns[:n_captions])]
        rest = columns[n_captions:]
        raw_tasks = rest.pop(0) if task_column is not None else [None] * len(indices)
        tasks = []
        for value in raw_tasks:
            name = _task_name(value, task_feature, task_column, task_names)
            if name not in label.names:
                raise ValueError(f"Task {name!r} in split {split!r} is not one of the tasks {label.names}.")
            tasks.append(label.str2int(name))
        ids = [int(i) for i in rest[0]] if image_id_column is not None else [id_offset + i for i in indices]
        return {"captions": captions, "task": tasks, "image_id": ids}

    out_features = datasets.Features(
        {image_column: ds.features[image_column], **{k: features[k] for k in features if k != "image"}}
    )
    converted = ds.map(
        convert,
        batched=True,
        with_indices=True,
        input_columns=inputs,
        remove_columns=[c for c in ds.column_names if c != image_column],
        features=out_features,
        desc=f"Converting {split!r} to the continual schema",
    )
    if image_column != "image":
        converted = converted.rename_column(image_column, "image")
    if converted.features["image"] != features["image"]:
        converted = converted.cast_column("image", features["image"])
    converted = converted.select_columns(list(features))
    kept = converted.filter(lambda captions: len(captions) > 0, input_columns=["captions"])
    if len(kept) < len(converted):
        logger.warning("Split %r: dropped %d rows without a non-empty caption.", split, len(converted) - len(kept))
    return kept


def from_datasets(
    dataset_or_name: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
    *,
    image_column: str = "image",
    caption_column: str | Sequence[str] = "caption",
    task_column: str | None = "task",
    task_names: Sequence[str] | None = None,
    train_split: str = "train",
    eval_split: str = "validation",
    data_dir: str | None = None,
    image_id_column: str | None = None,
    eval_size: float | int | None = None,
    seed: int = 0,
    clean_captions: bool = False,
    load_kwargs: dict[str, Any] | None = None,
) -> datasets.DatasetDict:
    """Convert an image-caption dataset to the shared schema, with splits ``"train"`` and ``"validation"``.

    Args:
        dataset_or_name: a `DatasetDict`, a `Dataset` (taken as the training split), a Hub name or a local path
            (`load_dataset`; a folder written by `save_to_disk` is read with `load_from_disk`).
        image_column: column with images (an Image feature, or paths/bytes that are cast to one).
        caption_column: one column or a list of columns; each holds a caption string or a list of them. All are
            merged into the row's ``captions``; blank captions are removed and rows left without any are dropped.
        task_column: the task of each row (ClassLabel, int or string); None puts everything in one task.
        task_names: task order (see the module docstring); with an int column, the names of ids 0, 1, ...
        train_split, eval_split: source split names.
        data_dir: forwarded to `load_dataset`.
        image_id_column: column of integer image ids; without it ids are row numbers, training split first, so
            they are unique across the two splits.
        eval_size: when the source has no `eval_split`, hold out this fraction/number of training rows
            (stratified by task, `seed`) as the validation split.
        clean_captions: apply `clean_caption` (lower-case, no punctuation, at most 30 words); otherwise captions are
            only whitespace-normalised.
        load_kwargs: extra keyword arguments for `load_dataset` (e.g. ``{"name": ..., "revision": ...}``).

    Raises:
        ValueError: a missing split or column (the message lists what is available), a task value outside
            `task_names`, or a task without training rows ("empty task").
    """
    source = _load(dataset_or_name, data_dir, load_kwargs or {})
    if train_split not in source:
        raise ValueError(f"Split {train_split!r} not found; available splits: {list(source)}.")
    if eval_split not in source and eval_size is None:
        raise ValueError(
            f"Split {eval_split!r} not found (available splits: {list(source)}); pass `eval_size` to hold out part "
            f"of {train_split!r} instead."
        )
    caption_columns = [caption_column] if isinstance(caption_column, str) else list(caption_column)
    if not caption_columns:
        raise ValueError("`caption_column` must name at least one column.")
    train = source[train_split]
    if task_column is not None and task_column not in train.column_names:
        raise ValueError(
            f"Column {task_column!r} not found in split {train_split!r}; available columns: {train.column_names}."
        )
    features = continual_features(_task_order(train, task_column, task_names))
    kwargs = dict(
        image_column=image_column,
        caption_columns=caption_columns,
        task_column=task_column,
        task_names=task_names,
        image_id_column=image_id_column,
        features=features,
        clean=clean_captions,
    )
    out = datasets.DatasetDict({"train": _convert(train, train_split, id_offset=0, **kwargs)})
    _check_no_empty_task(out["train"], train_split)
    if eval_split in source:
        out["validation"] = _convert(source[eval_split], eval_split, id_offset=len(train), **kwargs)
    else:
        held_out = out["train"].train_test_split(test_size=eval_size, seed=seed, stratify_by_column="task")
        out = datasets.DatasetDict({"train": held_out["train"], "validation": held_out["test"]})
        _check_no_empty_task(out["train"], f"{train_split} after holding out eval_size={eval_size}")
    return out


def _check_no_empty_task(train: datasets.Dataset, split: str) -> None:
    names = train.features["task"].names
    counts = [0] * len(names)
    for task in train["task"]:
        counts[task] += 1
    empty = [name for name, n in zip(names, counts) if n == 0]
    if empty:
        raise ValueError(f"empty task(s) {empty}: no training rows in split {split!r}.")


def first_tasks(data: datasets.DatasetDict, num_tasks: int) -> datasets.DatasetDict:
    """Keep the first `num_tasks` tasks (in continual order) of every split; the ClassLabel is shortened to match."""
    names = data["train"].features["task"].names
    if not 1 <= num_tasks <= len(names):
        raise ValueError(f"`num_tasks` must be in [1, {len(names)}], got {num_tasks}.")
    if num_tasks == len(names):
        return data
    label = datasets.ClassLabel(names=names[:num_tasks])
    return datasets.DatasetDict(
        {
            split: ds.filter(lambda task: task < num_tasks, input_columns=["task"]).cast_column("task", label)
            for split, ds in data.items()
        }
    )
