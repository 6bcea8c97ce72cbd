"""Per-task PEFT LoRA adapters with LPI's k-means keys and routing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...tuner.model import embedding_of
from ...tuner.routing import kmeans, nearest_task
from ..methods import ContinualMethod, FeatureChunks
from ..objective import base_contrastive_loss
from ._common import _feature_method

LORA_TARGET_MODULES = r".*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"  # CLIP/SigLIP attention of both towers
KEYS_FILE = "keys.safetensors"


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

        from ...io import CheckpointError

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
