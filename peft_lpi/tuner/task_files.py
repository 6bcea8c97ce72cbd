"""One task as a standalone safetensors file: save, load (validated before anything changes) and import.

A mixin of `LPIModel` (peft_lpi/tuner/model.py): it uses the tuner's `active_bank`, `active_config`, `model` and
`_check_task_id`.
"""

from __future__ import annotations

import json
import os

import torch

from .._version import __version__
from ..io import TASK_FILE_FORMAT, TASK_FILE_VERSION, CheckpointError, read_task_file, save_tensors_atomic
from .factors import LPITaskFactors
from .layer import LPIPromptedLayer


class TaskFilesMixin:
    """`save_task` / `load_task` / `import_task`: share one task without the rest of the adapter."""

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
