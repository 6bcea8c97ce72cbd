"""Finding the two towers of a Hugging Face dual encoder: their encoder layer lists, widths and causality."""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

# model_type -> (vision layers, text layers, text tower causal). Paths are dotted attribute paths from the base model.
KNOWN_ARCHITECTURES: dict[str, tuple[str, str, bool]] = {
    "clip": ("vision_model.encoder.layers", "text_model.encoder.layers", True),
    "siglip": ("vision_model.encoder.layers", "text_model.encoder.layers", False),
    "siglip2": ("vision_model.encoder.layers", "text_model.encoder.layers", False),
    "chinese_clip": ("vision_model.encoder.layers", "text_model.encoder.layer", False),
}

# Sub-model attribute names searched structurally when the model type is not in the table: at the top level first,
# then anywhere below (the shallowest match), so nested towers (detection / segmentation heads around a dual
# encoder, FLAVA's image_model, Grounding DINO's backbone / text_backbone) are found too.
_TOWER_ROOTS = {
    "vision": ("vision_model", "visual", "image_encoder", "image_model", "backbone"),
    "text": ("text_model", "text", "text_encoder", "text_backbone"),
}
_CONFIG_NAMES = {"vision": "vision_config", "text": "text_config"}


@dataclass(frozen=True)
class TowerSpec:
    """Where one tower's encoder layers live and what they look like."""

    modality: str  # "vision" or "text"
    layers_path: str  # dotted path from the base model to the nn.ModuleList of encoder layers
    num_layers: int
    hidden_size: int
    causal: bool  # text towers like CLIP's: a prompt inserted after BOS is visible only to later tokens
    # Dotted paths of every block that can be prompted, in order. Empty: `layers_path.0`, `layers_path.1`, ...
    # Hierarchical towers (Swin stages) list the blocks of all stages here.
    block_paths: tuple[str, ...] = ()
    spatial: bool = False  # blocks take a (B, H*W, C) map with its (H, W) (Swin): no extra tokens possible

    def block_path(self, index: int) -> str:
        """Dotted path of prompted block `index`."""
        return self.block_paths[index] if self.block_paths else f"{self.layers_path}.{index}"


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


