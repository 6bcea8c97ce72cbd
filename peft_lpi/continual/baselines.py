"""Baselines and the joint upper bound, run by the same `ContinualTrainer` under the identical protocol as LPI.

Every method here is a `peft_lpi.continual.methods.ContinualMethod`; `build_method(name, ...)` creates the model and the method
from a frozen base model and is what `examples/continual_retrieval.py --method NAME` calls:

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

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..tuner.config import LPIConfig
from ..tuner.model import embedding_of
from ..tuner.routing import kmeans, nearest_task
from .losses import task_contrastive_loss
from .methods import ContinualMethod, FeatureChunks, LPIMethod
from .objective import LPIObjective, alignment_terms, base_contrastive_loss
from .similarity import similarity_targets

METHOD_NAMES = ("lpi", "zero-shot", "shared-prompt", "s-prompts", "lora", "joint")
LORA_TARGET_MODULES = r".*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"  # CLIP/SigLIP attention of both towers
KEYS_FILE = "keys.safetensors"
ZERO_SHOT_MARKER = "zero_shot.json"


def _as_group(task: int | Sequence[int]) -> list[int]:
    """The trainer passes an int for a one-task stage and a list of task ids for a multi-task stage."""
    return [int(task)] if isinstance(task, int | torch.Tensor) else [int(t) for t in task]


def _feature_method(model: nn.Module, modality: str) -> Any:
    return model.get_image_features if modality == "vision" else model.get_text_features


def matched_full_rank_std(init_std: float, rank: int) -> float:
    """Element std of LPI's CP prompts at init, `init_std**3 / sqrt(rank)`: the init of the full-rank baselines."""
    return init_std**3 / math.sqrt(rank)


# ----------------------------------------------------------------------------------------------------------------------
# Zero-shot
# ----------------------------------------------------------------------------------------------------------------------


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
        from ..io import CheckpointError

        if not (Path(path) / ZERO_SHOT_MARKER).is_file():
            raise CheckpointError(f"Checkpoint {path} was not written by the zero-shot method.")


# ----------------------------------------------------------------------------------------------------------------------
# Sequential fine-tuning of one shared prompt set (the forgetting baseline)
# ----------------------------------------------------------------------------------------------------------------------


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
        self.tuner.set_task(0)
        return super().training_loss(ddp_model, batch, 0)

    @torch.no_grad()
    def encode(self, modality: str, inputs: dict[str, torch.Tensor], tasks: torch.Tensor | str | None) -> tuple:
        return super().encode(modality, inputs, None if tasks is None else 0)


# ----------------------------------------------------------------------------------------------------------------------
# S-Prompts-style full-rank per-task prompts
# ----------------------------------------------------------------------------------------------------------------------


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


def s_prompts_config(**lpi_kwargs: Any) -> LPIConfig:
    """S-Prompts-style adapter: per-task free (K, P, D_m) prompts in both towers, same depth and length as LPI, no
    factorisation, no correlation module, contrastive loss only (alignment and task terms off)."""
    return LPIConfig(**_full_rank_kwargs(lpi_kwargs))


def s_prompts_method(model: nn.Module) -> LPIMethod:
    """S-Prompts is LPI's machinery (per-task sets, k-means keys, batched routing) on an `s_prompts_config` adapter."""
    method = LPIMethod(model)
    method.name = "s-prompts"
    return method


# ----------------------------------------------------------------------------------------------------------------------
# Per-task LoRA adapters
# ----------------------------------------------------------------------------------------------------------------------


def lora_adapter_name(task: int) -> str:
    return f"task{int(task)}"


