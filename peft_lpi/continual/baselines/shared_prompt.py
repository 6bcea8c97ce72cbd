"""Sequential fine-tuning of one shared full-rank prompt set on every task in turn (the forgetting baseline)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...tuner.config import LPIConfig
from ..methods import LPIMethod
from ..objective import LPIObjective
from ._common import _full_rank_kwargs


def shared_prompt_config(**lpi_kwargs: Any) -> LPIConfig:
    """One full-rank VPT-deep prompt set (task 0), no interaction, contrastive loss only."""
    kwargs = _full_rank_kwargs(lpi_kwargs)
    kwargs["num_tasks"] = 1
    return LPIConfig(**kwargs)


class SharedPromptMethod(LPIMethod):
    """Sequential fine-tuning of ONE prompt set on every task in turn: no per-task sets, no keys, no routing.

    Every evaluation uses the shared set (task 0), so the "oracle" numbers are the method's routing-free numbers.
    """

    name = "shared-prompt"
    uses_keys = False

    def setup(self, trainer: Any) -> None:
        self.objective = LPIObjective(self.model, None)  # one set: nothing for the task constraint to contrast

    def parameters_for_task(self, task: int) -> list[nn.Parameter]:
        return self.tuner.train_task(0)

    def training_loss(self, ddp_model: nn.Module, batch: dict[str, torch.Tensor], task: int) -> dict[str, torch.Tensor]:
        return super().training_loss(ddp_model, batch, 0)  # the one shared set, chosen per call

    @torch.no_grad()
    def encode(self, modality: str, inputs: dict[str, torch.Tensor], tasks: torch.Tensor | str | None) -> tuple:
        return super().encode(modality, inputs, None if tasks is None else 0)
