"""The grounding baselines (shared prompt, per-task LoRA, joint) on Grounding DINO, through its `GroundingFamily`:
the example end to end with each, the shared set is one additive set, LoRA trains only its task's adapter and detects
each image with its own adapter, LoRA's budget is PEFT's own count closest to LPI's, joint's mixed batches give each
image its own task's prompts.

Tiny Grounding DINO and BERT tokenizer of test_grounding_dino.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from grounding_run import load_example, save_detector_folder
from peft import get_peft_model
from test_grounding_dino import tiny_bert_tokenizer, tiny_gdino, tiny_gdino_processor
from torch import nn

import peft_lpi  # noqa: F401
from peft_lpi import LPIConfig
from peft_lpi.continual.baselines.grounding import (
    GROUNDING_DINO_LORA_TARGETS,
    GroundingJointMethod,
    GroundingLoRAMethod,
    GroundingSharedPromptMethod,
    build_grounding_method,
    grounding_lora_targets,
    lora_parameters_per_rank,
)
from peft_lpi.continual.grounding import LPIGroundingMethod, grounding_collator, prepare_grounding_dataset
from peft_lpi.continual.grounding_models import GroundingDinoFamily
from peft_lpi.continual.objective import LPIObjective
from peft_lpi.data.grounding_world import GROUNDING_TASKS, build_grounding_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")
LPI_KWARGS = dict(prompt_length=2, prompt_depth=2, rank=2, num_keys=2, injection="additive")
INPUTS = ("pixel_values", "pixel_mask", "input_ids", "attention_mask")


@pytest.fixture(scope="module")
def parts():
    tokenizer = tiny_bert_tokenizer()
    data = prepare_grounding_dataset(build_grounding_benchmark(0, 6, 4, tasks=GROUNDING_TASKS[:2]))
    return tokenizer, tiny_gdino_processor(), data


def build(parts, name, **kwargs):
    torch.manual_seed(0)
    return build_grounding_method(name, tiny_gdino(parts[0]), 2, dict(LPI_KWARGS), **kwargs)


def batch_of(parts, model, split, rows):
    tokenizer, processor, data = parts
    return grounding_collator(model, processor, tokenizer)([data[split][i] for i in rows])


def rows_of(parts, split, task, n):
    return [i for i, t in enumerate(parts[2][split]["task"]) if t == task][:n]


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def _train(method, model, batch, task, steps=2):
    optimizer = torch.optim.Adam(method.parameters_for_task(task), lr=5e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        method.training_loss(model, batch, task)["loss"].backward()
        optimizer.step()


# ---------------------------------------------------------------------------------------------- the example, each


@pytest.mark.parametrize("name", ["shared-prompt", "lora", "joint"])
def test_example_runs_the_baseline_on_grounding_dino(parts, tmp_path, name):
    """`examples/continual_grounding.py --method NAME` on a Grounding DINO folder: every stage evaluated, a finite
    P@1 for every task in each of the method's modes; the prompt sets are additive."""
    tokenizer, processor, _ = parts
    backbone = tmp_path / "gdino"
    save_detector_folder(backbone, tiny_gdino(tokenizer), tokenizer, processor)
    argv = ["--model", str(backbone), "--method", name, "--max_tasks", "2", "--train_per_task", "4",
            "--val_per_task", "2", "--max_steps", "1", "--per_device_train_batch_size", "4", "--prompt_length", "2",
            "--prompt_depth", "2", "--rank", "2", "--num_keys", "2", "--output_dir", str(tmp_path / name),
            "--disable_tqdm", "true"]
    example = load_example()
    results = example.main(argv)
    assert results["method"] == name and (tmp_path / name / "results.json").is_file()
    modes = {"shared-prompt": {"zero-shot", "oracle"}}.get(name, {"zero-shot", "oracle", "auto"})
    assert set(results["grounding"]) == modes
    for mode in modes:
        final = results["grounding"][mode]["matrices"]["P@1"][-1]
        assert len(final) == 2 and all(v is not None and math.isfinite(v) for v in final), (mode, final)
    if name != "lora":
        assert {c["injection"] for c in results["peft_config"].values()} == {"additive"}
    resumed = example.main(argv + ["--resume_from_checkpoint", "true"])  # every stage done: the checkpoint reloads
    assert resumed["grounding"] == results["grounding"]


# --------------------------------------------------------------------------------------------------- shared prompt


