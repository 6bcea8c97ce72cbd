"""Bad inputs (each refused with an error naming the problem, nothing saved changed) and factor sets that travel
between adapters.

Covered elsewhere, not repeated here: a plain BERT given to get_peft_model, task-selection errors of `set_task`,
task files that are corrupt / truncated / foreign / of another rank, prompt length, depth, width, model type or
towers (tests/test_tuner_model.py, test_layer.py); RGBA / greyscale / palette / odd-sized images and captions over the tokenizer's
limit in the collator (tests/test_preprocess.py); an empty training task and a NaN loss (tests/test_trainer.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from fault_run import build_args, build_base, build_world, factors, make_trainer
from helpers import random_batch, tiny_clip, tiny_siglip, tiny_vit_bert
from peft import PeftModel, get_peft_model
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import peft_lpi  # noqa: F401
from peft_lpi import LPIConfig
from peft_lpi.continual.trainer import ContinualTrainer, TrainingDivergedError
from peft_lpi.io import CheckpointError

SMALL = dict(prompt_depth=2, prompt_length=3, rank=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    import peft_lpi.report

    monkeypatch.setattr(peft_lpi.report, "plot_results", lambda *a, **k: [])


@pytest.fixture(scope="module")
def world():
    return build_world()


def wrap(base, seed: int = 0, **config):
    torch.manual_seed(seed)
    return get_peft_model(base, LPIConfig(**{**SMALL, **config}))


def digest(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a folder."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path) if path.is_dir() else p.name): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lpi_prompts" in k}


def assert_unchanged(before: dict[str, torch.Tensor], model) -> None:
    after = state(model)
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value.nan_to_num(), after[key].nan_to_num()) and torch.equal(value.isnan(), after[key].isnan()), key


def emb(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@pytest.fixture(scope="module")
def saved_clip_adapter(tmp_path_factory):
    """A CLIP (vision 48 / text 32) LPI adapter saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("adapter")
    model = wrap(tiny_clip(), num_tasks=2)
    model.set_task_keys(0, vision=torch.randn(5, 16), text=torch.randn(5, 16))
    model.save_pretrained(folder)
    return folder


# ============================================================================ wrong family, mismatched widths
@pytest.mark.parametrize("make_base, names", [
    (lambda: tiny_vit_bert(), ["CLIPModel", "VisionTextDualEncoderModel", "wrong model family"]),  # same widths
    (lambda: tiny_siglip(), ["CLIPModel", "SiglipModel", "wrong model family"]),
])
def test_adapter_onto_another_model_family_is_refused(saved_clip_adapter, make_base, names):
    before = digest(saved_clip_adapter)
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(make_base(), saved_clip_adapter)
    for name in names:
        assert name in str(info.value)
    assert digest(saved_clip_adapter) == before


def test_adapter_onto_other_hidden_sizes_is_refused_naming_the_tensor(saved_clip_adapter):
    before = digest(saved_clip_adapter)
    with pytest.raises(RuntimeError, match=r"size mismatch for .*hidden_factors\.vision.*\[48, 2\].*\[64, 2\]"):
        PeftModel.from_pretrained(tiny_clip(vision_hidden=64), saved_clip_adapter)
    assert digest(saved_clip_adapter) == before


# ==================================================================================== task ids, auto routing
def test_bad_task_ids_change_nothing(tmp_path):
    model = wrap(tiny_clip(), num_tasks=2)
    path = tmp_path / "task0.safetensors"
    model.save_task(0, path)
    saved, before = digest(path), state(model)
    bad_ids = ((2, IndexError), (-1, IndexError), (1.0, TypeError), (torch.tensor(0.5), TypeError),
               (True, TypeError), (torch.tensor([0, 1]), TypeError))
    for bad, error in bad_ids:
        for call in (model.save_task, model.load_task):
            with pytest.raises(error):
                call(bad, path)
        with pytest.raises(error):
            model.train_task(bad)
    with pytest.raises(ValueError, match="accepts an int, a LongTensor or 'auto'"):
        model.set_task("0")
    with pytest.raises(IndexError, match=r"Task id 2 is out of range: this adapter has 2 tasks \(0..1\)"):
        model.load_task(2, path)
    with pytest.raises(TypeError, match="integer tensor, got dtype torch.float32"):
        model.set_task(torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="integer tensor, got dtype torch.bool"):
        model.set_task(torch.tensor([True, False]))
    assert digest(path) == saved and sorted(p.name for p in tmp_path.iterdir()) == ["task0.safetensors"]
    assert_unchanged(before, model)
    assert model.base_model.num_tasks == 2


