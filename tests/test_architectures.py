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


def _first_text_token(model, family: Family, batch, layers_path: str) -> torch.Tensor:
    """Output of the text tower's last layer at position 0 (a forward hook), for the read-out of `family`."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    last = base.get_submodule(layers_path)[-1]
    captured = []

    def hook(module, args, output):
        captured.append((output if isinstance(output, torch.Tensor) else output[0])[:, 0].clone())

    handle = last.register_forward_hook(hook)
    try:
        read_towers(family, model, batch)
    finally:
        handle.remove()
    return captured[0]


def _truly_causal(family: Family, batch, layers_path: str) -> bool:
    """Measured on the base model: does changing the last token of caption 0 leave position 0 unchanged?"""
    model = build(family).requires_grad_(False)
    before = _first_text_token(model, family, batch, layers_path)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][0, -2] = (changed["input_ids"][0, -2] + 1 - 4) % (60 - 4) + 4
    after = _first_text_token(model, family, changed, layers_path)
    return torch.allclose(before[0], after[0], atol=1e-6)


def check_prompted(family: Family, tmp_path, **extra) -> None:
    """Every census check of a family that LPI prompts (towers per `extra`, default both)."""
    batch = make_batch(family)
    base_model = build(family).requires_grad_(False)  # as get_peft_model leaves it (MHA's fast path needs it)
    base = read_towers(family, base_model, batch)
    peft = _wrap(family, base_model, **extra)
    tuner = peft.base_model
    prompted = peft.peft_config["default"].prompted_modalities
    for modality in prompted:  # detection
        if modality in family.towers:
            assert tuner._towers[modality].layers_path == family.towers[modality], modality

    outputs = []
    for task in (0, 1):
        peft.set_task(task)
        outputs.append(read_towers(family, peft, batch))
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

    if "text" in prompted:  # causality as the tower is really run: measured on the base model, not read from config
        path = tuner._towers["text"].layers_path
        peft.set_task(0)
        causal = _truly_causal(family, batch, path)
        if peft.peft_config["default"].injection != "additive":  # (additive prompts never widen a mask)
            assert tuner._towers["text"].causal == causal, f"text tower causal={causal} but detected otherwise"
        with peft.disable_adapter():
            plain = _first_text_token(peft, family, batch, path)
        first = _first_text_token(peft, family, batch, path)
        assert torch.allclose(first, plain, atol=1e-6) == causal

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

