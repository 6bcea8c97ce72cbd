"""Grounding baselines (shared prompt, per-task LoRA, joint) and several expressions per image in one OWL forward.

Tiny OWL-ViT from a config and the tiny grounding world of test_continual_grounding.py."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from grounding_run import load_example, save_detector_folder, tiny_owl
from peft import get_peft_model

import peft_lpi  # noqa: F401
from peft_lpi import LPIConfig
from peft_lpi.continual.baselines.grounding import (
    GROUNDING_LORA_TARGETS,
    GroundingJointMethod,
    GroundingLoRAMethod,
    GroundingSharedPromptMethod,
    build_grounding_method,
    lora_parameters_per_rank,
    matched_lora_rank,
    rec_terms,
)
from peft_lpi.continual.baselines.lora import lora_model
from peft_lpi.continual.grounding import GroundingEvaluator, LPIGroundingMethod, prepare_grounding_dataset
from peft_lpi.continual.grounding_batches import PAIR_TARGETS, SceneQueryCollator, group_pairs_by_image
from peft_lpi.continual.grounding_loss import rec_loss
from peft_lpi.continual.trainer import ContinualTrainer, ContinualTrainingArguments
from peft_lpi.data.grounding_backbone import build_grounding_tokenizer, grounding_image_processor
from peft_lpi.data.grounding_world import GROUNDING_TASKS, SCENE_SIZE, build_grounding_benchmark, render_task_scenes
from peft_lpi.data.preprocess import with_pixel_values
from peft_lpi.evaluation.grounding import box_xyxy_to_cxcywh

pytestmark = pytest.mark.usefixtures("one_thread")
LPI_KWARGS = dict(prompt_length=2, prompt_depth=2, rank=2, num_keys=2)


@pytest.fixture(scope="module")
def parts():
    tokenizer = build_grounding_tokenizer()
    processor = grounding_image_processor([0.2, 0.2, 0.2], [0.3, 0.3, 0.3])
    data = prepare_grounding_dataset(build_grounding_benchmark(0, 12, 6, tasks=GROUNDING_TASKS[:2],
                                                               train_all_objects=True))
    data["train"] = group_pairs_by_image(data["train"])
    data = {name: with_pixel_values(split, processor) for name, split in data.items()}
    return tokenizer, processor, data


def make_trainer(parts, tmp_path, name, max_steps=2):
    tokenizer, processor, data = parts
    torch.manual_seed(0)
    model, method = build_grounding_method(name, tiny_owl(tokenizer), 2, LPI_KWARGS)
    accelerator = Accelerator(cpu=True)
    collator = SceneQueryCollator(processor, tokenizer, max_length=16)
    rows = [[i for i, t in enumerate(data["validation"]["task"]) if t == task] for task in range(2)]
    evaluator = GroundingEvaluator(accelerator, method, data["validation"], rows, collator, batch_size=5)
    args = ContinualTrainingArguments(output_dir=str(tmp_path), num_train_epochs=5, max_steps=max_steps,
                                      per_device_train_batch_size=4, optim="adamw", learning_rate=5e-2,
                                      disable_tqdm=True)
    similarity = torch.tensor([[1.0, 0.2], [0.2, 1.0]])
    return ContinualTrainer(model, tokenizer, processor, data, args, accelerator=accelerator, method=method,
                            evaluator=evaluator, data_collator=collator, task_similarity=similarity)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


# ------------------------------------------------------------------------------------------ several queries per image


def test_world_all_objects_and_grouping_keep_every_pair(parts):
    """Every describable object of every training scene is a pair, and grouping by image keeps exactly those pairs."""
    _, _, data = parts
    scenes = {t: render_task_scenes(GROUNDING_TASKS[t], 0, 12, split="train") for t in range(2)}
    expected = sorted((t, e, tuple(round(v / SCENE_SIZE, 5) for v in o.box))
                      for t in range(2) for s in scenes[t] for e, o in zip(s.expressions, s.objects) if e is not None)
    grouped = data["train"]
    assert len(grouped) == 24  # one row per scene
    got = sorted((row["task"], e, tuple(round(float(v), 5) for v in box))
                 for row in grouped for e, box in zip(row["captions"], row[PAIR_TARGETS]))
    assert got == expected
    assert max(len(row["captions"]) for row in grouped) > 1, "the check needs a scene with several pairs"
    one = build_grounding_benchmark(0, 12, 6, tasks=GROUNDING_TASKS[:2])
    every = build_grounding_benchmark(0, 12, 6, tasks=GROUNDING_TASKS[:2], train_all_objects=True)
    assert one["validation"].to_dict() == every["validation"].to_dict()  # validation does not change


def test_scene_collator_loss_equals_one_forward_per_pair(parts):
    """The REC loss of a grouped batch (several queries per image) == the loss of one forward per (image,
    expression) pair, pairs concatenated: the query layout and mask put every expression on its own image."""
    tokenizer, processor, data = parts
    torch.manual_seed(0)
    model = get_peft_model(tiny_owl(tokenizer), LPIConfig(num_tasks=2, **LPI_KWARGS))
    model.eval()
    rows = [data["train"][i] for i in range(5)]
    batch = SceneQueryCollator(processor, tokenizer, max_length=16)(rows)
    assert batch["query_mask"].sum().item() == sum(len(r["captions"]) for r in rows) == batch["boxes"].shape[0]
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], task_ids=1)
        grouped = rec_terms(out, batch, {})["rec"]
        logits, boxes, targets = [], [], []
        for row in rows:
            for caption, target in zip(row["captions"], row[PAIR_TARGETS]):
                text = tokenizer([caption], return_tensors="pt")
                out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                            pixel_values=row["pixel_values"][None], task_ids=1)
                logits.append(out.logits[0, :, 0])
                boxes.append(out.pred_boxes[0])
                targets.append(box_xyxy_to_cxcywh(torch.tensor(target)))
        single = rec_loss(torch.stack(logits), torch.stack(boxes), torch.stack(targets)).loss
    assert grouped.item() == pytest.approx(single.item(), rel=1e-4)


# ------------------------------------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("name", ["shared-prompt", "lora", "joint"])
def test_baseline_trains_and_evaluates_end_to_end(parts, tmp_path, name):
    """ContinualTrainer.train() with each baseline: every stage evaluated in the method's modes, results written."""
    results = make_trainer(parts, tmp_path, name, max_steps=1).train()
    assert results["method"] == name
    modes = {"shared-prompt": {"zero-shot", "oracle"}}.get(name, {"zero-shot", "oracle", "auto"})
    assert set(results["grounding"]) == modes
    assert results["schedule"] == ([[0, 1]] if name == "joint" else [[0], [1]])
    for mode in modes:
        matrix = results["grounding"][mode]["matrices"]["P@1"]
        assert len(matrix) == len(results["schedule"]) and all(v is not None for v in matrix[-1])
    assert (tmp_path / "results.json").is_file()