class LoRAMethod(ContinualMethod):
    """One PEFT LoRA adapter per task (`task0`, `task1`, ...) with LPI's k-means keys and routing.

    Training task t activates adapter `task{t}` and trains only it; its loss is the family contrastive loss. Keys are
    k-means centres of the prompt-free (adapters disabled) features. Encoding with per-sample tasks groups the batch
    by task and loops over the distinct tasks (at most T forwards per batch), not over samples.
    """

    name = "lora"

    def __init__(self, model: nn.Module, num_keys: int = 5, routing_metric: str = "l1"):
        super().__init__(model)
        self.num_keys, self.routing_metric = num_keys, routing_metric
        self.adapters = sorted(model.peft_config, key=lambda n: int(n.removeprefix("task")))
        self.keys: dict[str, torch.Tensor] = {}
        self.has_keys = torch.zeros(len(self.adapters), dtype=torch.bool)

    @property
    def base(self) -> nn.Module:
        return self.model.get_base_model()

    def parameters_for_task(self, task: int) -> list[nn.Parameter]:
        name = lora_adapter_name(task)
        self.model.set_adapter(name)  # PEFT: only the active adapter requires grad
        params = [p for n, p in self.model.named_parameters() if p.requires_grad]
        if not params or not all(f".{name}." in n for n, p in self.model.named_parameters() if p.requires_grad):
            raise RuntimeError(f"Expected only adapter {name!r} to be trainable.")
        return params

    def training_loss(self, ddp_model: nn.Module, batch: dict[str, torch.Tensor], task: int) -> dict[str, torch.Tensor]:
        outputs = ddp_model(
            pixel_values=batch["pixel_values"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        loss = base_contrastive_loss(
            self.base, outputs.image_embeds.float(), outputs.text_embeds.float(), sample_ids=batch["caption_ids"]
        )
        return {"loss": loss, "contrastive": loss.detach()}

    def prompt_free(self) -> Any:
        return self.model.disable_adapter()

    def build_keys(self, task: int, vision: FeatureChunks, text: FeatureChunks, seed: int) -> None:
        for modality, features in (("vision", vision), ("text", text)):
            centres = kmeans(features, self.num_keys, seed=seed, normalize=True)
            repeat = torch.arange(self.num_keys) % centres.shape[0]  # fewer centres than k: repeat (as LPI does)
            if modality not in self.keys:
                self.keys[modality] = torch.full(
                    (len(self.adapters), self.num_keys, centres.shape[1]), float("nan"), device=centres.device
                )
            self.keys[modality][task] = centres[repeat].to(self.keys[modality])
        self.has_keys[task] = True

    def route(self, modality: str, features: torch.Tensor) -> torch.Tensor:
        if not bool(self.has_keys.any()):
            raise ValueError("No task has routing keys yet.")
        return nearest_task(features, self.keys[modality], self.routing_metric, available=self.has_keys)

    @torch.no_grad()
    def encode(self, modality: str, inputs: dict[str, torch.Tensor], tasks: torch.Tensor | str | None) -> tuple:
        method = _feature_method(self.model, modality)
        if tasks is None:
            with self.model.disable_adapter():
                return embedding_of(method(**inputs)).float(), None
        routes = None
        if isinstance(tasks, str):
            with self.model.disable_adapter():
                features = embedding_of(method(**inputs)).float()
            tasks = routes = self.route(modality, features)
        tasks = torch.as_tensor(tasks).long()
        active = self.model.active_adapter
        embeds: torch.Tensor | None = None
        try:
            for task in torch.unique(tasks).tolist():
                rows = torch.nonzero(tasks == task).flatten().to(next(iter(inputs.values())).device)
                self.model.set_adapter(lora_adapter_name(task), inference_mode=True)
                part = embedding_of(method(**{k: v.index_select(0, rows) for k, v in inputs.items()})).float()
                if embeds is None:
                    embeds = part.new_empty(tasks.shape[0], part.shape[1])
                embeds[rows] = part
        finally:
            self.model.set_adapter(active, inference_mode=True)
        return embeds, routes

    def trainable_parameters_per_task(self) -> int:
        marker = f".{self.adapters[0]}."
        return sum(p.numel() for n, p in self.model.named_parameters() if marker in n)

    def save_adapter(self, path: Any) -> None:
        from safetensors.torch import save_file

        self.model.save_pretrained(path)  # no adapter is called "default": each goes to path/task{t}/
        tensors = {f"keys.{m}": k.detach().cpu().contiguous() for m, k in self.keys.items()}
        tensors["has_keys"] = self.has_keys.clone()
        save_file(tensors, str(Path(path) / KEYS_FILE))

    def load_adapter(self, path: Any) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from ..io import CheckpointError

        try:
            for name in self.adapters:
                weights = load_file(str(Path(path) / name / "adapter_model.safetensors"))
                result = set_peft_model_state_dict(self.model, weights, adapter_name=name)
                if any("lora_" in k for k in result.unexpected_keys):
                    raise CheckpointError(f"Checkpoint {path}: adapter {name} has unexpected tensors.")
            keys = load_file(str(Path(path) / KEYS_FILE))
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"Cannot read the LoRA adapters of checkpoint {path}: {err}") from None
        device = next(self.model.parameters()).device
        self.has_keys = keys.pop("has_keys").bool()
        self.keys = {k.removeprefix("keys."): v.to(device) for k, v in keys.items()}


def lora_model(base_model: nn.Module, num_tasks: int, rank: int = 4, target_modules: Any = LORA_TARGET_MODULES,
               lora_alpha: float | None = None, **lora_kwargs: Any) -> nn.Module:
    """`base_model` with one LoRA adapter per task (`task0` ... `task{T-1}`), all created up front. LoRA's B = 0
    makes every adapter start as the base model; alpha defaults to 2 * rank (PEFT's 8 at rank 4)."""
    from peft import LoraConfig, get_peft_model

    def config() -> LoraConfig:
        return LoraConfig(r=rank, lora_alpha=lora_alpha or 2 * rank, lora_dropout=0.0, target_modules=target_modules,
                          **lora_kwargs)

    model = get_peft_model(base_model, config(), adapter_name=lora_adapter_name(0))
    for task in range(1, num_tasks):
        model.add_adapter(lora_adapter_name(task), config())
    model.set_adapter(lora_adapter_name(0))
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Joint multi-task LPI (upper bound)
# ----------------------------------------------------------------------------------------------------------------------


class JointMethod(LPIMethod):
    """LPI trained on the union of all tasks in ONE stage (the non-continual upper bound).

    Each sample of a mixed batch gets its own task's prompts (`set_task(batch["task"])`, batched). Loss:
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
        self.tuner.set_task(batch["task"])
        outputs = ddp_model(
            pixel_values=batch["pixel_values"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        return self.joint_objective(outputs.image_embeds.float(), outputs.text_embeds.float(), group,
                                    sample_ids=batch["caption_ids"])

    def joint_objective(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, group: list[int], *,
                        sample_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        config, tuner = self.objective.config, self.tuner
        terms = {"contrastive": base_contrastive_loss(tuner.model, image_embeds, text_embeds, sample_ids=sample_ids)}
        zero = terms["contrastive"].new_zeros(())
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
        terms["loss"] = terms["contrastive"] + config.align_weight * terms["align"] + config.task_weight * terms["task"]
        return terms


def grouped_continual_metrics(matrix: Sequence[Sequence[float]], schedule: list[list[int]]) -> dict[str, float]:
    """`evaluation.continual_metrics` generalised to stages that learn several tasks (e.g. joint: one stage).

    A task is "learned at" the stage whose group contains it. final_average: mean of the last stage's row over the
    tasks learned so far; stage_averaged: per task, mean over the stages from its own on, then over tasks; forgetting
    (positive = forgotten) and backward transfer: over tasks learned before the last stage, 0.0 when there are none.
    With one task per stage in order this equals `continual_metrics`.
    """
    R = torch.tensor([[math.nan if v is None else float(v) for v in row] for row in matrix], dtype=torch.float64)
    last = R.shape[0] - 1
    learned_at = {t: s for s, group in enumerate(schedule[: last + 1]) for t in group}
    seen = sorted(learned_at)
    final = R[last, seen].mean().item()
    staged = torch.stack([R[learned_at[t]:, t].nanmean() for t in seen]).mean().item()
    earlier = [t for t in seen if learned_at[t] < last]
    if earlier:
        drops = [R[learned_at[t]:last, t].nan_to_num(nan=-math.inf).max() - R[last, t] for t in earlier]
        forgetting = torch.stack(drops).mean().item()
        bwt = torch.stack([R[last, t] - R[learned_at[t], t] for t in earlier]).mean().item()
    else:
        forgetting = bwt = 0.0
    return {"final_average": final, "stage_averaged": staged, "forgetting": forgetting, "backward_transfer": bwt}


# ----------------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------------


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
