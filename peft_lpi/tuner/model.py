"""The LPI tuner: a PEFT `BaseTuner` that injects deep prompts into both towers of a dual encoder.

The factors of every task live on the tuner (`lpi_prompts[adapter_name]`, an `LPIPromptBank`), shared by the
wrapped layers of both towers. Which task's prompts a sample gets is chosen per call (`task_ids=` on the forward and
both feature methods, as PEFT's LoRA takes `adapter_names`) or sticky (`set_task`).
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .additive import LPIAdditiveLayer
from .architectures import TowerSpec, find_towers, replace_block
from .config import LPIConfig
from .factors import LPIPromptBank
from .layer import MERGE_ERROR, LPIPromptedLayer
from .shallow import ShallowInjection
from .task_files import TaskFilesMixin
from .task_routing import (
    AUTO,
    TaskRoutingMixin,
    TaskSelection,
    embedding_of,  # noqa: F401  (re-exported: peft_lpi.tuner.model.embedding_of)
)
from .trainability import TrainabilityMixin


def _finite_keys(key: str, value: torch.Tensor) -> torch.Tensor:
    """A routing-key tensor of an older adapter, NaN (its old "no keys yet" sentinel) replaced by 0; others as is."""
    if "lpi_prompts" in key and key.endswith(("vision_keys", "text_keys")) and value.is_floating_point():
        return value.nan_to_num(0.0)
    return value


def _drop_task_ids(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook on the base model: `task_ids` is LPI's per-call argument (read by the tuner's forward
    hooks), never the base model's. PeftModel only filters its own `special_peft_forward_args`."""
    kwargs.pop("task_ids", None)
    return args, kwargs


def _no_layer_prompts(modality: str, layer_index: int, batch: int) -> None:
    """Prompt source of the pass-through layers of injection='shallow'."""
    return None