@pytest.mark.slow
def test_example_method_flag_runs_every_baseline(parts, tmp_path):
    """`examples/continual_grounding.py --method NAME` for every method; the zero-shot mode (the frozen backbone)
    is the same in every method's run."""
    tokenizer, processor, _ = parts
    backbone = tmp_path / "owl"
    save_detector_folder(backbone, tiny_owl(tokenizer), tokenizer, processor)
    example = load_example()
    zero_shot = {}
    for name in ("lpi", "shared-prompt", "lora", "joint"):
        argv = ["--model", str(backbone), "--method", name, "--max_tasks", "2", "--train_per_task", "8",
                "--val_per_task", "4", "--max_steps", "2", "--per_device_train_batch_size", "4", "--prompt_length",
                "2", "--prompt_depth", "2", "--rank", "2", "--num_keys", "2", "--output_dir",
                str(tmp_path / name), "--disable_tqdm", "true"]
        results = example.main(argv)
        assert results["method"] == name and (tmp_path / name / "results.json").is_file()
        zero_shot[name] = results["grounding"]["zero-shot"]["matrices"]["P@1"][-1]
    assert all(v == zero_shot["lpi"] for v in zero_shot.values()), zero_shot
    with pytest.raises(ValueError, match="Unknown grounding method"):
        example.main(["--model", str(backbone), "--method", "s-prompts", "--max_tasks", "2", "--train_per_task", "2",
                      "--val_per_task", "2", "--output_dir", str(tmp_path / "bad")])


