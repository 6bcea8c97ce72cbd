"""The census: every transformers family with image and text towers is prompted correctly or refused up front.

For each family of `architecture_census.FAMILIES` (tiny random configs, 2 samples, the second caption padded):
detection (the layer lists found), both towers' outputs change, disabled == base exactly, per-sample tasks == the
single-task runs row by row, save/load exact, and the text tower's causality as measured on the base model (a
causal tower's first token never sees the prompts; a bidirectional one's does). Refused families must fail at
`get_peft_model` with an error naming the family. The additive mode is checked against an independent
re-implementation with forward pre-hooks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from architecture_census import FAMILIES, Family, build, make_batch, read_towers
from peft import PeftModel, get_peft_model

import peft_lpi  # noqa: F401  (registers LPI with PEFT)
from peft_lpi import LPIConfig

SMALL = dict(num_tasks=2, prompt_length=2, prompt_depth=2, rank=2)


def _config(family: Family, **extra) -> LPIConfig:
    return LPIConfig(**{**SMALL, **family.config, **extra})


def _wrap(family: Family, model, **extra) -> PeftModel:
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, _config(family, **extra))


class _FirstTextToken:
    """Records the output of the text tower's last layer at position 0 (a forward hook) while active."""

    def __init__(self, model, layers_path: str | None) -> None:
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        self.layer = base.get_submodule(layers_path)[-1] if layers_path else None
        self.values: list[torch.Tensor] = []

    def __enter__(self) -> _FirstTextToken:
        if self.layer is not None:
            self.handle = self.layer.register_forward_hook(self._hook)
        return self

    def _hook(self, module, args, output) -> None:
        self.values.append((output if isinstance(output, torch.Tensor) else output[0])[:, 0].clone())

    def __exit__(self, *exc) -> None:
        if self.layer is not None:
            self.handle.remove()


def _changed_last_word(batch):
    """The batch with caption 0's last word (before EOS) replaced by another word."""
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][0, -2] = (changed["input_ids"][0, -2] + 1 - 4) % (60 - 4) + 4
    return changed


