"""Shallow prompt insertion (VPT-shallow): prompts enter each tower once, before its first layer, and stay.

This is what the authors' retrieval code ran (docs/method.md, "Where prompts enter"):

* vision: the P prompts are inserted right after token 0 (CLS) of the embedding output — after the position
  embedding, before the pre-LayerNorm (CLIP's `pre_layrnorm`, the reference's `ln_pre`) — without a position
  embedding of their own, and stay in the sequence through every layer;
* text: the prompts take the place of P placeholder token embeddings right after token 0 (BOS/CLS), so they go
  through the tower's embedding module like words: they receive the position embeddings 1..P (and BERT's token-type
  embedding and LayerNorm), and every later token moves P positions on (CLIP's EOS index moves by P). The padding
  mask is widened by P visible positions; a causal tower builds its own causal mask over the longer sequence.

The prompts are removed from the output of the tower's last layer, so every pooling rule (CLIP's EOS index from `input_ids`,
SigLIP's last token, CLS, attention-pool heads) and the shape of `last_hidden_state` are those of the base model.
Per-layer `hidden_states` (when requested) are stripped as well; per-layer attentions keep the prompt positions.

Implemented with forward hooks on modules every supported tower has (`<tower>.embeddings`, its last encoder layer,
the tower itself), found from the encoder layer path that `find_towers` returns.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .architectures import TowerSpec, get_submodule

ShallowPromptSource = Callable[[str, int], "torch.Tensor | None"]  # (modality, batch) -> (B, P, D) or None

_WORD_EMBEDDINGS = ("token_embedding", "word_embeddings")
_POSITION_EMBEDDINGS = ("position_embedding", "position_embeddings")


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _insert(tensor: torch.Tensor, inserted: torch.Tensor) -> torch.Tensor:
    """(B, L, ...) -> (B, L + P, ...) with `inserted` (B, P, ...) at positions 1..P."""
    return torch.cat([tensor[:, :1], inserted, tensor[:, 1:]], dim=1)


def _strip(tensor: torch.Tensor, num: int) -> torch.Tensor:
    """(B, L + P, ...) -> (B, L, ...): drop positions 1..P."""
    return torch.cat([tensor[:, :1], tensor[:, 1 + num :]], dim=1)


def _argument(module: nn.Module, name: str, args: tuple, kwargs: dict) -> tuple[Any, int | None]:
    """Value of forward argument `name` (from kwargs or by position) and its position in args (None: keyword)."""
    if name in kwargs:
        return kwargs[name], None
    params = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if name in params and params.index(name) < len(args):
        return args[params.index(name)], params.index(name)
    return None, None


def _set_argument(args: tuple, kwargs: dict, position: int | None, name: str, value: Any) -> tuple[tuple, dict]:
    if position is not None:
        args = (*args[:position], value, *args[position + 1 :])
    else:
        kwargs = {**kwargs, name: value}
    return args, kwargs


def text_prompt_positions(model: nn.Module) -> int:
    """Token positions the active LPI adapter adds to every text sequence: P with injection='shallow' on the text
    tower, else 0. A caption may then have at most `max_position_embeddings - P` tokens (callers truncate to it)."""
    tuner = getattr(model, "base_model", model)
    config = getattr(tuner, "active_config", None) if hasattr(tuner, "lpi_prompts") else None
    if config is None or getattr(config, "injection", "deep") != "shallow" or "text" not in config.prompted_modalities:
        return 0
    return int(config.prompt_length)


class ShallowInjection:
    """Forward hooks that insert each prompted tower's layer-0 prompts once and strip them from its output.

    Args:
        model: the base model.
        towers: `find_towers(model)`; only the modalities in `modalities` are prompted.
        prompt_source: `(modality, batch) -> (B, P, D_m)` prompts for this call, or None when prompts are off.

    Raises a ValueError naming the missing module when a tower has no `embeddings` / `encoder` module next to its
    layer list (an architecture the shallow mode does not know); `injection="deep"` works there.
    """

    def __init__(
        self, model: nn.Module, towers: dict[str, TowerSpec], modalities: tuple[str, ...], prompt_source: ShallowPromptSource
    ):
        self.prompt_source = prompt_source
        self.enabled = True
        self._pending: dict[str, torch.Tensor] = {}  # prompts of the call in progress, per modality
        self._handles: list[Any] = []
        self.paths: dict[str, str] = {}
        for modality in modalities:
            layers_path = towers[modality].layers_path
            # the tower: the closest module above the layer list that has an `embeddings` child
            # (CLIP / SigLIP / BERT: <tower>.encoder.<layers>; ViT in transformers 5: <tower>.<layers>)
            candidates = [_parent(layers_path), _parent(_parent(layers_path))]
            tower_path = next((c for c in candidates if self._has(model, f"{c}.embeddings" if c else "embeddings")), None)
            if tower_path is None:
                raise ValueError(
                    f"injection='shallow' needs the {modality} tower's embedding module next to its layer list "
                    f"'{layers_path}', but found no 'embeddings' module at {[c or '<model>' for c in candidates]} in "
                    f"{type(model).__name__}. Supported are towers laid out as '<tower>.embeddings' + "
                    "'<tower>[.encoder].<layers>' (CLIP, SigLIP, ViT, BERT, ChineseCLIP); use injection='deep' here."
                )
            embeddings_path = f"{tower_path}.embeddings" if tower_path else "embeddings"
            tower = get_submodule(model, tower_path) if tower_path else model
            embeddings = get_submodule(model, embeddings_path)
            last_layer = get_submodule(model, layers_path)[-1]
            if modality == "text":
                word = next((getattr(embeddings, n) for n in _WORD_EMBEDDINGS if hasattr(embeddings, n)), None)
                if not isinstance(word, nn.Embedding):
                    raise ValueError(
                        f"injection='shallow' needs the text embedding module '{embeddings_path}' to have a token "
                        f"embedding named one of {_WORD_EMBEDDINGS}; {type(embeddings).__name__} has none."
                    )
                self._handles.append(
                    embeddings.register_forward_pre_hook(self._text_embeddings_hook(word), with_kwargs=True)
                )
            else:
                self._handles.append(embeddings.register_forward_hook(self._vision_embeddings_hook()))
            self._handles.append(tower.register_forward_pre_hook(self._tower_pre_hook(modality), with_kwargs=True))
            self._handles.append(last_layer.register_forward_hook(self._last_layer_hook(modality)))
            self._handles.append(tower.register_forward_hook(self._tower_hook(modality)))
            self.paths[modality] = embeddings_path

    @staticmethod
    def _has(model: nn.Module, path: str) -> bool:
        try:
            model.get_submodule(path)
            return True
        except AttributeError:
            return False

    def remove(self) -> None:
        """Remove every hook (unload)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()

    # ------------------------------------------------------------------ hooks
    def _tower_pre_hook(self, modality: str) -> Callable:
        """Decide this call's prompts (B from the first input) and widen a text padding mask by P positions."""

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            self._pending.pop(modality, None)
            name = "pixel_values" if modality == "vision" else "input_ids"
            first, _ = _argument(module, name, args, kwargs)
            if first is None and args and isinstance(args[0], torch.Tensor):
                first = args[0]
            if not self.enabled or not isinstance(first, torch.Tensor):
                return None
            prompts = self.prompt_source(modality, first.shape[0])
            if prompts is None:
                return None
            self._pending[modality] = prompts
            if modality != "text":
                return None
            mask, position = _argument(module, "attention_mask", args, kwargs)
            if mask is None:
                return None
            if mask.dim() != 2:
                raise ValueError(
                    f"injection='shallow' widens a 2-D (B, L) text attention mask; got shape {tuple(mask.shape)}."
                )
            ones = mask.new_ones(mask.shape[0], prompts.shape[1])
            return _set_argument(args, kwargs, position, "attention_mask", _insert(mask, ones))

        return hook

    def _vision_embeddings_hook(self) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            prompts = self._pending.get("vision")
            if prompts is None:
                return None
            if prompts.shape[-1] != output.shape[-1]:
                raise ValueError(
                    f"LPI vision prompts have width {prompts.shape[-1]} but the vision embeddings have width "
                    f"{output.shape[-1]}."
                )
            return _insert(output, prompts.to(dtype=output.dtype, device=output.device))

        return hook

    def _text_embeddings_hook(self, word: nn.Embedding) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            prompts = self._pending.get("text")
            if prompts is None:
                return None
            input_ids, ids_position = _argument(module, "input_ids", args, kwargs)
            embeds, embeds_position = _argument(module, "inputs_embeds", args, kwargs)
            if embeds is None:
                if input_ids is None:
                    raise ValueError("injection='shallow': the text embeddings got neither input_ids nor inputs_embeds.")
                embeds = word(input_ids)
            num, length = prompts.shape[1], embeds.shape[1]
            limit = next(
                (getattr(module, n).num_embeddings for n in _POSITION_EMBEDDINGS if hasattr(module, n)), None
            )
            if limit is not None and length + num > limit:
                raise ValueError(
                    f"injection='shallow' puts {num} text prompts into the token sequence, but {length} tokens + {num} "
                    f"prompts exceed the text tower's {limit} position embeddings (max_position_embeddings). Tokenize "
                    f"with max_length <= {limit - num} (e.g. tokenizer(..., truncation=True, max_length="
                    f"{limit - num})), or use a shorter prompt_length or injection='deep'."
                )
            new_embeds = _insert(embeds, prompts.to(dtype=embeds.dtype, device=embeds.device))
            if ids_position is not None:
                args = (*args[:ids_position], None, *args[ids_position + 1 :])
            else:
                kwargs = {**kwargs, "input_ids": None}
            args, kwargs = _set_argument(args, kwargs, embeds_position, "inputs_embeds", new_embeds)
            positions, pos_position = _argument(module, "position_ids", args, kwargs)
            if positions is not None:  # the prompts take positions 1..P, every later token moves P on
                start = positions[..., :1]
                steps = torch.arange(1, num + 1, device=positions.device, dtype=positions.dtype)
                shifted = torch.cat([start, start + steps, positions[..., 1:] + num], dim=-1)
                args, kwargs = _set_argument(args, kwargs, pos_position, "position_ids", shifted)
            types, types_position = _argument(module, "token_type_ids", args, kwargs)
            if types is not None:  # the placeholders have the token type of token 0
                filler = types[:, :1].expand(-1, num)
                args, kwargs = _set_argument(args, kwargs, types_position, "token_type_ids", _insert(types, filler))
            return args, kwargs

        return hook

    def _last_layer_hook(self, modality: str) -> Callable:
        """Remove the prompt positions from the output of the tower's last layer, before any final norm / pooling."""

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            prompts = self._pending.get(modality)
            if prompts is None:
                return None
            num = prompts.shape[1]
            if isinstance(output, torch.Tensor):
                return _strip(output, num)
            if isinstance(output, tuple):
                return (_strip(output[0], num), *output[1:])
            raise TypeError(f"injection='shallow': unexpected encoder layer output of type {type(output).__name__}.")

        return hook

    def _tower_hook(self, modality: str) -> Callable:
        """Strip per-layer hidden states (when requested) and end the call."""

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            prompts = self._pending.pop(modality, None)
            if prompts is None:
                return None
            states = getattr(output, "hidden_states", None)
            if isinstance(states, tuple) and states:
                num = prompts.shape[1]
                length = output.last_hidden_state.shape[1] + num if hasattr(output, "last_hidden_state") else None
                output.hidden_states = tuple(
                    _strip(s, num) if isinstance(s, torch.Tensor) and s.shape[1] == length else s for s in states
                )
            return output

        return hook
