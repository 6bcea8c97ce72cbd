"""`ContinualTrainer`: the loop of a continual run with Accelerate, task after task.

It reads top to bottom: `train()` runs the stages; each stage trains (`_train_task` -> `_training_step`), lets the
method finish the task, builds task keys, evaluates and checkpoints. Two collaborators do the rest:

- the stage evaluator (`evaluator.RetrievalEvaluator` by default): `evaluate(stage) -> dict`, `summarize(...)`,
  `describe(...)`; it encodes, routes and gathers across processes;
- the `checkpointing.Checkpointer`: atomic `output_dir/checkpoint` with Accelerate's `save_state` / `load_state`.

Results and printing are functions of `peft_lpi.report`.

Plugging in another problem (e.g. REC grounding) without editing this loop:

- data: a `DatasetDict` with "train" and "validation" splits whose `task` column is a ClassLabel in task order, and
  `image` + `captions` columns (the texts of the problem: captions, referring expressions); pass
  `data_collator=` to turn training rows into the batch the method's loss expects;
- loss: the `ContinualMethod` (`training_loss(ddp_model, batch, task) -> {"loss": ..., ...}`) owns it, with which
  parameters train, the task keys and how samples are encoded;
- evaluation: pass `evaluator=` any object with `evaluate(stage) -> dict`, `summarize(stages, schedule) -> dict`
  and `describe(entry, title) -> str` (`evaluator.StageEvaluator`).
"""

from __future__ import annotations

import math
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

from ..data.preprocess import RetrievalCollator, column_values, flatten_captions, text_token_limit, with_pixel_values
from ..report import jsonable, write_report
from ..tuner.shallow import text_prompt_positions
from .checkpointing import CHECKPOINT_DIR, Checkpointer, TrainerState
from .evaluator import RetrievalEvaluator, StageEvaluator, encode_sharded
from .methods import ContinualMethod, LPIMethod
from .similarity import task_similarity_from_captions, task_similarity_from_names