def test_shared_prompt_is_one_additive_set(parts):
    model, method = build(parts, "shared-prompt")
    assert isinstance(method, GroundingSharedPromptMethod) and isinstance(method.family, GroundingDinoFamily)
    config = method.tuner.active_config
    assert config.injection == "additive" and config.num_tasks == 1 and config.factorization == "full"
    assert [id(p) for p in method.parameters_for_task(0)] == [id(p) for p in method.parameters_for_task(1)]
    batch = batch_of(parts, model, "train", rows_of(parts, "train", 1, 3))
    before = _snapshot(model)
    method.setup(None)  # the shared set's objective needs nothing of the trainer
    model.eval()
    _train(method, model, batch, 1)  # task 1 trains the one set
    changed = _changed(model, before)
    assert changed and all(".tasks.0." in n for n in changed), sorted(changed)[:4]
    inputs = {k: batch[k] for k in INPUTS}
    with torch.no_grad():
        a = method.detect(inputs, torch.tensor([1, 0, 1]))
        b = model(**inputs, task_ids=0)
        with method.prompt_free():
            zero = method.detect(inputs, None)
    assert torch.equal(a.pred_boxes, b.pred_boxes) and torch.equal(a.logits, b.logits)
    assert not torch.allclose(a.pred_boxes, zero.pred_boxes)
    with pytest.raises(ValueError, match="injection='additive'"):  # Swin takes no extra prompt tokens
        build_grounding_method("shared-prompt", tiny_gdino(parts[0]), 2, dict(LPI_KWARGS, injection="deep"))


# ---------------------------------------------------------------------------------------------------------- joint


def test_joint_gives_each_image_its_own_tasks_prompts(parts):
    """A mixed batch's loss == the per-image mean of each task's images alone with that task's prompts (Grounding
    DINO's loss is a sum over images / number of images); all images with task 0 give another loss; one step trains
    both tasks' factors and nothing else."""
    model, method = build(parts, "joint")
    assert isinstance(method, GroundingJointMethod) and method.schedule(2) == [[0, 1]]
    rows = rows_of(parts, "train", 0, 2) + rows_of(parts, "train", 1, 2)
    batch = batch_of(parts, model, "train", rows)
    assert batch["task"].tolist() == [0, 0, 1, 1]
    method.objective = LPIObjective(model, None)
    method.objective.config.align_weight = method.objective.config.task_weight = 0.0
    model.eval()
    with torch.no_grad():
        mixed = method.training_loss(model, batch, [0, 1])["rec"]
        alone = [LPIGroundingMethod.training_loss(method, model, {k: v[i:i + 2] for k, v in batch.items()}, task)["rec"]
                 for i, task in ((0, 0), (2, 1))]
        all_zero = LPIGroundingMethod.training_loss(method, model, batch, 0)["rec"]
    assert mixed.item() == pytest.approx(((alone[0] * 2 + alone[1] * 2) / 4).item(), rel=1e-4)
    assert not math.isclose(mixed.item(), all_zero.item(), rel_tol=1e-4)
    before = _snapshot(model)
    _train(method, model, batch, [0, 1], steps=1)
    changed = _changed(model, before)
    assert any(".tasks.0." in n for n in changed) and any(".tasks.1." in n for n in changed)
    assert all(".tasks.0." in n or ".tasks.1." in n for n in changed)
    with pytest.raises(ValueError, match="each image's task"):
        method.training_loss(model, {k: v for k, v in batch.items() if k != "task"}, [0, 1])


# ----------------------------------------------------------------------------------------------------------- LoRA


def _expected_targets(detector: nn.Module) -> set[str]:
    """Query / value linears of the Swin backbone's and BERT's self-attention modules, found by module class."""
    inner = detector.model
    out = set()
    for root, prefix in ((inner.backbone, "model.backbone."), (inner.text_backbone, "model.text_backbone.")):
        for name, module in root.named_modules():
            if type(module).__name__ in ("SwinAttention", "SwinSelfAttention", "BertSelfAttention"):
                out |= {f"{prefix}{name}.{child}" for child in ("query", "value", "q_proj", "v_proj")
                        if isinstance(getattr(module, child, None), nn.Linear)}
    return out


