"""The grounding (REC) variants of the baselines: the retrieval baselines' machinery with the detector family's own
grounding loss, on every family of `peft_lpi.continual.grounding_models` (OWL-ViT / OWLv2, Grounding DINO).

`build_grounding_method(name, ...)` is what `examples/continual_grounding.py --method NAME` calls:

| name            | model                                          | trains per task            | routing (auto)        |
|-----------------|------------------------------------------------|----------------------------|-----------------------|
| `lpi`           | LPI adapter                                    | task t's CP factors        | image k-means keys    |
| `shared-prompt` | LPI adapter, 1 task, full-rank, no interaction | the one shared prompt set  | none                  |
| `lora`          | PEFT LoRA, one adapter per task                | adapter `task{t}`          | image k-means keys    |
| `joint`         | LPI adapter                                    | all tasks at once (1 stage)| image k-means keys    |

Every method answers the `GroundingEvaluator`'s calls: `detect(inputs, tasks)` (the detector's logits and boxes
with each image's task), `prompt_free()` (zero-shot) and `encode("vision", ..., "auto")` (routing on the
prompt-free image feature; the expression gets its image's task, as for LPI). The zero-shot backbone is the
evaluator's "zero-shot" mode of any run.

Family-agnostic: every detector-specific step (the forward, the candidates, the grounding loss, the prompt-free
features, the text format) is the model's `GroundingFamily`'s, as for LPI. On Grounding DINO the prompt sets of
`lpi`, `shared-prompt` and `joint` are additive (``injection="additive"`` in `lpi_kwargs`, as the example sets it;
`shared_prompt_config` keeps it) and the loss is the model's own (`grounding_dino_rec_loss`).

LoRA at LPI's parameter budget: by default the rank on the target modules (`grounding_lora_targets`: the attention
query / value projections of both towers; OWL: ``q_proj`` / ``v_proj`` of the ViT and the CLIP text tower, as
retrieval's budget-matched LoRA; Grounding DINO: ``q_proj`` / ``v_proj`` (``query`` / ``value``) of the Swin
backbone and ``query`` / ``value`` of BERT, not the fusion / decoder layers LPI leaves alone either) is the one whose
per-task parameter count is closest to LPI's (`matched_lora_rank`), so the two differ by at most half of one rank's
parameters (or LoRA has rank 1 when LPI has fewer parameters than one rank; on the offline OWL backbone: 4,096
against LPI's 3,696 per task).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ...tuner.config import LPIConfig
from ..grounding import LPIGroundingMethod
from ..grounding_loss import owl_rec_terms
from ..grounding_models import GROUNDING_DINO_TYPES, MODEL_INPUTS, OWL_TYPES, grounding_family, grounding_model_type
from ._common import _as_group
from .joint import JointMethod
from .lora import LoRAMethod, lora_adapter_name, lora_model
from .shared_prompt import SharedPromptMethod, shared_prompt_config

__all__ = [
    "GROUNDING_DINO_LORA_TARGETS",
    "GROUNDING_LORA_TARGETS",
    "GROUNDING_METHOD_NAMES",
    "GroundingJointMethod",
    "GroundingLoRAMethod",
    "GroundingSharedPromptMethod",
    "build_grounding_method",
    "grounding_lora_targets",
    "lora_parameters_per_rank",
    "lpi_parameters_per_task",
    "matched_lora_rank",
    "rec_terms",
]

GROUNDING_METHOD_NAMES = ("lpi", "shared-prompt", "lora", "joint")
GROUNDING_LORA_TARGETS = r".*\.self_attn\.(q_proj|v_proj)"  # both OWL towers' attention queries and values
# Grounding DINO: the Swin backbone's (q_proj / v_proj; older transformers: self.query / self.value) and BERT's
# (self.query / self.value) attention queries and values; not the encoder / fusion / decoder layers
GROUNDING_DINO_LORA_TARGETS = (
    r".*\.(conv_encoder|text_backbone)\..*\.attention\.(self\.)?(query|value|q_proj|v_proj)"
)


def grounding_lora_targets(model: nn.Module) -> str:
    """The default LoRA `target_modules` regex of the detector family of `model` (module docstring)."""
    model_type = grounding_model_type(model)
    if model_type in OWL_TYPES:
        return GROUNDING_LORA_TARGETS
    if model_type in GROUNDING_DINO_TYPES:
        return GROUNDING_DINO_LORA_TARGETS
    grounding_family(model)  # raises the clear "not a supported grounding detector" error
    raise AssertionError("unreachable")


def rec_terms(outputs: Any, batch: dict[str, torch.Tensor], rec_kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """OWL's REC loss of a batch (one or several queries per image, ``query_mask``) and its named parts."""
    return _with_loss(owl_rec_terms(outputs, batch, rec_kwargs))