__all__ = ["ContinualTrainer", "ContinualTrainingArguments", "TrainerState", "TrainingDivergedError"]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class ContinualTrainingArguments:
    """Settings of a continual run, named as transformers' `TrainingArguments` names them where one exists.

    Defaults follow the authors' COCO protocol (docs/method.md)."""

    output_dir: str = field(default="outputs/lpi", metadata={"help": "Folder for checkpoints, results and plots."})
    num_train_epochs: int = field(default=10, metadata={"help": "Epochs per task."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Cap on optimiser steps PER TASK (a joint stage of T tasks: T times it)."}
    )
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Training batch size per process."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Encoding batch size per process."})
    optim: str = field(default="sgd", metadata={"help": "'sgd' (momentum, reference) or 'adamw'."})
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
    save_steps: int = field(default=0, metadata={"help": "Also checkpoint every N optimiser steps (0: per task)."})
    resume_from_checkpoint: bool = field(
        default=False, metadata={"help": "Continue from output_dir/checkpoint if it exists."}
    )
    eval_routing: list[str] = field(
        default_factory=lambda: ["oracle", "auto"], metadata={"help": "Routing modes to evaluate: oracle, auto."}
    )
    recall_ks: list[int] = field(default_factory=lambda: [1, 5, 10], metadata={"help": "Recall cut-offs."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader workers."})
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
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the tqdm progress bars (shown on the main "
                                                                "process only)."})
    report_to: str | None = field(default=None, metadata={"help": "Accelerate tracker (tensorboard, wandb, ...)."})


class ContinualTrainer:
    """Trains a continual method (LPI by default) task after task on a `DatasetDict`.

    Args:
        model: a PeftModel with an LPI adapter (`get_peft_model(base, LPIConfig(num_tasks=T, ...))`), or the model
            of another method (`peft_lpi.continual.baselines.build_method`).
        tokenizer / image_processor: the backbone's own preprocessing.
        dataset: `DatasetDict` with "train" and "validation" splits: image, captions, task (a ClassLabel in task
            order), image_id.
        args: `ContinualTrainingArguments`.
        task_similarity: optional user (T, T) matrix; else computed with the frozen text encoder.
        accelerator: an `Accelerator`; created from `args` when None.
        method: the continual method (default: `LPIMethod(model)`); baselines live in `peft_lpi.continual.baselines`.
        evaluator: the stage evaluator (default: `RetrievalEvaluator` on the validation split).
        data_collator: turns training rows into a batch (default: `RetrievalCollator`).
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
        evaluator: StageEvaluator | None = None,
        data_collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None,
    ):
        if args.similarity_source not in ("names", "captions"):
            raise ValueError(f"similarity_source must be 'names' or 'captions', got {args.similarity_source!r}.")
        self.args = args
        self.accelerator = accelerator or Accelerator(
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with=args.report_to,
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
        self.train_indices = _indices_by_task(self.train_set, self.task_names, "train")
        self.eval_indices = _indices_by_task(self.eval_set, self.task_names, "validation")
        self.output_dir = Path(args.output_dir)
        self.model.to(self.accelerator.device)
        limit = text_token_limit(model, tokenizer)  # longer captions are truncated with a warning, never a crash
        if limit is not None:  # injection="shallow" puts P prompts into every token sequence
            limit -= text_prompt_positions(model)
        self.collator = data_collator or RetrievalCollator(
            image_processor, tokenizer, train=True, seed=args.seed, max_length=limit
        )
        self.eval_collator = RetrievalCollator(
            image_processor, tokenizer, train=False, seed=args.seed, max_length=limit
        )
        self.evaluator = evaluator or RetrievalEvaluator(
            self.accelerator, self.method, self.eval_set, self.eval_indices, self.eval_collator,
            modes=args.eval_routing, recall_ks=args.recall_ks, batch_size=args.per_device_eval_batch_size,
            progress=not args.disable_tqdm,
        )
        self.checkpointer = Checkpointer(self.accelerator, self.output_dir / CHECKPOINT_DIR, self.method)
        self.checkpoint_dir = self.checkpointer.directory
        self.task_similarity = task_similarity
        self.state = TrainerState()

    # ------------------------------------------------------------------ the run
    def train(self) -> dict[str, Any]:
        """Train every stage in order (resuming when asked); returns the results dict (also written to disk)."""
        args, acc = self.args, self.accelerator
        set_seed(args.seed)
        if args.resume_from_checkpoint:
            restored = self.checkpointer.load()
            if restored is not None:
                self.state, similarity = restored
                if self.task_similarity is None:
                    self.task_similarity = similarity
        if self.task_similarity is None:
            self.task_similarity = self._compute_task_similarity()
        self.method.setup(self)
        if args.report_to:
            acc.init_trackers("peft_lpi", config={k: str(v) for k, v in asdict(args).items()})
        schedule = self.method.schedule(self.num_tasks)  # [[0], [1], ...] unless the method groups tasks (joint)
        for stage in range(self.state.task, len(schedule)):
            if len(self.state.stages) > stage:
                continue  # finished before the interruption
            group = schedule[stage]
            started = time.perf_counter()
            if self.method.trains:
                self._train_task(group[0] if len(group) == 1 else group)
            for t in group:
                self.method.finish_task(t)
            self.state.train_seconds.append(time.perf_counter() - started)
            self.state.peak_memory_mb.append(_peak_memory_mb(acc.device))
            if self.method.uses_keys:
                for t in group:
                    self._build_task_keys(t)
            self.state.stages.append(self.evaluator.evaluate(max(group)))
            self.state.task, self.state.epoch, self.state.step_in_epoch, self.state.optimizer_steps = stage + 1, 0, 0, 0
            self.checkpointer.save(self.state, self.task_similarity)
            if acc.is_main_process:
                names = "+".join(self.task_names[t] for t in group)
                tqdm.write(self.evaluator.describe(self.state.stages[-1], f"{max(group)} {names}"))
        results = self.results()
        if acc.is_main_process:
            write_report(results, self.output_dir)
        acc.wait_for_everyone()
        acc.end_training()
        return results

    def _train_task(self, task: int | list[int]) -> None:
        """Train one stage (a task, or a list of tasks for a joint stage) until its epochs or `max_steps` end."""
        args, acc = self.args, self.accelerator
        params = self.method.parameters_for_task(task)
        total_steps = self._steps_per_epoch(task) * args.num_train_epochs
        if args.max_steps is not None:
            total_steps = min(total_steps, args.max_steps * len(_task_ids(task)))
        optimizer = self._make_optimizer(params)
        scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, max(total_steps, 1))
        # DDP records which parameters train when it wraps the model, so the model is (re)prepared per task.
        ddp_model, optimizer = acc.prepare(self.model, optimizer)
        if self.state.mid_task:
            self.checkpointer.restore_training(scheduler)
        ddp_model.eval()  # the backbone is frozen: no dropout noise in it (prompt tuning convention)
        bar = tqdm(
            total=total_steps, initial=self.state.optimizer_steps,
            desc=f"task {task} {'+'.join(self.task_names[t] for t in _task_ids(task))}",
            disable=args.disable_tqdm or not acc.is_local_main_process, dynamic_ncols=True,
        )
        while self.state.optimizer_steps < total_steps and self.state.epoch < args.num_train_epochs:
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
                    if args.report_to:
                        acc.log(logs, step=self.state.global_step)
                    bar.set_postfix(loss=f"{logs['train/loss']:.3f}", refresh=False)
                    bar.update(1)
                    if args.save_steps and self.state.optimizer_steps % args.save_steps == 0:
                        self.checkpointer.save(self.state, self.task_similarity, scheduler)
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

    def _training_step(self, ddp_model: torch.nn.Module, batch: dict[str, torch.Tensor], task: Any) -> dict:
        """One micro-batch: the method's loss (it runs the forward), a finiteness check, backward."""
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

    # ------------------------------------------------------------------ data and optimiser
    def _train_loader(self, task: int | list[int], epoch: int) -> DataLoader:
        """A seeded permutation of the stage's rows for this epoch, sharded over processes by Accelerate."""
        generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + _task_ids(task)[0] * 1_009 + epoch)
        rows = [i for t in _task_ids(task) for i in self.train_indices[t]]
        order = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
        if hasattr(self.collator, "set_epoch"):
            self.collator.set_epoch(epoch)
        batch_size = self.args.per_device_train_batch_size
        loader = DataLoader(
            Subset(self.train_set, order),
            batch_size=batch_size,
            shuffle=False,
            collate_fn=self.collator,
            num_workers=self.args.dataloader_num_workers,
            drop_last=len(order) >= batch_size * self.accelerator.num_processes,
        )
        return self.accelerator.prepare_data_loader(loader)

    def _steps_per_epoch(self, task: int | list[int]) -> int:
        per_step = self.args.per_device_train_batch_size * self.accelerator.num_processes
        batches = max(sum(len(self.train_indices[t]) for t in _task_ids(task)) // per_step, 1)
        return math.ceil(batches / self.args.gradient_accumulation_steps)

    def _make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        a = self.args
        if a.optim == "sgd":
            return torch.optim.SGD(params, lr=a.learning_rate, momentum=a.momentum, weight_decay=a.weight_decay)
        if a.optim == "adamw":
            return torch.optim.AdamW(params, lr=a.learning_rate, weight_decay=a.weight_decay)
        raise ValueError(f"Unknown optim {a.optim!r}; use 'sgd' or 'adamw'.")

    # ------------------------------------------------------------------ task similarity and keys
    def _compute_task_similarity(self) -> torch.Tensor:
        """Task semantic similarity with the frozen (prompt-free) text encoder, as docs/method.md prescribes."""
        with self.method.prompt_free():
            if self.args.similarity_source == "captions":
                all_captions = column_values(self.train_set, "captions")
                captions = [[c for i in rows[:200] for c in all_captions[i][:1]] for rows in self.train_indices]
                return task_similarity_from_captions(self.model, self.tokenizer, captions).cpu()
            names = [self.args.name_template.format(n) for n in self.task_names]
            return task_similarity_from_names(self.model, self.tokenizer, names, template="{}").cpu()

    def _build_task_keys(self, task: int) -> None:
        """k-means keys of the task's prompt-free training features (images and captions independently)."""
        rows = self.train_indices[task]
        texts, _, _ = flatten_captions(self.train_set.select(rows))

        def images(index: list[int]) -> dict[str, torch.Tensor]:
            return {"pixel_values": self.eval_collator.pixel_values(self.train_set.select([rows[i] for i in index]))}

        def captions(index: list[int]) -> dict[str, torch.Tensor]:
            encoded = self.eval_collator.tokenize([texts[i] for i in index])
            return {k: encoded[k] for k in ("input_ids", "attention_mask")}

        def chunks(modality: str, n: int, inputs: Callable) -> Callable[[], Iterator[torch.Tensor]]:
            features, _ = encode_sharded(
                self.accelerator, self.method, modality, n, inputs, None,
                batch_size=self.args.per_device_eval_batch_size, desc=f"keys {modality}",
                progress=not self.args.disable_tqdm,
            )
            return lambda: iter(features.split(8192))

        self.method.build_keys(
            task, chunks("vision", len(rows), images), chunks("text", len(texts), captions), self.args.kmeans_seed
        )

    # ------------------------------------------------------------------ results
    def evaluate_stage(self, stage: int) -> dict[str, Any]:
        """The evaluation after training `stage` (the evaluator's `evaluate`)."""
        return self.evaluator.evaluate(stage)

    def results(self) -> dict[str, Any]:
        """The run's results: settings, method, costs, and the evaluator's summary of every finished stage."""
        schedule = self.method.schedule(self.num_tasks)
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
            "schedule": schedule,
            "num_processes": self.accelerator.num_processes,
        }
        results.update(self.evaluator.summarize(self.state.stages, schedule))
        return jsonable(results)


def _indices_by_task(split: Any, task_names: list[str], name: str) -> list[list[int]]:
    """The rows of each task of `split`; every task must have some."""
    tasks = torch.as_tensor(column_values(split, "task"))
    indices = [torch.nonzero(tasks == t).flatten().tolist() for t in range(len(task_names))]
    for t, rows in enumerate(indices):
        if not rows:
            raise ValueError(f"Task {t} ({task_names[t]!r}) has no {name} samples: every task needs data.")
    return indices


def _task_ids(task: int | list[int]) -> list[int]:
    """A stage's tasks: the trainer passes an int for a one-task stage, a list for a multi-task stage (joint)."""
    return [task] if isinstance(task, int) else list(task)


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory of the stage in MiB: on CUDA `torch.cuda.max_memory_allocated` (reset after each reading, so
    per stage); on CPU the process RSS high-water mark (`ru_maxrss`, never reset: the run's peak so far)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def _peft_config_dict(model: Any) -> dict[str, Any] | None:
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    return {name: config.to_dict() for name, config in configs.items()}
