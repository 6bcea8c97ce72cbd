"""The stage evaluator of continual retrieval, and the sharded encoder it shares with the trainer's task keys.

`RetrievalEvaluator.evaluate(stage)` builds one joint gallery of the validation data of tasks 0..stage and, for each
routing mode ("oracle": every sample with its true task; "auto": the method routes every sample), encodes the images
and the captions ONCE: each process encodes its shard, and the embeddings and the routes the method chose travel
back together in one gather (`encode_sharded`). Recall per task and routing accuracy come from those gathered
tensors, so an evaluation under N processes does the same tower forwards as under one.

A problem other than retrieval (e.g. grounding) brings its own evaluator object with the same
`evaluate(stage) -> dict` method (see `StageEvaluator`); the trainer's loop does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.preprocess import RetrievalCollator, caption_id, column_values, flatten_captions
from ..evaluation import per_task_recall, retrieval_recall
from ..report import retrieval_summary, stage_line
from ..tuner.routing import routing_accuracy
from .methods import ContinualMethod

TaskSelection = torch.Tensor | str | None  # per-sample task ids (oracle), "auto" (routed), None (prompt-free)


class StageEvaluator(Protocol):
    """What the trainer asks of a problem's evaluator (the seam a second problem plugs into).

    `evaluate(stage)`: the metrics after training `stage` (a JSON-able dict, kept in the checkpoint);
    `summarize(stages, schedule)`: the problem's part of the run's results dict (e.g. accuracy matrices and
    continual metrics), merged into results.json; `describe(entry, title)`: the line printed after each stage.
    """

    def evaluate(self, stage: int) -> dict[str, Any]: ...

    def summarize(self, stages: list[dict[str, Any]], schedule: list[list[int]]) -> dict[str, Any]: ...

    def describe(self, entry: dict[str, Any], title: str) -> str: ...


def encode_sharded(
    accelerator: Accelerator,
    method: ContinualMethod,
    modality: str,
    num_items: int,
    make_inputs: Callable[[list[int]], dict[str, torch.Tensor]],
    tasks: TaskSelection,
    *,
    batch_size: int,
    desc: str = "",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode items 0..num_items-1 with `method.encode`, sharded over processes; gather in item order.

    `make_inputs(positions)` returns the model inputs of those items (on any device). Returns the (num_items, D)
    float CPU embeddings and, when the method routed them (`tasks == "auto"`), the (num_items,) routed task ids,
    gathered together with the embeddings (no second pass). Accelerate pads a short last shard by wrapping around;
    such duplicates carry the position of a sample already encoded, so writing by position removes them.
    """
    loader = accelerator.prepare_data_loader(DataLoader(list(range(num_items)), batch_size=batch_size, shuffle=False))
    embeds_parts, route_parts, position_parts = [], [], []
    bar = tqdm(loader, desc=desc, disable=not (progress and accelerator.is_local_main_process), leave=False)
    for positions in bar:
        index = positions.tolist()
        inputs = {k: v.to(accelerator.device) for k, v in make_inputs(index).items()}
        selection = tasks[index].to(accelerator.device) if isinstance(tasks, torch.Tensor) else tasks
        with torch.no_grad(), accelerator.autocast():
            embeds, routes = method.encode(modality, inputs, selection)
        embeds_parts.append(embeds.float())
        if isinstance(tasks, str):
            if routes is None:
                raise RuntimeError(f"{type(method).__name__}.encode returned no routes for tasks={tasks!r}.")
            route_parts.append(routes.to(accelerator.device).long())
        position_parts.append(positions.to(accelerator.device))
    embeds = torch.cat(embeds_parts) if embeds_parts else torch.empty(0, 1, device=accelerator.device)
    positions = torch.cat(position_parts) if position_parts else torch.empty(0, dtype=torch.long,
                                                                             device=accelerator.device)
    has_routes = isinstance(tasks, str)  # the same on every process: they all take part in the same gathers
    columns = [embeds]
    if has_routes:
        routes = torch.cat(route_parts) if route_parts else torch.empty(0, dtype=torch.long, device=accelerator.device)
        columns.append(routes[:, None].to(embeds.dtype))  # task ids are small integers: exact in float32
    packed = torch.cat(columns, dim=1) if embeds.shape[0] else embeds.new_empty(0, embeds.shape[1] + has_routes)
    packed = accelerator.gather(accelerator.pad_across_processes(packed.contiguous(), dim=0))
    positions = accelerator.gather(accelerator.pad_across_processes(positions.contiguous(), dim=0, pad_index=-1))
    keep = positions >= 0
    result = packed.new_empty(num_items, packed.shape[-1])
    result[positions[keep].long()] = packed[keep]
    result = result.cpu()
    if has_routes:
        return result[:, :-1].contiguous(), result[:, -1].round().long()
    return result, None


