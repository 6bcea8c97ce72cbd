"""Finding the two towers of a Hugging Face dual encoder: their encoder layer lists, widths and causality."""

from __future__ import annotations

from dataclasses import dataclass

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

# model_type -> (vision layers, text layers, text tower causal). Paths are dotted attribute paths from the base model.
KNOWN_ARCHITECTURES: dict[str, tuple[str, str, bool]] = {
    "clip": ("vision_model.encoder.layers", "text_model.encoder.layers", True),
    "siglip": ("vision_model.encoder.layers", "text_model.encoder.layers", False),
    "siglip2": ("vision_model.encoder.layers", "text_model.encoder.layers", False),
    "chinese_clip": ("vision_model.encoder.layers", "text_model.encoder.layer", False),
}

# Sub-model attribute names searched structurally when the model type is not in the table.
_TOWER_ROOTS = {"vision": ("vision_model", "visual", "image_encoder"), "text": ("text_model", "text", "text_encoder")}
_CONFIG_NAMES = {"vision": "vision_config", "text": "text_config"}


@dataclass(frozen=True)
class TowerSpec:
    """Where one tower's encoder layers live and what they look like."""

    modality: str  # "vision" or "text"
    layers_path: str  # dotted path from the base model to the nn.ModuleList of encoder layers
    num_layers: int
    hidden_size: int
    causal: bool  # text towers like CLIP's: a prompt inserted after BOS is visible only to later tokens


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """`model.get_submodule` with an error that names the missing path."""
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise ValueError(f"No module at '{path}' in {type(model).__name__}: {err}") from None


def _block_type(module: nn.Module) -> type:
    """The class of an encoder block, looking through a PEFT tuner-layer wrapper (an adapter already injected)."""
    while isinstance(module, BaseTunerLayer) and isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return type(module)


def _longest_uniform_module_list(root: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The longest nn.ModuleList under `root` whose children all share one class (the transformer blocks)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({_block_type(child) for child in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    return best


def _tower_hidden_size(model: nn.Module, modality: str, layers: nn.ModuleList) -> int:
    config = getattr(model, "config", None)
    sub_config = getattr(config, _CONFIG_NAMES[modality], None)
    hidden = getattr(sub_config, "hidden_size", None)
    if hidden is None:  # fall back to the first LayerNorm of a block
        for sub in layers[0].modules():
            if isinstance(sub, nn.LayerNorm):
                return int(sub.normalized_shape[0])
        raise ValueError(f"Cannot determine the hidden size of the {modality} tower; set it in the model config.")
    return int(hidden)


def find_towers(
    model: nn.Module,
    layer_paths: dict[str, str] | None = None,
    text_causal: bool | None = None,
) -> dict[str, TowerSpec]:
    """Locate the vision and text encoder layers of a dual encoder.

    Lookup order: `layer_paths` (config override), the per-architecture table `KNOWN_ARCHITECTURES` keyed by
    `config.model_type`, then structural detection (the longest list of identical blocks under `vision_model` /
    `text_model`). Raises a ValueError naming what was looked for when a tower cannot be found.
    """
    layer_paths = dict(layer_paths or {})
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table = KNOWN_ARCHITECTURES.get(model_type)
    towers: dict[str, TowerSpec] = {}
    for index, modality in enumerate(("vision", "text")):
        path = layer_paths.get(modality) or (table[index] if table else None)
        if path is not None:
            layers = get_submodule(model, path)
            if not isinstance(layers, nn.ModuleList):
                raise ValueError(f"'{path}' in {type(model).__name__} is a {type(layers).__name__}, not a ModuleList.")
        else:
            found = None
            for root_name in _TOWER_ROOTS[modality]:
                root = getattr(model, root_name, None)
                if isinstance(root, nn.Module):
                    found = _longest_uniform_module_list(root)
                    if found is not None:
                        path = f"{root_name}.{found[0]}" if found[0] else root_name
                        layers = found[1]
                        break
            if found is None:
                raise ValueError(
                    f"LPI needs a dual encoder with a vision and a text tower, but found no {modality} encoder layers "
                    f"in {type(model).__name__} (model_type={model_type!r}). Looked for the architectures "
                    f"{sorted(KNOWN_ARCHITECTURES)} and for a list of identical blocks under "
                    f"{list(_TOWER_ROOTS[modality])}. If this is a dual encoder, name its layer lists with "
                    "LPIConfig(layer_paths={'vision': '...', 'text': '...'})."
                )
        causal = False
        if modality == "text":
            if text_causal is not None:
                causal = text_causal
            elif table is not None:
                causal = table[2]
            else:
                sub_config = getattr(getattr(model, "config", None), "text_config", None)
                causal = bool(getattr(sub_config, "is_decoder", False))
        towers[modality] = TowerSpec(
            modality=modality,
            layers_path=path,
            num_layers=len(layers),
            hidden_size=_tower_hidden_size(model, modality, layers),
            causal=causal,
        )
    return towers
