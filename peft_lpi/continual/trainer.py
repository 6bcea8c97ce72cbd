"""`ContinualTrainer`: trains an LPI adapter task after task with Accelerate, builds task keys, evaluates retrieval
after every task, checkpoints atomically and resumes.

The loop reads top to bottom in `train()` -> `_train_task()` -> `_training_step()`; evaluation is `evaluate_stage()`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..data.preprocess import RetrievalCollator, column_values, flatten_captions, with_pixel_values
from ..evaluation import continual_metrics, per_task_recall, retrieval_recall
from ..io import CheckpointError, atomic_directory, recover_directory
from ..tuner.routing import routing_accuracy
from ..tuner.shallow import text_prompt_positions
from .methods import ContinualMethod, LPIMethod
from .similarity import task_similarity_from_captions, task_similarity_from_names

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.json"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class ContinualTrainingArguments:
    """Settings of a continual run. Defaults follow the authors' COCO protocol (docs/method.md)."""

    output_dir: str = field(default="outputs/lpi", metadata={"help": "Folder for checkpoints, results and plots."})
    epochs: int = field(default=10, metadata={"help": "Epochs per task."})
    max_steps_per_task: int | None = field(default=None, metadata={"help": "Cap on optimiser steps per task."})
    batch_size: int = field(default=64, metadata={"help": "Training batch size per process."})
    eval_batch_size: int = field(default=256, metadata={"help": "Encoding batch size at evaluation."})
    optimizer: str = field(default="sgd", metadata={"help": "'sgd' (momentum, reference) or 'adamw'."})
    learning_rate: float = field(default=0.05, metadata={"help": "Peak learning rate (reference: 0.05 with SGD)."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    weight_decay: float = field(default=2e-4, metadata={"help": "Weight decay."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps of the cosine schedule (per task)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping norm (0 or None: off)."})
    mixed_precision: str | None = field(
        default=None,
        metadata={"help": "'no', 'fp16' or 'bf16' (autocast; factors stay fp32). None: what `accelerate launch` says."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, data order and caption choice."})
    checkpoint_every: int = field(default=0, metadata={"help": "Also checkpoint every N optimiser steps (0: per task)."})
    resume: bool = field(default=False, metadata={"help": "Continue from output_dir/checkpoint if it exists."})
    eval_routing: list[str] = field(
        default_factory=lambda: ["oracle", "auto"], metadata={"help": "Routing modes to evaluate: oracle, auto."}
    )
    recall_ks: list[int] = field(default_factory=lambda: [1, 5, 10], metadata={"help": "Recall cut-offs."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers."})
    preprocess_images: bool = field(
        default=False,
        metadata={"help": "Run the image processor once over both splits (datasets.map) and keep the pixel values, "
                  "instead of decoding and processing every image at every epoch and evaluation. For small images "
                  "(the offline world); not for COCO at 224 px (600 KB per image)."},
    )
    kmeans_seed: int = field(default=0, metadata={"help": "Seed of the task-key k-means."})
    similarity_source: str = field(
        default="names", metadata={"help": "Task similarity from 'names' (task names) or 'captions' (mean embeds)."}
    )
    name_template: str = field(default="{}", metadata={"help": "Template wrapping a task name before encoding."})
    progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars (main process only)."})
    log_with: str | None = field(default=None, metadata={"help": "Accelerate tracker (tensorboard, wandb, ...)."})


@dataclass
class TrainerState:
    """What a checkpoint must remember to resume exactly."""

    task: int = 0  # task being trained (or next to train when step == 0 and epoch == 0)
    epoch: int = 0
    step_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    optimizer_steps: int = 0  # optimiser steps done in `task`
    global_step: int = 0
    stages: list[dict[str, Any]] = field(default_factory=list)  # evaluation after each finished task
    train_seconds: list[float] = field(default_factory=list)
    peak_memory_mb: list[float] = field(default_factory=list)  # after each stage's training (see _peak_memory_mb)


class ContinualTrainer:
    """Trains a continual method (LPI by default) task after task on a `DatasetDict`.

    The dataset schema: image, captions, task (a ClassLabel in task order), image_id.

    Args:
        model: a PeftModel with an LPI adapter (`get_peft_model(base, LPIConfig(num_tasks=T, ...))`).
        tokenizer / image_processor: the backbone's own preprocessing.
        dataset: `DatasetDict` with "train" and "validation" splits; `task` is a ClassLabel in task order.
        args: `ContinualTrainingArguments`.
        task_similarity: optional user (T, T) matrix; else computed with the frozen text encoder.
        accelerator: an `Accelerator`; created from `args` when None.
        method: the continual method (default: `LPIMethod(model)`); baselines live in `peft_lpi.continual.baselines`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        image_processor: Any,
        dataset: Any,
        args: ContinualTrainingArguments,
        task_similarity: torch.Tensor | None = None,
        accelerator: Accelerator | None = None,
        method: ContinualMethod | None = None,
    ):
        if args.similarity_source not in ("names", "captions"):
            raise ValueError(f"similarity_source must be 'names' or 'captions', got {args.similarity_source!r}.")
        self.args = args
        self.accelerator = accelerator or Accelerator(
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with=args.log_with,
        )
        self.model = model
        self.method = method or LPIMethod(model)
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.train_set, self.eval_set = dataset["train"], dataset["validation"]
        if args.preprocess_images:
            self.train_set = with_pixel_values(self.train_set, image_processor)
            self.eval_set = with_pixel_values(self.eval_set, image_processor)
        self.task_names: list[str] = list(self.train_set.features["task"].names)
        self.num_tasks = len(self.task_names)
        tuner = getattr(model, "base_model", None)
        if hasattr(tuner, "lpi_prompts") and self.method.uses_keys and tuner.num_tasks < self.num_tasks:
            raise ValueError(
                f"The adapter has {tuner.num_tasks} tasks but the dataset has {self.num_tasks}: create it with "
                f"LPIConfig(num_tasks={self.num_tasks}) or call add_task()."
            )
        if hasattr(tuner, "lpi_prompts") and self.method.uses_keys:
            tuner.active_config.task_names = list(self.task_names)  # saved with the adapter, shown in model cards
        self.train_indices = self._indices_by_task(self.train_set, "train")
        self.eval_indices = self._indices_by_task(self.eval_set, "validation")
        self.output_dir = Path(args.output_dir)
        self.checkpoint_dir = self.output_dir / CHECKPOINT_DIR
        self.model.to(self.accelerator.device)
        limit = _text_token_limit(model, tokenizer)  # longer captions are truncated with a warning, never a crash
        if limit is not None:  # injection="shallow" puts P prompts into every token sequence
            limit -= text_prompt_positions(model)
        self.collator = RetrievalCollator(image_processor, tokenizer, train=True, seed=args.seed, max_length=limit)
        self.eval_collator = RetrievalCollator(image_processor, tokenizer, train=False, seed=args.seed, max_length=limit)
        self.task_similarity = task_similarity
        self.state = TrainerState()

    # ------------------------------------------------------------------ data
    def _indices_by_task(self, split: Any, name: str) -> list[list[int]]:
        tasks = torch.as_tensor(column_values(split, "task"))
        indices = [torch.nonzero(tasks == t).flatten().tolist() for t in range(self.num_tasks)]
        for t, rows in enumerate(indices):
            if not rows:
                raise ValueError(f"Task {t} ({self.task_names[t]!r}) has no {name} samples: every task needs data.")
        return indices

    def _train_loader(self, task: int, epoch: int) -> DataLoader:
        """A seeded permutation of the task's rows for this epoch, sharded over processes by Accelerate."""
        generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + _task_ids(task)[0] * 1_009 + epoch)
        rows = [i for t in _task_ids(task) for i in self.train_indices[t]]
        order = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
        self.collator.set_epoch(epoch)
        loader = DataLoader(
            Subset(self.train_set, order),
            batch_size=self.args.batch_size,
            shuffle=False,
            collate_fn=self.collator,
            num_workers=self.args.num_workers,
            drop_last=len(order) >= self.args.batch_size * self.accelerator.num_processes,
        )
        return self.accelerator.prepare_data_loader(loader)

    def _steps_per_epoch(self, task: int) -> int:
        per_step = self.args.batch_size * self.accelerator.num_processes
        batches = max(sum(len(self.train_indices[t]) for t in _task_ids(task)) // per_step, 1)
        return math.ceil(batches / self.args.gradient_accumulation_steps)

    # ------------------------------------------------------------------ the run
    def train(self) -> dict[str, Any]:
        """Train every task in order (resuming when asked); returns the results dict (also written to disk)."""
        args, acc = self.args, self.accelerator
        set_seed(args.seed)
        if args.resume and acc.is_main_process:
            recover_directory(self.checkpoint_dir)  # a kill between the two renames of a checkpoint swap
        acc.wait_for_everyone()
        if args.resume and self.checkpoint_dir.exists():
            self._load_checkpoint()
        if self.task_similarity is None:
            self.task_similarity = self._compute_task_similarity()
        self.method.setup(self)
        if args.log_with:
            acc.init_trackers("peft_lpi", config={k: str(v) for k, v in asdict(args).items()})
        schedule = self.method.schedule(self.num_tasks)  # [[0], [1], ...] unless the method groups tasks (joint)
        for task in range(self.state.task, len(schedule)):  # `task` indexes stages (= tasks for continual methods)
            if self.state.task == task and len(self.state.stages) > task:
                continue  # finished before the interruption
            group = schedule[task]
            started = time.perf_counter()
            if self.method.trains:
                self._train_task(group[0] if len(group) == 1 else group)
            for t in group:
                self.method.finish_task(t)
            self.state.train_seconds.append(time.perf_counter() - started)
            self.state.peak_memory_mb.append(self._peak_memory_mb())
            if self.method.uses_keys:
                for t in group:
                    self._build_task_keys(t)
            self.state.stages.append(self.evaluate_stage(max(group)))
            self.state.task, self.state.epoch, self.state.step_in_epoch, self.state.optimizer_steps = task + 1, 0, 0, 0
            self._save_checkpoint()
            if acc.is_main_process:
                self._print_stage(task)
        results = self.results()
        self.model.lpi_run_results = results  # used by model.push_to_hub (peft_lpi.hub) for the model card
        if acc.is_main_process:
            from ..report import write_report

            write_report(results, self.output_dir, model=self.model)
        acc.wait_for_everyone()
        acc.end_training()
        return results

    def _compute_task_similarity(self) -> torch.Tensor:
        """Task semantic similarity with the frozen (prompt-free) text encoder, as docs/method.md prescribes."""
        with self.method.prompt_free():
            if self.args.similarity_source == "captions":
                all_captions = column_values(self.train_set, "captions")
                captions = [[c for i in rows[:200] for c in all_captions[i][:1]] for rows in self.train_indices]
                return task_similarity_from_captions(self.model, self.tokenizer, captions).cpu()
            names = [self.args.name_template.format(n) for n in self.task_names]
            return task_similarity_from_names(self.model, self.tokenizer, names, template="{}").cpu()

    def _make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        a = self.args
        if a.optimizer == "sgd":
            return torch.optim.SGD(params, lr=a.learning_rate, momentum=a.momentum, weight_decay=a.weight_decay)
        if a.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=a.learning_rate, weight_decay=a.weight_decay)
        raise ValueError(f"Unknown optimizer {a.optimizer!r}; use 'sgd' or 'adamw'.")

    def _train_task(self, task: int) -> None:
        args, acc = self.args, self.accelerator
        params = self.method.parameters_for_task(task)
        total_steps = self._steps_per_epoch(task) * args.epochs
        if args.max_steps_per_task is not None:
            total_steps = min(total_steps, args.max_steps_per_task * len(_task_ids(task)))
        optimizer = self._make_optimizer(params)
        scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, max(total_steps, 1))
        if self._resume_optimizer is not None:
            optimizer.load_state_dict(self._resume_optimizer["optimizer"])
            scheduler.load_state_dict(self._resume_optimizer["scheduler"])
            self._resume_optimizer = None
        # DDP records which parameters train when it wraps the model, so the model is (re)prepared per task.
        ddp_model, optimizer = acc.prepare(self.model, optimizer)
        ddp_model.eval()  # the backbone is frozen: no dropout noise in it (prompt tuning convention)
        bar = tqdm(
            total=total_steps, initial=self.state.optimizer_steps,
            desc=f"task {task} {'+'.join(self.task_names[t] for t in _task_ids(task))}",
            disable=not (args.progress and acc.is_local_main_process), dynamic_ncols=True,
        )
        while self.state.optimizer_steps < total_steps and self.state.epoch < args.epochs:
            loader = self._train_loader(task, self.state.epoch)
            if self.state.step_in_epoch:
                loader = acc.skip_first_batches(loader, self.state.step_in_epoch)
            for batch in loader:
                with acc.accumulate(ddp_model):
                    terms = self._training_step(ddp_model, batch, task)
                    if acc.sync_gradients and args.max_grad_norm:
                        acc.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                self.state.step_in_epoch += 1
                if acc.sync_gradients:
                    scheduler.step()
                    self.state.optimizer_steps += 1
                    self.state.global_step += 1
                    logs = {f"train/{k}": v.item() for k, v in terms.items()}
                    logs["train/lr"] = scheduler.get_last_lr()[0]
                    if args.log_with:
                        acc.log(logs, step=self.state.global_step)
                    bar.set_postfix(loss=f"{logs['train/loss']:.3f}", refresh=False)
                    bar.update(1)
                    if args.checkpoint_every and self.state.optimizer_steps % args.checkpoint_every == 0:
                        self._save_checkpoint(optimizer, scheduler)
                    if self.state.optimizer_steps >= total_steps:
                        break
            else:
                self.state.epoch += 1
                self.state.step_in_epoch = 0
                continue
            break
        bar.close()
        self.model = acc.unwrap_model(ddp_model)
        acc.free_memory()  # drop the per-task DDP wrapper and optimizer references

    def _training_step(self, ddp_model: torch.nn.Module, batch: dict[str, torch.Tensor], task: int) -> dict:
        """One micro-batch: forward both towers with task `task`'s prompts, the LPI loss, backward."""
        with self.accelerator.autocast():
            terms = self.method.training_loss(ddp_model, batch, task)
        loss = terms["loss"]
        if not torch.isfinite(loss.detach()):
            raise TrainingDivergedError(
                f"The loss became {loss.item()} at task {task}, optimiser step {self.state.optimizer_steps + 1} "
                f"(global step {self.state.global_step + 1}); terms: "
                f"{ {k: round(v.item(), 4) for k, v in terms.items()} }. The last good checkpoint in "
                f"{self.checkpoint_dir} is kept; lower the learning rate or use fp32."
            )
        self.accelerator.backward(loss)
        return {k: v.detach() for k, v in terms.items()}

    def _peak_memory_mb(self) -> float:
        """Peak memory of the stage in MiB: on CUDA `torch.cuda.max_memory_allocated` (reset after each reading, so
        per stage); on CPU the process RSS high-water mark (`ru_maxrss`, never reset: the run's peak so far)."""
        if self.accelerator.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.accelerator.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.accelerator.device)
            return peak
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10

    # ------------------------------------------------------------------ keys and encoding
    def _encode(
        self, split: Any, rows: list[int], modality: str, task_ids: torch.Tensor | str | None, desc: str
    ) -> torch.Tensor:
        """Embeddings of the images (or all captions) of `rows`, sharded over processes and gathered in order.

        task_ids: per-sample true tasks (oracle), "auto", or None (prompt-free features).
        """
        acc, bs = self.accelerator, self.args.eval_batch_size
        if modality == "vision":
            items: list[Any] = rows
        else:
            texts, _, _ = flatten_captions(split.select(rows))
            items = texts
        positions = list(range(len(items)))
        loader = acc.prepare_data_loader(DataLoader(positions, batch_size=bs, shuffle=False))
        outputs, order = [], []
        for positions_batch in tqdm(loader, desc=desc, disable=not (self.args.progress and acc.is_local_main_process),
                                    leave=False):
            index = positions_batch.tolist()
            if modality == "vision":
                rows_batch = split.select([items[i] for i in index])
                inputs = {"pixel_values": self.eval_collator.pixel_values(rows_batch).to(acc.device)}
            else:
                inputs = self._text_inputs([items[i] for i in index])
            embeds = self._embed(modality, inputs, task_ids, index)
            outputs.append(embeds)
            order.append(positions_batch.to(acc.device))
        return self._gather_in_order(outputs, order, len(items))

    def _gather_in_order(self, outputs: list[torch.Tensor], order: list[torch.Tensor], total: int) -> torch.Tensor:
        """Gather every process's embeddings and put them back in dataset order.

        Accelerate pads a short last shard by wrapping around; such duplicates carry the position of a sample
        already encoded, so writing by position removes them whatever the padding was.
        """
        acc = self.accelerator
        embeds = torch.cat(outputs) if outputs else torch.empty(0, 1, device=acc.device)
        positions = torch.cat(order) if order else torch.empty(0, dtype=torch.long, device=acc.device)
        embeds = acc.gather(acc.pad_across_processes(embeds.contiguous(), dim=0))
        positions = acc.gather(acc.pad_across_processes(positions.contiguous(), dim=0, pad_index=-1))
        keep = positions >= 0
        result = embeds.new_empty(total, embeds.shape[-1])
        result[positions[keep].long()] = embeds[keep]
        return result.float().cpu()

    def _text_inputs(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.eval_collator.tokenize(texts)
        return {k: encoded[k].to(self.accelerator.device) for k in ("input_ids", "attention_mask")}

    @torch.no_grad()
    def _embed(self, modality: str, inputs: dict, task_ids: torch.Tensor | str | None, index: list[int]) -> torch.Tensor:
        if isinstance(task_ids, torch.Tensor):
            task_ids = task_ids[index].to(self.accelerator.device)
        with self.accelerator.autocast():
            embeds, routes = self.method.encode(modality, inputs, task_ids)
        if routes is not None:
            self._last_routes.append(routes.cpu())
        return embeds.float()

    def _feature_chunks(self, task: int, modality: str) -> Callable[[], Iterator[torch.Tensor]]:
        features = self._encode(self.train_set, self.train_indices[task], modality, None, f"keys {modality}")

        def chunks() -> Iterator[torch.Tensor]:
            yield from features.split(8192)

        return chunks

    def _build_task_keys(self, task: int) -> None:
        """k-means keys of the task's prompt-free training features (images and captions independently)."""
        self.method.build_keys(
            task, self._feature_chunks(task, "vision"), self._feature_chunks(task, "text"), self.args.kmeans_seed
        )

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate_stage(self, stage: int) -> dict[str, Any]:
        """Joint gallery of the validation data of tasks 0..stage; recall per task in each routing mode."""
        rows = [i for t in range(stage + 1) for i in self.eval_indices[t]]
        subset = self.eval_set.select(rows)
        texts, text_to_image, text_task = flatten_captions(subset)
        image_task = torch.as_tensor(column_values(subset, "task"))
        text_task = torch.as_tensor(text_task)
        groups = torch.as_tensor([hash_text(t) for t in texts])
        _, group_ids = torch.unique(groups, return_inverse=True)
        result: dict[str, Any] = {"stage": stage, "num_images": len(rows), "num_texts": len(texts)}
        for mode in self.eval_modes:
            self._last_routes = []
            image_sel = image_task if mode == "oracle" else "auto"
            image_embeds = self._encode(self.eval_set, rows, "vision", image_sel, f"eval images ({mode})")
            image_routes = torch.cat(self._last_routes) if mode == "auto" and self._last_routes else None
            self._last_routes = []
            text_sel = text_task if mode == "oracle" else "auto"
            text_embeds = self._encode_texts(texts, text_sel, f"eval captions ({mode})")
            text_routes = torch.cat(self._last_routes) if mode == "auto" and self._last_routes else None
            recall = retrieval_recall(
                image_embeds, text_embeds, torch.as_tensor(text_to_image), ks=self.args.recall_ks,
                text_groups=group_ids,
            )
            entry: dict[str, Any] = {}
            for variant, prefix in (("strict", ""), ("caption_equal", "caption_equal_")):
                per_task = per_task_recall(
                    recall[f"i2t_{prefix}hits"], recall[f"t2i_{prefix}hits"], image_task, text_task,
                    self.num_tasks, self.args.recall_ks,
                )
                entry[variant] = {"per_task": {int(k): v for k, v in per_task["per_task"].items()},
                                  "macro": per_task["macro"]}
            if mode == "auto" and image_routes is not None and self.accelerator.num_processes == 1:
                entry["routing"] = {
                    "image": routing_accuracy(image_routes, image_task, self.num_tasks),
                    "text": routing_accuracy(text_routes, text_task, self.num_tasks),
                }
            elif mode == "auto":
                entry["routing"] = self._routing_from_embeddings(image_task, text_task, rows, texts)
            result[mode] = entry
        return result

    @property
    def eval_modes(self) -> list[str]:
        """Routing modes evaluated: "auto" only for methods with task keys."""
        return [m for m in self.args.eval_routing if m == "oracle" or self.method.uses_keys]

    def _encode_texts(self, texts: list[str], task_ids: torch.Tensor | str | None, desc: str) -> torch.Tensor:
        acc, bs = self.accelerator, self.args.eval_batch_size
        loader = acc.prepare_data_loader(DataLoader(list(range(len(texts))), batch_size=bs, shuffle=False))
        outputs, order = [], []
        for positions in tqdm(loader, desc=desc, disable=not (self.args.progress and acc.is_local_main_process),
                              leave=False):
            index = positions.tolist()
            inputs = self._text_inputs([texts[i] for i in index])
            outputs.append(self._embed("text", inputs, task_ids, index))
            order.append(positions.to(acc.device))
        return self._gather_in_order(outputs, order, len(texts))

    def _routing_from_embeddings(self, image_task: torch.Tensor, text_task: torch.Tensor, rows: list[int],
                                 texts: list[str]) -> dict[str, Any]:
        """Routing accuracy recomputed from gathered prompt-free features (used under several processes)."""
        images = self._encode(self.eval_set, rows, "vision", None, "routing images")
        captions = self._encode_texts(texts, None, "routing captions")
        return {
            "image": routing_accuracy(self.method.route("vision", images.to(self.accelerator.device)).cpu(),
                                      image_task, self.num_tasks),
            "text": routing_accuracy(self.method.route("text", captions.to(self.accelerator.device)).cpu(),
                                     text_task, self.num_tasks),
        }

    def _print_stage(self, stage: int) -> None:
        entry = self.state.stages[stage]
        parts = []
        for mode in self.eval_modes:
            macro = entry[mode]["strict"]["macro"]
            parts.append(f"{mode}: i2t R@1 {macro['i2t_R@1']:.1f} t2i R@1 {macro['t2i_R@1']:.1f}")
            if "routing" in entry[mode]:
                parts.append(f"routing img {100 * entry[mode]['routing']['image']['accuracy']:.1f}%")
        tqdm.write(f"[after task {stage} {self.task_names[stage]}] " + " | ".join(parts))

    # ------------------------------------------------------------------ results
    def accuracy_matrix(self, mode: str, key: str, variant: str = "strict") -> list[list[float]]:
        """R[stage][task] of one metric key (e.g. 'i2t_R@1'), NaN for tasks not yet seen."""
        matrix = []
        for entry in self.state.stages:
            per_task = entry[mode][variant]["per_task"]
            matrix.append([per_task[t][key] if t in per_task else float("nan") for t in range(self.num_tasks)])
        return matrix

    def results(self) -> dict[str, Any]:
        ks = self.args.recall_ks
        keys = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in ks] + ["rmean"]
        results: dict[str, Any] = {
            "task_names": self.task_names,
            "task_similarity": self.task_similarity.tolist() if self.task_similarity is not None else None,
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.args).items()},
            "method": self.method.name,
            "peft_config": _peft_config_dict(self.model),
            "trainable_parameters_per_task": self.method.trainable_parameters_per_task(),
            "train_seconds_per_task": self.state.train_seconds,
            "peak_memory_mb_per_task": self.state.peak_memory_mb,
            "peak_memory_source": "cuda_max_memory_allocated" if self.accelerator.device.type == "cuda"
            else "process_ru_maxrss",
            "schedule": self.method.schedule(self.num_tasks),
            "num_processes": self.accelerator.num_processes,
            "modes": {},
        }
        for mode in self.eval_modes:
            mode_results: dict[str, Any] = {}
            for variant in ("strict", "caption_equal"):
                matrices = {key: self.accuracy_matrix(mode, key, variant) for key in keys}
                summary = {key: _summary(m, results["schedule"]) for key, m in matrices.items()} if matrices else {}
                mode_results[variant] = {"matrices": matrices, "summary": summary}
            if mode == "auto":
                mode_results["routing_accuracy"] = [
                    {"image": e[mode]["routing"]["image"]["accuracy"], "text": e[mode]["routing"]["text"]["accuracy"]}
                    for e in self.state.stages
                ]
            results["modes"][mode] = mode_results
        return _jsonable(results)

    # ------------------------------------------------------------------ checkpoints
    _resume_optimizer: dict[str, Any] | None = None

    def _save_checkpoint(self, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None) -> None:
        """Atomically replace output_dir/checkpoint: adapter (all tasks + keys), optimizer, scheduler, state."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            with atomic_directory(self.checkpoint_dir) as tmp:
                self.method.save_adapter(tmp)
                if optimizer is not None:
                    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                               tmp / "optimizer.pt")
                state = asdict(self.state)
                state["task_similarity"] = self.task_similarity.tolist() if self.task_similarity is not None else None
                (tmp / STATE_FILE).write_text(json.dumps(_jsonable(state)))
        acc.wait_for_everyone()

    def _load_checkpoint(self) -> None:
        path = self.checkpoint_dir
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise CheckpointError(f"{path} has no {STATE_FILE}: not a ContinualTrainer checkpoint.")
        self.method.load_adapter(path)
        raw = json.loads(state_file.read_text())
        similarity = raw.pop("task_similarity", None)
        if similarity is not None and self.task_similarity is None:
            self.task_similarity = torch.tensor(similarity)
        stages = raw.pop("stages")
        self.state = TrainerState(**raw, stages=[_restore_int_keys(s) for s in stages])
        optimizer_file = path / "optimizer.pt"
        if optimizer_file.is_file() and (self.state.optimizer_steps or self.state.step_in_epoch):
            self._resume_optimizer = torch.load(optimizer_file, map_location="cpu", weights_only=False)


def _task_ids(task: int | list[int]) -> list[int]:
    """A stage's tasks: the trainer passes an int for a one-task stage, a list for a multi-task stage (joint)."""
    return [task] if isinstance(task, int) else list(task)


def _summary(matrix: list[list[float]], schedule: list[list[int]]) -> dict[str, float]:
    if all(group == [t] for t, group in enumerate(schedule)):
        return continual_metrics(torch.tensor(matrix))
    from .baselines import grouped_continual_metrics  # stages of several tasks (joint): learned-at from the schedule

    return grouped_continual_metrics(matrix, schedule)


def _peft_config_dict(model: Any) -> dict[str, Any] | None:
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    return {name: config.to_dict() for name, config in configs.items()}


def _text_token_limit(model: Any, tokenizer: Any) -> int | None:
    """Most tokens a caption may have: the text tower's position table, or the tokenizer's limit when smaller."""
    text_config = getattr(getattr(model, "config", None), "text_config", None)
    limits = [getattr(text_config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(v) for v in limits if isinstance(v, int) and 0 < v < 1_000_000]
    return min(limits) if limits else None


def hash_text(text: str) -> int:
    """A stable id of a caption's text (identical captions share it)."""
    import zlib

    return zlib.crc32(text.encode("utf-8"))


def _restore_int_keys(stage: dict[str, Any]) -> dict[str, Any]:
    """JSON turns the integer task keys of per_task into strings; turn them back."""
    for value in stage.values():
        if isinstance(value, dict):
            for variant in ("strict", "caption_equal"):
                if variant in value:
                    value[variant]["per_task"] = {int(k): v for k, v in value[variant]["per_task"].items()}
    return stage


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {(k if isinstance(k, str | int) else str(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, os.PathLike):
        return str(value)
    return value