def check_prompted(family: Family, tmp_path, **extra) -> None:
    """Every census check of a family that LPI prompts (towers per `extra`, default both)."""
    batch = make_batch(family)
    base_model = build(family).requires_grad_(False)  # as get_peft_model leaves it (MHA's fast path needs it)
    text_path = family.towers.get("text") if extra.get("towers", "both") != "vision" else None
    with _FirstTextToken(base_model, text_path) as plain:
        base = read_towers(family, base_model, batch)
    with _FirstTextToken(base_model, text_path) as changed:
        read_towers(family, base_model, _changed_last_word(batch))
    # causality as the tower is really run, measured on the base model (caption 0's first position ignores a change
    # of its last word), not read from a config flag
    causal = bool(plain.values) and torch.allclose(plain.values[0][0], changed.values[0][0], atol=1e-6)
    peft = _wrap(family, base_model, **extra)
    tuner = peft.base_model
    prompted = peft.peft_config["default"].prompted_modalities
    for modality in prompted:  # detection
        if modality in family.towers:
            assert tuner._towers[modality].layers_path == family.towers[modality], modality

    outputs = []
    for task in (0, 1):
        peft.set_task(task)
        with _FirstTextToken(peft, text_path) as first:
            outputs.append(read_towers(family, peft, batch))
        if task == 0:
            first_prompted = first.values
    for modality in ("vision", "text"):  # the prompted towers change; an unprompted independent tower does not
        if modality in prompted:
            assert not torch.allclose(outputs[0][modality], base[modality], rtol=1e-4, atol=1e-7), f"{modality} same"
            assert not torch.allclose(outputs[0][modality], outputs[1][modality], rtol=1e-4, atol=1e-7), "tasks agree"
        elif family.read in ("features", "video", "naflex", "flava", "kosmos"):
            assert torch.equal(outputs[0][modality], base[modality]), f"unprompted {modality} tower changed"

    with peft.disable_adapter():  # disabled == base, exactly
        disabled = read_towers(family, peft, batch)
    for key in base:
        assert torch.equal(disabled[key], base[key]), key

    peft.set_task(torch.tensor([0, 1]))  # per-sample tasks == the single-task runs, row by row
    mixed = read_towers(family, peft, batch)
    for key in base:
        torch.testing.assert_close(mixed[key][0], outputs[0][key][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mixed[key][1], outputs[1][key][1], atol=1e-5, rtol=1e-4)

    if "text" in prompted:  # a causal tower's first token never sees the prompts; a bidirectional one's does
        if peft.peft_config["default"].injection != "additive":  # (additive prompts never widen a mask)
            assert tuner._towers["text"].causal == causal, f"text tower causal={causal} but detected otherwise"
        assert torch.allclose(first_prompted[0], plain.values[0], atol=1e-6) == causal

    peft.save_pretrained(tmp_path / "adapter")  # save / load exact
    loaded = PeftModel.from_pretrained(build(family), tmp_path / "adapter")
    loaded.set_task(1)
    again = read_towers(family, loaded, batch)
    for key in base:
        assert torch.equal(again[key], outputs[1][key]), key


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_census(family: Family, tmp_path) -> None:
    if family.expected == "refused":
        with pytest.raises(ValueError, match=family.refusal) as info:
            _wrap(family, build(family))
        assert type(build(family)).__name__ in str(info.value)
        return
    if family.expected == "text only":
        with pytest.raises(ValueError, match=family.refusal) as info:
            _wrap(family, build(family))
        assert "towers='text'" in str(info.value)
        check_prompted(family, tmp_path, towers="text")
        return
    check_prompted(family, tmp_path)



def _family(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)


def _add_prompts_with_hooks(model, peft, modality: str, task: int, spatial: bool) -> list:
    """Independent additive injection: forward pre-hooks on the base blocks that add the task's prompts, reshaped
    to each block's width, to positions 1..n (sequence) or to the top-left grid of the (H, W) map (Swin)."""
    prompts = peft.base_model.task_prompts([task])[modality][0].detach()  # (K, P, D)
    spec = peft.base_model._towers[modality]
    handles = []
    for index in range(prompts.shape[0]):
        block = model.get_submodule(spec.block_path(index))

        def hook(module, args, kwargs, prompt=prompts[index]):
            hidden = args[0]
            batch, length, width = hidden.shape
            values = prompt.reshape(-1, width)
            n = values.shape[0]
            if spatial:
                height, map_width = args[1]
                rows = int(n ** 0.5)
                cols = n // rows
                grid = hidden.reshape(batch, height, map_width, width).clone()
                grid[:, :rows, :cols] += values.reshape(rows, cols, width)
                hidden = grid.reshape(batch, length, width)
            else:
                hidden = hidden.clone()
                hidden[:, 1 : 1 + n] += values
            return (hidden, *args[1:]), kwargs

        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


@pytest.mark.parametrize("name", ["CLIP", "VisionTextDualEncoder Swin + BERT"])
def test_additive_matches_an_independent_implementation(name: str) -> None:
    """injection="additive" == the base model with the prompts added by hooks (per block width; Swin's windows)."""
    family = _family(name)
    batch = make_batch(family)
    peft = _wrap(family, build(family).requires_grad_(False), injection="additive")
    peft.set_task(1)
    prompted = read_towers(family, peft, batch)
    reference_model = build(family).requires_grad_(False)
    spec = peft.base_model._towers
    handles = []
    for modality in ("vision", "text"):
        handles += _add_prompts_with_hooks(reference_model, peft, modality, 1, spec[modality].spatial)
    try:
        expected = read_towers(family, reference_model, batch)
    finally:
        for handle in handles:
            handle.remove()
    for modality in ("vision", "text"):
        torch.testing.assert_close(prompted[modality], expected[modality], atol=1e-5, rtol=1e-4)
    if name.startswith("VisionTextDualEncoder Swin"):  # stage 2 is twice as wide: P*D values as half the tokens
        widths = [peft.get_base_model().get_submodule(spec["vision"].block_path(i)).base_layer.layernorm_before
                  .normalized_shape[0] for i in range(2)]
        assert widths == [16, 32]


def test_swin_deep_insertion_is_refused_at_get_peft_model() -> None:
    family = _family("VisionTextDualEncoder Swin + BERT")
    with pytest.raises(ValueError, match="injection='additive'") as info:
        _wrap(family, build(family), injection="deep")
    assert "VisionTextDualEncoderModel" in str(info.value) and "Swin" in str(info.value)


def test_blip2_qformer_through_layer_paths_is_refused() -> None:
    """Pointing layer_paths at the Q-Former (the issue's silently-wrong set-up) is refused too."""
    family = _family("Blip2ForImageTextRetrieval")
    paths = {"vision": "vision_model.encoder.layers", "text": "qformer.encoder.layer"}
    with pytest.raises(ValueError, match="Q-Former.*towers='vision'"):
        _wrap(family, build(family), layer_paths=paths)


def test_blip2_vision_tower_alone_is_prompted() -> None:
    """BLIP-2's Q-Former text side is refused, but towers='vision' works (the way out the error names)."""
    family = _family("Blip2ForImageTextRetrieval")
    peft = _wrap(family, build(family), towers="vision")
    assert peft.base_model._towers["vision"].layers_path == "vision_model.encoder.layers"
    assert "text" not in peft.base_model.peft_config["default"].prompted_modalities


def test_xclip_auto_routing_expands_video_routes_to_frames() -> None:
    """set_task('auto') on X-CLIP's get_video_features: one route per video, applied to all its frames; equal to
    explicit per-video task ids."""
    family = _family("X-CLIP")
    batch = make_batch(family)
    peft = _wrap(family, build(family).requires_grad_(False))
    tuner = peft.base_model
    with tuner.prompts_disabled():
        videos = read_towers(family, peft, batch)
    # keys from the two videos / captions (tasks 1 and 0)
    for task, row in ((1, 0), (0, 1)):
        tuner.set_task_keys(task, vision=videos["vision"][row : row + 1], text=videos["text"][row : row + 1])
    peft.set_task("auto")
    with torch.no_grad():
        peft.get_video_features(pixel_values=batch["pixel_values"])
    video_routes = tuner.last_routes["vision"]
    assert video_routes.shape == (2,)  # one route per video (2 videos of 2 frames each)
    routed = read_towers(family, peft, batch)
    text_routes = tuner.last_routes["text"]
    peft.set_task(video_routes)
    explicit_video = read_towers(family, peft, batch)["vision"]
    peft.set_task(text_routes)
    torch.testing.assert_close(routed["vision"], explicit_video)
    torch.testing.assert_close(routed["text"], read_towers(family, peft, batch)["text"])


def test_owl_detection_auto_routing_per_image_and_per_query() -> None:
    """set_task('auto') through OwlViTForObjectDetection's forward: images routed with the inner OwlViTModel's
    get_image_features, each query row with get_text_features; equal to the same routes given explicitly."""
    family = _family("OwlViTForObjectDetection")
    batch = make_batch(family)
    peft = _wrap(family, build(family).requires_grad_(False))
    tuner = peft.base_model
    with tuner.prompts_disabled(), torch.no_grad():
        inner = peft.get_base_model().owlvit
        images = inner.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        texts = inner.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for task, row in ((1, 0), (0, 1)):
        tuner.set_task_keys(task, vision=images[row : row + 1], text=texts.pooler_output[row : row + 1])
    peft.set_task("auto")
    routed = read_towers(family, peft, batch)
    routes = dict(tuner.last_routes)
    assert routes["vision"].shape == (2,) and routes["text"].shape == (4,)  # 2 images, 2 x 2 query rows
    single = []
    for task in (0, 1):
        peft.set_task(task)
        single.append(read_towers(family, peft, batch))
    for image, task in enumerate(routes["vision"].tolist()):
        torch.testing.assert_close(routed["vision"][image], single[task]["vision"][image])
    routed_queries = routed["text"].reshape(4, -1)  # (image, query) major rows, as fed
    for row, task in enumerate(routes["text"].tolist()):
        torch.testing.assert_close(routed_queries[row], single[task]["text"].reshape(4, -1)[row])
