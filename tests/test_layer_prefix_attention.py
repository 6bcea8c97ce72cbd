"""The prefix-attention path of the prompted layer (prompts only as keys/values of the real tokens) against the
generic insert / run the base layer / strip path: same outputs and gradients, taken only where it is exact."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch, tiny_clip, tiny_siglip
from peft import get_peft_model

from peft_lpi import LPIConfig
from peft_lpi.tuner import layer as layer_module
from peft_lpi.tuner.layer import LPIPromptedLayer

BUILDERS = {"clip": tiny_clip, "siglip": tiny_siglip}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)


@pytest.fixture
def prefix_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = layer_module.prefix_attention_layer

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(layer_module, "prefix_attention_layer", counted)
    return calls


def run(kind: str, task_ids, generic: bool, monkeypatch: pytest.MonkeyPatch, **forward_kwargs):
    """Embeddings and the trained task's gradients of one forward/backward (generic=True: the generic path)."""
    torch.manual_seed(0)
    model = get_peft_model(BUILDERS[kind](), LPIConfig(num_tasks=3, prompt_depth=3, prompt_length=3, rank=2))
    params = model.base_model.train_task(1)
    model.train()
    with monkeypatch.context() as patch:
        if generic:
            patch.setattr(LPIPromptedLayer, "_can_run_prefix_attention", lambda *args: False)
        out = model(**random_batch(kind, 4, pad_rows=(1, 2)), task_ids=task_ids, **forward_kwargs)
        (out.image_embeds.square().sum() + out.text_embeds.pow(3).sum()).backward()
    return out, [p.grad for p in params]


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("per_sample", [False, True])
def test_prefix_attention_equals_insert_run_strip(kind, per_sample, monkeypatch, prefix_calls):
    task_ids = torch.tensor([1, 0, 2, 1]) if per_sample else 1
    fast, fast_grads = run(kind, task_ids, False, monkeypatch)
    assert len(prefix_calls) == 6  # 3 prompted layers in each tower took the prefix path
    generic, generic_grads = run(kind, task_ids, True, monkeypatch)
    assert len(prefix_calls) == 6
    torch.testing.assert_close(fast.image_embeds, generic.image_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.text_embeds, generic.text_embeds, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast_grads, generic_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_hidden_state_capture_and_checkpointing_take_the_generic_path(monkeypatch, prefix_calls):
    run("clip", 1, False, monkeypatch, output_hidden_states=True)
    assert prefix_calls == []  # captured hidden states come from the generic path's records
    torch.manual_seed(0)
    base = tiny_clip()
    base.gradient_checkpointing_enable()
    model = get_peft_model(base, LPIConfig(num_tasks=2, prompt_depth=2, prompt_length=3, rank=2))
    model.base_model.train_task(1)
    model.train()
    model(**random_batch("clip", 2), task_ids=1)
    assert prefix_calls == []  # checkpointing wraps the base layer's own call


def test_eager_attention_takes_the_generic_path(monkeypatch, prefix_calls):
    torch.manual_seed(0)
    model = get_peft_model(tiny_clip("eager"), LPIConfig(num_tasks=2, prompt_depth=2, prompt_length=3, rank=2))
    with torch.no_grad():
        model(**random_batch("clip", 2), task_ids=1)
    assert prefix_calls == []
