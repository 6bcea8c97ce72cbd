"""The LPI tuner: a PEFT `BaseTuner` that injects deep prompts into both towers of a dual encoder.

The factors of every task live on the tuner (`lpi_prompts[adapter_name]`, an `LPIPromptBank`), shared by the
wrapped layers of both towers. Which task's prompts a sample gets is chosen per call (`task_ids=` on the forward and
both feature methods, as PEFT's LoRA takes `adapter_names`) or sticky (`set_task`).
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
from .additive import LPIAdditiveLayer
from .architectures import TowerSpec, find_towers, replace_block
from .config import LPIConfig
from .factors import VISION, LPIPromptBank, LPITaskFactors
from .layer import LPIPromptedLayer
from .routing import kmeans, nearest_task
from .shallow import ShallowInjection

AUTO = "auto"
TaskSelection = int | torch.Tensor | str


def _finite_keys(key: str, value: torch.Tensor) -> torch.Tensor:
    """A routing-key tensor of an older adapter, NaN (its old "no keys yet" sentinel) replaced by 0; others as is."""
    if "lpi_prompts" in key and key.endswith(("vision_keys", "text_keys")) and value.is_floating_point():
        return value.nan_to_num(0.0)
    return value


def embedding_of(output: Any) -> torch.Tensor:
    """The projected embedding from a feature method: a tensor (transformers 4) or `.pooler_output` (5.x)."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"Cannot find an embedding in a {type(output).__name__}.")


