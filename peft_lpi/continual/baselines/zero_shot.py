"""Zero-shot: the frozen backbone evaluated under the continual protocol (the floor of the table)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...tuner.model import embedding_of
from ..methods import ContinualMethod
from ._common import _feature_method

ZERO_SHOT_MARKER = "zero_shot.json"


class ZeroShotMethod(ContinualMethod):
    """The frozen backbone, evaluated after every task under the same protocol (no training, no routing).

    `model` is the plain base model (or a PeftModel with an LPI adapter, whose prompts are then kept disabled).
    Checkpoints hold only a marker file: there is nothing to save.
    """

    name = "zero-shot"
    trains = False
    uses_keys = False

    def prompt_free(self) -> Any:
        tuner = getattr(self.model, "base_model", None)
        return tuner.prompts_disabled() if hasattr(tuner, "prompts_disabled") else contextlib.nullcontext()

    def parameters_for_task(self, task: int) -> list[nn.Parameter]:
        return []

    @torch.no_grad()
    def encode(self, modality: str, inputs: dict[str, torch.Tensor], tasks: torch.Tensor | str | None) -> tuple:
        with self.prompt_free():
            return embedding_of(_feature_method(self.model, modality)(**inputs)).float(), None

    def trainable_parameters_per_task(self) -> int:
        return 0

    def save_adapter(self, path: Any) -> None:
        (Path(path) / ZERO_SHOT_MARKER).write_text('{"method": "zero-shot"}\n')

    def load_adapter(self, path: Any) -> None:
        from ...io import CheckpointError

        if not (Path(path) / ZERO_SHOT_MARKER).is_file():
            raise CheckpointError(f"Checkpoint {path} was not written by the zero-shot method.")
