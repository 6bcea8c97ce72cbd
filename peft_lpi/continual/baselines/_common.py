"""Helpers shared by the baselines: stage groups, feature methods, the full-rank prompt settings."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...tuner.config import LPIConfig


def _as_group(task: int | Sequence[int]) -> list[int]:
    """The trainer passes an int for a one-task stage and a list of task ids for a multi-task stage."""
    return [int(task)] if isinstance(task, int | torch.Tensor) else [int(t) for t in task]


def _feature_method(model: nn.Module, modality: str) -> Any:
    return model.get_image_features if modality == "vision" else model.get_text_features


def matched_full_rank_std(init_std: float, rank: int) -> float:
    """Element std of LPI's CP prompts at init, `init_std**3 / sqrt(rank)`: the init of the full-rank baselines."""
    return init_std**3 / math.sqrt(rank)


def _full_rank_kwargs(lpi_kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(lpi_kwargs)
    defaults = LPIConfig()
    init_std = kwargs.pop("init_std", defaults.init_std)
    rank = kwargs.get("rank", defaults.rank)
    kwargs.update(
        factorization="full",
        interaction=False,
        align_weight=0.0,
        task_weight=0.0,
        init_std=kwargs.pop("full_rank_init_std", None) or matched_full_rank_std(init_std, rank),
    )
    return kwargs
