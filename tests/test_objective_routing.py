"""The LPI objective on a model, modality independence, task keys and task-agnostic (auto) inference."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch, tiny_clip, tiny_siglip
from peft import get_peft_model

import peft_lpi  # noqa: F401
from peft_lpi import LPIConfig
from peft_lpi.continual.losses import contrastive_loss, sigmoid_loss
from peft_lpi.continual.objective import LPIObjective
from peft_lpi.tuner.model import embedding_of

BUILDERS = {"clip": tiny_clip, "siglip": tiny_siglip}


def lpi(kind: str, **config):
    values = dict(num_tasks=3, prompt_length=3, prompt_depth=3, rank=2, num_keys=2)
    values.update(config)
    return get_peft_model(BUILDERS[kind](), LPIConfig(**values))


def features(model, batch):
    image = embedding_of(model.get_image_features(pixel_values=batch["pixel_values"]))
    text = embedding_of(model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
    return image, text


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.slow
def test_image_embedding_does_not_depend_on_captions(kind):
    """The correlation module couples prompts, never data: images and captions are encoded independently."""
    model = lpi(kind)
    model.set_task(1)
    a, b = random_batch(kind, seed=1), random_batch(kind, seed=2)
    out_a = model(pixel_values=a["pixel_values"], input_ids=a["input_ids"], attention_mask=a["attention_mask"])
    out_b = model(pixel_values=a["pixel_values"], input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    torch.testing.assert_close(out_a.image_embeds, out_b.image_embeds, rtol=0, atol=0)
    out_c = model(pixel_values=b["pixel_values"], input_ids=a["input_ids"], attention_mask=a["attention_mask"])
    torch.testing.assert_close(out_a.text_embeds, out_c.text_embeds, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_objective_uses_the_family_loss_and_reports_every_term(kind):
    model = lpi(kind)
    similarity = torch.tensor([[1.0, 0.6, 0.1], [0.6, 1.0, 0.2], [0.1, 0.2, 1.0]])
    objective = LPIObjective(model, similarity)
    batch = random_batch(kind)
    model.train_task(2)
    image, text = features(model, batch)
    terms = objective(image, text, task=2)
    assert set(terms) == {"loss", "contrastive", "align", "align_layer", "align_token", "task"}
    base = model.base_model.model
    if kind == "siglip":
        expected = sigmoid_loss(image, text, base.logit_scale.exp(), base.logit_bias)
    else:
        expected = contrastive_loss(image, text, base.logit_scale.exp())
    torch.testing.assert_close(terms["contrastive"], expected)
    config = model.peft_config["default"]
    total = terms["contrastive"] + config.align_weight * terms["align"] + config.task_weight * terms["task"]
    torch.testing.assert_close(terms["loss"], total)
    assert terms["task"].item() > 0 and terms["align"].item() > 0
    # Task 0 has no earlier tasks: no task term.
    assert objective(image, text, task=0)["task"].item() == 0.0


@pytest.mark.slow
def test_a_few_steps_on_a_fixed_batch_lower_every_term():
    torch.manual_seed(0)
    model = lpi("clip", align_normalize=True)
    similarity = torch.tensor([[1.0, 0.7, 0.1], [0.7, 1.0, 0.1], [0.1, 0.1, 1.0]])
    objective = LPIObjective(model, similarity)
    batch = random_batch("clip", batch=6, seed=3)
    params = model.train_task(2)
    optimizer = torch.optim.Adam(params, lr=2e-2)
    history = []
    for _ in range(25):
        terms = objective(*features(model, batch), task=2)
        history.append({k: v.item() for k, v in terms.items()})
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    for name in ("loss", "contrastive", "align", "task"):
        assert history[-1][name] < history[0][name], (name, history[0][name], history[-1][name])


def clustered_keys(model, batches):
    """Keys of each task: k-means of prompt-free features of that task's samples."""
    for task, batch in enumerate(batches):
        with model.prompts_disabled():
            image, text = features(model, batch)
        model.build_task_keys(task, vision=image, text=text)


@pytest.mark.slow
def test_auto_routing_needs_keys_then_routes_each_sample_and_matches_oracle():
    model = lpi("clip")
    with pytest.raises(ValueError, match="keys"):
        model.set_task("auto")
    # Three "domains": each task's images are the same random batch shifted far apart.
    batches = []
    for task in range(3):
        b = random_batch("clip", batch=4, seed=10 + task)
        b["pixel_values"] = b["pixel_values"] * 0.1 + 3.0 * (task - 1)
        batches.append(b)
    clustered_keys(model, batches)
    mixed = {k: torch.cat([b[k][:2] for b in batches]) for k in batches[0]}
    true_tasks = torch.tensor([0, 0, 1, 1, 2, 2])

    model.set_task("auto")
    auto_image = embedding_of(model.get_image_features(pixel_values=mixed["pixel_values"]))
    routes = model.base_model.last_routes["vision"]
    assert torch.equal(routes.cpu(), true_tasks)

    # Batched per-sample prompts equal the oracle (true task ids) encoding, and the routes equal a brute-force
    # nearest-key computation.
    model.set_task(true_tasks)
    oracle_image = embedding_of(model.get_image_features(pixel_values=mixed["pixel_values"]))
    torch.testing.assert_close(auto_image, oracle_image)
    with model.prompts_disabled():
        free = torch.nn.functional.normalize(embedding_of(model.get_image_features(pixel_values=mixed["pixel_values"])), dim=-1)
    keys = model.base_model.lpi_prompts["default"].vision_keys  # (T, k, D)
    brute = torch.stack([
        torch.tensor([min((free[i] - keys[t, j]).abs().sum().item() for j in range(keys.shape[1]))
                      for t in range(3)]).argmin()
        for i in range(free.shape[0])
    ])
    assert torch.equal(brute, true_tasks)

    # The joint forward routes images and captions independently.
    model.set_task("auto")
    out = model(**mixed)
    assert set(model.base_model.last_routes) == {"vision", "text"}
    assert out.image_embeds.shape == (6, 16)


def test_keys_are_saved_and_loaded_with_the_adapter(tmp_path):
    model = lpi("clip")
    batches = [random_batch("clip", seed=20 + t) for t in range(3)]
    clustered_keys(model, batches)
    model.save_pretrained(tmp_path / "adapter")
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path / "adapter")
    source = model.base_model.lpi_prompts["default"]
    target = loaded.base_model.lpi_prompts["default"]
    assert torch.equal(source.vision_keys, target.vision_keys)
    assert torch.equal(source.text_keys, target.text_keys)
    assert target.has_keys.all()
    model.save_task(1, tmp_path / "t1.safetensors")
    fresh = lpi("clip")
    fresh.load_task(2, tmp_path / "t1.safetensors")
    assert torch.equal(fresh.base_model.lpi_prompts["default"].vision_keys[2], source.vision_keys[1])
