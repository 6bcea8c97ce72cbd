"""Continual referring-expression grounding (REC) with LPI on an OWL-ViT / OWLv2 or Grounding DINO detector, in the
ContinualTrainer. What differs between detector families (candidates, score, loss, features) is in
`peft_lpi.continual.grounding_models`.

The pieces the trainer's seam asks of a second problem (see `peft_lpi.continual.trainer`):

- data: `prepare_grounding_dataset` turns a REC `DatasetDict` (the shared schema of `peft_lpi.data.grounding`) into
  what the trainer reads: a ``captions`` column (``[expression]``, used for the text keys) and ``target`` (the box
  as xyxy normalised by the image size, what OWL's ``pred_boxes`` are compared with);
- `GroundingCollator` (``data_collator=``): pixel values, one tokenised expression per image, the target boxes;
- `LPIGroundingMethod` (``method=``): the loss = the detector's grounding loss (OWL: `rec_loss`; Grounding DINO:
  its own) + LPI's alignment and task terms;
- `GroundingEvaluator` (``evaluator=``): Precision@k per task after each stage, oracle / auto / zero-shot.

Routing, as in the authors' grounding code: the task keys and the routing use the frozen backbone's IMAGE feature
only. The expression of a pair gets the task its image was routed to (OWL's text rows are expanded per image by the
tuner's ``task_ids``), so one pair never mixes two tasks' prompts. Text keys are still built (k-means of the
prompt-free expression features, cheap), because a task counts as keyed once both towers have keys; they are never
used to route here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.preprocess import PIXEL_VALUES, _to_rgb, column_values, image_size
from ..evaluation import stage_metrics
from ..evaluation.grounding import box_xyxy_to_cxcywh, rec_precision
from ..tuner.routing import routing_accuracy
from .grounding_loss import rec_predictions
from .grounding_models import MODEL_INPUTS, GroundingFamily, grounding_family
from .methods import LPIMethod
from .objective import LPIObjective, alignment_terms
from .similarity import cosine_similarity_matrix, task_similarity_from_names

__all__ = [
    "GROUNDING_MODES",
    "GroundingCollator",
    "GroundingEvaluator",
    "LPIGroundingMethod",
    "grounding_collator",
    "grounding_task_similarity",
    "owl_dual_encoder",
    "prepare_grounding_dataset",
]

GROUNDING_MODES = ("zero-shot", "oracle", "auto")


def owl_dual_encoder(model: nn.Module) -> nn.Module:
    """The CLIP-like dual encoder inside an OWL detector (``owlvit`` / ``owlv2``), through PEFT wrappers."""
    inner = model
    for _ in range(4):
        for root in ("owlvit", "owlv2"):
            sub = getattr(inner, root, None)
            if isinstance(sub, nn.Module):
                return sub
        inner = getattr(inner, "model", None) or getattr(inner, "base_model", None)
        if inner is None:
            break
    raise ValueError(f"{type(model).__name__} holds no OWL-ViT / OWLv2 detector ('owlvit' or 'owlv2' sub-model).")


def prepare_grounding_dataset(data: Any) -> Any:
    """Add ``captions`` (``[expression]``) and ``target`` (xyxy box / image size) to every split of a REC dataset.

    Image sizes come from the file headers (`image_size`); no image is decoded here."""
    import datasets

    def add(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        targets = []
        for image, box in zip(batch["image"], batch["box"]):
            width, height = image_size(image)
            targets.append([box[0] / width, box[1] / height, box[2] / width, box[3] / height])
        return {"captions": [[e] for e in batch["expression"]], "target": targets}

    def one(split: datasets.Dataset) -> datasets.Dataset:
        image_feature = split.features["image"]
        if isinstance(image_feature, datasets.Image):  # rows give {"path", "bytes"}: sizes from the file headers
            split = split.cast_column("image", datasets.Image(decode=False))
        features = split.features.copy()
        features["captions"] = datasets.Sequence(datasets.Value("string"))
        features["target"] = datasets.Sequence(datasets.Value("float32"), length=4)
        split = split.map(add, batched=True, features=features, desc="grounding targets")
        return split.cast_column("image", image_feature) if isinstance(image_feature, datasets.Image) else split

    return datasets.DatasetDict({name: one(split) for name, split in data.items()})


class GroundingCollator:
    """Rows -> ``pixel_values`` (B, 3, H, W) (and ``pixel_mask`` when the image processor pads, as Grounding DINO's
    does), ``input_ids`` / ``attention_mask`` (one expression per image: OWL's query rows), ``boxes`` (B, 4) cxcywh
    normalised (the loss), ``target`` (B, 4) xyxy normalised (the metric) and, when the rows carry one, ``task``
    (B,) each image's task (the joint baseline's per-image prompts).

    `text_format` rewrites each expression for the detector's tokenizer (Grounding DINO: ``"the red mug."``) and
    `min_length` pads the token batch to at least that many positions (additive text prompts need P + 1);
    `grounding_collator` sets both from the model.
    """

    def __init__(self, image_processor: Any, tokenizer: Any, max_length: int | None = None, *,
                 text_format: Callable[[str], str] | None = None, min_length: int | None = None):
        self.image_processor = getattr(image_processor, "image_processor", None) or image_processor
        self.tokenizer, self.max_length = tokenizer, max_length
        self.text_format, self.min_length = text_format, min_length

    def images(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """``pixel_values`` of the rows, and ``pixel_mask`` when the image processor returns one."""
        if rows and PIXEL_VALUES in rows[0]:
            return {"pixel_values": torch.stack([torch.as_tensor(row[PIXEL_VALUES]) for row in rows])}
        processed = self.image_processor(images=[_to_rgb(row["image"]) for row in rows], return_tensors="pt")
        out = {"pixel_values": torch.as_tensor(processed["pixel_values"])}
        if processed.get("pixel_mask") is not None:
            out["pixel_mask"] = torch.as_tensor(processed["pixel_mask"])
        return out

    def pixel_values(self, rows: Sequence[dict[str, Any]]) -> torch.Tensor:
        return self.images(rows)["pixel_values"]

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = list(rows)
        expressions = [row["expression"] for row in rows]
        if self.text_format is not None:
            expressions = [self.text_format(e) for e in expressions]
        text = self.tokenizer(
            expressions, padding=True, truncation=self.max_length is not None,
            max_length=self.max_length, return_tensors="pt",
        )
        input_ids, attention_mask = text["input_ids"], text["attention_mask"]
        short = 0 if self.min_length is None else self.min_length - input_ids.shape[1]
        if short > 0:  # padding positions: masked out of everything the detector reads
            input_ids = torch.nn.functional.pad(input_ids, (0, short), value=self.tokenizer.pad_token_id)
            attention_mask = torch.nn.functional.pad(attention_mask, (0, short), value=0)
        target = torch.tensor([list(row["target"]) for row in rows], dtype=torch.float32)
        batch = {
            **self.images(rows),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "boxes": box_xyxy_to_cxcywh(target),
            "target": target,
        }
        if rows and "task" in rows[0]:
            batch["task"] = torch.tensor([int(row["task"]) for row in rows], dtype=torch.long)
        return batch


def grounding_collator(model: nn.Module, image_processor: Any, tokenizer: Any) -> GroundingCollator:
    """The `GroundingCollator` for an LPI-wrapped detector: texts truncated to what its text tower reads (less
    the positions of shallow prompts), written and padded as its family needs (`grounding_models`)."""
    from ..data.preprocess import text_token_limit
    from ..tuner.shallow import text_prompt_positions

    family = grounding_family(model)
    limits = [v for v in (text_token_limit(model, tokenizer), family.max_text_length()) if v is not None]
    limit = min(limits) - text_prompt_positions(model) if limits else None
    overridden = type(family).format_expression is not GroundingFamily.format_expression
    text_format = family.format_expression if overridden else None
    if family.name == "owl":  # OWL takes several queries per image: rows grouped by image train in one forward
        from .grounding_batches import SceneQueryCollator

        return SceneQueryCollator(image_processor, tokenizer, max_length=limit, text_format=text_format,
                                  min_length=family.min_text_length())
    return GroundingCollator(image_processor, tokenizer, max_length=limit, text_format=text_format,
                             min_length=family.min_text_length())


@torch.no_grad()
def grounding_task_similarity(model: nn.Module, tokenizer: Any, names: Sequence[str]) -> torch.Tensor:
    """Task similarity from the task names with the frozen (prompt-free) text tower of the detector (detectors have
    no `get_text_features`, so the trainer's default cannot compute it): OWL's CLIP text tower; other families
    their `GroundingFamily.text_features` of the names written as expressions."""
    tuner = getattr(model, "base_model", None)
    context = tuner.prompts_disabled() if hasattr(tuner, "prompts_disabled") else torch.no_grad()
    family = grounding_family(model)
    with context:
        if family.name == "owl":
            return task_similarity_from_names(owl_dual_encoder(model), tokenizer, list(names), template="{}").cpu()
        if not names:
            raise ValueError("grounding_task_similarity needs at least one task name.")
        device = next(model.parameters()).device
        encoded = tokenizer([family.format_expression(n) for n in names], padding=True, return_tensors="pt")
        features = family.text_features(encoded["input_ids"].to(device), encoded["attention_mask"].to(device))
        return cosine_similarity_matrix(features.float()).cpu()


class LPIGroundingMethod(LPIMethod):
    """LPI for REC on a detector (OWL-ViT / OWLv2, Grounding DINO): per-task prompts in both towers, the detector's
    own boxes and scores.

    Loss of a batch of task t: the family's grounding loss (`grounding_models`; OWL: ``rec_loss``, box L1 + gIoU on
    the matched patch + cross-entropy over patches, see `grounding_loss`; Grounding DINO: the model's own loss) +
    ``align_weight * L_align`` (raw CP prompts of t) + ``task_weight * L_task`` (tasks 0..t), the last two exactly
    as `LPIObjective` computes them for retrieval. Keys and routing: the image feature only (module docstring);
    `encode` gives the frozen towers' features for the keys.
    """

    name = "lpi"

    def __init__(self, model: nn.Module, rec_kwargs: dict[str, Any] | None = None):
        super().__init__(model)
        self.rec_kwargs = dict(rec_kwargs or {})
        self.family = grounding_family(model)
        self.encoder = getattr(self.family, "encoder", None)  # OWL's CLIP-like model (None for other families)

    def setup(self, trainer: Any) -> None:
        similarity = trainer.task_similarity
        self.objective = LPIObjective(
            self.model, None if similarity is None else similarity.to(trainer.accelerator.device)
        )

    def training_loss(self, ddp_model: nn.Module, batch: dict[str, torch.Tensor], task: int) -> dict[str, torch.Tensor]:
        config = self.objective.config
        with self.tuner.reuse_prompts():
            terms = self.family.rec_terms(ddp_model, batch, task, self.rec_kwargs)
            zero = terms["rec"].new_zeros(())
            if config.align_weight > 0 and len(self.tuner.active_bank.modalities) == 2:
                raw = self.tuner.active_bank.task_raw_prompts(torch.tensor([task]))
                align = alignment_terms(config, raw["vision"][0], raw["text"][0])
                terms["align_layer"], terms["align_token"], terms["align"] = align["layer"], align["token"], align["total"]
            else:
                terms["align_layer"] = terms["align_token"] = terms["align"] = zero
            use_task = config.task_weight > 0 and self.objective.task_similarity is not None and task >= 1
            terms["task"] = self.objective.task_loss(task) if use_task else zero
        terms["loss"] = terms["rec"] + config.align_weight * terms["align"] + config.task_weight * terms["task"]
        return terms

    def detect(self, inputs: dict[str, torch.Tensor], tasks: torch.Tensor | None) -> Any:
        """The detector's outputs of a batch with each image's task (None: as the model is, e.g. inside
        `prompt_free`). The evaluator's one call into the model, so baselines can answer it."""
        return self.family.forward(self.model, inputs, task_ids=tasks)

    def candidates(self, outputs: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B, N) and cxcywh boxes (B, N, 4) of each pair's N candidates (the family's reading of `detect`)."""
        return self.family.candidates(outputs, batch)

    @torch.no_grad()
    def encode(self, modality: str, inputs: dict[str, torch.Tensor], tasks: torch.Tensor | str | None) -> tuple:
        """Prompt-free features of the detector's towers (task keys; `grounding_models`: OWL's projected features,
        Grounding DINO's pooled last Swin stage / BERT); under "auto" also the routed tasks.

        Prompted features are not defined for grounding (the detector's outputs are boxes and candidate scores)."""
        if tasks is not None and not isinstance(tasks, str):
            raise ValueError("LPIGroundingMethod.encode gives prompt-free features only (tasks=None or 'auto').")
        with self.tuner.prompts_disabled():
            features = self.family.tower_features(modality, inputs)
        return features, (self.route(modality, features) if tasks == "auto" else None)


class GroundingEvaluator:
    """REC Precision@k per task after each stage, over the validation pairs of tasks 0..stage.

    Modes: "zero-shot" (prompts off), "oracle" (each pair with its true task), "auto" (each image routed with the
    task keys on its prompt-free image feature; its expression gets the same task). Each process predicts its shard
    of the pairs; the top-k boxes, the routes and the pair positions come back in one gather.

    Args:
        accelerator, method: the run's Accelerator and `LPIGroundingMethod`.
        dataset: the validation split (after `prepare_grounding_dataset`); rows_by_task: its rows of each task.
        collator: a `GroundingCollator`; modes: subset of `GROUNDING_MODES`; ks: Precision cut-offs.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        method: LPIGroundingMethod,
        dataset: Any,
        rows_by_task: list[list[int]],
        collator: GroundingCollator,
        *,
        modes: Sequence[str] = GROUNDING_MODES,
        ks: Sequence[int] = (1, 5),
        batch_size: int = 256,
        progress: bool = False,
    ):
        unknown = [m for m in modes if m not in GROUNDING_MODES]
        if unknown:
            raise ValueError(f"Unknown grounding evaluation mode(s) {unknown}; choose from {GROUNDING_MODES}.")
        self.accelerator, self.method, self.dataset = accelerator, method, dataset
        self.rows_by_task, self.collator = rows_by_task, collator
        self.num_tasks = len(rows_by_task)
        self.modes = [m for m in modes if m != "auto" or method.uses_keys]
        self.ks, self.batch_size, self.progress = [int(k) for k in ks], batch_size, progress

    @torch.no_grad()
    def predict(self, rows: list[int], mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Top-k xyxy boxes (len(rows), k, 4) of dataset `rows` in `mode`, and the routed tasks under "auto"."""
        acc, method = self.accelerator, self.method
        model = method.model
        true_tasks = torch.as_tensor(column_values(self.dataset.select(rows), "task"))
        k = max(self.ks)
        loader = acc.prepare_data_loader(DataLoader(list(range(len(rows))), batch_size=self.batch_size))
        parts = []
        was_training = model.training
        model.eval()
        for positions in tqdm(loader, desc=f"eval ({mode})", leave=False,
                              disable=not (self.progress and acc.is_local_main_process)):
            index = positions.tolist()
            batch = self.collator([self.dataset[rows[i]] for i in index])
            inputs = {key: batch[key].to(acc.device) for key in MODEL_INPUTS if key in batch}
            routes = torch.full((len(index),), -1, dtype=torch.long, device=acc.device)
            with acc.autocast():
                if mode == "zero-shot":
                    with method.prompt_free():
                        out = method.detect(inputs, None)
                else:
                    if mode == "auto":
                        images = {key: inputs[key] for key in ("pixel_values", "pixel_mask") if key in inputs}
                        routes = method.encode("vision", images, "auto")[1]
                        tasks = routes.to(acc.device).long()
                    else:
                        tasks = true_tasks[index].to(acc.device)
                    out = method.detect(inputs, tasks)
            logits, boxes = method.candidates(out, inputs)
            top, _ = rec_predictions(logits.float(), boxes.float(), top_k=k)
            top = torch.nn.functional.pad(top, (0, 0, 0, k - top.shape[1]), value=0.0) if top.shape[1] < k else top
            parts.append(torch.cat([top.reshape(len(index), -1), routes[:, None].float(),
                                    positions.to(acc.device)[:, None].float()], dim=1))
        model.train(was_training)
        width = 4 * k + 2
        packed = torch.cat(parts) if parts else torch.empty(0, width, device=acc.device)
        packed = acc.gather(acc.pad_across_processes(packed.contiguous(), dim=0, pad_index=-1))
        packed = packed[packed[:, -1] >= 0].cpu()  # padding rows carry position -1; wrap-around duplicates overwrite
        result = torch.empty(len(rows), width)
        result[packed[:, -1].round().long()] = packed
        boxes = result[:, : 4 * k].reshape(len(rows), k, 4)
        return boxes, (result[:, -2].round().long() if mode == "auto" else None)

    @torch.no_grad()
    def evaluate(self, stage: int) -> dict[str, Any]:
        """Precision@k per task of tasks 0..stage in each mode; routing accuracy (image) under "auto"."""
        rows = [i for t in range(stage + 1) for i in self.rows_by_task[t]]
        subset = self.dataset.select(rows)
        tasks = torch.as_tensor(column_values(subset, "task"))
        target = torch.tensor(column_values(subset, "target"), dtype=torch.float32)
        result: dict[str, Any] = {"stage": stage, "num_pairs": len(rows)}
        for mode in self.modes:
            boxes, routes = self.predict(rows, mode)
            precision = rec_precision(boxes, target, tasks=tasks, num_tasks=self.num_tasks, ks=self.ks)
            entry: dict[str, Any] = {"per_task": {int(t): v for t, v in precision["per_task"].items()},
                                     "macro": precision["macro"], "overall": {f"P@{k}": precision[f"P@{k}"]
                                                                              for k in self.ks}}
            if routes is not None:
                entry["routing"] = {"image": routing_accuracy(routes, tasks, self.num_tasks)}
            result[mode] = entry
        return result

    def summarize(self, stages: list[dict[str, Any]], schedule: list[list[int]]) -> dict[str, Any]:
        """{"grounding": {mode: {"matrices": {"P@k": P[stage][task]}, "summary": continual metrics per key,
        "routing_accuracy": image routing accuracy per stage (auto)}}, "problem": "grounding"}."""
        out: dict[str, Any] = {}
        for mode in self.modes:
            matrices = {}
            # a checkpoint's JSON turns the int task keys into strings: read both
            per_task = [{int(t): v for t, v in e[mode]["per_task"].items()} for e in stages]
            for k in self.ks:
                key = f"P@{k}"
                matrices[key] = [[p[t][key] if t in p else math.nan for t in range(self.num_tasks)] for p in per_task]
            block: dict[str, Any] = {
                "matrices": matrices,
                "summary": {key: stage_metrics(m, schedule) for key, m in matrices.items()} if stages else {},
            }
            if mode == "auto":
                block["routing_accuracy"] = [e[mode]["routing"]["image"]["accuracy"] for e in stages]
            out[mode] = block
        return {"problem": "grounding", "grounding": out}

    def describe(self, entry: dict[str, Any], title: str) -> str:
        parts = []
        for mode in self.modes:
            parts.append(f"{mode}: P@1 {entry[mode]['macro']['P@1']:.1f}")
            if "routing" in entry[mode]:
                parts.append(f"routing img {100 * entry[mode]['routing']['image']['accuracy']:.1f}%")
        return f"[after task {title}] " + " | ".join(parts)
