"""The LPI tuner: a PEFT `BaseTuner` that injects deep prompts into both towers of a dual encoder.

The factors of every task live on the tuner (`lpi_prompts[adapter_name]`, an `LPIPromptBank`), shared by the
wrapped layers of both towers. Which task's prompts a sample gets is tuner state (`set_task`), because the feature
methods (`get_image_features`, `get_text_features`) bypass `PeftModel.forward`.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .._version import __version__
from ..io import TASK_FILE_FORMAT, TASK_FILE_VERSION, CheckpointError, read_task_file, save_tensors_atomic
from .architectures import TowerSpec, find_towers
from .config import LPIConfig
from .factors import VISION, LPIPromptBank, LPITaskFactors
from .layer import LPIPromptedLayer
from .routing import kmeans, nearest_task
from .shallow import ShallowInjection

AUTO = "auto"
TaskSelection = int | torch.Tensor | str


def embedding_of(output: Any) -> torch.Tensor:
    """The projected embedding from a feature method: a tensor (transformers 4) or `.pooler_output` (5.x)."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"Cannot find an embedding in a {type(output).__name__}.")


def _no_layer_prompts(modality: str, layer_index: int, batch: int) -> None:
    """Prompt source of the pass-through layers of injection='shallow'."""
    return None


class LPIModel(BaseTuner):
    """LPI as a PEFT tuner. Create it with `peft.get_peft_model(model, LPIConfig(...))` after `import peft_lpi`."""

    prefix: str = "lpi_"
    tuner_layer_cls = LPIPromptedLayer
    target_module_mapping: dict[str, list[str]] = {}
    uses_shared_state = True

    # ------------------------------------------------------------------ injection
    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Create the adapter's prompt bank and wrap the first `prompt_depth` layers of each prompted tower."""
        config: LPIConfig = self.peft_config[adapter_name]
        if not isinstance(config, LPIConfig):
            raise TypeError(f"LPIModel needs an LPIConfig, got {type(config).__name__}.")
        saved_class = (config.auto_mapping or {}).get("base_model_class")  # set when loading a saved adapter
        if saved_class and saved_class != type(model).__name__:
            raise ValueError(
                f"This LPI adapter was trained on a {saved_class} but is being loaded onto a {type(model).__name__} "
                "(wrong model family): its prompts and keys only fit the backbone they were trained with."
            )
        if "lpi_prompts" not in self._modules:
            self.lpi_prompts = nn.ModuleDict()
            self._task_selection: TaskSelection = 0
            self._routes: dict[str, torch.Tensor] = {}
            self._prompt_cache: dict[str, torch.Tensor] = {}
            self._prompts_off = False
            self.last_routes: dict[str, torch.Tensor] = {}  # tasks chosen by the latest "auto" call, per modality
        towers = find_towers(model, config.layer_paths, config.text_causal)
        depth = min(config.prompt_depth, *(towers[m].num_layers for m in config.prompted_modalities))
        if depth < config.prompt_depth:
            warnings.warn(
                f"prompt_depth={config.prompt_depth} exceeds the depth of the prompted towers; using {depth}.",
                stacklevel=3,
            )
            config.prompt_depth = depth
        self._towers: dict[str, TowerSpec] = towers
        hidden_sizes = {m: towers[m].hidden_size for m in config.prompted_modalities}
        bank = LPIPromptBank(
            num_tasks=config.num_tasks,
            depth=depth,
            prompt_length=config.prompt_length,
            rank=config.rank,
            hidden_sizes=hidden_sizes,
            key_sizes=self._embedding_sizes(model, towers),
            num_keys=config.num_keys,
            share_layer_factor=config.share_layer_factor,
            init_std=config.init_std,
            interaction=config.interaction,
            alpha=config.interaction_alpha,
            factorization=config.factorization,
            interaction_init=config.interaction_init,
        )
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        # low_cpu_mem_usage: PEFT builds the factors on the meta device and assigns the loaded tensors later
        self.lpi_prompts[adapter_name] = bank if any(p.is_meta for p in bank.parameters()) else bank.to(device)
        injections = {self.peft_config[name].injection for name in self.lpi_prompts}
        if len(injections) > 1:
            del self.lpi_prompts[adapter_name]
            raise ValueError(
                f"All LPI adapters of one model must use the same injection mode, got {sorted(injections)}; load the "
                "other adapter into a fresh copy of the base model."
            )
        if config.injection == "shallow":
            if getattr(self, "_shallow", None) is None:  # one set of hooks serves every (shallow) adapter
                self._shallow = ShallowInjection(model, towers, config.prompted_modalities, self._shallow_prompts)
                self.targeted_module_names.extend(self._shallow.paths.values())
            for modality in config.prompted_modalities:
                # a pass-through tuner layer (never inserts anything): PEFT finds its adapter layers through it
                # (get_model_status, disable_adapter); the prompts enter through the shallow hooks
                layers = model.get_submodule(towers[modality].layers_path)
                if not isinstance(layers[0], LPIPromptedLayer):
                    layers[0] = LPIPromptedLayer(layers[0], modality, 0, towers[modality].causal, _no_layer_prompts)
            self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
            self._mark_only_adapters_as_trainable(model)
            return
        for modality in config.prompted_modalities:
            layers = model.get_submodule(towers[modality].layers_path)
            for index in range(depth):
                layer = layers[index]
                if isinstance(layer, LPIPromptedLayer):
                    continue  # wrapped for an earlier adapter: wrappers ask the active adapter's bank
                layers[index] = LPIPromptedLayer(
                    layer, modality, index, towers[modality].causal, self._layer_prompts
                )
                self.targeted_module_names.append(f"{towers[modality].layers_path}.{index}")
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable(model)

    @staticmethod
    def _embedding_sizes(model: nn.Module, towers: dict[str, TowerSpec]) -> dict[str, int]:
        """Width of the routing features (the projected embeddings) of each tower."""
        projection = getattr(getattr(model, "config", None), "projection_dim", None)
        return {m: int(projection or towers[m].hidden_size) for m in ("vision", "text")}

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - inject_adapter is custom
        raise NotImplementedError("LPIModel injects through inject_adapter.")

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for param in model.parameters():
            param.requires_grad = False
        for name, bank in self.lpi_prompts.items():
            trainable = name in self.active_adapters and not self.peft_config[name].inference_mode
            bank.requires_grad_(trainable)

    # ------------------------------------------------------------------ PEFT adapter management
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1:
            raise ValueError("LPI activates one adapter at a time (tasks live inside one adapter).")
        for name in names:
            if name not in self.lpi_prompts:
                raise ValueError(f"Adapter {name!r} does not exist; available: {list(self.lpi_prompts)}.")
        for name, bank in self.lpi_prompts.items():
            bank.requires_grad_(name in names and not inference_mode)
        self.active_adapter = names[0] if names else []
        self._task_selection = 0
        self._prompt_cache.clear()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        del self.peft_config[adapter_name]
        del self.lpi_prompts[adapter_name]
        if adapter_name in self.active_adapters:
            remaining = list(self.lpi_prompts)
            self.active_adapter = remaining[0] if remaining else []

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        if getattr(self, "_shallow", None) is not None:
            self._shallow.enabled = enabled
        for module in self.model.modules():
            if isinstance(module, LPIPromptedLayer):
                module._disable_adapters = not enabled

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            "LPI prompts are extra tokens, not weight deltas: they cannot be merged into the base weights. Keep the "
            "PeftModel for inference, or use `unload()` to get the base model back without prompts."
        )

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        self.merge_adapter()
        raise AssertionError("unreachable")

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs: Any) -> nn.Module:
        if merge:
            self.merge_adapter()
        if getattr(self, "_shallow", None) is not None:
            self._shallow.remove()
            self._shallow = None
        for spec in self._towers.values():
            layers = self.model.get_submodule(spec.layers_path)
            for index, layer in enumerate(layers):
                if isinstance(layer, LPIPromptedLayer):
                    layers[index] = layer.base_layer
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """'base_model.lpi_prompts.<adapter>.tasks.0.layer_factor' -> 'base_model.lpi_prompts.tasks.0.layer_factor'."""
        return key.replace(f"lpi_prompts.{adapter_name}.", "lpi_prompts.", 1)

    # ------------------------------------------------------------------ tasks
    @property
    def active_bank(self) -> LPIPromptBank:
        if not self.active_adapters or self.active_adapters[0] not in self.lpi_prompts:
            raise ValueError("No active LPI adapter; call set_adapter(name) first.")
        return self.lpi_prompts[self.active_adapters[0]]

    @property
    def active_config(self) -> LPIConfig:
        return self.peft_config[self.active_adapters[0]]

    @property
    def num_tasks(self) -> int:
        return self.active_bank.num_tasks

    def _check_task_id(self, task: Any) -> int:
        if isinstance(task, bool) or not isinstance(task, numbers.Integral | torch.Tensor) or (
            isinstance(task, torch.Tensor) and (task.dim() != 0 or task.is_floating_point())
        ):
            raise TypeError(f"A task id must be an int, got {task!r} ({type(task).__name__}).")
        task = int(task)
        if not 0 <= task < self.num_tasks:
            raise IndexError(
                f"Task id {task} is out of range: this adapter has {self.num_tasks} tasks (0..{self.num_tasks - 1}). "
                "Use add_task() to add one."
            )
        return task

    def set_task(self, task: TaskSelection) -> None:
        """Choose whose prompts the next calls use.

        - an int: every sample uses that task;
        - a 1-D integer tensor: one task per sample of the next batch (its length must equal the batch size);
        - "auto": each sample's task is inferred from its prompt-free features and the stored task keys.
        """
        if isinstance(task, str):
            if task != AUTO:
                raise ValueError(f"set_task accepts an int, a LongTensor or 'auto', got the string {task!r}.")
            if not bool(self.active_bank.has_keys.any()):
                raise ValueError(
                    "set_task('auto') needs task keys, but no task has any yet. Build them after training a task "
                    "with `model.build_task_keys(task, ...)` (the ContinualTrainer does this) or load an adapter "
                    "that has them."
                )
        elif isinstance(task, torch.Tensor) and task.dim() == 1:
            if task.is_floating_point() or task.dtype == torch.bool or task.is_complex():
                raise TypeError(f"Per-sample task ids must be an integer tensor, got dtype {task.dtype}.")
            if task.numel() == 0:
                raise ValueError("Per-sample task ids are empty.")
            low, high = int(task.min()), int(task.max())
            if low < 0 or high >= self.num_tasks:
                bad = low if low < 0 else high
                raise IndexError(
                    f"Task id {bad} is out of range: this adapter has {self.num_tasks} tasks (0..{self.num_tasks - 1})."
                )
            task = task.long()
        else:
            task = self._check_task_id(task)
        self._task_selection = task
        self._routes = {}
        self._prompt_cache.clear()

    @property
    def current_task(self) -> TaskSelection:
        return self._task_selection

    def train_task(self, task: int) -> list[nn.Parameter]:
        """Make task `task` the only trainable one (every other task's factors frozen exactly) and select it.

        Returns the trainable parameters, ready for an optimizer.
        """
        task = self._check_task_id(task)
        bank = self.active_bank
        bank.requires_grad_(False)
        bank.tasks[task].requires_grad_(True)
        self.set_task(task)
        return [p for p in bank.tasks[task].parameters()]

    def add_task(self) -> int:
        """Append a new task to the active adapter (frozen until `train_task`); returns its id."""
        bank = self.active_bank
        index = bank.add_task()
        bank.tasks[index].requires_grad_(False)
        config = self.active_config
        config.num_tasks = bank.num_tasks
        if config.task_names is not None:
            config.task_names = [*config.task_names, f"task_{index}"]
        return index

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return list(self.active_bank.tasks[self._check_task_id(task)].parameters())

    def task_prompts(self, tasks: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Prompts of the given tasks after the correlation module: {modality: (len(tasks), K, P, D_m)}."""
        ids = torch.as_tensor(tasks, dtype=torch.long).reshape(-1)
        for t in ids.tolist():
            self._check_task_id(t)
        return self.active_bank.task_prompts(ids)

    # ------------------------------------------------------------------ prompts for the wrapped layers
    def _samples_tasks(self, modality: str, batch: int) -> torch.Tensor | int:
        if modality in self._routes:
            routes = self._routes[modality]
            if routes.shape[0] != batch:
                raise ValueError(f"Routed {routes.shape[0]} {modality} samples but the batch has {batch}.")
            return routes
        selection = self._task_selection
        if isinstance(selection, str):
            raise ValueError(
                "set_task('auto') routes inside the PeftModel's forward, get_image_features and get_text_features. "
                "Call those on the PeftModel (not on the inner base model)."
            )
        if isinstance(selection, torch.Tensor) and selection.shape[0] != batch:
            raise ValueError(
                f"set_task got {selection.shape[0]} per-sample task ids but the {modality} batch has {batch} samples."
            )
        return selection

    def _layer_prompts(self, modality: str, layer_index: int, batch: int) -> torch.Tensor | None:
        """(B, P, D) prompts for one prompted layer, or None when this layer gets no prompts."""
        if self._prompts_off or not self.active_adapters or self.active_adapters[0] not in self.lpi_prompts:
            return None
        bank = self.active_bank
        if modality not in bank.modalities or layer_index >= bank.depth:
            return None
        if layer_index == 0 or modality not in self._prompt_cache:
            tasks = self._samples_tasks(modality, batch)
            if isinstance(tasks, int):
                prompts = bank.task_prompts(torch.tensor([tasks]))[modality].expand(batch, -1, -1, -1)
            else:
                prompts = bank.prompts_for_samples(modality, tasks)
            self._prompt_cache[modality] = prompts  # (B, K, P, D)
        prompts = self._prompt_cache[modality]
        if layer_index == bank.depth - 1:
            del self._prompt_cache[modality]
        return prompts[:, layer_index]

    def _shallow_prompts(self, modality: str, batch: int) -> torch.Tensor | None:
        """(B, P, D) layer-0 prompts for injection='shallow' (the only layer whose prompts enter the towers)."""
        prompts = self._layer_prompts(modality, 0, batch)
        self._prompt_cache.pop(modality, None)  # no later layer asks for the rest
        return prompts

    @contextlib.contextmanager
    def prompts_disabled(self) -> Iterator[None]:
        """Run the base model without prompts (the prompt-free features used for routing and task keys)."""
        previous = self._prompts_off
        self._prompts_off = True
        try:
            yield
        finally:
            self._prompts_off = previous

    # ------------------------------------------------------------------ task identity at inference
    def set_task_keys(self, task: int, *, vision: torch.Tensor | None = None, text: torch.Tensor | None = None) -> None:
        """Store a task's k-means centres (k', D) per modality; fewer than k centres are padded by repetition."""
        task = self._check_task_id(task)
        bank = self.active_bank
        for modality, centres in (("vision", vision), ("text", text)):
            if centres is None:
                continue
            buffer = getattr(bank, f"{modality}_keys")
            num_keys, width = buffer.shape[1:]
            if centres.dim() != 2 or centres.shape[1] != width or centres.shape[0] == 0:
                raise ValueError(f"{modality} keys must have shape (k, {width}), got {tuple(centres.shape)}.")
            repeat = torch.arange(num_keys) % centres.shape[0]
            buffer[task] = centres[repeat].to(buffer)
        both = all(bool(torch.isfinite(getattr(bank, f"{m}_keys")[task]).all()) for m in ("vision", "text"))
        bank.has_keys[task] = both  # routing needs keys of both modalities

    def build_task_keys(self, task: int, *, vision: Any = None, text: Any = None, seed: int = 0) -> None:
        """k-means (k = LPIConfig.num_keys) on a task's L2-normalised prompt-free features, stored as its keys.

        `vision` / `text` are (N, D) tensors or callables returning a fresh iterator of (n, D) chunks (streaming).
        """
        k = self.active_config.num_keys
        centres = {
            modality: kmeans(features, k, seed=seed, normalize=True)
            for modality, features in (("vision", vision), ("text", text))
            if features is not None
        }
        self.set_task_keys(task, **centres)

    def route(self, modality: str, features: torch.Tensor) -> torch.Tensor:
        """Task of each sample: the task whose nearest key is closest (LPIConfig.routing_metric)."""
        bank = self.active_bank
        if not bool(bank.has_keys.any()):
            raise ValueError("No task has routing keys yet; build them with `build_task_keys` after training a task.")
        keys = getattr(bank, f"{modality}_keys")
        return nearest_task(features, keys, self.active_config.routing_metric, available=bank.has_keys)

    def _base_features(self, modality: str, **inputs: Any) -> torch.Tensor:
        method = self.model.get_image_features if modality == VISION else self.model.get_text_features
        with self.prompts_disabled():
            return embedding_of(method(**inputs))

    @contextlib.contextmanager
    def _auto_routes(self, inputs: dict[str, Any]) -> Iterator[None]:
        """In auto mode, route the images and captions of `inputs` independently for the duration of a call."""
        if not (isinstance(self._task_selection, str) and self._task_selection == AUTO):
            yield
            return
        routes: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if inputs.get("pixel_values") is not None:
                features = self._base_features(VISION, pixel_values=inputs["pixel_values"])
                routes[VISION] = self.route(VISION, features)
            if inputs.get("input_ids") is not None:
                text_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
                routes["text"] = self.route("text", self._base_features("text", **text_inputs))
        self._routes = routes
        self.last_routes = {k: v.detach() for k, v in routes.items()}
        try:
            yield
        finally:
            self._routes = {}

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Called by PeftModel.forward around the base model's forward: auto routing happens here."""
        with self._auto_routes(kwargs):
            yield

    def get_image_features(self, pixel_values: torch.Tensor | None = None, **kwargs: Any) -> Any:
        with self._auto_routes({"pixel_values": pixel_values}):
            return self.model.get_image_features(pixel_values=pixel_values, **kwargs)

    def get_text_features(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        with self._auto_routes({"input_ids": input_ids, **kwargs}):
            return self.model.get_text_features(input_ids=input_ids, **kwargs)

    # ------------------------------------------------------------------ one task as a standalone file
    def _task_file_metadata(self) -> dict[str, str]:
        config, bank = self.active_config, self.active_bank
        base_config = getattr(self.model, "config", None)
        return {
            "format": TASK_FILE_FORMAT,
            "format_version": str(TASK_FILE_VERSION),
            "library_version": __version__,
            "model_type": str(getattr(base_config, "model_type", type(self.model).__name__)),
            "base_model_name_or_path": str(config.base_model_name_or_path or ""),
            "towers": config.towers,
            "vision_hidden_size": str(self._towers["vision"].hidden_size),
            "text_hidden_size": str(self._towers["text"].hidden_size),
            "rank": str(bank.rank),
            "prompt_length": str(bank.prompt_length),
            "prompt_depth": str(bank.depth),
            "share_layer_factor": str(config.share_layer_factor),
            "interaction": str(config.interaction),
            "factorization": config.factorization,
            "num_keys": str(config.num_keys),
            "backbone_fingerprint": self._backbone_fingerprint(),
        }

    def _backbone_fingerprint(self) -> str:
        """Norms of the frozen weights of each tower's first encoder layer (JSON list): tells apart two backbones of
        the same shapes (another checkpoint), while tolerating dtype casts of the same one (compared with rtol 1e-3)."""
        norms = []
        for modality in ("vision", "text"):
            layer = self.model.get_submodule(self._towers[modality].layers_path)[0]
            for _, param in sorted(layer.named_parameters()):
                norms.append(0.0 if param.is_meta else float(torch.linalg.vector_norm(param.detach().double())))
        return json.dumps([float(f"{v:.8g}") for v in norms])

    def save_task(self, task: int, path: str | os.PathLike) -> None:
        """Write one task's factors and keys as a standalone safetensors file with metadata (atomically)."""
        task = self._check_task_id(task)
        bank = self.active_bank
        tensors = {f"factors.{k}": v for k, v in bank.tasks[task].state_dict().items()}
        for modality in ("vision", "text"):
            tensors[f"keys.{modality}"] = getattr(bank, f"{modality}_keys")[task]
        tensors["keys.available"] = bank.has_keys[task : task + 1]
        save_tensors_atomic(tensors, path, self._task_file_metadata())

    def load_task(self, task: int | None, path: str | os.PathLike) -> int:
        """Load a task file into task `task` (None: append it as a new task). Returns the task id.

        The file is checked completely (format, backbone, widths, rank, prompt length, depth, tensor shapes) before
        anything is changed; an incompatible or corrupt file raises `CheckpointError` and leaves the adapter as it was.
        """
        tensors, metadata = read_task_file(path)
        expected = self._task_file_metadata()
        for field_name in (
            "model_type", "towers", "vision_hidden_size", "text_hidden_size", "rank", "prompt_length",
            "prompt_depth", "share_layer_factor", "interaction", "factorization", "num_keys",
        ):
            if metadata.get(field_name) != expected[field_name]:
                raise CheckpointError(
                    f"Task file {path} does not fit this adapter: {field_name} is {metadata.get(field_name)!r} in the "
                    f"file but {expected[field_name]!r} here. A task can only move between adapters with the same "
                    "backbone and LPI shape."
                )
        if metadata.get("backbone_fingerprint"):  # absent in files written before it existed
            saved, here = json.loads(metadata["backbone_fingerprint"]), json.loads(expected["backbone_fingerprint"])
            if len(saved) != len(here) or any(abs(a - b) > 1e-3 * max(abs(a), abs(b), 1e-6) for a, b in zip(saved, here)):
                raise CheckpointError(
                    f"Task file {path} was trained on another backbone: the frozen weights of its first encoder "
                    f"layers differ from this model's (base model {metadata.get('base_model_name_or_path')!r} in the "
                    f"file, {expected['base_model_name_or_path']!r} here), although model_type, widths and the LPI "
                    "shape match. Prompts only work with the backbone they were trained on."
                )
        bank = self.active_bank
        candidate = LPITaskFactors(**bank._factor_kwargs)
        factor_state = {k.removeprefix("factors."): v for k, v in tensors.items() if k.startswith("factors.")}
        try:
            candidate.load_state_dict(factor_state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"Task file {path} has unexpected tensors: {err}") from None
        keys = {}
        for modality in ("vision", "text"):
            buffer = getattr(bank, f"{modality}_keys")
            value = tensors.get(f"keys.{modality}")
            if value is None or tuple(value.shape) != tuple(buffer.shape[1:]):
                raise CheckpointError(f"Task file {path}: keys.{modality} is missing or has the wrong shape.")
            keys[modality] = value
        available = tensors.get("keys.available")
        if available is None or available.numel() != 1:
            raise CheckpointError(f"Task file {path}: keys.available is missing.")
        # Everything checked: now change the adapter.
        if task is None:
            task = self.add_task()
        task = self._check_task_id(task)
        with torch.no_grad():
            target = bank.tasks[task]
            sources = candidate.state_dict()
            for name, param in target.state_dict(keep_vars=True).items():
                param.copy_(sources[name].to(param))
            for modality, value in keys.items():
                getattr(bank, f"{modality}_keys")[task] = value.to(getattr(bank, f"{modality}_keys"))
            bank.has_keys[task] = bool(available.reshape(()).item())
        return task

    def import_task(self, path: str | os.PathLike) -> int:
        """Append a task trained elsewhere (same backbone and LPI shape), keys included; returns its new id."""
        return self.load_task(None, path)

