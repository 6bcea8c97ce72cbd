"""Baselines under the ContinualTrainer: each method end to end on 2 tiny tasks, plus the properties that define it."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import CLIPModel

import peft_lpi  # noqa: F401
from peft_lpi.continual.baselines import (
    METHOD_NAMES,
    LoRAMethod,
    build_method,
    lora_adapter_name,
    matched_full_rank_std,
)
from peft_lpi.continual.trainer import ContinualTrainer, ContinualTrainingArguments
from peft_lpi.data.backbone import build_world_tokenizer, tiny_clip_config, world_image_processor
from peft_lpi.data.world import WORLD_TASKS, build_offline_benchmark
from peft_lpi.evaluation import continual_metrics, grouped_continual_metrics
from peft_lpi.tuner.model import embedding_of

LPI_KWARGS = dict(prompt_length=2, prompt_depth=2, rank=2, num_keys=3)


@pytest.fixture(scope="module")
def world():
    tokenizer = build_world_tokenizer()
    data = build_offline_benchmark(seed=0, train_per_task=32, val_per_task=8, tasks=WORLD_TASKS[:2])
    processor = world_image_processor([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    return tokenizer, processor, data


WIDTH = 32  # hidden size of both towers of the tiny backbone


def tiny_base(tokenizer) -> CLIPModel:
    torch.manual_seed(0)
    config = tiny_clip_config(tokenizer)
    for tower in (config.vision_config, config.text_config):
        tower.num_hidden_layers, tower.hidden_size, tower.intermediate_size, tower.num_attention_heads = 2, WIDTH, 64, 2
    return CLIPModel(config).eval()


def text_inputs(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    encoded = tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lpi_prompts" in n or "lora_" in n}


def run(name: str, world, tmp_path, **lpi_overrides):
    """Train `name` on the 2 tiny tasks; returns (trainer, results, snapshots after each stage, initial snapshot)."""
    AcceleratorState._reset_state(True)
    tokenizer, processor, data = world
    torch.manual_seed(0)
    model, method = build_method(name, tiny_base(tokenizer), 2, {**LPI_KWARGS, **lpi_overrides})
    initial = snapshot(model)
    args = ContinualTrainingArguments(
        output_dir=str(tmp_path / name), num_train_epochs=1, max_steps=1, per_device_train_batch_size=16, per_device_eval_batch_size=64,
        optim="adamw", learning_rate=5e-2, weight_decay=0.0, disable_tqdm=True, recall_ks=[1, 5],
    )
    trainer = ContinualTrainer(model, tokenizer, processor, data, args, method=method)
    snapshots = []
    finish = method.finish_task
    method.finish_task = lambda task: (snapshots.append(snapshot(trainer.model)), finish(task))[1]
    results = trainer.train()
    AcceleratorState._reset_state(True)
    return trainer, results, snapshots, initial


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baselines")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("peft_lpi.report.plot_results", lambda *a, **k: [])  # plots are tested elsewhere; slow here
        return {name: run(name, world, tmp) for name in METHOD_NAMES}


@pytest.mark.parametrize("name", METHOD_NAMES)
@pytest.mark.slow
def test_every_method_runs_end_to_end(runs, name):
    trainer, results, _, _ = runs[name]
    stages = 1 if name == "joint" else 2
    assert results["method"] == name
    assert len(results["train_seconds_per_task"]) == stages and len(results["peak_memory_mb_per_task"]) == stages
    assert all(m > 0 for m in results["peak_memory_mb_per_task"])
    modes = ["oracle"] + (["auto"] if name in ("lpi", "s-prompts", "lora", "joint") else [])
    assert list(results["modes"]) == modes
    matrix = results["modes"]["oracle"]["strict"]["matrices"]["i2t_R@1"]
    assert len(matrix) == stages and all(0 <= v <= 100 for v in matrix[-1])
    if "auto" in modes:
        assert 0 <= results["modes"]["auto"]["routing_accuracy"][-1]["image"] <= 1
    assert (trainer.output_dir / "results.json").is_file()
    assert (trainer.output_dir / "checkpoint" / "trainer_state.json").is_file()


@pytest.mark.slow
def test_zero_shot_embeddings_equal_the_base_models(runs, world):
    trainer, results, _, _ = runs["zero-shot"]
    tokenizer, processor, data = world
    reference = tiny_base(tokenizer)
    inputs = text_inputs(tokenizer, ["a red circle", "two blue squares"])
    with torch.no_grad():
        got, routes = trainer.method.encode("text", inputs, torch.tensor([0, 1]))
        expected = embedding_of(reference.get_text_features(**inputs))
    assert routes is None and torch.equal(got, expected)
    assert results["trainable_parameters_per_task"] == 0
    # Nothing trains, so task 0 can only lose recall through the distractors task 1 adds to the joint gallery.
    for key, matrix in results["modes"]["oracle"]["strict"]["matrices"].items():
        assert matrix[1][0] <= matrix[0][0], key


@pytest.mark.slow
def test_shared_prompt_trains_one_set_on_every_task_and_forgets(runs):
    trainer, results, (after0, after1), initial = runs["shared-prompt"]
    bank = trainer.model.base_model.lpi_prompts["default"]
    assert bank.num_tasks == 1
    first, second = trainer.method.parameters_for_task(0), trainer.method.parameters_for_task(1)
    assert [id(p) for p in first] == [id(p) for p in second]  # the same Parameters for both tasks
    for key in initial:
        assert not torch.equal(after0[key], initial[key]), key  # trained on task 0
        assert not torch.equal(after1[key], after0[key]), key  # ...and overwritten by task 1: the forgetting baseline
    k, p = bank.depth, bank.prompt_length
    assert results["trainable_parameters_per_task"] == k * p * (WIDTH + WIDTH)


@pytest.mark.slow
def test_s_prompts_is_full_rank_per_task_without_interaction(runs):
    trainer, results, (after0, after1), initial = runs["s-prompts"]
    bank = trainer.model.base_model.lpi_prompts["default"]
    k, p = bank.depth, bank.prompt_length
    assert results["trainable_parameters_per_task"] == k * p * (WIDTH + WIDTH)
    assert all(task.correlation is None for task in bank.tasks)
    std = float(torch.cat([v.flatten() for k, v in initial.items() if "full_prompts" in k]).std())
    assert std == pytest.approx(matched_full_rank_std(0.5, LPI_KWARGS["rank"]), rel=0.2)
    for key, value in after0.items():
        if ".tasks.0." in key:
            assert torch.equal(after1[key], value), key  # task 0 frozen while task 1 trains


@pytest.mark.slow
def test_lora_per_task_adapters_freeze_and_route_by_groups(runs, world):
    trainer, results, (after0, after1), initial = runs["lora"]
    method: LoRAMethod = trainer.method
    model = trainer.model
    task0 = [k for k in initial if ".task0." in k]
    task1 = [k for k in initial if ".task1." in k]
    assert task0 and task1
    assert any(not torch.equal(after0[k], initial[k]) for k in task0)  # task 0 trained in stage 0
    assert all(torch.equal(after1[k], after0[k]) for k in task0)  # ...and bit-identical while task 1 trained
    assert any(not torch.equal(after1[k], after0[k]) for k in task1)
    # rank 4 on q/k/v/out of every layer of both towers: 2 towers x 2 layers x 4 projections x (D*4 + 4*D)
    assert results["trainable_parameters_per_task"] == 2 * 2 * 4 * (WIDTH * 4 + 4 * WIDTH)
    # Routed (grouped) encoding equals encoding each group with its own adapter.
    inputs = text_inputs(world[0], ["a red circle", "two blue squares", "a green star", "one small yellow circle"])
    tasks = torch.tensor([1, 0, 1, 0])
    got, _ = method.encode("text", inputs, tasks)
    expected = torch.empty_like(got)
    with torch.no_grad():
        for t in (0, 1):
            model.set_adapter(lora_adapter_name(t), inference_mode=True)
            rows = (tasks == t).nonzero().flatten()
            expected[rows] = embedding_of(model.get_text_features(**{k: v[rows] for k, v in inputs.items()})).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    all0, _ = method.encode("text", inputs, torch.zeros(4, dtype=torch.long))
    assert not torch.allclose(all0, got)  # the two adapters really differ
    auto, routes = method.encode("text", inputs, "auto")
    assert routes is not None and routes.shape == (4,)
    torch.testing.assert_close(auto, method.encode("text", inputs, routes)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_lora_checkpoint_round_trip(runs, world):
    trainer, _, _, _ = runs["lora"]
    tokenizer, _, _ = world
    model, method = build_method("lora", tiny_base(tokenizer), 2, LPI_KWARGS)
    method.load_adapter(trainer.checkpoint_dir)
    trained = trainer.model.state_dict()
    for name, value in model.state_dict().items():
        if "lora_" in name:
            assert torch.equal(value, trained[name]), name
    assert method.has_keys.all()
    torch.testing.assert_close(method.keys["vision"], trainer.method.keys["vision"])


@pytest.mark.slow
def test_joint_is_one_stage_over_all_tasks(runs):
    trainer, results, snapshots, initial = runs["joint"]
    assert results["schedule"] == [[0, 1]]
    assert len(snapshots) == 2  # finish_task of both tasks after the single stage
    for t in (0, 1):
        key = next(k for k in initial if f".tasks.{t}.layer_factor" in k)
        assert not torch.equal(snapshots[-1][key], initial[key])  # both tasks' factors trained in the one stage
    oracle = results["modes"]["oracle"]["strict"]
    row = oracle["matrices"]["i2t_R@1"][0]
    summary = oracle["summary"]["i2t_R@1"]
    assert summary["final_average"] == pytest.approx(sum(row) / len(row))
    assert summary["forgetting"] == 0.0 and summary["stage_averaged"] == pytest.approx(summary["final_average"])
    assert trainer.model.base_model.lpi_prompts["default"].has_keys.all()


def test_grouped_metrics_equal_continual_metrics_for_one_task_per_stage():
    matrix = [[50.0, math.nan, math.nan], [40.0, 60.0, math.nan], [30.0, 55.0, 70.0]]
    expected = continual_metrics(torch.tensor(matrix))
    got = grouped_continual_metrics(matrix, [[0], [1], [2]])
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key


def test_ablation_configs_have_the_expected_parameter_counts(world):
    tokenizer, _, _ = world
    K, P, r, D = 2, 2, 2, WIDTH  # tiny: depth 2, 2 tokens, rank 2, both widths WIDTH

    def count(name="lpi", **overrides):
        model, method = build_method(name, tiny_base(tokenizer), 2, {**LPI_KWARGS, **overrides})
        return method.trainable_parameters_per_task()

    cp = K * r + 2 * P * r + 2 * D * r
    correlation = 2 * ((K - 1) * r + (D + 1) * r + D * r) + 2 * 2 * D  # two CP maps + two LayerNorms
    assert count() == cp + correlation
    assert count(interaction=False) == cp
    assert count(interaction=False, share_layer_factor=False) == cp + K * r
    assert count(interaction=False, rank=8) == K * 8 + 2 * P * 8 + 2 * D * 8
    assert count(interaction=False, prompt_depth=1) == 1 * r + 2 * P * r + 2 * D * r
    with pytest.warns(UserWarning, match="exceeds the depth"):
        assert count(interaction=False, prompt_depth=12) == cp  # capped at the backbone's 2 layers
    assert count(align_weight=0.0, task_weight=0.0) == cp + correlation  # loss ablations change no parameters
    assert count("s-prompts") == K * P * 2 * D


def test_unknown_method_is_refused(world):
    with pytest.raises(ValueError, match="Unknown method"):
        build_method("ewc", tiny_base(world[0]), 2, {})


@pytest.mark.slow
def test_results_table_is_built_from_run_folders(runs, tmp_path):
    """examples/run_results.py picks each method's best sweep rate and turns results.json files into table rows."""
    import copy
    import importlib.util
    import json
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("run_results", Path(__file__).parent.parent / "examples" / "run_results.py")
    run_results = importlib.util.module_from_spec(spec)
    sys.modules["run_results"] = run_results  # dataclasses look their module up there
    spec.loader.exec_module(run_results)

    worse = copy.deepcopy(runs["lpi"][1])  # the same run with every auto R@1 10 points lower
    for direction in ("i2t_R@1", "t2i_R@1"):
        worse["modes"]["auto"]["strict"]["summary"][direction]["final_average"] -= 10.0
    folders = {"lpi-lr0.05": runs["lpi"][1], "lpi-lr0.002": worse, "joint-lr0.05": runs["joint"][1],
               "zero-shot": runs["zero-shot"][1]}
    for name, results in folders.items():
        folder = tmp_path / name / "seed0"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(results))

    best = run_results.best_learning_rates(tmp_path, {})
    assert best == {"lpi": 0.05, "joint": 0.05}  # only LPI was swept here; joint follows LPI
    assert run_results.best_learning_rates(tmp_path, {"lpi": 0.002})["lpi"] == 0.002  # --lr overrides
    assert [row.name for row in run_results.main_rows(best)] == [
        "zero-shot", "lpi-lr0.05", "lpi-reference-lr0.05", "joint-lr0.05"]  # the reference preset at LPI's rate
    assert all("--learning_rate" in row.args and "0.05" in row.args for row in run_results.ablation_rows(best))

    text = run_results.table(tmp_path, quick=True, best=best)
    lines: dict[str, str] = {}
    for line in text.splitlines():  # the main section comes first: its rows win over same-label sweep rows
        if line.startswith("| "):
            lines.setdefault(line.split(" |")[0], line)
    lpi = "| **LPI** (K=4, P=8, r=4), lr 0.05"
    assert "| 1 |" in lines[lpi] and "—" in lines[lpi]
    assert "not run" in lines["| sequential FT, one shared prompt set, lr 0.05"]  # a sweep row not on disk
    assert "LPI wins (+10.0)" in lines["| **LPI** (K=4, P=8, r=4), lr 0.002"]  # the sweep row vs the main row
    assert any(word in lines["| joint multi-task LPI (upper bound), lr 0.05"] for word in ("wins", "tie", "loses"))
    doc = tmp_path / "results.md"
    doc.write_text("# intro\n\n" + run_results.BEGIN + "\nold\n" + run_results.END + "\n\nanalysis kept\n")
    run_results.write_table(doc, text)
    assert "analysis kept" in doc.read_text() and "old" not in doc.read_text().split(run_results.END)[0]


def test_lora_rank_and_targets_shape_the_lora_baseline(world):
    """build_method's LoRA options (the example's --lora_rank / --lora_target_modules): per-task counts in closed
    form, r * (in + out) per targeted projection of both towers' 2 layers."""
    tokenizer, _, _ = world
    layers, D = 2 * 2, WIDTH  # 2 towers x 2 layers; every attention projection is D x D

    def count(**options) -> int:
        model, method = build_method("lora", tiny_base(tokenizer), 2, LPI_KWARGS, **options)
        counted = sum(p.numel() for n, p in model.named_parameters() if ".task1." in n)  # one task's adapter
        assert method.trainable_parameters_per_task() == counted
        return counted

    assert count() == layers * 4 * 4 * (D + D)  # default: rank 4 on q/k/v/out
    assert count(lora_rank=1, lora_target_modules=r".*\.self_attn\.(q_proj|v_proj)") == layers * 2 * 1 * (D + D)