def test_auto_routing_without_keys_is_refused(saved_clip_adapter):
    model = wrap(tiny_clip(), num_tasks=2)
    with pytest.raises(ValueError, match=r"set_task\('auto'\) needs task keys.*build_task_keys"):
        model.set_task("auto")
    with pytest.raises(ValueError, match="No task has routing keys"):
        model.base_model.route("vision", torch.randn(2, 16))
    assert model.current_task == 0
    loaded = PeftModel.from_pretrained(tiny_clip(), saved_clip_adapter)  # task 0 has keys, task 1 has none
    loaded.set_task("auto")
    batch = random_batch("clip", 3, 8)
    with torch.no_grad():
        loaded.get_image_features(pixel_values=batch["pixel_values"])
    assert loaded.base_model.last_routes["vision"].tolist() == [0, 0, 0]  # only tasks with keys are candidates


# ============================================================================ corrupt checkpoints, newer formats
def _trainer_checkpoint(world, tmp_path) -> tuple[ContinualTrainer, Path]:
    trainer = make_trainer(world, tmp_path / "run")
    trainer.checkpointer.save(trainer.state, trainer.task_similarity)
    return trainer, tmp_path / "run" / "checkpoint"


@pytest.mark.parametrize("damage, match", [
    ("truncated", "Cannot read the adapter of checkpoint"),
    ("garbage", "Cannot read the adapter of checkpoint"),
    ("foreign", "does not fit|lacks adapter tensors"),
    ("no_state", "not a ContinualTrainer checkpoint"),
])
def test_resume_from_a_damaged_checkpoint_is_refused_and_leaves_it_as_is(world, tmp_path, damage, match):
    _, checkpoint = _trainer_checkpoint(world, tmp_path)
    adapter = checkpoint / "adapter_model.safetensors"
    if damage == "truncated":
        adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    elif damage == "garbage":
        adapter.write_bytes(b"\x07" * 200)
    elif damage == "foreign":
        save_file({"encoder.weight": torch.randn(4, 4)}, str(adapter), metadata={"format": "pt"})
    else:
        (checkpoint / "trainer_state.json").unlink()
    before = digest(checkpoint)
    trainer = make_trainer(world, tmp_path / "run", resume_from_checkpoint=True)
    initial = factors(trainer.model)
    with pytest.raises(CheckpointError, match=match):
        trainer.train()
    assert digest(checkpoint) == before
    assert not (tmp_path / "run" / "results.json").exists()
    if damage != "foreign":  # (a foreign file may have matched nothing: the model is not partially loaded then)
        for key, value in initial.items():
            assert torch.equal(value.nan_to_num(), factors(trainer.model)[key].nan_to_num()), key


