"""Atomic, resumable checkpoints of a continual run: `Checkpointer` and the `TrainerState` it remembers.

One checkpoint is one folder, `output_dir/checkpoint`, replaced atomically (`peft_lpi.io.atomic_directory`: at
every moment either the previous or the new complete folder exists). It holds:

- the method's adapter (`method.save_adapter`: for LPI every task's factors and keys, `adapter_model.safetensors`);
- `trainer_state.json`: where the run is (task, epoch, micro-batches consumed, optimiser steps) and every finished
  stage's evaluation;
- what Accelerate's `save_state` writes: the optimiser and the learning-rate schedule of the task in progress
  (`optimizer.bin`, `custom_checkpoint_0.pkl`), the RNG states of every process (`random_states_<i>.pkl`) and the
  gradient scaler under fp16. The model itself is not written by `save_state` (the frozen backbone is not ours to
  save; the adapter is above): a save/load pre-hook takes it off Accelerate's lists.

Resuming mid-epoch: the trainer skips the micro-batches already consumed with `accelerator.skip_first_batches`
and `restore_training` loads the optimiser, schedule and RNG states with `accelerator.load_state`, so a run killed
and resumed ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..io import CheckpointError, atomic_directory, recover_directory
from ..report import jsonable
from .methods import ContinualMethod

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """What a checkpoint must remember to resume exactly."""

    task: int = 0  # stage being trained (or next to train when step == 0 and epoch == 0)
    epoch: int = 0
    step_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    optimizer_steps: int = 0  # optimiser steps done in `task`
    global_step: int = 0
    stages: list[dict[str, Any]] = field(default_factory=list)  # evaluation after each finished stage
    train_seconds: list[float] = field(default_factory=list)
    peak_memory_mb: list[float] = field(default_factory=list)  # after each stage's training

    @property
    def mid_task(self) -> bool:
        """True when the state is inside a task's training (an optimiser and schedule to restore)."""
        return bool(self.optimizer_steps or self.step_in_epoch)


class _SchedulerSlot:
    """The learning-rate schedule of the task in progress, registered once with `register_for_checkpointing`.

    The trainer creates a schedule per task; registering each would grow Accelerate's list of custom objects (and
    `load_state` insists the counts match), so one slot holds whichever schedule is current ({} between tasks).
    """

    def __init__(self) -> None:
        self.scheduler: Any = None

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scheduler is not None and state:
            self.scheduler.load_state_dict(state)


def _no_model_weights(models: list[Any], weights: list[Any], output_dir: str) -> None:
    weights.clear()  # save_state pre-hook: the adapter is saved by the method, the frozen backbone never


def _no_model_loading(models: list[Any], input_dir: str) -> None:
    models.clear()  # load_state pre-hook: the adapter is loaded by the method


class Checkpointer:
    """Saves and restores a continual run in `directory` (see the module docstring for the contents).

    Every process must call `save` and `restore_training` (Accelerate writes and reads per-process RNG states);
    only the main process writes the adapter and the state file.
    """

    def __init__(self, accelerator: Accelerator, directory: str | Path, method: ContinualMethod):
        self.accelerator, self.directory, self.method = accelerator, Path(directory), method
        self._scheduler = _SchedulerSlot()
        accelerator.register_for_checkpointing(self._scheduler)
        accelerator.register_save_state_pre_hook(_no_model_weights)
        accelerator.register_load_state_pre_hook(_no_model_loading)

    def save(self, state: TrainerState, task_similarity: torch.Tensor | None, scheduler: Any = None) -> None:
        """Atomically replace the checkpoint. `scheduler`: the task's schedule when saving mid-task (the optimiser
        is whatever `accelerator.prepare` currently holds)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        self._scheduler.scheduler = scheduler
        writer = atomic_directory(self.directory) if acc.is_main_process else contextlib.nullcontext()
        with writer as tmp:
            path = broadcast_object_list([str(tmp) if tmp is not None else None])[0]  # one folder for all processes
            acc.save_state(path)
            if acc.is_main_process:
                self.method.save_adapter(tmp)
                saved = asdict(state)
                saved["task_similarity"] = task_similarity.tolist() if task_similarity is not None else None
                (tmp / STATE_FILE).write_text(json.dumps(jsonable(saved)))
            acc.wait_for_everyone()  # every process has written before the main process swaps the folder in
        self._scheduler.scheduler = None
        acc.wait_for_everyone()

    def load(self) -> tuple[TrainerState, torch.Tensor | None] | None:
        """Repair a half-swapped checkpoint, then load the adapter into the model and return the saved state and
        task similarity; None when there is no checkpoint."""
        acc = self.accelerator
        if acc.is_main_process:
            recover_directory(self.directory)  # a kill between the two renames of a checkpoint swap
        acc.wait_for_everyone()
        if not self.directory.exists():
            return None
        state_file = self.directory / STATE_FILE
        if not state_file.is_file():
            raise CheckpointError(f"{self.directory} has no {STATE_FILE}: not a ContinualTrainer checkpoint.")
        self.method.load_adapter(self.directory)
        raw = json.loads(state_file.read_text())
        similarity = raw.pop("task_similarity", None)
        stages = [_restore_int_keys(s) for s in raw.pop("stages")]
        return TrainerState(**raw, stages=stages), None if similarity is None else torch.tensor(similarity)

    def restore_training(self, scheduler: Any) -> None:
        """Load the optimiser (already passed to `accelerator.prepare`), `scheduler` and the RNG states saved
        mid-task."""
        self._scheduler.scheduler = scheduler
        try:
            self.accelerator.load_state(str(self.directory))
        except (FileNotFoundError, RuntimeError, KeyError) as err:
            raise CheckpointError(f"Cannot restore the optimiser state of checkpoint {self.directory}: {err}") from None
        finally:
            self._scheduler.scheduler = None


def _restore_int_keys(stage: dict[str, Any]) -> dict[str, Any]:
    """JSON turns the integer task keys of per_task into strings; turn them back."""
    for value in stage.values():
        if isinstance(value, dict):
            for variant in ("strict", "caption_equal"):
                if variant in value:
                    value[variant]["per_task"] = {int(k): v for k, v in value[variant]["per_task"].items()}
    return stage
