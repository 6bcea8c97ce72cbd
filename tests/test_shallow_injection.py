"""injection="shallow" beyond the reference comparison: per-sample tasks, save / load, refusals."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import random_batch, tiny_clip, tiny_siglip
from peft import PeftModel, get_peft_model
from torch import nn

import peft_lpi  # noqa: F401  (registers LPI with PEFT)
from peft_lpi import LPIConfig

SHALLOW = dict(num_tasks=3, prompt_length=3, prompt_depth=2, rank=2, injection="shallow")


def _wrap(builder, seed=0, **overrides):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(builder(attn="eager"), LPIConfig(**{**SHALLOW, **overrides}))


@pytest.mark.parametrize("builder, kind", [(tiny_clip, "clip"), (tiny_siglip, "siglip")])
def test_per_sample_tasks_equal_one_task_per_batch(builder, kind):
    model = _wrap(builder)
    batch = random_batch(kind, pad_rows=[1])
    if kind == "siglip":
        batch.pop("attention_mask")
    tuner = model.base_model
    tasks = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        tuner.set_task(tasks)
        mixed = model(**batch)
        for task in (0, 1, 2):
            tuner.set_task(task)
            alone = model(**batch)
            rows = tasks == task
            assert torch.allclose(mixed.image_embeds[rows], alone.image_embeds[rows], atol=1e-5)
            assert torch.allclose(mixed.text_embeds[rows], alone.text_embeds[rows], atol=1e-5)
        tuner.set_task(0)
        assert not torch.allclose(model(**batch).text_embeds, alone.text_embeds, atol=1e-4)  # tasks differ


def test_save_and_load_round_trip(tmp_path):
    model = _wrap(tiny_clip)
    batch = random_batch("clip")
    model.base_model.set_task(1)
    with torch.no_grad():
        before = model(**batch)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_clip(attn="eager"), tmp_path)
    assert loaded.peft_config["default"].injection == "shallow"
    loaded.base_model.set_task(1)
    with torch.no_grad():
        after = loaded(**batch)
    assert torch.allclose(before.image_embeds, after.image_embeds, atol=1e-6)
    assert torch.allclose(before.text_embeds, after.text_embeds, atol=1e-6)


def test_gradients_reach_only_the_current_task():
    model = _wrap(tiny_clip)
    model.base_model.train_task(2)
    out = model(**random_batch("clip"))
    (out.image_embeds.sum() + out.text_embeds.sum()).backward()
    bank = model.base_model.active_bank
    assert bank.tasks[2].token_factors["vision"].grad.abs().sum() > 0
    assert bank.tasks[2].token_factors["text"].grad.abs().sum() > 0
    assert bank.tasks[0].token_factors["vision"].grad is None
    # only layer 0's prompts enter the towers: the other rows of the layer factor get no gradient from the forward
    assert bank.tasks[2].layer_factor.grad[0].abs().sum() > 0 and bank.tasks[2].layer_factor.grad[1:].abs().sum() == 0


def test_mixing_injection_modes_in_one_model_is_refused():
    model = _wrap(tiny_clip)
    with pytest.raises(ValueError, match="same injection mode"):
        model.add_adapter("deep", LPIConfig(num_tasks=1, prompt_length=2, prompt_depth=1, rank=2))


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)

    def forward(self, hidden, attention_mask=None):
        return self.norm(hidden)


class _Tower(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(width) for _ in range(2)])


class _DualEncoderWithoutEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_model, self.text_model = _Tower(8), _Tower(6)


def test_shallow_refuses_a_tower_without_an_embedding_module():
    with pytest.raises(ValueError, match="injection='deep'"):
        get_peft_model(_DualEncoderWithoutEmbeddings(), LPIConfig(**SHALLOW))
    deep = get_peft_model(_DualEncoderWithoutEmbeddings(), LPIConfig(**{**SHALLOW, "injection": "deep"}))
    assert deep.base_model.active_config.injection == "deep"


def test_unknown_injection_is_refused():
    with pytest.raises(ValueError, match="injection"):
        LPIConfig(injection="sideways")
