"""S-Prompts-style baseline: per-task full-rank prompts in both towers, LPI's keys and routing, no factorisation."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...tuner.config import LPIConfig
from ..methods import LPIMethod
from ._common import _full_rank_kwargs


def s_prompts_config(**lpi_kwargs: Any) -> LPIConfig:
    """S-Prompts-style adapter: per-task free (K, P, D_m) prompts in both towers, same depth and length as LPI, no
    factorisation, no correlation module, contrastive loss only (alignment and task terms off)."""
    return LPIConfig(**_full_rank_kwargs(lpi_kwargs))


def s_prompts_method(model: nn.Module) -> LPIMethod:
    """S-Prompts is LPI's machinery (per-task sets, k-means keys, batched routing) on an `s_prompts_config` adapter."""
    method = LPIMethod(model)
    method.name = "s-prompts"
    return method
