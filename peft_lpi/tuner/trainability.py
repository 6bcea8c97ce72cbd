"""Which LPI factors train: one state per adapter that every PEFT call and `train_task` agree on.

A mixin of `LPIModel` (peft_lpi/tuner/model.py). The state is the adapter config's `trainable_task` and
`finished_tasks` plus a per-adapter grad switch (`_grad_enabled`); `requires_grad` of the factors is always
recomputed from it in one place (`_apply_trainability`), so `set_adapter`, `add_adapter`, `set_requires_grad`,
`disable_adapter` and loading can never unfreeze a finished task.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..io import CheckpointError
from .layer import LPIPromptedLayer


class TrainabilityMixin:
    """Trainability state of LPIModel: `trainable_task`, `finished_tasks`, `set_requires_grad`, dtype casting."""

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
