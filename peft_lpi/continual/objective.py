"""The LPI training objective: L = L_clip + w_align * L_align + w_task * L_task, with every term reported."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..tuner.config import LPIConfig
from .losses import contrastive_loss, hierarchical_alignment_loss, sigmoid_loss, task_contrastive_loss
from .similarity import similarity_targets


def _tuner(model: nn.Module) -> Any:
    """The LPIModel inside a PeftModel (or the LPIModel itself)."""
    inner = getattr(model, "base_model", model)
    if not hasattr(inner, "lpi_prompts"):
        raise TypeError(f"Expected a PeftModel wrapping an LPI adapter, got {type(model).__name__}.")
    return inner


def uses_sigmoid_loss(base_model: nn.Module) -> bool:
    """SigLIP-family models were trained with the sigmoid loss (they carry a `logit_bias`)."""
    return isinstance(getattr(base_model, "logit_bias", None), torch.Tensor)


def base_contrastive_loss(
    base_model: nn.Module,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    *,
    sample_ids: torch.Tensor | None = None,
    gather: bool = True,
) -> torch.Tensor:
    """The loss the base model family was trained with, with the model's own (frozen) logit scale and bias."""
    scale = base_model.logit_scale.exp()
    if uses_sigmoid_loss(base_model):
        return sigmoid_loss(image_embeds, text_embeds, scale, base_model.logit_bias, sample_ids=sample_ids, gather=gather)
    return contrastive_loss(image_embeds, text_embeds, scale, sample_ids=sample_ids, gather=gather)


def alignment_terms(config: LPIConfig, raw_vision: torch.Tensor, raw_text: torch.Tensor) -> dict[str, torch.Tensor]:
    """L_align of one task from its RAW CP prompts (K, P, D_m) with the config's temperatures and weights.

    Returns {"layer", "token", "total"}; total = layer + align_token_weight * token (align_weight is applied by the
    caller). See docs/method.md for the arithmetic and why the defaults reproduce the reference's gradient.
    """
    return hierarchical_alignment_loss(
        raw_vision,
        raw_text,
        layer_temperature=config.align_layer_temperature,
        token_temperature=config.align_token_temperature,
        normalize=config.align_normalize,
        layer_weight=1.0,
        token_weight=config.align_token_weight,
    )


class LPIObjective:
    """Computes the LPI loss of one batch of the task being trained.

    Args:
        model: the PeftModel (or LPIModel) with an LPI adapter.
        task_similarity: (T, T) task semantic similarity S; L_task uses `S > config.task_similarity_threshold` as
            positives. None disables L_task (as for a single task).
        config: the weights and temperatures; defaults to the active adapter's LPIConfig.
    """

    def __init__(self, model: nn.Module, task_similarity: torch.Tensor | None = None, config: LPIConfig | None = None):
        self.tuner = _tuner(model)
        self.config = config or self.tuner.active_config
        self.task_similarity = task_similarity

    def __call__(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        task: int,
        *,
        sample_ids: torch.Tensor | None = None,
        gather: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Returns {"loss", "contrastive", "align", "align_layer", "align_token", "task"} (scalar tensors)."""
        config = self.config
        terms: dict[str, torch.Tensor] = {}
        terms["contrastive"] = base_contrastive_loss(
            self.tuner.model, image_embeds, text_embeds, sample_ids=sample_ids, gather=gather
        )
        zero = terms["contrastive"].new_zeros(())
        both = len(self.tuner.active_bank.modalities) == 2
        if config.align_weight > 0 and both:
            # the RAW CP prompts: after the correlation module's LayerNorm their hidden-axis mean is exactly 0
            raw = self.tuner.active_bank.task_raw_prompts(torch.tensor([task]))
            align = alignment_terms(config, raw["vision"][0], raw["text"][0])
            terms["align_layer"], terms["align_token"], terms["align"] = align["layer"], align["token"], align["total"]
        else:
            terms["align_layer"] = terms["align_token"] = terms["align"] = zero
        if config.task_weight > 0 and self.task_similarity is not None and task >= 1:
            terms["task"] = self.task_loss(task)
        else:
            terms["task"] = zero
        terms["loss"] = terms["contrastive"] + config.align_weight * terms["align"] + config.task_weight * terms["task"]
        return terms

    def task_loss(self, task: int) -> torch.Tensor:
        """L_task over the tasks seen so far (0..task), averaged over the prompted modalities."""
        seen = list(range(task + 1))
        similarity = self.task_similarity[: task + 1, : task + 1]
        targets = similarity_targets(similarity, self.config.task_similarity_threshold).to(similarity.device)
        prompts = self.tuner.task_prompts(seen)
        losses = [
            task_contrastive_loss(
                p.reshape(len(seen), -1),
                targets.to(p.device),
                current_task=task,
                temperature=self.config.task_temperature,
                double_sigmoid=self.config.task_loss_double_sigmoid,
                mode=self.config.task_loss_mode,
            )
            for p in prompts.values()
        ]
        return torch.stack(losses).mean()
