"""Joint multi-task LPI: every task in one stage, the non-continual upper bound."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..losses import task_contrastive_loss
from ..methods import LPIMethod
from ..objective import alignment_terms, base_contrastive_loss
from ..similarity import similarity_targets
from ._common import _as_group


class JointMethod(LPIMethod):
    """LPI trained on the union of all tasks in ONE stage (the non-continual upper bound).

    Each sample of a mixed batch gets its own task's prompts (`task_ids=batch["task"]`, batched). Loss:
    - contrastive: over the whole mixed batch (negatives from every task);
    - align: the hierarchical alignment of each task in the stage, averaged over those tasks;
    - task: the task constraint over all tasks of the stage, with each task in turn as the "current" row (receiving
      the gradient), averaged over tasks.
    Averaging keeps the balance of the terms per task as in the sequential run: a task's prompts receive about
    1/T of the contrastive gradient of a mixed batch and 1/T of each averaged regulariser. Steps: the stage has
    T times the data of one task, so it runs T times the steps (and `max_steps_per_task * T` when capped).
    """

    name = "joint"

    def schedule(self, num_tasks: int) -> list[list[int]]:
        return [list(range(num_tasks))]

    def parameters_for_task(self, task: int | Sequence[int]) -> list[nn.Parameter]:
        bank = self.tuner.active_bank
        bank.requires_grad_(False)
        params: list[nn.Parameter] = []
        for t in _as_group(task):
            bank.tasks[t].requires_grad_(True)
            params.extend(bank.tasks[t].parameters())
        return params

    def training_loss(self, ddp_model: nn.Module, batch: dict[str, torch.Tensor], task: Any) -> dict[str, torch.Tensor]:
        group = _as_group(task)
        with self.tuner.reuse_prompts():  # each task's prompts computed once for both towers and the prompt losses
            outputs = ddp_model(
                pixel_values=batch["pixel_values"],
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                task_ids=batch["task"],  # each sample its own task's prompts, for this call only
            )
            return self.joint_objective(outputs.image_embeds.float(), outputs.text_embeds.float(), group,
                                        sample_ids=batch["caption_ids"])

    def joint_objective(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, group: list[int], *,
                        sample_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        config, tuner = self.objective.config, self.tuner
        terms = {"contrastive": base_contrastive_loss(tuner.model, image_embeds, text_embeds, sample_ids=sample_ids)}
        terms.update(self.prompt_terms(group, terms["contrastive"].new_zeros(())))
        terms["loss"] = terms["contrastive"] + config.align_weight * terms["align"] + config.task_weight * terms["task"]
        return terms

    def prompt_terms(self, group: list[int], zero: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stage's prompt regularisers, unweighted: ``align`` (and its ``align_layer`` / ``align_token`` parts)
        averaged over the group's tasks, ``task`` the task constraint averaged over the group's rows (class doc)."""
        config, tuner = self.objective.config, self.tuner
        terms: dict[str, torch.Tensor] = {}
        both = len(tuner.active_bank.modalities) == 2
        need_prompts = config.task_weight > 0 and len(group) > 1
        prompts = tuner.task_prompts(group) if need_prompts else {}
        terms["align_layer"] = terms["align_token"] = terms["align"] = zero
        if config.align_weight > 0 and both:
            raw = tuner.active_bank.task_raw_prompts(torch.tensor(group))  # before the correlation module
            aligns = [alignment_terms(config, raw["vision"][i], raw["text"][i]) for i in range(len(group))]
            for name, key in (("align_layer", "layer"), ("align_token", "token"), ("align", "total")):
                terms[name] = torch.stack([a[key] for a in aligns]).mean()
        terms["task"] = zero
        similarity = self.objective.task_similarity
        if config.task_weight > 0 and similarity is not None and len(group) > 1:
            index = torch.as_tensor(group, device=similarity.device)
            targets = similarity_targets(similarity[index][:, index], config.task_similarity_threshold)
            per_modality = []
            for p in prompts.values():
                flat = p.reshape(len(group), -1)
                per_modality.append(torch.stack([
                    task_contrastive_loss(
                        flat, targets.to(flat.device), current_task=i, temperature=config.task_temperature,
                        double_sigmoid=config.task_loss_double_sigmoid, mode=config.task_loss_mode,
                    )
                    for i in range(len(group))
                ]).mean())
            terms["task"] = torch.stack(per_modality).mean()
        return terms
