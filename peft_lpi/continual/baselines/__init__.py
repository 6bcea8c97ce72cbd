"""Baselines and the joint upper bound (one file each), run by the same `ContinualTrainer` under the identical
protocol as LPI.

Every method here is a `peft_lpi.continual.methods.ContinualMethod`; `build_method(name, ...)` (the registry)
creates the model and the method from a frozen base model and is what `examples/continual_retrieval.py --method
NAME` calls:

| name            | model                                           | trains per task             | routing         |
|-----------------|-------------------------------------------------|-----------------------------|-----------------|
| `zero-shot`     | the base model                                  | nothing                     | none            |
| `shared-prompt` | LPI adapter, 1 task, full-rank, no interaction  | the one shared prompt set   | none            |
| `s-prompts`     | LPI adapter, full-rank, no interaction/losses   | task t's full-rank prompts  | k-means keys    |
| `lora`          | PEFT LoRA, one adapter per task (rank 4, attn)  | adapter `task{t}`           | k-means keys    |
| `lpi`           | LPI adapter                                     | task t's CP factors         | k-means keys    |
| `joint`         | LPI adapter                                     | all tasks at once (1 stage) | k-means keys    |

Full-rank prompts (`shared-prompt`, `s-prompts`) start at the element scale of LPI's CP prompts with the same flags
(std `init_std**3 / sqrt(rank)`, 0.0625 for the defaults), so no baseline differs from LPI by its initial prompt
scale. The k-means keys of every routed method are built the same way from the same prompt-free features, so
their routing accuracies are identical and differences in recall come from what each method trains.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...tuner.config import LPIConfig
from ..methods import ContinualMethod, LPIMethod
from ._common import matched_full_rank_std
from .joint import JointMethod
from .lora import LORA_TARGET_MODULES, LoRAMethod, lora_adapter_name, lora_model
from .s_prompts import s_prompts_config, s_prompts_method
from .shared_prompt import SharedPromptMethod, shared_prompt_config
from .zero_shot import ZeroShotMethod

METHOD_NAMES = ("lpi", "zero-shot", "shared-prompt", "s-prompts", "lora", "joint")

__all__ = [
    "LORA_TARGET_MODULES",
    "METHOD_NAMES",
    "JointMethod",
    "LoRAMethod",
    "SharedPromptMethod",
    "ZeroShotMethod",
    "build_method",
    "lora_adapter_name",
    "lora_model",
    "matched_full_rank_std",
    "s_prompts_config",
    "s_prompts_method",
    "shared_prompt_config",
]


def build_method(
    name: str, base_model: nn.Module, num_tasks: int, lpi_kwargs: dict[str, Any] | None = None, *,
    lora_rank: int = 4,
    lora_target_modules: Any = LORA_TARGET_MODULES,
) -> tuple[nn.Module, ContinualMethod]:
    """The model and the `ContinualMethod` of `name` (one of `METHOD_NAMES`) on a frozen `base_model`.

    `lpi_kwargs` are `LPIConfig` fields (prompt_length, prompt_depth, rank, init_std, interaction,
    share_layer_factor, align_weight, task_weight, routing_metric, num_keys, ...); each method takes the ones that
    apply to it (LoRA: routing_metric and num_keys). `lora_rank` / `lora_target_modules` (a PEFT target list or
    regex) shape the LoRA baseline. Seed torch before calling: adapters are initialised here.
    """
    from peft import get_peft_model

    kwargs = dict(lpi_kwargs or {})
    kwargs["num_tasks"] = num_tasks
    if name == "lpi":
        model = get_peft_model(base_model, LPIConfig(**kwargs))
        return model, LPIMethod(model)
    if name == "joint":
        model = get_peft_model(base_model, LPIConfig(**kwargs))
        return model, JointMethod(model)
    if name == "s-prompts":
        model = get_peft_model(base_model, s_prompts_config(**kwargs))
        return model, s_prompts_method(model)
    if name == "shared-prompt":
        model = get_peft_model(base_model, shared_prompt_config(**kwargs))
        return model, SharedPromptMethod(model)
    if name == "lora":
        model = lora_model(base_model, num_tasks, rank=lora_rank, target_modules=lora_target_modules)
        defaults = LPIConfig()
        return model, LoRAMethod(model, num_keys=kwargs.get("num_keys", defaults.num_keys),
                                 routing_metric=kwargs.get("routing_metric", defaults.routing_metric))
    if name == "zero-shot":
        for param in base_model.parameters():
            param.requires_grad_(False)
        return base_model, ZeroShotMethod(base_model)
    raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}.")
