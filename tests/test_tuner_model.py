"""The LPI tuner (peft_lpi.tuner.model): depth cap, trainability, mixed-task batches, auto routing, train_task /
add_task and PEFT behaviour (disable, unload, adapters, save / load), each against an independent computation."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    KINDS,
    TINY_BUILDERS,
    bank_of,
    cp_prompts,
    features,
    image_features,
    random_batch,
    reference_clip_image,
    reference_clip_text,
    text_features,
    tiny_clip,
    wrap,
)
from peft import AutoPeftModel, PeftModel
from safetensors import safe_open

from peft_lpi import LPIConfig
from peft_lpi.tuner.factors import LPITaskFactors
from peft_lpi.tuner.layer import LPIPromptedLayer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)


def test_depth_is_capped_at_tower_depth_with_warning():
    with pytest.warns(UserWarning, match="prompt_depth"):
        model = wrap(tiny_clip(layers=3), prompt_depth=10, interaction=False)
    assert model.peft_config["default"].prompt_depth == 3
    assert bank_of(model).depth == 3
    layers = [m for m in model.modules() if isinstance(m, LPIPromptedLayer)]
    assert sorted((m.modality, m.layer_index) for m in layers) == [(m, i) for m in ("text", "vision") for i in range(3)]


# ============================================================================================== trainability
@pytest.mark.parametrize("kind", KINDS)
def test_only_lpi_parameters_are_trainable(kind):
    model = wrap(TINY_BUILDERS[kind](), num_tasks=2)
    for name, param in model.named_parameters():
        assert param.requires_grad == ("lpi_prompts.default.tasks.0." in name), name
    batch = random_batch(kind, 2, 8)
    img, txt = image_features(model, batch), text_features(model, batch)
    (img.sum() + txt.sum()).backward()
    for name, param in model.named_parameters():
        if "lpi_prompts" in name and ".tasks.0." in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        elif "lpi_prompts" not in name:
            assert param.grad is None, name


# ========================================================================================= mixed-task batches
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_task_batch_equals_per_sample(kind, monkeypatch):
    model = wrap(TINY_BUILDERS[kind](), num_tasks=3)
    batch = random_batch(kind, 4, 8, pad_rows=[1])
    tasks = torch.tensor([0, 2, 1, 2])
    calls = []
    original = LPITaskFactors.forward

    def counting(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(LPITaskFactors, "forward", counting)
    model.set_task(tasks)
    img, txt = features(model, batch)
    # Each distinct task is computed once; under no_grad the second tower pass reuses the cached prompts.
    assert len(calls) == 3 and len({id(c) for c in calls}) == 3
    calls.clear()
    image_features(model, batch), text_features(model, batch)  # with grad enabled
    # With grad, outside reuse_prompts(): the training task (0) is recomputed per tower pass; the frozen tasks (1, 2)
    # come from the cache filled above (their factors did not change).
    assert len(calls) == 2 and all(c is bank_of(model).tasks[0] for c in calls)
    monkeypatch.setattr(LPITaskFactors, "forward", original)
    for row, task in enumerate(tasks.tolist()):
        model.set_task(task)
        one = {k: v[row : row + 1] for k, v in batch.items()}
        alone_img, alone_txt = features(model, one)
        torch.testing.assert_close(img[row : row + 1], alone_img, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(txt[row : row + 1], alone_txt, atol=1e-5, rtol=1e-5)


def test_auto_routing_matches_explicit_per_sample_tasks():
    model = wrap(tiny_clip(), num_tasks=3)
    batch = random_batch("clip", 3, 8, pad_rows=[2])
    with torch.no_grad(), model.prompts_disabled():
        img, txt = features(model, batch)
    img, txt = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
    # sample i's prompt-free features are the key of task truth[i]; image and caption routes are independent
    truth_img, truth_txt = torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])
    for task in range(3):
        model.set_task_keys(task, vision=img[truth_img == task], text=txt[truth_txt == task])
    model.set_task("auto")
    with torch.no_grad():
        auto = model(**batch)  # PeftModel.forward routes both modalities
        assert torch.equal(model.base_model.last_routes["vision"], truth_img)
        assert torch.equal(model.base_model.last_routes["text"], truth_txt)
        auto_img, auto_txt = features(model, batch)  # feature methods route their own modality
        assert torch.equal(model.base_model.last_routes["text"], truth_txt)
    model.set_task(truth_img)
    explicit_img = features(model, batch)[0]
    model.set_task(truth_txt)
    explicit_txt = features(model, batch)[1]
    assert torch.equal(auto_img, explicit_img) and torch.equal(auto_txt, explicit_txt)
    torch.testing.assert_close(auto.image_embeds, torch.nn.functional.normalize(explicit_img, dim=-1))
    torch.testing.assert_close(auto.text_embeds, torch.nn.functional.normalize(explicit_txt, dim=-1))


def test_auto_routing_needs_keys():
    model = wrap(tiny_clip(), num_tasks=2)
    with pytest.raises(ValueError, match="keys"):
        model.set_task("auto")


def test_wrapped_layer_accepts_keyword_hidden_states_when_disabled():
    model = wrap(tiny_clip(), num_tasks=1)
    layer = model.base_model.model.vision_model.encoder.layers[0]
    hidden = torch.randn(2, 5, 48)
    with torch.no_grad():
        prompted = layer(hidden_states=hidden, attention_mask=None)
        with model.disable_adapter():
            plain = layer(hidden_states=hidden, attention_mask=None)
        expected = layer.base_layer(hidden, None)
    assert torch.equal(plain, expected) and not torch.allclose(prompted, expected)


def test_task_selection_errors():
    model = wrap(tiny_clip(), num_tasks=3)
    batch = random_batch("clip", 4, 8)
    model.set_task(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="3 per-sample task ids .* 4 samples"):
        image_features(model, batch)
    with pytest.raises(TypeError, match="integer"):
        model.set_task(torch.tensor([0.0, 1.0, 1.0, 0.0]))
    with pytest.raises(IndexError, match="out of range"):
        model.set_task(torch.tensor([0, 3, 1, 0]))
    with pytest.raises(IndexError, match="out of range"):
        model.set_task(torch.tensor([0, -1, 1, 0]))
    with pytest.raises(IndexError, match="out of range"):
        model.set_task(3)
    with pytest.raises(ValueError, match="auto"):
        model.set_task("automatic")
    with pytest.raises(TypeError):
        model.set_task(1.0)


# ===================================================================================== train_task / add_task
def _sgd_step(model, params, batch, kind="clip"):
    optimizer = torch.optim.SGD(params, lr=0.5)
    img, txt = image_features(model, batch), text_features(model, batch)
    (img @ txt.T).diagonal().sum().neg().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_train_task_changes_only_that_task():
    model = wrap(tiny_clip(), num_tasks=3)
    bank = bank_of(model)
    before = [{k: v.clone() for k, v in task.state_dict().items()} for task in bank.tasks]
    params = model.train_task(1)
    assert {id(p) for p in params} == {id(p) for p in bank.tasks[1].parameters()}
    assert all(not p.requires_grad for t in (0, 2) for p in bank.tasks[t].parameters())
    _sgd_step(model, [p for p in model.parameters() if p.requires_grad], random_batch("clip", 3, 8))
    for t, task in enumerate(bank.tasks):
        changed = [not torch.equal(before[t][k], v) for k, v in task.state_dict().items()]
        if t == 1:
            assert all(changed)
        else:
            assert not any(changed)


def test_add_task_grows_and_trains():
    model = wrap(tiny_clip(), num_tasks=2)
    model.set_task_keys(0, vision=torch.randn(5, 16), text=torch.randn(5, 16))
    new = model.add_task()
    assert new == 2 and model.num_tasks == 3 and model.peft_config["default"].num_tasks == 3
    bank = bank_of(model)
    assert bank.vision_keys.shape[0] == 3 and bank.has_keys.tolist() == [True, False, False]
    before = {k: v.clone() for k, v in bank.tasks[new].state_dict().items()}
    old = {k: v.clone() for k, v in bank.tasks[0].state_dict().items()}
    params = model.train_task(new)
    _sgd_step(model, params, random_batch("clip", 3, 8))
    assert all(not torch.equal(before[k], v) for k, v in bank.tasks[new].state_dict().items())
    assert all(torch.equal(old[k], v) for k, v in bank.tasks[0].state_dict().items())


# ============================================================================================ PEFT behaviour
@pytest.mark.parametrize("kind", KINDS)
def test_disable_adapter_and_unload_give_base_outputs(kind):
    base = TINY_BUILDERS[kind]()
    # frozen like the wrapped base: SigLIP's nn.MultiheadAttention pooling head takes another (fast) kernel path
    # when no parameter requires grad, which differs from the slow path in the last bits
    reference = copy.deepcopy(base).requires_grad_(False)
    model = wrap(base, num_tasks=2)
    batch = random_batch(kind, 3, 8, pad_rows=[2])
    ref_img, ref_txt = features(reference, batch)
    with model.disable_adapter():
        img, txt = features(model, batch)
    assert torch.equal(img, ref_img) and torch.equal(txt, ref_txt)
    img, _ = features(model, batch)
    assert not torch.allclose(img, ref_img)  # prompts back on after the context
    unloaded = model.unload()
    assert not any(isinstance(m, LPIPromptedLayer) for m in unloaded.modules())
    img, txt = features(unloaded, batch)
    assert torch.equal(img, ref_img) and torch.equal(txt, ref_txt)


def test_merge_and_unload_raises():
    model = wrap(tiny_clip())
    with pytest.raises(ValueError, match="merge"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="merge"):
        model.merge_adapter()


def test_add_set_delete_adapter(tmp_path):
    base = tiny_clip("eager")
    reference = copy.deepcopy(base)
    model = wrap(base, num_tasks=2, interaction=False)
    batch = random_batch("clip", 3, 8, pad_rows=[1])
    default_img, default_txt = features(model, batch)
    torch.manual_seed(5)
    model.add_adapter("other", LPIConfig(num_tasks=1, prompt_depth=3, prompt_length=2, rank=3, interaction=False))
    assert features(model, batch)[0].equal(default_img)  # adding does not activate
    model.set_adapter("other")
    img, txt = features(model, batch)
    img_other = img
    factors = bank_of(model, "other").tasks[0]
    with torch.no_grad():
        pv, pw = (cp_prompts(factors, m).expand(3, -1, -1, -1) for m in ("vision", "text"))
        ref_img, _ = reference_clip_image(reference, pv, batch["pixel_values"])
        ref_txt, _ = reference_clip_text(reference, pw, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-5)
    model.set_adapter("default")
    img, txt = features(model, batch)
    assert torch.equal(img, default_img) and torch.equal(txt, default_txt)
    model.set_adapter("other")
    model.save_pretrained(tmp_path)  # a non-default adapter goes to <dir>/<name>/, keys without the name
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "other", adapter_name="again")
    assert torch.equal(features(reloaded, batch)[0], img_other)
    model.delete_adapter("other")
    assert "other" not in model.peft_config and "other" not in model.base_model.lpi_prompts
    assert model.active_adapters == ["default"]
    img, txt = features(model, batch)
    assert torch.equal(img, default_img) and torch.equal(txt, default_txt)


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_round_trip(kind, tmp_path):
    base = TINY_BUILDERS[kind]()
    pristine = copy.deepcopy(base)
    model = wrap(base, num_tasks=3)
    key_width = bank_of(model).vision_keys.shape[-1]  # projection dim (CLIP, ViT+BERT) or hidden size (SigLIP)
    model.set_task_keys(1, vision=torch.randn(5, key_width), text=torch.randn(2, key_width))
    model.set_task(torch.tensor([2, 1, 0]))
    batch = random_batch(kind, 3, 8, pad_rows=[1])
    expected = features(model, batch)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all("default" not in k for k in keys)
    assert any(k.endswith("vision_keys") for k in keys) and any(k.endswith("has_keys") for k in keys)

    for name, low_memory in (("default", False), ("renamed", False), ("default", True)):
        loaded = PeftModel.from_pretrained(
            copy.deepcopy(pristine), tmp_path, adapter_name=name, low_cpu_mem_usage=low_memory
        )
        assert not any(p.is_meta for p in loaded.parameters())
        loaded.set_task(torch.tensor([2, 1, 0]))
        for got, exp in zip(features(loaded, batch), expected, strict=True):
            assert torch.equal(got, exp)
        for key in ("vision_keys", "text_keys", "has_keys"):
            assert torch.equal(getattr(bank_of(loaded), key).nan_to_num(), getattr(bank_of(model), key).nan_to_num())
        assert loaded.base_model.num_tasks == 3

    # load_adapter under another name onto a model that already has an adapter
    other = wrap(copy.deepcopy(pristine), seed=7, num_tasks=3)
    other.load_adapter(tmp_path, adapter_name="second")
    other.set_adapter("second")
    other.set_task(torch.tensor([2, 1, 0]))
    for got, exp in zip(features(other, batch), expected, strict=True):
        assert torch.equal(got, exp)


def test_auto_peft_model_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    base = tiny_clip()
    base.save_pretrained(tmp_path / "base")
    base.name_or_path = str(tmp_path / "base")
    model = wrap(base, num_tasks=2)
    assert model.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")
    model.set_task(1)
    batch = random_batch("clip", 2, 8)
    expected = features(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModel.from_pretrained(tmp_path / "adapter")
    loaded.eval()
    loaded.set_task(1)
    for got, exp in zip(features(loaded, batch), expected, strict=True):
        torch.testing.assert_close(got, exp, atol=0, rtol=0)