def test_adapter_config_from_a_newer_version_is_refused(saved_clip_adapter, tmp_path):
    folder = tmp_path / "newer"
    shutil.copytree(saved_clip_adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(format_version=99, field_from_the_future=1)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    before = digest(folder)
    with pytest.raises(ValueError, match=r"newer peft_lpi \(format version 99; this install reads up to 1\)"):
        PeftModel.from_pretrained(tiny_clip(), folder)
    assert digest(folder) == before


def test_task_file_from_a_newer_version_is_refused(tmp_path):
    model = wrap(tiny_clip(), num_tasks=2)
    path = tmp_path / "task.safetensors"
    model.save_task(0, path)
    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(tensors, str(path), metadata={**metadata, "format_version": "7"})
    before_file, before = digest(path), state(model)
    with pytest.raises(CheckpointError, match=r"newer peft_lpi \(task format 7"):
        model.import_task(path)
    assert digest(path) == before_file and model.base_model.num_tasks == 2
    assert_unchanged(before, model)


# =============================================================================================== empty task
def test_empty_validation_task_is_refused_before_anything_is_written(world, tmp_path):
    tokenizer, processor, data = world
    trainer, checkpoint = _trainer_checkpoint(world, tmp_path)
    before = digest(tmp_path / "run")
    data = copy.copy(data)
    data["validation"] = data["validation"].filter(lambda row: row["task"] == 0)
    with pytest.raises(ValueError, match=r"Task 1 \('blurry digits'\) has no validation samples"):
        ContinualTrainer(trainer.model, tokenizer, processor, data, build_args(tmp_path / "run", resume_from_checkpoint=True))
    assert digest(tmp_path / "run") == before


# ============================================================================== long captions, odd images
def test_captions_longer_than_the_text_tower_are_truncated_with_a_warning(world, caplog):
    tokenizer, processor, data = world
    unlimited = copy.deepcopy(tokenizer)
    unlimited.model_max_length = int(1e30)  # a tokenizer that declares no limit: the text tower's 16 positions rule
    trainer = ContinualTrainer(build_base_peft(unlimited), unlimited, processor, data,
                               build_args("unused-output-dir"))
    assert trainer.collator.max_length == trainer.eval_collator.max_length == 16
    long_caption = " ".join(["a red circle on the left"] * 8)  # 40 words
    rows = [{"image": Image.new("RGB", (32, 32)), "captions": [long_caption], "task": 0, "image_id": 1},
            {"image": Image.new("RGB", (32, 32)), "captions": ["a blue square"], "task": 0, "image_id": 2}]
    with caplog.at_level(logging.WARNING, logger="peft_lpi.data.preprocess"):
        batch = trainer.collator(rows)
    assert batch["input_ids"].shape == (2, 16) and "truncated" in caplog.text
    with torch.no_grad():
        text = emb(trainer.model.get_text_features(input_ids=batch["input_ids"],
                                                   attention_mask=batch["attention_mask"]))
    assert text.shape == (2, 16) and torch.isfinite(text).all()


def build_base_peft(tokenizer):
    from fault_run import build_model

    return build_model(tokenizer)


def test_greyscale_rgba_and_odd_sized_images_encode(world):
    tokenizer, processor, data = world
    trainer = ContinualTrainer(build_base_peft(tokenizer), tokenizer, processor, data, build_args("unused-output-dir"))
    images = [Image.new("L", (17, 45), 90), Image.new("RGBA", (33, 31), (255, 0, 0, 0)),
              Image.new("RGB", (7, 300), (0, 255, 0)), Image.new("1", (40, 40), 1), Image.new("I;16", (20, 25), 300)]
    pixel_values = trainer.eval_collator.process_images(images)
    assert pixel_values.shape == (5, 3, 32, 32)
    trainer.model.set_task(torch.tensor([0, 1, 0, 1, 0]))
    with torch.no_grad():
        embeds = emb(trainer.model.get_image_features(pixel_values=pixel_values))
    assert embeds.shape == (5, 16) and torch.isfinite(embeds).all()


# ============================================================================================= inf loss
def test_inf_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch):
    from peft_lpi.continual.objective import LPIObjective

    trainer = make_trainer(world, tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoint"
    good: dict = {}
    save = trainer.checkpointer.save

    def save_and_remember(*args, **kwargs):
        save(*args, **kwargs)
        good.update(digest=digest(checkpoint), factors=factors(trainer.model), step=trainer.state.optimizer_steps)

    trainer.checkpointer.save = save_and_remember
    calls = {"n": 0}
    original_call = LPIObjective.__call__

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        terms = original_call(self, *args, **kwargs)
        if calls["n"] == 3:
            terms["loss"] = terms["loss"] + math.inf
        return terms

    monkeypatch.setattr(LPIObjective, "__call__", poisoned)
    with pytest.raises(TrainingDivergedError, match=r"The loss became inf at task 0, optimiser step 3") as info:
        trainer.train()
    assert "last good checkpoint" in str(info.value)
    assert good["step"] == 2 and digest(checkpoint) == good["digest"]
    assert json.loads((checkpoint / "trainer_state.json").read_text())["optimizer_steps"] == 2
    reloaded = PeftModel.from_pretrained(build_base(world[0]), str(checkpoint))
    for key, value in good["factors"].items():
        assert torch.equal(value.nan_to_num(), factors(reloaded)[key].nan_to_num()), key


# ======================================================================================= factor-set travel
def _two_groups(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Two kinds of samples a random backbone tells apart: bright vs dark images, low vs high word ids."""
    generator = torch.Generator().manual_seed(seed)
    groups = {}
    for name, shift, words in (("x", 2.0, (4, 12)), ("y", -2.0, (90, 99))):
        ids = torch.randint(*words, (1, 8), generator=generator).repeat(12, 1)  # one sentence, one word varied
        ids[:, 3] = torch.randint(*words, (12,), generator=generator)
        ids[:, 0], ids[:, -1] = 2, 3  # BOS ... EOS
        groups[name] = {"pixel_values": torch.randn(12, 3, 16, 16, generator=generator) + shift,
                        "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return groups


def _prompt_free(model, group) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad(), model.base_model.prompts_disabled():
        return (emb(model.get_image_features(pixel_values=group["pixel_values"])),
                emb(model.get_text_features(input_ids=group["input_ids"], attention_mask=group["attention_mask"])))


def _encode(model, group) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return (emb(model.get_image_features(pixel_values=group["pixel_values"])),
                emb(model.get_text_features(input_ids=group["input_ids"], attention_mask=group["attention_mask"])))


def test_a_task_travels_to_another_adapter_with_its_keys_and_routes(tmp_path):
    backbone = tiny_clip()
    groups = _two_groups()
    source = wrap(copy.deepcopy(backbone), seed=1, num_tasks=1, num_keys=3)  # "another run": task 0 learned on x
    vision, text = _prompt_free(source, groups["x"])
    source.base_model.build_task_keys(0, vision=vision, text=text, seed=0)
    path = tmp_path / "x_task.safetensors"
    source.save_task(0, path)
    saved = digest(path)

    target = wrap(copy.deepcopy(backbone), seed=2, num_tasks=1, num_keys=3)  # its own task 0 learned on y
    vision, text = _prompt_free(target, groups["y"])
    target.base_model.build_task_keys(0, vision=vision, text=text, seed=0)
    own_task = {k: v for k, v in state(target).items() if ".tasks.0." in k}

    new_id = target.import_task(path)
    assert new_id == 1 and target.base_model.num_tasks == 2 and target.peft_config["default"].num_tasks == 2
    bank = target.base_model.active_bank
    assert bank.has_keys.tolist() == [True, True]
    assert torch.equal(bank.vision_keys[1], source.base_model.active_bank.vision_keys[0])
    for key, value in own_task.items():  # the adapter's own task is untouched
        assert torch.equal(state(target)[key], value), key

    target.set_task("auto")
    source.set_task(0)
    for name, expected_task in (("x", 1), ("y", 0)):
        image, text = _encode(target, groups[name])
        routes = target.base_model.last_routes  # (text routes of the last call; image routes checked below)
        assert routes["text"].tolist() == [expected_task] * 12, name
        target.get_image_features(pixel_values=groups[name]["pixel_values"])
        assert target.base_model.last_routes["vision"].tolist() == [expected_task] * 12, name
        if name == "x":  # routed to the imported task: exactly what the source adapter computes with its task
            for got, exp in zip((image, text), _encode(source, groups["x"]), strict=True):
                torch.testing.assert_close(got, exp, rtol=0, atol=0)
    assert digest(path) == saved


def test_a_task_from_another_backbone_of_the_same_shape_is_refused(tmp_path):
    source = wrap(tiny_clip(seed=1), num_tasks=1)  # same CLIP architecture and widths, other weights
    path = tmp_path / "task.safetensors"
    source.save_task(0, path)
    saved = digest(path)
    target = wrap(tiny_clip(seed=0), num_tasks=1)
    before = state(target)
    for task in (None, 0):
        with pytest.raises(CheckpointError, match="trained on another backbone"):
            target.load_task(task, path)
    assert target.base_model.num_tasks == 1 and digest(path) == saved
    assert_unchanged(before, target)
    # The same backbone cast to another dtype is the same backbone.
    half = wrap(tiny_clip(seed=1).to(torch.bfloat16), num_tasks=1)
    assert half.import_task(path) == 1