class LPIModel(TrainabilityMixin, TaskRoutingMixin, TaskFilesMixin, BaseTuner):
    """LPI as a PEFT tuner. Create it with `peft.get_peft_model(model, LPIConfig(...))` after `import peft_lpi`.

    This class holds injection, PEFT's adapter management (set/delete/unload/merge refusal) and the task selection
    the wrapped layers read; three mixins hold the rest, one job each: `TrainabilityMixin` (which factors train),
    `TaskRoutingMixin` (keys, "auto" routing, per-call `task_ids`) and `TaskFilesMixin` (one task as a file). It
    stays near 400 lines because PEFT's `BaseTuner` surface it must override (inject_adapter, set_adapter,
    delete_adapter, _enable_adapter_layers, _unload_and_optionally_merge, state-dict remapping, forward hooks) is
    one contract and reads best in one place, as in PEFT's own `LoraModel`.
    """

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
        # PEFT: adding an adapter never changes the trainability of parameters already there (a base weight the user
        # unfroze, a factor they froze); only the first injection freezes the base model.
        existing_requires_grad = _requires_grad_snapshot(model, self) if len(getattr(self, "lpi_prompts", ())) else []
        if "lpi_prompts" not in self._modules:
            self.lpi_prompts = nn.ModuleDict()
            self._grad_enabled: dict[str, bool] = {}  # per adapter: may its training task require grad now?
            self._task_selection: TaskSelection = 0
            self._routes: dict[str, torch.Tensor] = {}
            self._prompt_cache: dict[str, torch.Tensor] = {}
            self._prompts_off = False
            self.last_routes: dict[str, torch.Tensor] = {}  # tasks chosen by the latest "auto" call, per modality
            self._task_ids_hook = model.register_forward_pre_hook(_drop_task_ids, with_kwargs=True)
        injection = getattr(config, "injection", "deep")
        towers = find_towers(
            model, config.layer_paths, config.text_causal, required=config.prompted_modalities, injection=injection
        )
        _check_injection(model, towers, config)
        depth = min(config.prompt_depth, *(towers[m].num_layers for m in config.prompted_modalities))
        if depth < config.prompt_depth:
            warnings.warn(
                f"prompt_depth={config.prompt_depth} exceeds the depth of the prompted towers; using {depth}.",
                stacklevel=3,
            )
            config.prompt_depth = depth
        self._towers: dict[str, TowerSpec] = towers
        self._grouped_rows = _grouped_row_modalities(model)
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
        if config.injection == "shallow" and getattr(self, "_shallow", None) is None:
            # one set of hooks serves every (shallow) adapter; the prompts enter through them, and layer 0 gets a
            # pass-through tuner layer (never inserts anything) through which PEFT finds the adapter layers
            # (get_model_status, disable_adapter)
            self._shallow = ShallowInjection(model, towers, config.prompted_modalities, self._shallow_prompts)
            self.targeted_module_names.extend(self._shallow.paths.values())
        for modality in config.prompted_modalities:
            spec = towers[modality]
            for index in range(1 if config.injection == "shallow" else depth):
                path = spec.block_path(index)
                layer = model.get_submodule(path)
                if isinstance(layer, LPIPromptedLayer):
                    continue  # wrapped for an earlier adapter: wrappers ask the active adapter's bank
                if injection == "additive":
                    wrapped = LPIAdditiveLayer(
                        layer, modality, index, spec.causal, self._layer_prompts, spatial=spec.spatial
                    )
                elif injection == "shallow":
                    wrapped = LPIPromptedLayer(layer, modality, index, spec.causal, _no_layer_prompts)
                else:
                    wrapped = LPIPromptedLayer(layer, modality, index, spec.causal, self._layer_prompts)
                wrapped.training_factors_source = self._training_factors_view
                wrapped.requires_grad_sink = self.set_requires_grad
                replace_block(model, path, wrapped)
                self.targeted_module_names.append(path)
        # A new adapter trains only if it is the active one (the first adapter) and not loaded for inference; adding
        # an adapter never changes what the other adapters train (PEFT: "add_adapter preserves existing trainability").
        self._grad_enabled[adapter_name] = adapter_name in self.active_adapters and not config.inference_mode
        if adapter_name in self.active_adapters:
            self._task_selection = config.trainable_task
        self._sync_layer_active_adapters()
        self._mark_only_adapters_as_trainable(model)
        for param, requires_grad in existing_requires_grad:
            param.requires_grad = requires_grad

    @staticmethod
    def _embedding_sizes(model: nn.Module, towers: dict[str, TowerSpec]) -> dict[str, int]:
        """Width of the routing features (the projected embeddings) of each tower."""
        config = getattr(model, "config", None)
        projection = getattr(config, "projection_dim", None)
        sizes = {m: int(projection or (towers[m].hidden_size if m in towers else 1)) for m in ("vision", "text")}
        backbone = getattr(config, "backbone_config", None)
        if projection is None and getattr(config, "model_type", None) == "grounding-dino" and backbone is not None:
            # Grounding DINO routes on its pooled LAST Swin stage (peft_lpi.continual.grounding_models), whose width
            # is the backbone's hidden_size, not the first stage's that the prompts have.
            sizes["vision"] = int(backbone.hidden_size)
        return sizes

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - inject_adapter is custom
        raise NotImplementedError("LPIModel injects through inject_adapter.")

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """Freeze the base model; the LPI factors follow the trainability state (`_apply_trainability`)."""
        for param in model.parameters():
            param.requires_grad = False
        self._apply_trainability()

    # ------------------------------------------------------------------ PEFT adapter management
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter. Like LoRA, it becomes trainable (unless `inference_mode`) and the others freeze; for
        LPI "trainable" means its training task only. Selects that task for the next calls."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1:
            raise ValueError("LPI activates one adapter at a time (tasks live inside one adapter).")
        for name in names:
            if name not in self.lpi_prompts:
                raise ValueError(f"Adapter {name!r} does not exist; available: {list(self.lpi_prompts)}.")
        for name in self.lpi_prompts:
            self._grad_enabled[name] = name in names and not inference_mode
        self.active_adapter = names[0] if names else []
        self._sync_layer_active_adapters()
        self._task_selection = self.peft_config[names[0]].trainable_task if names else 0
        self._routes = {}
        self._apply_trainability()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        del self.peft_config[adapter_name]
        del self.lpi_prompts[adapter_name]
        self._grad_enabled.pop(adapter_name, None)
        if adapter_name in self.active_adapters:
            remaining = list(self.lpi_prompts)
            if remaining:
                self.set_adapter(remaining[0])
            else:
                self.active_adapter = []
                self._sync_layer_active_adapters()
        self._apply_trainability()

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        """Disabled layers add no prompts and nothing trains (like LoRA); enabling restores the trainability state."""
        if getattr(self, "_shallow", None) is not None:
            self._shallow.enabled = enabled
        for module in self._prompted_layers():
            module._disable_adapters = not enabled
        self._apply_trainability()

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: LPIConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Adapters saved before keys were zero-initialised hold NaN keys for tasks without keys: load them as 0."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        return {k: _finite_keys(k, v) for k, v in remapped.items()}

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(MERGE_ERROR)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        self.merge_adapter()
        raise AssertionError("unreachable")

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs: Any) -> nn.Module:
        if merge:
            self.merge_adapter()
        if getattr(self, "_shallow", None) is not None:
            self._shallow.remove()
            self._shallow = None
        for name, module in list(self.model.named_modules()):
            if isinstance(module, LPIPromptedLayer):
                replace_block(self.model, name, module.base_layer)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        if getattr(self, "_task_ids_hook", None) is not None:
            self._task_ids_hook.remove()
            self._task_ids_hook = None
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
        """Choose whose prompts the next calls use (sticky, until the next `set_task`).

        - an int: every sample uses that task;
        - a 1-D integer tensor: one task per sample of the next batch (its length must equal the batch size);
        - "auto": each sample's task is inferred from its prompt-free features and the stored task keys.

        For one call only, pass `task_ids=` to the PeftModel's forward, `get_image_features` or `get_text_features`
        instead (as PEFT's LoRA takes `adapter_names`); that leaves this setting unchanged.
        """
        self._task_selection = self._validated_selection(task)
        self._routes = {}
        self._prompt_cache.clear()

    def _validated_selection(self, task: TaskSelection) -> TaskSelection:
        """Check a task selection (int, 1-D integer tensor or "auto") and return it normalised (int / LongTensor)."""
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
        return task

    @property
    def current_task(self) -> TaskSelection:
        return self._task_selection

    def train_task(self, task: int, *, allow_retrain: bool = False) -> list[nn.Parameter]:
        """Make task `task` the only trainable one (every other task's factors frozen exactly) and select it.

        The task trained until now becomes finished (saved in `LPIConfig.finished_tasks`): no PEFT call makes it
        trainable again. Training a finished task again (continual learning would then forget it) raises unless
        `allow_retrain=True` says so. Returns the trainable parameters, ready for an optimizer.
        """
        task = self._check_task_id(task)
        config = self.active_config
        finished = set(config.finished_tasks)
        if task in finished and not allow_retrain:
            raise ValueError(
                f"Task {task} is finished (training moved on from it, finished tasks: {sorted(finished)}); training it "
                "again would change what it learnt. Call train_task(task, allow_retrain=True) if that is intended."
            )
        if config.trainable_task != task:
            finished.add(config.trainable_task)
        finished.discard(task)
        config.finished_tasks = sorted(finished)
        config.trainable_task = task
        self._grad_enabled[self.active_adapters[0]] = True
        self._apply_trainability()
        self.set_task(task)
        return [p for p in self.active_bank.tasks[task].parameters()]

    def add_task(self) -> int:
        """Append a new task to the active adapter (frozen until `train_task`); returns its id."""
        bank = self.active_bank
        index = bank.add_task()
        self._apply_trainability()  # the new task stays frozen: trainability follows the state
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
            routes = self._expand_rows(modality, self._routes[modality], batch)
            if routes.shape[0] != batch:
                raise ValueError(f"Routed {routes.shape[0]} {modality} samples but the batch has {batch}.")
            return routes
        selection = self._task_selection
        if isinstance(selection, str):
            raise ValueError(
                "set_task('auto') routes inside the PeftModel's forward, get_image_features and get_text_features. "
                "Call those on the PeftModel (not on the inner base model)."
            )
        if isinstance(selection, torch.Tensor):
            selection = self._expand_rows(modality, selection, batch)
        if isinstance(selection, torch.Tensor) and selection.shape[0] != batch:
            raise ValueError(
                f"set_task got {selection.shape[0]} per-sample task ids but the {modality} batch has {batch} samples."
            )
        return selection

    def _expand_rows(self, modality: str, tasks: torch.Tensor, batch: int) -> torch.Tensor:
        """Per-sample task ids for a tower whose rows are not samples (X-CLIP's frames, OWL detection's queries):
        each sample's id repeated over its rows (rows are sample-major there)."""
        if modality in getattr(self, "_grouped_rows", ()) and tasks.shape[0] != batch and batch % tasks.shape[0] == 0:
            return tasks.repeat_interleave(batch // tasks.shape[0])
        return tasks

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


def _grouped_row_modalities(model: nn.Module) -> frozenset[str]:
    """Towers whose batch rows are groups of rows per sample: X-CLIP's vision tower (frames per video) and OWL
    detection's text tower (queries per image); per-sample task ids expand over those rows."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "xclip":
        return frozenset({"vision"})
    if model_type in ("owlvit", "owlv2") and type(model).__name__.endswith("ForObjectDetection"):
        return frozenset({"text"})
    return frozenset()


def _check_injection(model: nn.Module, towers: dict[str, TowerSpec], config: LPIConfig) -> None:
    """Refuse at injection time what cannot work at the first forward: extra tokens into a Swin tower."""
    injection = getattr(config, "injection", "deep")
    for modality in config.prompted_modalities:
        spec = towers[modality]
        if spec.spatial and injection != "additive":
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            raise ValueError(
                f"The {modality} tower of {type(model).__name__} (model_type={model_type!r}) is a Swin-style tower "
                f"('{spec.layers_path}'): its blocks window a fixed (H, W) token map, so no extra prompt tokens can be "
                "inserted. Use LPIConfig(injection='additive') (prompts added to the top-left window of each stage's "
                "map, as the authors did for GLIP's Swin)."
            )


def _requires_grad_snapshot(model: nn.Module, tuner: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    """(parameter, requires_grad) of every parameter of the base model and of the existing prompt banks, once each."""
    seen: set[int] = set()
    snapshot = []
    for param in [*model.parameters(), *tuner.lpi_prompts.parameters()]:
        if id(param) not in seen:
            seen.add(id(param))
            snapshot.append((param, param.requires_grad))
    return snapshot