def _drop_task_ids(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook on the base model: `task_ids` is LPI's per-call argument (read by the tuner's forward
    hooks), never the base model's. PeftModel only filters its own `special_peft_forward_args`."""
    kwargs.pop("task_ids", None)
    return args, kwargs


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

    @staticmethod
    def _embedding_sizes(model: nn.Module, towers: dict[str, TowerSpec]) -> dict[str, int]:
        """Width of the routing features (the projected embeddings) of each tower."""
        projection = getattr(getattr(model, "config", None), "projection_dim", None)
        return {m: int(projection or (towers[m].hidden_size if m in towers else 1)) for m in ("vision", "text")}

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - inject_adapter is custom
        raise NotImplementedError("LPIModel injects through inject_adapter.")

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """Freeze the base model; the LPI factors follow the trainability state (`_apply_trainability`)."""
        for param in model.parameters():
            param.requires_grad = False
        self._apply_trainability()

    # ------------------------------------------------------------------ trainability: one state, every call agrees
    # The state of each adapter: `config.trainable_task` (the task being trained), `config.finished_tasks` (tasks whose
    # training is over; saved with the adapter) and `_grad_enabled[name]` (PEFT's switch: set_adapter,
    # set_requires_grad, inference_mode). `requires_grad` is always derived from it, so no PEFT call can unfreeze a
    # task that the state does not name; only `train_task(t, allow_retrain=True)` takes a task out of finished_tasks.
    def _apply_trainability(self) -> None:
        """Set requires_grad of every LPI factor from the state: only the training task of grad-enabled adapters."""
        layers_enabled = not any(layer.disable_adapters for layer in self._prompted_layers())
        for name, bank in self.lpi_prompts.items():
            bank.requires_grad_(False)
            if layers_enabled and self._grad_enabled.get(name, False):
                bank.tasks[self.peft_config[name].trainable_task].requires_grad_(True)
        self._training_factors_view()
        self._prompt_cache.clear()

    def _prompted_layers(self) -> list[LPIPromptedLayer]:
        return [m for m in self.model.modules() if isinstance(m, LPIPromptedLayer)]

    def _sync_layer_active_adapters(self) -> None:
        """The wrapped layers report the tuner's active adapter (read by PEFT's `get_layer_status`)."""
        for layer in self._prompted_layers():
            layer._active_adapter = list(self.active_adapters)

    def _training_factors_view(self) -> nn.ModuleDict:
        """{adapter name: the factors of the task that adapter trains}: what PEFT's status helpers report per layer.

        One ModuleDict, updated in place (so a reference held across `delete_adapter` sees the change), kept out of
        the module tree (not a submodule: nothing is saved, counted or moved twice).
        """
        view = self.__dict__.get("_training_view")
        if view is None:
            view = nn.ModuleDict()
            object.__setattr__(self, "_training_view", view)
        wanted = {name: bank.tasks[self.peft_config[name].trainable_task] for name, bank in self.lpi_prompts.items()}
        for name in [n for n in view if n not in wanted]:
            del view[name]
        for name, factors in wanted.items():
            view[name] = factors
        return view

    @property
    def trainable_task(self) -> int:
        """The task the active adapter trains (its factors require grad unless the adapter is frozen)."""
        return self.active_config.trainable_task

    @property
    def finished_tasks(self) -> list[int]:
        """Tasks of the active adapter whose training is over; only `train_task(t, allow_retrain=True)` reopens one."""
        return list(self.active_config.finished_tasks)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """PEFT's switch per adapter: True makes the adapter's training task trainable (never a finished task), False
        freezes the whole adapter."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name not in self.lpi_prompts:
                raise ValueError(f"Adapter {name!r} does not exist; available: {list(self.lpi_prompts)}.")
            self._grad_enabled[name] = bool(requires_grad)
        self._apply_trainability()

    def _restore_training_state(self, config_file: str | os.PathLike) -> None:
        """Take the active adapter's training task and finished tasks from a saved adapter_config.json (a resumed
        run continues with the state it stopped with); a file without them (older versions) changes nothing."""
        if not os.path.isfile(config_file):
            return
        with open(config_file, encoding="utf-8") as handle:
            saved = json.load(handle)
        if "trainable_task" not in saved:
            return
        config = self.active_config
        trainable, finished = int(saved["trainable_task"]), sorted({int(t) for t in saved.get("finished_tasks") or []})
        if not 0 <= trainable < self.num_tasks or any(not 0 <= t < self.num_tasks for t in finished):
            raise CheckpointError(f"{config_file}: trainable_task / finished_tasks do not fit {self.num_tasks} tasks.")
        config.trainable_task, config.finished_tasks = trainable, finished
        self._apply_trainability()

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Like LoRA: True keeps the factors in float32 (upcasting float16 / bfloat16 ones); False gives them the base
        model's float dtype. The routing keys always stay float32."""
        bank = self.lpi_prompts[adapter_name]
        if autocast_adapter_dtype:
            if any(p.dtype in (torch.float16, torch.bfloat16) for p in bank.tasks.parameters()):
                bank.tasks.to(torch.float32)
        else:
            dtypes = [p.dtype for p in self.model.parameters() if p.is_floating_point()]
            if dtypes:
                bank.tasks.to(max(set(dtypes), key=dtypes.count))  # the dtype most base weights have
        bank._eval_cache.clear()

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

    # ------------------------------------------------------------------ task identity at inference
    def set_task_keys(self, task: int, *, vision: torch.Tensor | None = None, text: torch.Tensor | None = None) -> None:
        """Store a task's k-means centres (k', D) per modality; fewer than k centres are padded by repetition."""
        task = self._check_task_id(task)
        bank = self.active_bank
        given: set[str] = set()
        for modality, centres in (("vision", vision), ("text", text)):
            if centres is None:
                continue
            buffer = getattr(bank, f"{modality}_keys")
            num_keys, width = buffer.shape[1:]
            if centres.dim() != 2 or centres.shape[1] != width or centres.shape[0] == 0:
                raise ValueError(f"{modality} keys must have shape (k, {width}), got {tuple(centres.shape)}.")
            if not bool(torch.isfinite(centres).all()):
                raise ValueError(f"{modality} keys of task {task} contain NaN or inf.")
            repeat = torch.arange(num_keys) % centres.shape[0]
            buffer[task] = centres[repeat].to(buffer)
            given.add(modality)
        if not bool(bank.has_keys[task]):  # routing needs keys of both modalities, possibly given in two calls
            seen = bank._partial_keys.get(task, set()) | given
            bank._partial_keys[task] = seen
            if seen >= {"vision", "text"}:
                bank.has_keys[task] = True
                del bank._partial_keys[task]

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

    def _feature_method(self, name: str) -> Any:
        """`name` (get_image_features, ...) of the base model, else of the first sub-model in module order that has
        it (the dual encoder inside a detection / segmentation head, e.g. OwlViTForObjectDetection.owlvit)."""
        for _, module in self.model.named_modules():
            method = getattr(module, name, None)
            if callable(method):
                return method
        raise ValueError(
            f"set_task('auto') routes with {name}, which {type(self.model).__name__} and its sub-models lack. Give "
            "explicit task ids (an int or one id per sample) instead."
        )

    def _base_features(self, modality: str, **inputs: Any) -> torch.Tensor:
        if modality == VISION:
            pixels = inputs.get("pixel_values")
            video = pixels is not None and pixels.dim() == 5
            method = self._feature_method("get_video_features" if video else "get_image_features")
        else:
            method = self._feature_method("get_text_features")
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

    # ------------------------------------------------------------------ per-call task selection and prompt reuse
    @contextlib.contextmanager
    def _task_scope(self, task_ids: TaskSelection | None) -> Iterator[None]:
        """Select `task_ids` (int, 1-D LongTensor of per-sample ids or "auto") for one call; None keeps `set_task`'s.

        The sticky selection is restored on exit, also when the call raises.
        """
        if task_ids is None:
            yield
            return
        selection = self._validated_selection(task_ids)
        previous, previous_routes = self._task_selection, self._routes
        self._task_selection, self._routes = selection, {}
        self._prompt_cache.clear()
        try:
            yield
        finally:
            self._task_selection, self._routes = previous, previous_routes
            self._prompt_cache.clear()

    @contextlib.contextmanager
    def reuse_prompts(self) -> Iterator[None]:
        """Compute each task's prompts at most once inside this block, with their autograd graph, and reuse them.

        A training step wraps its forward passes and its loss in it, so that both towers and the prompt losses
        share one computation of the trained task's factors and correlation module (and one backward through
        them). On exit the prompts are dropped, so the next step, after the optimiser has changed the factors,
        computes fresh ones; inside, an in-place change of a task's factors also recomputes its prompts. The
        PeftModel's forward enters it on its own (both towers of one call share their prompts). Re-entrant.
        """
        with self.active_bank.reuse_prompts():
            yield

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Called by PeftModel.forward around the base model's forward: per-call `task_ids`, prompt reuse across
        both towers, and auto routing happen here (`_drop_task_ids` keeps `task_ids` from the base model)."""
        with self._task_scope(kwargs.get("task_ids")), self.reuse_prompts(), self._auto_routes(kwargs):
            yield

    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, *, task_ids: TaskSelection | None = None, **kwargs: Any
    ) -> Any:
        """The base model's image features with the prompts of `task_ids` (this call only; None: `set_task`'s)."""
        with self._task_scope(task_ids), self._auto_routes({"pixel_values": pixel_values}):
            return self.model.get_image_features(pixel_values=pixel_values, **kwargs)

    def get_video_features(
        self, pixel_values: torch.Tensor | None = None, *, task_ids: TaskSelection | None = None, **kwargs: Any
    ) -> Any:
        """X-CLIP's video features (frames of each video get the video's task)."""
        with self._task_scope(task_ids), self._auto_routes({"pixel_values": pixel_values}):
            return self.model.get_video_features(pixel_values=pixel_values, **kwargs)

    def get_text_features(
        self, input_ids: torch.Tensor | None = None, *, task_ids: TaskSelection | None = None, **kwargs: Any
    ) -> Any:
        """The base model's text features with the prompts of `task_ids` (this call only; None: `set_task`'s)."""
        with self._task_scope(task_ids), self._auto_routes({"input_ids": input_ids, **kwargs}):
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
            "vision_hidden_size": str(self._towers["vision"].hidden_size if "vision" in self._towers else None),
            "text_hidden_size": str(self._towers["text"].hidden_size if "text" in self._towers else None),
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
            if modality not in self._towers:
                continue  # a tower LPI does not prompt and could not locate (a CNN)
            layer = self.model.get_submodule(self._towers[modality].block_path(0))
            layer = layer.base_layer if isinstance(layer, LPIPromptedLayer) else layer
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
            for modality, value in keys.items():  # task files written before zero-initialised keys hold NaN
                getattr(bank, f"{modality}_keys")[task] = value.nan_to_num(0.0).to(getattr(bank, f"{modality}_keys"))
            bank.has_keys[task] = bool(available.reshape(()).item())
        return task

    def import_task(self, path: str | os.PathLike) -> int:
        """Append a task trained elsewhere (same backbone and LPI shape), keys included; returns its new id."""
        return self.load_task(None, path)



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
