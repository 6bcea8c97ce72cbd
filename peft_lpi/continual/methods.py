"""What the ContinualTrainer asks of a continual method, and LPI's answers.

The trainer owns the loop (data, optimiser, Accelerate, checkpoints, evaluation); a `ContinualMethod` owns what
differs between methods: which parameters train for a task, the loss, the task keys, and how samples are encoded
(with the true task, with routed tasks, or prompt-free). Baselines (`peft_lpi.continual.baselines`) implement the same
interface so they run under the identical protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..tuner.model import embedding_of
from .objective import LPIObjective

FeatureChunks = Callable[[], Iterator[torch.Tensor]]


class ContinualMethod:
    """Interface of a continual method. `model` is the (unwrapped) model the trainer prepares and saves."""

    name = "base"
    trains = True  # False: the trainer skips optimisation (zero-shot)
    uses_keys = True  # False: no task keys are built and "auto" evaluation equals "oracle" routing of the method

    def __init__(self, model: nn.Module):
        self.model = model

    def setup(self, trainer: Any) -> None:
        """Called once before the first task (e.g. to build the objective from the task similarity)."""

    def schedule(self, num_tasks: int) -> list[list[int]]:
        """The tasks trained in each stage (one evaluation per stage). Continual: `[[0], [1], ...]`. A stage with
        several tasks (e.g. joint training: `[[0, ..., T-1]]`) trains on the union of their data, and
        `parameters_for_task` / `training_loss` then receive the list of task ids instead of an int."""
        return [[t] for t in range(num_tasks)]

    def parameters_for_task(self, task: int) -> list[nn.Parameter]:
        """Make exactly the parameters of `task` trainable and return them."""
        raise NotImplementedError

    def training_loss(self, ddp_model: nn.Module, batch: dict[str, torch.Tensor], task: int) -> dict[str, torch.Tensor]:
        """Forward one micro-batch of `task` and return {"loss": ..., other named terms}."""
        raise NotImplementedError

    def prompt_free(self) -> Any:
        """Context manager under which `encode` gives the frozen backbone's features (task keys, routing)."""
        raise NotImplementedError

    def build_keys(self, task: int, vision: FeatureChunks, text: FeatureChunks, seed: int) -> None:
        raise NotImplementedError

    def encode(self, modality: str, inputs: dict[str, torch.Tensor], tasks: torch.Tensor | str | None) -> tuple:
        """Embeddings of a batch: `tasks` is per-sample task ids (oracle), "auto" or None (prompt-free).

        Returns (embeddings (B, D), routed task ids (B,) or None).
        """
        raise NotImplementedError

    def route(self, modality: str, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish_task(self, task: int) -> None:
        """Called after a task's training, before its keys and the evaluation."""

    def trainable_parameters_per_task(self) -> int:
        raise NotImplementedError

    def save_adapter(self, path: Any) -> None:
        self.model.save_pretrained(path)


class LPIMethod(ContinualMethod):
    """LPI: per-task low-rank prompts in both towers, the LPI objective, k-means keys and batched routing."""

    name = "lpi"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.tuner = model.base_model
        self.objective: LPIObjective | None = None

    def setup(self, trainer: Any) -> None:
        self.objective = LPIObjective(self.model, trainer.task_similarity.to(trainer.accelerator.device))

    def parameters_for_task(self, task: int) -> list[nn.Parameter]:
        return self.tuner.train_task(task)

    def training_loss(self, ddp_model: nn.Module, batch: dict[str, torch.Tensor], task: int) -> dict[str, torch.Tensor]:
        # One computation of the task's prompts feeds both towers and the prompt losses (reuse_prompts); the task is
        # chosen for this call only (task_ids), not through the sticky set_task.
        with self.tuner.reuse_prompts():
            outputs = ddp_model(
                pixel_values=batch["pixel_values"],
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                task_ids=task,
            )
            return self.objective(
                outputs.image_embeds.float(), outputs.text_embeds.float(), task, sample_ids=batch["caption_ids"]
            )

    def prompt_free(self) -> Any:
        return self.tuner.prompts_disabled()

    def build_keys(self, task: int, vision: FeatureChunks, text: FeatureChunks, seed: int) -> None:
        self.tuner.build_task_keys(task, vision=vision, text=text, seed=seed)

    @torch.no_grad()
    def encode(self, modality: str, inputs: dict[str, torch.Tensor], tasks: torch.Tensor | str | None) -> tuple:
        method = self.model.get_image_features if modality == "vision" else self.model.get_text_features
        if tasks is None:
            with self.tuner.prompts_disabled():
                return embedding_of(method(**inputs)).float(), None
        embeds = embedding_of(method(**inputs, task_ids=tasks)).float()
        routes = self.tuner.last_routes[modality] if isinstance(tasks, str) else None
        return embeds, routes

    def route(self, modality: str, features: torch.Tensor) -> torch.Tensor:
        return self.tuner.route(modality, features)

    def trainable_parameters_per_task(self) -> int:
        return sum(p.numel() for p in self.tuner.active_bank.tasks[0].parameters())

    def load_adapter(self, path: Any) -> None:
        """Load the adapter (all tasks and keys) saved by `save_adapter` into the model, refusing what doesn't fit."""
        from pathlib import Path

        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from ..io import CheckpointError

        adapter_file = Path(path) / "adapter_model.safetensors"
        try:
            weights = load_file(str(adapter_file))
        except Exception as err:
            raise CheckpointError(f"Cannot read the adapter of checkpoint {path}: {err}") from None
        bank = self.tuner.active_bank
        saved_tasks = {k.split("tasks.")[1].split(".")[0] for k in weights if ".tasks." in k}
        if len(saved_tasks) > bank.num_tasks:
            raise CheckpointError(f"Checkpoint {path} has {len(saved_tasks)} tasks; this adapter has {bank.num_tasks}.")
        try:
            result = set_peft_model_state_dict(self.model, weights, adapter_name=self.tuner.active_adapters[0])
        except RuntimeError as err:
            raise CheckpointError(f"Checkpoint {path} does not fit this adapter: {err}") from None
        missing = [k for k in result.missing_keys if "lpi_prompts" in k]
        if missing:
            raise CheckpointError(f"Checkpoint {path} lacks adapter tensors (e.g. {missing[:3]}); it does not fit.")
        self.tuner._restore_training_state(Path(path) / "adapter_config.json")