def test_shared_prompt_shares_one_set_across_tasks(parts, tmp_path):
    trainer = make_trainer(parts, tmp_path, "shared-prompt")
    method = trainer.method
    assert isinstance(method, GroundingSharedPromptMethod) and not method.uses_keys
    assert method.tuner.active_bank.num_tasks == 1
    assert [id(p) for p in method.parameters_for_task(0)] == [id(p) for p in method.parameters_for_task(1)]
    before = _snapshot(trainer.model)
    trainer.train()
    after_both = _changed(trainer.model, before)
    assert after_both and all(".tasks.0." in n for n in after_both), sorted(after_both)[:4]
    # evaluation with any task uses the one set: detect(task 1) == detect(task 0)
    batch = SceneQueryCollator(parts[1], parts[0], max_length=16)([parts[2]["validation"][i] for i in range(3)])
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    with torch.no_grad():
        a = method.detect(inputs, torch.tensor([1, 1, 0]))
        b = method.model(**inputs, task_ids=0)
        with method.prompt_free():
            zero = method.detect(inputs, None)
    assert torch.equal(a.logits, b.logits) and not torch.equal(a.logits, zero.logits)


def test_lora_trains_only_its_tasks_adapter_and_detects_with_each_images_adapter(parts, tmp_path):
    trainer = make_trainer(parts, tmp_path, "lora")
    method, model = trainer.method, trainer.model
    assert isinstance(method, GroundingLoRAMethod)
    trainer.task_similarity = trainer.task_similarity.to(trainer.accelerator.device)
    method.setup(trainer)
    for task in (0, 1):
        before = _snapshot(model)
        params = method.parameters_for_task(task)
        optimizer = torch.optim.Adam(params, lr=1e-2)
        for batch in list(trainer._train_loader(task, 0))[:2]:
            optimizer.zero_grad()
            method.training_loss(model, batch, task)["loss"].backward()
            optimizer.step()
        changed = _changed(model, before)
        assert changed and all(f".task{task}." in n and "lora_" in n for n in changed), sorted(changed)[:4]
    # detect with per-image tasks == each image through its own adapter alone
    batch = SceneQueryCollator(parts[1], parts[0], max_length=16)([parts[2]["validation"][i] for i in range(4)])
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    tasks = torch.tensor([1, 0, 1, 0])
    with torch.no_grad():
        mixed = method.detect(inputs, tasks)
        for i, task in enumerate(tasks.tolist()):
            model.set_adapter(f"task{task}", inference_mode=True)
            alone = model(pixel_values=inputs["pixel_values"][i:i + 1], input_ids=inputs["input_ids"][i:i + 1],
                          attention_mask=inputs["attention_mask"][i:i + 1])
            torch.testing.assert_close(mixed.logits[i], alone.logits[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mixed.pred_boxes[i], alone.pred_boxes[0], rtol=1e-5, atol=1e-5)
        assert not torch.equal(mixed.logits[0], method.detect(inputs, torch.zeros(4, dtype=torch.long)).logits[0])


def test_lora_parameter_budget_matches_lpi(parts):
    """Matched rank: LoRA's per-task count is within half a rank's parameters of LPI's (or rank 1); the per-rank
    count is checked against a rank-1 LoRA built by PEFT."""
    tokenizer = parts[0]
    owl = tiny_owl(tokenizer)
    lpi = get_peft_model(copy.deepcopy(owl), LPIConfig(num_tasks=2, **LPI_KWARGS))
    lpi_params = LPIGroundingMethod(lpi).trainable_parameters_per_task()
    rank1 = lora_model(copy.deepcopy(owl), 2, rank=1, target_modules=GROUNDING_LORA_TARGETS)
    per_rank = sum(p.numel() for n, p in rank1.named_parameters() if ".task0." in n)
    assert lora_parameters_per_rank(owl, GROUNDING_LORA_TARGETS) == per_rank > 0
    _, method = build_grounding_method("lora", copy.deepcopy(owl), 2, LPI_KWARGS)
    lora_params = method.trainable_parameters_per_task()
    rank = lora_params // per_rank
    assert rank == matched_lora_rank(lpi_params, per_rank)
    assert abs(lora_params - lpi_params) <= per_rank / 2 or (rank == 1 and lpi_params < per_rank)
    big = dict(LPI_KWARGS, prompt_length=16, rank=8)  # a bigger LPI budget gets a bigger LoRA rank
    _, bigger = build_grounding_method("lora", copy.deepcopy(owl), 2, big)
    big_lpi = get_peft_model(copy.deepcopy(owl), LPIConfig(num_tasks=2, **big))
    big_params = LPIGroundingMethod(big_lpi).trainable_parameters_per_task()
    assert abs(bigger.trainable_parameters_per_task() - big_params) <= per_rank / 2


def test_joint_trains_every_task_in_one_stage_with_per_image_prompts(parts, tmp_path):
    trainer = make_trainer(parts, tmp_path, "joint", max_steps=1)
    method = trainer.method
    assert isinstance(method, GroundingJointMethod) and method.schedule(2) == [[0, 1]]
    before = _snapshot(trainer.model)
    results = trainer.train()
    changed = _changed(trainer.model, before)
    assert any(".tasks.0." in n for n in changed) and any(".tasks.1." in n for n in changed)
    assert all(".tasks.0." in n or ".tasks.1." in n for n in changed)
    assert len(results["grounding"]["auto"]["routing_accuracy"]) == 1
    # the mixed-batch loss gives each image its own task's prompts: == the per-task losses' pair-weighted mean
    batch = SceneQueryCollator(parts[1], parts[0], max_length=16)([parts[2]["train"][i] for i in (0, 1, 12, 13)])
    assert batch["task"].tolist() == [0, 0, 1, 1]
    config = method.objective.config
    config.align_weight = config.task_weight = 0.0
    with torch.no_grad():
        mixed = method.training_loss(trainer.model, batch, [0, 1])["rec"]
        parts_loss, pairs = [], []
        for rows, task in (([0, 1], 0), ([2, 3], 1)):
            sub = {k: v[rows] for k, v in batch.items() if k in ("pixel_values", "query_mask", "task")}
            q = batch["query_mask"].shape[1]
            text_rows = [r * q + j for r in rows for j in range(q)]
            sub["input_ids"], sub["attention_mask"] = batch["input_ids"][text_rows], batch["attention_mask"][text_rows]
            first = int(batch["query_mask"][: rows[0]].sum())
            n = int(batch["query_mask"][rows].sum())
            sub["boxes"] = batch["boxes"][first:first + n]
            parts_loss.append(LPIGroundingMethod.training_loss(method, trainer.model, sub, task)["rec"] * n)
            pairs.append(n)
    assert mixed.item() == pytest.approx((sum(parts_loss) / sum(pairs)).item(), rel=1e-4)


# ------------------------------------------------------------------------------------ run_results.py --problem grounding


def _fake_grounding_results(p1: dict[str, float], num_tasks: int = 2) -> dict:
    """A results.json of a grounding run whose final P@1 (and P@5 = P@1 + 30) in each mode is the same on every
    task; routed modes route 80 %."""
    grounding = {}
    for mode, value in p1.items():
        summary = {f"P@{k}": {"final_average": value + 30 * (k == 5), "stage_averaged": value,
                              "forgetting": 1.0, "backward_transfer": -1.0} for k in (1, 5)}
        block = {"summary": summary, "matrices": {"P@1": [[value] * num_tasks] * num_tasks}}
        if mode == "auto":
            block["routing_accuracy"] = [1.0, 0.8]
        grounding[mode] = block
    return {"grounding": grounding, "task_names": [f"t{i}" for i in range(num_tasks)],
            "train_seconds_per_task": [10.0] * num_tasks, "trainable_parameters_per_task": 100}


def test_run_results_grounding_rates_and_table(tmp_path):
    import importlib.util
    import json
    import statistics
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("run_results", Path(__file__).parent.parent / "examples" /
                                                  "run_results.py")
    run_results = importlib.util.module_from_spec(spec)
    sys.modules["run_results"] = run_results
    spec.loader.exec_module(run_results)

    def write(row: str, seed: int, p1: dict[str, float]) -> None:
        (tmp_path / row / f"seed{seed}").mkdir(parents=True)
        (tmp_path / row / f"seed{seed}" / "results.json").write_text(json.dumps(_fake_grounding_results(p1)))

    for seed, (oracle, auto) in enumerate([(42.0, 41.0), (43.0, 41.5), (44.0, 42.5)]):
        write("lpi-lr0.05", seed, {"zero-shot": 37.0, "oracle": oracle, "auto": auto})
    write("lora-lr0.05", 0, {"oracle": 40.0, "auto": 39.0})
    write("lora-lr0.005", 0, {"oracle": 46.0, "auto": 45.0})
    write("lora-lr0.005", 1, {"oracle": 47.0, "auto": 44.0})
    best = run_results.grounding_rates(tmp_path, {})
    assert best["lora"] == 0.005 and best["lpi"] == 0.05 and "shared-prompt" not in best
    assert run_results.grounding_rates(tmp_path, {"lora": 0.05})["lora"] == 0.05  # --lr overrides
    text = run_results.grounding_table(tmp_path, best, [0, 1, 2])
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    auto = next(line for name, line in rows.items() if "auto (image routing)" in name)
    mean, std = statistics.fmean([41.0, 41.5, 42.5]), statistics.stdev([41.0, 41.5, 42.5])
    assert f"| 3 | {mean:.1f} ± {std:.1f} |" in auto and f"+{mean - 37.0:.1f} (above" in auto
    lora = next(line for name, line in rows.items() if "LoRA" in name and "lr 0.005" in name)
    assert "| 2 | 44.5 ± 0.7 |" in lora and f"+{44.5 - mean:.1f}" in lora
    assert any("shared" in name and "not run" in line for name, line in rows.items())
    assert "| 0 t0 | 37.0 ± 0.0 |" in text  # the per-task table of LPI
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nretrieval text\n")
    run_results.write_table(doc, text, run_results.G_BEGIN, run_results.G_END)
    run_results.write_table(doc, text.replace("44.5", "44.6"), run_results.G_BEGIN, run_results.G_END)
    page = doc.read_text()
    assert page.startswith("# Results\n\nretrieval text\n") and page.count(run_results.G_BEGIN) == 1
    assert "44.6 ± 0.7" in page


def test_grouping_splits_a_photo_by_task():
    """RefCOCO photos carry expressions of several tasks (supercategories): grouping keeps one row per (image,
    task), each with exactly that task's expressions and boxes, in first-row order."""
    import datasets

    rows = {"image_id": [7, 7, 3, 7], "task": [0, 1, 0, 0], "expression": ["a", "b", "c", "d"],
            "target": [[0.1, 0.1, 0.2, 0.2], [0.3, 0.3, 0.4, 0.4], [0.5, 0.5, 0.6, 0.6], [0.0, 0.0, 0.9, 0.9]]}
    grouped = group_pairs_by_image(datasets.Dataset.from_dict(rows))
    got = [(r["image_id"], r["task"], r["captions"], [[round(v, 4) for v in b] for b in r[PAIR_TARGETS]])
           for r in grouped]
    assert got == [(7, 0, ["a", "d"], [[0.1, 0.1, 0.2, 0.2], [0.0, 0.0, 0.9, 0.9]]),
                   (7, 1, ["b"], [[0.3, 0.3, 0.4, 0.4]]),
                   (3, 0, ["c"], [[0.5, 0.5, 0.6, 0.6]])]