def _with_loss(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A family's grounding terms with ``loss`` = the grounding loss (what a baseline without prompt terms trains)."""
    return {"loss": terms["rec"], **terms}


class GroundingSharedPromptMethod(SharedPromptMethod, LPIGroundingMethod):
    """Sequential fine-tuning of ONE full-rank prompt set on every task in turn, with the REC loss.

    Training and evaluation always use the shared set (task 0): its "oracle" figures are its routing-free ones."""

    name = "shared-prompt"

    def detect(self, inputs: dict[str, torch.Tensor], tasks: torch.Tensor | None) -> Any:
        return super().detect(inputs, None if tasks is None else 0)


class GroundingJointMethod(JointMethod, LPIGroundingMethod):
    """LPI on the union of all tasks in one stage (the non-continual upper bound), with the REC loss.

    Each image of a mixed batch gets its own task's prompts (``task_ids=batch["task"]``, expanded over its
    queries on OWL); the grounding loss is the family's (`GroundingFamily.rec_terms` with per-image task ids); the
    alignment and task terms are `JointMethod.prompt_terms` (averaged over the tasks)."""

    name = "joint"

    def training_loss(self, ddp_model: nn.Module, batch: dict[str, torch.Tensor], task: Any) -> dict[str, torch.Tensor]:
        config = self.objective.config
        if batch.get("task") is None:
            raise ValueError("The joint baseline needs each image's task in the batch ('task'); use the collator of "
                             "peft_lpi.continual.grounding.grounding_collator (or any that returns 'task').")
        with self.tuner.reuse_prompts():
            terms = _with_loss(self.family.rec_terms(ddp_model, batch, batch["task"], self.rec_kwargs))
            terms.update(self.prompt_terms(_as_group(task), terms["rec"].new_zeros(())))
        terms["loss"] = terms["rec"] + config.align_weight * terms["align"] + config.task_weight * terms["task"]
        return terms


class GroundingLoRAMethod(LoRAMethod):
    """One PEFT LoRA adapter per task on the detector, its family's grounding loss, LPI's image k-means keys and
    routing.

    Training task t activates and trains only adapter ``task{t}``. Keys: k-means of the prompt-free (adapters
    disabled) image and expression features of the task (the family's `image_features` / `text_features`); routing
    uses the image feature only, as LPI's grounding routing does. `detect` groups a batch by task and runs each
    task's adapter on its images (at most T forwards)."""

    name = "lora"

    def __init__(self, model: nn.Module, num_keys: int = 5, routing_metric: str = "l1",
                 rec_kwargs: dict[str, Any] | None = None):
        super().__init__(model, num_keys=num_keys, routing_metric=routing_metric)
        self.family = grounding_family(model)
        self.encoder = getattr(self.family, "encoder", None)  # OWL's CLIP-like model (None for other families)
        self.rec_kwargs = dict(rec_kwargs or {})

    def candidates(self, outputs: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.family.candidates(outputs, batch)

    def training_loss(self, ddp_model: nn.Module, batch: dict[str, torch.Tensor], task: int) -> dict[str, torch.Tensor]:
        # no task ids: the active adapter is task t's
        return _with_loss(self.family.rec_terms(ddp_model, batch, None, self.rec_kwargs))

    @torch.no_grad()
    def encode(self, modality: str, inputs: dict[str, torch.Tensor], tasks: torch.Tensor | str | None) -> tuple:
        """Prompt-free (adapters off) features of the detector's towers; under "auto" also the routed tasks."""
        if tasks is not None and not isinstance(tasks, str):
            raise ValueError("GroundingLoRAMethod.encode gives prompt-free features only (tasks=None or 'auto').")
        with self.model.disable_adapter():
            features = self.family.tower_features(modality, inputs)
        return features, (self.route(modality, features) if tasks == "auto" else None)

    @torch.no_grad()
    def detect(self, inputs: dict[str, torch.Tensor], tasks: torch.Tensor | None) -> Any:
        if tasks is None:
            return self.family.forward(self.model, inputs)
        tasks = torch.as_tensor(tasks).long().reshape(-1)
        images = inputs["pixel_values"].shape[0]
        if tasks.numel() == 1:
            tasks = tasks.expand(images)
        queries = inputs["input_ids"].shape[0] // images  # text rows: (image, query) row-major (OWL); 1 per image
        logits = boxes = None
        active = self.model.active_adapter
        try:
            for task in torch.unique(tasks).tolist():
                rows = torch.nonzero(tasks == task).flatten().to(inputs["pixel_values"].device)
                text_rows = (rows[:, None] * queries + torch.arange(queries, device=rows.device)).reshape(-1)
                part = {key: inputs[key].index_select(0, text_rows if key in ("input_ids", "attention_mask") else rows)
                        for key in MODEL_INPUTS if inputs.get(key) is not None}
                self.model.set_adapter(lora_adapter_name(task), inference_mode=True)
                out = self.family.forward(self.model, part)
                if logits is None:
                    logits = out.logits.new_empty(images, *out.logits.shape[1:])
                    boxes = out.pred_boxes.new_empty(images, *out.pred_boxes.shape[1:])
                logits[rows], boxes[rows] = out.logits, out.pred_boxes
        finally:
            self.model.set_adapter(active, inference_mode=True)
        return SimpleNamespace(logits=logits, pred_boxes=boxes)


@contextmanager
def _untied_word_embeddings(model: nn.Module) -> Iterator[None]:
    """``config.tie_word_embeddings = False`` while PEFT injects LoRA into a Grounding DINO, then as it was.

    Why: Grounding DINO declares tied weights (its box heads), so PEFT's tied-embedding check calls
    ``get_input_embeddings()``, which transformers does not implement for it (NotImplementedError). Its word
    embeddings are tied to no output layer, so the flag's False is the truth; PEFT skips the check when it is."""
    config = getattr(model, "config", None)
    if grounding_model_type(model) not in GROUNDING_DINO_TYPES or config is None:
        yield
        return
    had, before = hasattr(config, "tie_word_embeddings"), getattr(config, "tie_word_embeddings", None)
    config.tie_word_embeddings = False
    try:
        yield
    finally:
        if had:
            config.tie_word_embeddings = before
        else:
            del config.tie_word_embeddings


def lpi_parameters_per_task(base_model: nn.Module, lpi_kwargs: dict[str, Any]) -> int:
    """Trainable parameters of one task of an LPI adapter with `lpi_kwargs` on (a copy of) `base_model`."""
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base_model), LPIConfig(**lpi_kwargs))
    return sum(p.numel() for p in model.base_model.active_bank.tasks[0].parameters())