def test_lora_targets_and_budget(parts):
    """Default targets: exactly the Swin / BERT attention queries and values; per-rank count == PEFT's own count of a
    rank-1 adapter; the matched rank's count is the closest to LPI's of all ranks (brute force)."""
    tokenizer = parts[0]
    detector = tiny_gdino(tokenizer)
    expected = _expected_targets(detector)
    assert len(expected) == 2 * (2 + 2) + 2 * 2  # Swin: 4 blocks x (q, v); BERT: 2 layers x (q, v)
    assert grounding_lora_targets(detector) == GROUNDING_DINO_LORA_TARGETS
    model, method = build_grounding_method("lora", copy.deepcopy(detector), 2, dict(LPI_KWARGS), lora_rank=1)
    assert isinstance(method, GroundingLoRAMethod) and isinstance(method.family, GroundingDinoFamily)
    assert set(model.base_model.targeted_module_names) == expected
    per_rank = lora_parameters_per_rank(detector, GROUNDING_DINO_LORA_TARGETS)
    trainable, _ = model.get_nb_trainable_parameters()  # PEFT's count: only the active adapter trains
    assert per_rank == trainable == method.trainable_parameters_per_task()
    assert detector.config.tie_word_embeddings  # the config is given back as it was
    for kwargs in (LPI_KWARGS, dict(LPI_KWARGS, prompt_length=16, prompt_depth=2, rank=8)):
        lpi = get_peft_model(copy.deepcopy(detector), LPIConfig(num_tasks=2, **kwargs))
        lpi_params = LPIGroundingMethod(lpi).trainable_parameters_per_task()
        _, lora = build_grounding_method("lora", copy.deepcopy(detector), 2, dict(kwargs))
        count = lora.trainable_parameters_per_task()
        best = min(range(1, lpi_params // per_rank + 3), key=lambda r: abs(r * per_rank - lpi_params))
        assert count == best * per_rank, (count, lpi_params, per_rank)
    assert count > per_rank  # the bigger budget gets a rank above 1


def test_lora_trains_its_adapter_detects_per_image_and_routes_on_the_frozen_swin(parts):
    tokenizer = parts[0]
    torch.manual_seed(0)
    reference = tiny_gdino(tokenizer)
    model, method = build(parts, "lora")
    model.eval()
    for task in (0, 1):
        batch = batch_of(parts, model, "train", rows_of(parts, "train", task, 3))
        before = _snapshot(model)
        _train(method, model, batch, task)
        changed = _changed(model, before)
        assert changed and all(f".task{task}." in n and "lora_" in n for n in changed), sorted(changed)[:4]
        assert {"backbone", "text_backbone"} <= {p for n in changed for p in n.split(".")}
    batch = batch_of(parts, model, "validation", rows_of(parts, "validation", 0, 2) + rows_of(parts, "validation", 1, 2))
    inputs = {k: batch[k] for k in INPUTS}
    tasks = torch.tensor([1, 0, 0, 1])
    with torch.no_grad():
        mixed = method.detect(inputs, tasks)
        for i, task in enumerate(tasks.tolist()):  # each image through its own adapter, alone
            model.set_adapter(f"task{task}", inference_mode=True)
            alone = model(**{k: v[i:i + 1] for k, v in inputs.items()})
            torch.testing.assert_close(mixed.logits[i], alone.logits[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mixed.pred_boxes[i], alone.pred_boxes[0], rtol=1e-5, atol=1e-5)
        other = method.detect(inputs, torch.zeros(4, dtype=torch.long))
        assert not torch.allclose(mixed.pred_boxes[0], other.pred_boxes[0])
        scores, boxes = method.candidates(mixed, inputs)
        assert scores.shape == boxes.shape[:2] == (4, reference.config.num_queries)
        # keys / routing read the frozen Swin: == the untouched detector's last stage, mean-pooled
        features, _ = method.encode("vision", {"pixel_values": inputs["pixel_values"]}, None)
        swin = reference.model.backbone.conv_encoder.model
        expected = swin(inputs["pixel_values"]).feature_maps[-1].mean((-2, -1))
        torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
        text, _ = method.encode("text", {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]},
                                None)
        assert torch.allclose(text, GroundingDinoFamily(reference).text_features(inputs["input_ids"],
                                                                               inputs["attention_mask"]), atol=1e-5)


def test_unknown_detector_family_gets_a_clear_error(parts):
    for name in ("shared-prompt", "lora", "joint"):
        with pytest.raises(ValueError, match="not a supported grounding detector"):
            build_grounding_method(name, nn.Sequential(nn.Linear(2, 2)), 2, dict(LPI_KWARGS))