def _uniform_block_lists(root: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every nn.ModuleList under `root` whose children share one class and hold no ModuleList themselves (the
    lists of transformer blocks; a list of stages that each hold their blocks is not one), in module order."""
    found = []
    for name, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({_block_type(c) for c in module}) == 1:
            if not any(isinstance(sub, nn.ModuleList) for child in module for sub in child.modules()):
                found.append((name, module))
    return found


def _is_convolutional(block: nn.Module) -> bool:
    """A CNN block (EfficientNet, ResNet): convolutions and no LayerNorm / attention over a token sequence."""
    modules = list(block.modules())
    return any(isinstance(m, nn.Conv2d) for m in modules) and not any(isinstance(m, nn.LayerNorm) for m in modules)


def _is_spatial(block: nn.Module) -> bool:
    """A block that receives its token map's (height, width) (Swin): the sequence length is fixed by the map."""
    while isinstance(block, BaseTunerLayer) and isinstance(getattr(block, "base_layer", None), nn.Module):
        block = block.base_layer
    return "input_dimensions" in inspect.signature(block.forward).parameters


def block_width(block: nn.Module) -> int | None:
    """Width of the hidden states a block receives: its first LayerNorm's (None when it has none)."""
    for sub in block.modules():
        if isinstance(sub, nn.LayerNorm):
            return int(sub.normalized_shape[0])
    return None


def _find_root(model: nn.Module, modality: str, exclude: str | None) -> tuple[str, nn.Module] | None:
    """The shallowest sub-module named like a tower of `modality` (top level first), outside `exclude`."""
    names = _TOWER_ROOTS[modality]
    candidates = []
    for name, module in model.named_modules():
        if not name or name.rsplit(".", 1)[-1] not in names:
            continue
        if exclude and (name == exclude or name.startswith(exclude + ".") or exclude.startswith(name + ".")):
            continue
        candidates.append((name.count("."), names.index(name.rsplit(".", 1)[-1]), name, module))
    if not candidates:
        return None
    _, _, name, module = min(candidates, key=lambda c: (c[0], c[1]))
    return name, module


def _family(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return f"{type(model).__name__} (model_type={model_type!r})"


def _refuse_misfits(model: nn.Module, modality: str, path: str) -> None:
    """Families whose layers LPI can find but not prompt correctly: an error naming the reason and the way out."""
    owner_names = [type(model.get_submodule(path[: i])).__name__ for i in
                   [j for j, c in enumerate(path) if c == "."]]
    if any("QFormer" in name for name in owner_names):
        raise ValueError(
            f"LPI cannot prompt the text side of {_family(model)}: its text tower is BLIP-2's Q-Former ('{path}'), "
            "where the caption tokens and the learned query tokens run through the same layers (the queries carry "
            "the image embedding, and the query_length slicing assumes a fixed layout), so text prompts would change "
            "the image embeddings too. Prompt the vision tower only with LPIConfig(towers='vision'), or use a dual "
            "encoder with a separate text tower (BLIP's BlipForImageTextRetrieval, CLIP, SigLIP)."
        )


def probe_text_causality(model: nn.Module, layers_path: str) -> bool | None:
    """Whether the text tower really runs causally, measured the way it is called: the text feature path
    (`get_text_features`, else the tower's own forward) on two 5-token captions (the second padded), twice, with
    the first caption's last token changed; causal when its first position's output of the last layer is unchanged.
    (BLIP's text config says is_decoder=True, yet its feature / ITC path runs the encoder bidirectionally; Aimv2 and
    Kosmos-2 are causal without saying so.) None when the probe cannot run (meta
    weights, a tower that needs other inputs)."""
    root_path = layers_path
    caller = None
    if hasattr(model, "get_text_features"):
        caller = model.get_text_features
    else:
        while "." in root_path:
            root_path = root_path.rsplit(".", 1)[0]
            root = model.get_submodule(root_path)
            if "input_ids" in inspect.signature(root.forward).parameters:
                caller = root
                break
    if caller is None:
        return None
    layers = model.get_submodule(layers_path)
    if any(p.is_meta for p in layers[-1].parameters()):
        return None
    device = next((p.device for p in layers[-1].parameters()), torch.device("cpu"))
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, output: object) -> None:
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        captured.append(hidden[0, 0].detach().float().clone())

    training = {m: m.training for m in model.modules()}
    model.eval()
    handle = layers[-1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            for last in (5, 6):  # a padded second row, so the tower builds its real mask (Aimv2 only then)
                ids = torch.tensor([[1, 2, 3, 4, last], [1, 2, 3, 0, 0]], device=device)
                caller(input_ids=ids, attention_mask=torch.tensor([[1] * 5, [1, 1, 1, 0, 0]], device=device))
    except Exception:  # noqa: BLE001 - any failure means "cannot tell"; the caller falls back to the config
        return None
    finally:
        handle.remove()
        for module, mode in training.items():
            module.training = mode
    if len(captured) != 2 or captured[0].shape != captured[1].shape:
        return None
    return bool(torch.allclose(captured[0], captured[1], atol=1e-6, rtol=0))


def find_towers(
    model: nn.Module,
    layer_paths: dict[str, str] | None = None,
    text_causal: bool | None = None,
    required: tuple[str, ...] = ("vision", "text"),
    injection: str = "deep",
) -> dict[str, TowerSpec]:
    """Locate the vision and text encoder layers of a dual encoder.

    Lookup order: `layer_paths` (config override), the per-architecture table `KNOWN_ARCHITECTURES` keyed by
    `config.model_type`, then structural detection: the tower roots (`vision_model`, `text_model`, ... at the top
    level, else the shallowest one below) and, inside, the list of identical transformer blocks (the first stage's
    for hierarchical towers; every stage's blocks for Swin under `injection="additive"`). Causality of the text
    tower is measured by `probe_text_causality` unless `text_causal` is given. Towers in `required` must be found
    and promptable; a ValueError names the family, the reason and the way out. An unrequired tower that is not found
    (or is a CNN) is left out of the result.
    """
    layer_paths = dict(layer_paths or {})
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table = KNOWN_ARCHITECTURES.get(model_type)
    towers: dict[str, TowerSpec] = {}
    roots: dict[str, str] = {}
    for index, modality in enumerate(("vision", "text")):
        needed = modality in required
        path = layer_paths.get(modality) or (table[index] if table else None)
        block_paths: tuple[str, ...] = ()
        if path is not None:
            layers = get_submodule(model, path)
            if not isinstance(layers, nn.ModuleList):
                raise ValueError(f"'{path}' in {type(model).__name__} is a {type(layers).__name__}, not a ModuleList.")
        else:
            other = roots.get("vision") if modality == "text" else None
            found_root = _find_root(model, modality, other)
            lists = _uniform_block_lists(found_root[1]) if found_root is not None else []
            if not lists:
                if not needed:
                    continue
                if modality == "text" and any(n.rsplit(".", 1)[-1] == "qformer" for n, _ in model.named_modules()):
                    _refuse_misfits(model, modality, "qformer.encoder.layer")
                raise ValueError(
                    f"LPI needs a dual encoder with a vision and a text tower, but found no {modality} encoder layers "
                    f"in {_family(model)}. Looked for the architectures {sorted(KNOWN_ARCHITECTURES)} and for a list "
                    f"of identical blocks under a sub-module named one of {list(_TOWER_ROOTS[modality])}. If this is a "
                    "dual encoder, name its layer lists with LPIConfig(layer_paths={'vision': '...', 'text': '...'})."
                )
            root_name = found_root[0]
            roots[modality] = root_name
            stage_lists = _stages(lists)
            if stage_lists is not None:  # hierarchical tower: blocks grouped in stages
                first_name, layers = stage_lists[0]
                path = f"{root_name}.{first_name}"
                if _is_spatial(layers[0]) and injection == "additive":
                    block_paths = tuple(f"{root_name}.{name}.{i}" for name, blocks in stage_lists
                                        for i in range(len(blocks)))
            else:
                name, layers = max(lists, key=lambda item: len(item[1]))  # first of the longest
                path = f"{root_name}.{name}"
        if _is_convolutional(layers[0]):
            if not needed:
                continue
            raise ValueError(
                f"The {modality} tower of {_family(model)} is a CNN ('{path}' holds {type(layers[0]).__name__} "
                "blocks): it has no token sequence to prompt. Prompt the text tower only with "
                "LPIConfig(towers='text')."
            )
        spatial = _is_spatial(layers[0])
        if needed:
            _refuse_misfits(model, modality, path)
        causal = False
        if modality == "text":
            if text_causal is not None:
                causal = text_causal
            else:
                measured = probe_text_causality(model, path)
                if measured is not None:
                    causal = measured
                elif table is not None:
                    causal = table[2]
                else:
                    sub_config = getattr(getattr(model, "config", None), "text_config", None)
                    causal = bool(getattr(sub_config, "is_decoder", False))
                    warnings.warn(
                        f"Could not measure whether the text tower of {_family(model)} is causal; using "
                        f"text_config.is_decoder={causal}. Set LPIConfig(text_causal=...) if that is wrong.",
                        stacklevel=3,
                    )
        num_layers = len(block_paths) if block_paths else len(layers)
        towers[modality] = TowerSpec(
            modality=modality,
            layers_path=path,
            num_layers=num_layers,
            hidden_size=_tower_hidden_size(model, modality, layers),
            causal=causal,
            block_paths=block_paths,
            spatial=spatial,
        )
    return towers


def _stages(lists: list[tuple[str, nn.ModuleList]]) -> list[tuple[str, nn.ModuleList]] | None:
    """The block lists of a hierarchical tower, in stage order ('stages.0.layers', 'stages.1.layers', ... or
    'layers.0.blocks', ...): two or more lists whose paths differ only in one index. None for a plain tower."""
    if len(lists) < 2:
        return None
    patterns = {}
    for name, module in lists:
        parts = name.split(".")
        digits = [i for i, part in enumerate(parts) if part.isdigit()]
        if not digits:
            continue
        key = ".".join("*" if i == digits[-1] else p for i, p in enumerate(parts))
        patterns.setdefault(key, []).append((int(parts[digits[-1]]), name, module))
    if not patterns:
        return None
    best = max(patterns.values(), key=len)
    if len(best) < 2:
        return None
    return [(name, module) for _, name, module in sorted(best)]


def replace_block(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at the dotted `path` (an element of a ModuleList or an attribute)."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, nn.ModuleList) and leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def _tower_hidden_size(model: nn.Module, modality: str, layers: nn.ModuleList) -> int:
    """Width of the first block's hidden states: read from the block (its first LayerNorm), so hierarchical towers
    (Swin: `hidden_size` is the last stage's) and `layer_paths` overrides get the right width; else the config's."""
    width = block_width(layers[0])
    if width is not None:
        return width
    sub_config = getattr(getattr(model, "config", None), _CONFIG_NAMES[modality], None)
    hidden = getattr(sub_config, "hidden_size", None)
    if hidden is None:
        raise ValueError(f"Cannot determine the hidden size of the {modality} tower; set it in the model config.")
    return int(hidden)
