"""Finding the towers (peft_lpi.tuner.architectures): models that are refused, layer_paths overrides."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    SMALL,
    bank_of,
    random_batch,
    tiny_clip,
    wrap,
)
from peft import get_peft_model
from torch import nn

from peft_lpi import LPIConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)


# ================================================================================================ bad models
def test_plain_bert_is_refused_with_a_clear_message():
    from transformers import BertConfig, BertModel

    bert = BertModel(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=16,
        )
    )
    with pytest.raises(ValueError, match="layer_paths") as info:
        get_peft_model(bert, LPIConfig(**SMALL))
    message = str(info.value)
    assert "vision" in message and "BertModel" in message and "vision_model" in message


class _CustomDualEncoder(nn.Module):
    """A dual encoder whose towers sit under names no lookup knows."""

    def __init__(self, clip):
        super().__init__()
        self.image_tower, self.caption_tower = clip.vision_model, clip.text_model


def test_layer_paths_override(tmp_path):
    clip = tiny_clip()
    custom = _CustomDualEncoder(copy.deepcopy(clip))
    with pytest.raises(ValueError, match="layer_paths"):
        get_peft_model(copy.deepcopy(custom), LPIConfig(**SMALL))
    paths = {"vision": "image_tower.encoder.layers", "text": "caption_tower.encoder.layers"}
    model = wrap(custom, layer_paths=paths, text_causal=True, num_tasks=2)
    reference = wrap(clip, num_tasks=2)
    # same factors; keys differ in width (no projection_dim in a config-less model: hidden sizes are used)
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if ".tasks." in k}, strict=False)
    assert bank_of(model).hidden_sizes == {"vision": 48, "text": 32}
    batch = random_batch("clip", 3, 8, pad_rows=[1])
    model.set_task(1)
    reference.set_task(1)
    with torch.no_grad():
        inner = model.base_model.model
        got = inner.caption_tower(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
        exp = reference.base_model.model.text_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).pooler_output
        torch.testing.assert_close(got, exp, atol=0, rtol=0)
        got = inner.image_tower(pixel_values=batch["pixel_values"]).pooler_output
        exp = reference.base_model.model.vision_model(pixel_values=batch["pixel_values"]).pooler_output
        torch.testing.assert_close(got, exp, atol=0, rtol=0)