class RetrievalEvaluator:
    """Recall of a joint image-caption gallery after each stage, per task, in each routing mode.

    Args:
        accelerator: the run's `Accelerator` (sharding, gathering, autocast).
        method: the continual method (`encode`, `uses_keys`).
        dataset: the evaluation split (columns image or pixel_values, captions, task).
        rows_by_task: the dataset rows of each task.
        collator: the evaluation `RetrievalCollator` (image processing, tokenisation).
        modes: routing modes to evaluate ("oracle", "auto"); "auto" only for methods with task keys.
        recall_ks: recall cut-offs.
        batch_size: encoding batch size per process.
        progress: show tqdm bars on the local main process.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        method: ContinualMethod,
        dataset: Any,
        rows_by_task: list[list[int]],
        collator: RetrievalCollator,
        *,
        modes: Sequence[str] = ("oracle", "auto"),
        recall_ks: Sequence[int] = (1, 5, 10),
        batch_size: int = 256,
        progress: bool = False,
    ):
        self.accelerator, self.method, self.dataset = accelerator, method, dataset
        self.rows_by_task, self.collator = rows_by_task, collator
        self.num_tasks = len(rows_by_task)
        self.modes = [m for m in modes if m == "oracle" or method.uses_keys]
        self.recall_ks, self.batch_size, self.progress = list(recall_ks), batch_size, progress

    def encode_images(self, rows: list[int], tasks: TaskSelection, desc: str = "") -> tuple[torch.Tensor, Any]:
        """Embeddings (and routes under "auto") of the images of dataset `rows`."""

        def inputs(index: list[int]) -> dict[str, torch.Tensor]:
            return {"pixel_values": self.collator.pixel_values(self.dataset.select([rows[i] for i in index]))}

        return self._encode("vision", len(rows), inputs, tasks, desc)

    def encode_texts(self, texts: list[str], tasks: TaskSelection, desc: str = "") -> tuple[torch.Tensor, Any]:
        """Embeddings (and routes under "auto") of `texts`."""

        def inputs(index: list[int]) -> dict[str, torch.Tensor]:
            encoded = self.collator.tokenize([texts[i] for i in index])
            return {k: encoded[k] for k in ("input_ids", "attention_mask")}

        return self._encode("text", len(texts), inputs, tasks, desc)

    def _encode(self, modality: str, n: int, inputs: Callable, tasks: TaskSelection, desc: str) -> tuple:
        return encode_sharded(self.accelerator, self.method, modality, n, inputs, tasks,
                              batch_size=self.batch_size, desc=desc, progress=self.progress)

    @torch.no_grad()
    def evaluate(self, stage: int) -> dict[str, Any]:
        """Joint gallery of the validation data of tasks 0..stage; recall per task (strict and caption-equal) in
        each routing mode, and routing accuracy under "auto"."""
        rows = [i for t in range(stage + 1) for i in self.rows_by_task[t]]
        subset = self.dataset.select(rows)
        texts, text_to_image, text_task = flatten_captions(subset)
        image_task = torch.as_tensor(column_values(subset, "task"))
        _, text_groups = torch.unique(torch.as_tensor([caption_id(t) for t in texts]), return_inverse=True)
        result: dict[str, Any] = {"stage": stage, "num_images": len(rows), "num_texts": len(texts)}
        for mode in self.modes:
            image_embeds, image_routes = self.encode_images(
                rows, image_task if mode == "oracle" else "auto", f"eval images ({mode})"
            )
            text_embeds, text_routes = self.encode_texts(
                texts, text_task if mode == "oracle" else "auto", f"eval captions ({mode})"
            )
            recall = retrieval_recall(image_embeds, text_embeds, text_to_image, ks=self.recall_ks,
                                      text_groups=text_groups)
            entry: dict[str, Any] = {}
            for variant, prefix in (("strict", ""), ("caption_equal", "caption_equal_")):
                per_task = per_task_recall(
                    recall[f"i2t_{prefix}hits"], recall[f"t2i_{prefix}hits"], image_task, text_task,
                    self.num_tasks, self.recall_ks,
                )
                entry[variant] = {"per_task": {int(k): v for k, v in per_task["per_task"].items()},
                                  "macro": per_task["macro"]}
            if mode == "auto":
                entry["routing"] = {
                    "image": routing_accuracy(image_routes, image_task, self.num_tasks),
                    "text": routing_accuracy(text_routes, text_task, self.num_tasks),
                }
            result[mode] = entry
        return result

    def summarize(self, stages: list[dict[str, Any]], schedule: list[list[int]]) -> dict[str, Any]:
        """Accuracy matrices, continual metrics and routing accuracy of every mode (`report.retrieval_summary`)."""
        return retrieval_summary(stages, self.modes, self.num_tasks, self.recall_ks, schedule)

    def describe(self, entry: dict[str, Any], title: str) -> str:
        return stage_line(entry, self.modes, title)
