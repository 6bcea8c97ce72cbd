"""End-to-end tests of the ContinualTrainer on a tiny world: training, keys, evaluation, outputs, resume, NaN stop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from accelerate.state import AcceleratorState
from peft import get_peft_model
from transformers import CLIPModel

import peft_lpi  # noqa: F401
from peft_lpi import LPIConfig
from peft_lpi.continual.trainer import ContinualTrainer, ContinualTrainingArguments, TrainingDivergedError
from peft_lpi.data.backbone import build_world_tokenizer, tiny_clip_config, world_image_processor
from peft_lpi.data.world import WORLD_TASKS, build_offline_benchmark


@pytest.fixture(scope="module")
def world():
    tokenizer = build_world_tokenizer()
    data = build_offline_benchmark(seed=0, train_per_task=48, val_per_task=12, tasks=WORLD_TASKS[:2])
    processor = world_image_processor([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    return tokenizer, processor, data


@pytest.fixture(autouse=True)
def fresh_accelerator():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def make_model(tokenizer):
    torch.manual_seed(0)
    config = tiny_clip_config(tokenizer)
    config.vision_config.num_hidden_layers = 2
    config.text_config.num_hidden_layers = 2
    base = CLIPModel(config).eval()
    return get_peft_model(base, LPIConfig(num_tasks=2, prompt_length=2, prompt_depth=2, rank=2, num_keys=3))


def make_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "run"), num_train_epochs=2, per_device_train_batch_size=16, per_device_eval_batch_size=32, optim="adamw",
        learning_rate=1e-2, weight_decay=0.0, disable_tqdm=True, recall_ks=[1, 5],
    )
    values.update(overrides)
    return ContinualTrainingArguments(**values)


def factors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.base_model.lpi_prompts["default"].state_dict().items()}


@pytest.mark.slow
def test_two_task_run_trains_freezes_evaluates_and_reports(world, tmp_path):
    tokenizer, processor, data = world
    model = make_model(tokenizer)
    initial = factors(model)
    snapshots = []
    trainer = ContinualTrainer(model, tokenizer, processor, data, make_args(tmp_path))
    original_build = trainer._build_task_keys
    trainer._build_task_keys = lambda task: (snapshots.append(factors(trainer.model)), original_build(task))[1]
    results = trainer.train()

    after_task0, after_task1 = snapshots
    # Task 0 trained during stage 0, then stayed bit-identical while task 1 trained.
    assert not torch.equal(after_task0["tasks.0.layer_factor"], initial["tasks.0.layer_factor"])
    assert torch.equal(after_task0["tasks.1.layer_factor"], initial["tasks.1.layer_factor"])
    for key, value in after_task0.items():
        if key.startswith("tasks.0."):
            assert torch.equal(after_task1[key], value), key
    assert not torch.equal(after_task1["tasks.1.layer_factor"], initial["tasks.1.layer_factor"])
    # Keys exist for both tasks.
    bank = trainer.model.base_model.lpi_prompts["default"]
    assert bank.has_keys.all() and not bank.vision_keys.isnan().any()

    oracle = results["modes"]["oracle"]["strict"]["matrices"]["i2t_R@1"]
    assert len(oracle) == 2 and math.isnan(oracle[0][1] if oracle[0][1] is not None else math.nan)
    assert all(0 <= v <= 100 for v in oracle[1])
    routing = results["modes"]["auto"]["routing_accuracy"]
    assert len(routing) == 2 and 0 <= routing[-1]["image"] <= 1
    assert routing[0]["image"] == 1.0  # one task seen: routing cannot fail
    out = tmp_path / "run"
    for name in ("results.json", "results.md", "accuracy_matrix_oracle.png", "recall_across_stages_auto.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["task_names"] == [t.name for t in WORLD_TASKS[:2]]
    assert (out / "checkpoint" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted_run(world, tmp_path):
    tokenizer, processor, data = world
    reference = ContinualTrainer(
        make_model(tokenizer), tokenizer, processor, data, make_args(tmp_path / "a", save_steps=2)
    )
    expected = reference.train()
    expected_factors = factors(reference.model)

    AcceleratorState._reset_state(True)
    args = make_args(tmp_path / "b", save_steps=2)
    interrupted = ContinualTrainer(make_model(tokenizer), tokenizer, processor, data, args)
    calls = {"n": 0}
    original_step = interrupted._training_step

    def crashing_step(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 9:  # task 1, after its checkpoint at step 2 of that task
            raise KeyboardInterrupt("simulated kill")
        return original_step(*a, **kw)

    interrupted._training_step = crashing_step
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()

    AcceleratorState._reset_state(True)
    resumed = ContinualTrainer(
        make_model(tokenizer), tokenizer, processor, data, make_args(tmp_path / "b", save_steps=2, resume_from_checkpoint=True)
    )
    got = resumed.train()
    got_factors = factors(resumed.model)
    for key, value in expected_factors.items():
        torch.testing.assert_close(got_factors[key], value, rtol=1e-5, atol=1e-6, equal_nan=True, msg=key)
    assert got["modes"]["oracle"]["strict"]["matrices"] == expected["modes"]["oracle"]["strict"]["matrices"]
    assert got["modes"]["auto"]["routing_accuracy"] == expected["modes"]["auto"]["routing_accuracy"]


@pytest.mark.slow
def test_preprocessed_images_give_the_same_run(world, tmp_path):
    """preprocess_images=True (pixel values computed once with datasets.map) changes speed, not results."""
    tokenizer, processor, data = world
    runs = []
    for preprocess in (False, True):
        AcceleratorState._reset_state(True)
        args = make_args(tmp_path / str(preprocess), num_train_epochs=1, preprocess_images=preprocess)
        trainer = ContinualTrainer(make_model(tokenizer), tokenizer, processor, data, args)
        runs.append((trainer.train(), factors(trainer.model)))
    (plain, plain_factors), (fast, fast_factors) = runs
    for key, value in plain_factors.items():
        torch.testing.assert_close(fast_factors[key], value, rtol=1e-5, atol=1e-6, equal_nan=True, msg=key)
    for mode in ("oracle", "auto"):
        assert fast["modes"][mode]["strict"]["matrices"] == plain["modes"][mode]["strict"]["matrices"]


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_keeps_checkpoint(world, tmp_path):
    tokenizer, processor, data = world
    args = make_args(tmp_path, save_steps=1)
    trainer = ContinualTrainer(make_model(tokenizer), tokenizer, processor, data, args)
    calls = {"n": 0}
    original_loss = trainer.method.training_loss

    def poisoned(*a, **kw):
        calls["n"] += 1
        terms = original_loss(*a, **kw)
        if calls["n"] == 3:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    trainer.method.training_loss = poisoned
    with pytest.raises(TrainingDivergedError, match="optimiser step 3"):
        trainer.train()
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["optimizer_steps"] == 2  # the last good step's checkpoint survives


def test_empty_task_is_refused(world, tmp_path):
    tokenizer, processor, data = world
    only_task0 = data.filter(lambda row: row["task"] == 0)
    with pytest.raises(ValueError, match="no train samples"):
        ContinualTrainer(make_model(tokenizer), tokenizer, processor, only_task0, make_args(tmp_path))