def lora_parameters_per_rank(base_model: nn.Module, target_modules: str) -> int:
    """LoRA parameters per unit of rank on the linear layers whose full name matches `target_modules` (PEFT's
    full-match rule for a regex): in_features + out_features per layer."""
    layers = [m for n, m in base_model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(target_modules, n)]
    if not layers:
        raise ValueError(f"No linear layer of {type(base_model).__name__} matches the LoRA targets {target_modules!r}.")
    return sum(m.in_features + m.out_features for m in layers)


def matched_lora_rank(lpi_parameters: int, per_rank: int) -> int:
    """The LoRA rank whose parameter count (rank * per_rank) is closest to LPI's, at least 1."""
    return max(1, round(lpi_parameters / per_rank))


def build_grounding_method(
    name: str, base_model: nn.Module, num_tasks: int, lpi_kwargs: dict[str, Any] | None = None, *,
    lora_rank: int | None = None, lora_target_modules: str | None = None,
    rec_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, LPIGroundingMethod | GroundingLoRAMethod]:
    """The model and the grounding method `name` (one of `GROUNDING_METHOD_NAMES`) on a frozen detector
    `base_model` (OWL-ViT / OWLv2 or Grounding DINO).

    `lpi_kwargs`: `LPIConfig` fields (prompt_length, prompt_depth, rank, num_keys, align_weight, task_weight,
    injection ("additive" for Grounding DINO), ...); each method takes those that apply (LoRA: num_keys and
    routing_metric). `lora_rank` None: matched to LPI's parameter budget; `lora_target_modules` None: the family's
    default (`grounding_lora_targets`; module docstring). Seed torch before calling: adapters are initialised here.
    """
    from peft import get_peft_model

    kwargs = dict(lpi_kwargs or {})
    kwargs["num_tasks"] = num_tasks
    if name not in GROUNDING_METHOD_NAMES:
        raise ValueError(f"Unknown grounding method {name!r}; choose one of {', '.join(GROUNDING_METHOD_NAMES)}.")
    if grounding_model_type(base_model) is None:
        grounding_family(base_model)  # the clear "not a supported grounding detector" error, before any wrapping
    if name in ("lpi", "joint"):
        model = get_peft_model(base_model, LPIConfig(**kwargs))
        return model, (LPIGroundingMethod if name == "lpi" else GroundingJointMethod)(model, rec_kwargs)
    if name == "shared-prompt":
        model = get_peft_model(base_model, shared_prompt_config(**kwargs))
        return model, GroundingSharedPromptMethod(model, rec_kwargs)
    if name == "lora":
        if lora_target_modules is None:
            lora_target_modules = grounding_lora_targets(base_model)
        if lora_rank is None:
            per_rank = lora_parameters_per_rank(base_model, lora_target_modules)
            lora_rank = matched_lora_rank(lpi_parameters_per_task(base_model, kwargs), per_rank)
        with _untied_word_embeddings(base_model):
            model = lora_model(base_model, num_tasks, rank=lora_rank, target_modules=lora_target_modules)
        defaults = LPIConfig()
        return model, GroundingLoRAMethod(model, num_keys=kwargs.get("num_keys", defaults.num_keys),
                                          routing_metric=kwargs.get("routing_metric", defaults.routing_metric),
                                          rec_kwargs=rec_kwargs)
    raise ValueError(f"Unknown grounding method {name!r}; choose one of {', '.join(GROUNDING_METHOD_NAMES)}.")
