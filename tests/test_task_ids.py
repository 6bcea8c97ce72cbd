"""Per-call task selection (`task_ids=`), as PEFT's LoRA takes `adapter_names`: the same outputs, bit for bit, as
`set_task` followed by the call, and the sticky `set_task` state left untouched (also when the call raises)."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch, tiny_clip, tiny_siglip
from peft import PeftModel, get_peft_model

from peft_lpi import LPIConfig
from peft_lpi.tuner.model import embedding_of

BUILDERS = {"clip": tiny_clip, "siglip": tiny_siglip}
NUM_TASKS, BATCH, STICKY = 3, 4, 2


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)


def lpi_model(kind: str) -> PeftModel:
    """A tiny LPI model with 3 tasks of distinct random factors and random unit keys (so "auto" routes)."""
    torch.manual_seed(0)
    model = get_peft_model(BUILDERS[kind](), LPIConfig(num_tasks=NUM_TASKS, prompt_depth=2, prompt_length=3, rank=2))
    generator = torch.Generator().manual_seed(3)
    for task in range(NUM_TASKS):
        keys = torch.nn.functional.normalize(torch.randn(2, 2, 16 if kind == "clip" else 32, generator=generator), dim=-1)
        model.set_task_keys(task, vision=keys[:, 0], text=keys[:, 1])
    return model.eval()


def run_all(model: PeftModel, batch: dict, **task_ids) -> dict[str, torch.Tensor]:
    """Embeddings of the PeftModel's forward and of both feature methods (with `task_ids` when given)."""
    with torch.no_grad():
        out = model(**batch, **task_ids)
        text = {k: batch[k] for k in ("input_ids", "attention_mask")}
        return {
            "forward_image": out.image_embeds,
            "forward_text": out.text_embeds,
            "image": embedding_of(model.get_image_features(pixel_values=batch["pixel_values"], **task_ids)),
            "text": embedding_of(model.get_text_features(**text, **task_ids)),
        }


SELECTIONS = {
    "int": lambda: 1,
    "tensor": lambda: torch.tensor([0, 1, 2, 1]),
    "zero_dim_tensor": lambda: torch.tensor(0),
    "auto": lambda: "auto",
}


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("selection", list(SELECTIONS))
def test_per_call_equals_set_task_then_call(kind: str, selection: str) -> None:
    model = lpi_model(kind)
    batch = random_batch(kind, BATCH, pad_rows=(1,))
    model.set_task(SELECTIONS[selection]())
    expected = run_all(model, batch)
    model.set_task(STICKY)
    sticky = run_all(model, batch)
    got = run_all(model, batch, task_ids=SELECTIONS[selection]())
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
        if selection != "auto":  # (auto may route every sample to task 2)
            assert not torch.equal(got[name], sticky[name]), f"{name}: task_ids had no effect"
    assert model.current_task == STICKY  # the per-call value did not stick
    assert all(torch.equal(v, sticky[k]) for k, v in run_all(model, batch).items())


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_auto_per_call_reports_routes(kind: str) -> None:
    model = lpi_model(kind)
    batch = random_batch(kind, BATCH)
    model.set_task(0)
    with torch.no_grad():
        model.get_image_features(pixel_values=batch["pixel_values"], task_ids="auto")
        routes = model.base_model.last_routes["vision"]
        features = embedding_of(model.base_model._base_features("vision", pixel_values=batch["pixel_values"]))
    assert torch.equal(routes, model.base_model.route("vision", features))
    assert model.current_task == 0


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_sticky_state_survives_an_exception_inside_the_forward(kind: str) -> None:
    model = lpi_model(kind)
    batch = random_batch(kind, BATCH)
    model.set_task(STICKY)
    before = run_all(model, batch)
    wrong_length = torch.tensor([0, 1])  # 2 ids for a batch of 4: raised by the first prompted layer
    with pytest.raises(ValueError, match="per-sample task ids"):
        model.get_image_features(pixel_values=batch["pixel_values"], task_ids=wrong_length)
    with pytest.raises(ValueError, match="per-sample task ids"):
        model(**batch, task_ids=wrong_length)
    with pytest.raises(IndexError, match="out of range"):
        model.get_text_features(input_ids=batch["input_ids"], task_ids=NUM_TASKS)
    assert model.current_task == STICKY
    after = run_all(model, batch)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_invalid_task_ids_are_refused_with_a_clear_error() -> None:
    model = lpi_model("clip")
    pixels = random_batch("clip", BATCH)["pixel_values"]
    with pytest.raises(ValueError, match="'auto'"):
        model.get_image_features(pixel_values=pixels, task_ids="first")
    with pytest.raises(TypeError, match="integer tensor"):
        model.get_image_features(pixel_values=pixels, task_ids=torch.zeros(BATCH))
    with pytest.raises(TypeError, match="must be an int"):
        model.get_image_features(pixel_values=pixels, task_ids=1.0)


def test_task_ids_with_adapter_disabled_runs_the_base_model() -> None:
    """Under `disable_adapter()` PEFT skips the tuner's forward hooks; `task_ids` still never reaches the base model."""
    model = lpi_model("clip")
    batch = random_batch("clip", BATCH)
    with torch.no_grad():
        with model.base_model.prompts_disabled():
            base = model.base_model.model(**batch)
        with model.disable_adapter():
            out = model(**batch, task_ids=1)
    assert torch.equal(out.image_embeds, base.image_embeds)
    assert torch.equal(out.text_embeds, base.text_embeds)


def test_unload_removes_the_task_ids_hook() -> None:
    model = lpi_model("clip")
    base = model.unload()
    assert not base._forward_pre_hooks


def test_per_call_training_gradients_equal_set_task() -> None:
    """A per-call training forward back-propagates exactly what the sticky form does."""
    model = lpi_model("clip").train()
    batch = random_batch("clip", BATCH)
    params = model.base_model.train_task(1)

    def grads(**task_ids) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out = model(**batch, **task_ids)
        (out.image_embeds.square().sum() + out.text_embeds.sum()).backward()
        return [p.grad.clone() for p in params]

    model.set_task(1)
    sticky = grads()
    model.set_task(0)
    per_call = grads(task_ids=1)
    assert all(torch.equal(a, b) for a, b in zip(per_call, sticky))
    assert model.current_task == 0
