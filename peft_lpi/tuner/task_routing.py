"""Task identity for LPIModel: the routing keys, "auto" routing, and the per-call / sticky task selection.

A mixin of `LPIModel` (peft_lpi/tuner/model.py), kept apart so that the tuner's PEFT plumbing and its task
routing each read in one place. It uses the tuner's `active_bank`, `_check_task_id`, `_validated_selection` and
`_task_selection`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .factors import VISION
from .routing import kmeans, nearest_task

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


class TaskRoutingMixin:
    """Keys (k-means centres per task and modality), routing, per-call `task_ids`, prompt reuse in a step."""

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
