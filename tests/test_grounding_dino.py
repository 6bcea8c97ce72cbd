"""Continual grounding on Grounding DINO (Swin + BERT, LPI's additive prompts): prompts are the only change, training
touches only the current task, the loss is the model's own (checked term by term against an independent
computation), the evaluator against brute force, routing on the image feature, and the example end to end.

Tiny GroundingDinoForObjectDetection from a config and a tiny BERT WordPiece tokenizer built offline, whose
[CLS] / [SEP] / "." / "?" ids are bert-base-uncased's (101, 102, 1012, 1029): Grounding DINO reads those ids to split
its text into phrases.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from accelerate import Accelerator
from grounding_run import load_example, save_detector_folder
from peft import get_peft_model
from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil

import peft_lpi  # noqa: F401
from peft_lpi import LPIConfig
from peft_lpi.continual.grounding import (
    GroundingEvaluator,
    LPIGroundingMethod,
    grounding_collator,
    grounding_task_similarity,
    prepare_grounding_dataset,
)
from peft_lpi.continual.grounding_models import GroundingDinoFamily, fixed_canvas
from peft_lpi.continual.trainer import ContinualTrainer, ContinualTrainingArguments
from peft_lpi.data.grounding_world import GROUNDING_TASKS, build_grounding_benchmark, grounding_words
from peft_lpi.evaluation.grounding import box_cxcywh_to_xyxy, paired_generalized_box_iou

CLS, SEP, DOT, QUESTION, PAD = 101, 102, 1012, 1029, 0


def tiny_bert_tokenizer() -> tf.BertTokenizer:
    """WordPiece over the grounding world's words, special ids laid out as in bert-base-uncased."""
    vocab = [f"[unused{i}]" for i in range(QUESTION + 1)]
    for index, token in ((PAD, "[PAD]"), (100, "[UNK]"), (CLS, "[CLS]"), (SEP, "[SEP]"), (103, "[MASK]"),
                         (DOT, "."), (QUESTION, "?")):
        vocab[index] = token
    words = grounding_words() | {w for task in GROUNDING_TASKS for w in task.name.split()}  # the task names too
    vocab += sorted(w.lower() for w in words)
    return tf.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=32)


def tiny_gdino(tokenizer) -> tf.GroundingDinoForObjectDetection:
    swin = tf.SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 2], window_size=4,
                         out_features=["stage1", "stage2"])
    text = dict(model_type="bert", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32, pad_token_id=PAD)
    config = tf.GroundingDinoConfig(
        backbone_config=swin, text_config=text, d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2, num_queries=8,
        num_feature_levels=2, encoder_n_points=1, decoder_n_points=1, max_text_len=32, use_timm_backbone=False,
    )
    torch.manual_seed(0)
    model = tf.GroundingDinoForObjectDetection(config).eval()
    with torch.no_grad():  # box heads start at zero (boxes == anchors); small weights let every input move the boxes
        for head in (model.bbox_embed[0], model.model.encoder_output_bbox_embed):  # bbox_embed.* are tied to [0]
            head.layers[-1].weight.normal_(std=0.1)
    return model


def wrap(model, **extra):
    settings = dict(num_tasks=2, prompt_length=2, prompt_depth=2, rank=2, num_keys=2, injection="additive")
    settings.update(extra)
    return get_peft_model(model, LPIConfig(**settings))


def tiny_gdino_processor() -> GroundingDinoImageProcessorPil:
    """Grounding DINO's image processor at 64 x 64 (the tiny model's image size)."""
    return GroundingDinoImageProcessorPil(size={"height": 64, "width": 64}, image_mean=[0.2, 0.2, 0.2],
                                          image_std=[0.3, 0.3, 0.3])


@pytest.fixture(scope="module")
def parts():
    tokenizer = tiny_bert_tokenizer()
    data = prepare_grounding_dataset(build_grounding_benchmark(0, 16, 5, tasks=GROUNDING_TASKS[:2]))
    return tokenizer, tiny_gdino_processor(), data


def make_trainer(parts, tmp_path, max_steps=2):
    tokenizer, processor, data = parts
    names = list(data["train"].features["task"].names)
    model = wrap(tiny_gdino(tokenizer))
    accelerator = Accelerator(cpu=True)
    method = LPIGroundingMethod(model)
    collator = grounding_collator(model, processor, tokenizer)
    rows = [[i for i, t in enumerate(data["validation"]["task"]) if t == task] for task in range(2)]
    evaluator = GroundingEvaluator(accelerator, method, data["validation"], rows, collator, batch_size=5)
    args = ContinualTrainingArguments(output_dir=str(tmp_path), num_train_epochs=5, max_steps=max_steps,
                                      per_device_train_batch_size=8, optim="adamw", learning_rate=5e-2,
                                      disable_tqdm=True)
    trainer = ContinualTrainer(model, tokenizer, processor, data, args, accelerator=accelerator, method=method,
                               evaluator=evaluator, data_collator=collator,
                               task_similarity=grounding_task_similarity(model, tokenizer, names))
    return trainer, evaluator


def test_collator_writes_one_phrase_and_pads_for_the_prompts(parts):
    tokenizer, processor, data = parts
    model = wrap(tiny_gdino(tokenizer), prompt_length=6)
    collator = grounding_collator(model, processor, tokenizer)
    row = dict(data["validation"][0], expression="The Red. circle?")
    batch = collator([row])
    ids = batch["input_ids"][0].tolist()
    assert ids[: ids.index(SEP) + 1] == tokenizer("the red circle.")["input_ids"]  # one phrase, one trailing "."
    assert batch["input_ids"].shape[1] >= 6 + 1 and batch["pixel_mask"].shape == (1, 64, 64)
    with pytest.raises(ValueError, match="Empty referring expression"):
        collator([dict(row, expression=" . ")])


def test_prompts_are_the_only_change(parts):
    """Prompts off == the base model bit for bit; a task's prompts change the boxes; per-sample task ids give each
    image its own task's output."""
    tokenizer, processor, data = parts
    base = tiny_gdino(tokenizer)
    model = wrap(tiny_gdino(tokenizer))
    batch = grounding_collator(model, processor, tokenizer)([data["validation"][i] for i in (0, 7)])
    inputs = {k: batch[k] for k in ("pixel_values", "pixel_mask", "input_ids", "attention_mask")}
    with torch.no_grad():
        reference = base(**inputs)
        with model.base_model.prompts_disabled():
            off = model(**inputs)
        task0, task1 = model(**inputs, task_ids=0), model(**inputs, task_ids=1)
        mixed = model(**inputs, task_ids=torch.tensor([0, 1]))
    assert torch.equal(off.pred_boxes, reference.pred_boxes) and torch.equal(off.logits, reference.logits)
    assert not torch.allclose(task0.pred_boxes, reference.pred_boxes)
    assert not torch.allclose(task0.pred_boxes, task1.pred_boxes)
    torch.testing.assert_close(mixed.pred_boxes[0], task0.pred_boxes[0])
    torch.testing.assert_close(mixed.pred_boxes[1], task1.pred_boxes[1])


def _focal(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25) -> torch.Tensor:
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    return ((alpha * targets + (1 - alpha) * (1 - targets)) * ce * (1 - p_t) ** 2).sum()


def _independent_loss(logits, boxes, phrase, valid, target) -> dict[str, torch.Tensor]:
    """Grounding DINO's loss for one box per image, from its definition: the query of least matching cost
    (5 L1 + 2 (-gIoU) + focal-cost over the phrase tokens), focal loss over the valid (query, token) pairs with the
    matched query's phrase tokens positive, L1 and 1 - gIoU of the matched box; sums over the batch / #boxes."""
    ce = l1 = giou = 0.0
    for b in range(logits.shape[0]):
        prob = logits[b].sigmoid()
        pos = 0.25 * (1 - prob) ** 2 * -(prob + 1e-8).log()
        neg = 0.75 * prob**2 * -(1 - prob + 1e-8).log()
        class_cost = ((pos - neg) * phrase[b]).sum(-1) / phrase[b].sum()
        ious = paired_generalized_box_iou(box_cxcywh_to_xyxy(boxes[b]), box_cxcywh_to_xyxy(target[b].expand_as(boxes[b])))
        cost = 5 * (boxes[b] - target[b]).abs().sum(-1) - 2 * ious + class_cost
        q = int(cost.argmin())
        onehot = torch.zeros_like(logits[b])
        onehot[q] = phrase[b]
        ce = ce + _focal(logits[b][:, valid[b]], onehot[:, valid[b]])
        l1 = l1 + (boxes[b, q] - target[b]).abs().sum()
        giou = giou + (1 - ious[q])
    n = logits.shape[0]
    return {"ce": ce / n, "l1": l1 / n, "giou": giou / n}


def test_loss_is_the_models_own_and_matches_an_independent_computation(parts, tmp_path):
    """The loss == transformers' own (forward with labels=) on each image alone, averaged; and == its terms
    recomputed from their definition on the batch."""
    trainer, _ = make_trainer(parts, tmp_path)
    model, method = trainer.model, trainer.method
    family = method.family
    assert isinstance(family, GroundingDinoFamily)
    batch = next(iter(trainer._train_loader(0, 0)))
    model.eval()  # dropout off: the two computations below see the same forward
    with torch.no_grad():
        terms = family.rec_terms(model, batch, 0, {})
        out = family.forward(model, batch, task_ids=0)
    width = out.logits.shape[-1]
    phrase = family.phrase_mask(batch["input_ids"], width).float()
    ids = F.pad(batch["input_ids"], (0, width - batch["input_ids"].shape[1]), value=PAD)
    expected_phrase = ~torch.isin(ids, torch.tensor([CLS, SEP, DOT, QUESTION, PAD]))
    assert torch.equal(phrase.bool(), expected_phrase)  # the phrase = every word of the expression
    valid = F.pad(batch["attention_mask"], (0, width - batch["attention_mask"].shape[1])).bool()
    decoder = _independent_loss(out.logits, out.pred_boxes, phrase, valid, batch["boxes"])
    encoder = _independent_loss(out.encoder_logits, out.encoder_pred_boxes, phrase, valid, batch["boxes"])
    torch.testing.assert_close(terms["classification"], decoder["ce"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["box_l1"], decoder["l1"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["giou"], decoder["giou"], rtol=1e-4, atol=1e-5)
    total = sum(2 * p["ce"] + 5 * p["l1"] + 2 * p["giou"] for p in (decoder, encoder))
    torch.testing.assert_close(terms["rec"], total, rtol=1e-4, atol=1e-4)
    # transformers' own loss, one image per call (its label-map indexing is right for the first two images only)
    inputs = ("pixel_values", "pixel_mask", "input_ids", "attention_mask")
    with torch.no_grad():
        own = torch.stack([
            model(**{k: batch[k][i : i + 1] for k in inputs}, task_ids=0,
                  labels=[{"class_labels": torch.tensor([0]), "boxes": batch["boxes"][i : i + 1]}]).loss
            for i in range(len(batch["boxes"]))
        ])
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1, "the check needs expressions of several lengths"
    torch.testing.assert_close(terms["rec"], own.mean(), rtol=1e-4, atol=1e-4)
    # the scores the evaluator ranks: per query, the max over the phrase tokens
    scores, boxes = family.candidates(out, batch)
    brute = out.logits.masked_fill(~phrase.bool()[:, None], -1e9).max(-1).values
    torch.testing.assert_close(scores, brute)
    assert torch.equal(boxes, out.pred_boxes)


def test_training_changes_only_the_current_tasks_factors_and_lowers_the_loss(parts, tmp_path):
    trainer, _ = make_trainer(parts, tmp_path)
    model, method = trainer.model, trainer.method
    trainer.task_similarity = trainer.task_similarity.to(trainer.accelerator.device)
    method.setup(trainer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(method.parameters_for_task(1), lr=2e-2)
    batch = next(iter(trainer._train_loader(1, 0)))
    model.eval()  # no dropout: the loss of the same batch is comparable across steps
    losses = []
    for _ in range(4):
        terms = method.training_loss(model, batch, 1)
        assert set(terms) >= {"loss", "rec", "box_l1", "giou", "classification", "align", "task"}
        assert terms["align"].item() != 0.0 and torch.isfinite(terms["task"])
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(terms["rec"].item())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, "training changed nothing"
    assert all(".tasks.1." in n for n in changed), sorted(changed)[:5]
    assert {m for n in changed for m in ("vision", "text") if m in n} == {"vision", "text"}
    assert losses[-1] < losses[0], losses


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_evaluator_matches_brute_force_and_routes_on_the_image_feature(parts, tmp_path):
    """The top-5 boxes (oracle) == one forward per pair, queries ranked by the max phrase-token logit; P@1 / P@5 ==
    IoU by hand; the auto routes == nearest keys of the mean-pooled last Swin stage, read from the Swin itself."""
    trainer, evaluator = make_trainer(parts, tmp_path)
    for task in (0, 1):  # the untrained prompts are random, not zero: no training needed to check the ranking
        trainer._build_task_keys(task)
    stage = evaluator.evaluate(1)
    _, processor, data = parts
    val = data["validation"]
    model, tokenizer = trainer.model, trainer.tokenizer
    model.eval()
    hits = {1: {0: [], 1: []}, 5: {0: [], 1: []}}
    features, top5 = [], []
    swin = model.base_model.model.model.backbone.conv_encoder.model
    with torch.no_grad():
        for row in val:
            task = int(row["task"])
            pixels = processor(images=[row["image"].convert("RGB")], return_tensors="pt")["pixel_values"]
            enc = tokenizer([row["expression"].lower() + "."], return_tensors="pt")
            enc = {k: F.pad(v, (0, 3 - v.shape[1])) if v.shape[1] < 3 else v for k, v in enc.items()}  # P + 1 = 3
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels,
                        task_ids=task)
            words = [i for i, t in enumerate(enc["input_ids"][0].tolist()) if t not in (CLS, SEP, DOT, PAD)]
            scores = out.logits[0][:, words].max(-1).values.tolist()
            order = sorted(range(len(scores)), key=lambda i: -scores[i])
            target = [float(v) for v in row["target"]]
            ious, corners = [], []
            for i in order[:5]:
                cx, cy, w, h = out.pred_boxes[0, i].tolist()
                corners.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
                ious.append(_iou(corners[-1], target))
            top5.append(corners)
            hits[1][task].append(ious[0] >= 0.5)
            hits[5][task].append(max(ious) >= 0.5)
            with model.base_model.prompts_disabled():
                features.append(swin(pixels).feature_maps[-1].mean((-2, -1))[0])
    last = stage["oracle"]["per_task"]
    for k in (1, 5):
        for task in (0, 1):
            expected = 100.0 * sum(hits[k][task]) / len(hits[k][task])
            assert last[task][f"P@{k}"] == pytest.approx(expected, abs=1e-6)
    boxes, _ = evaluator.predict(list(range(len(val))), "oracle")
    torch.testing.assert_close(boxes, torch.tensor(top5), rtol=0, atol=1e-5)
    # routing: L1 to the nearest key of each task, on the L2-normalised image feature
    bank = model.base_model.active_bank
    assert bank.vision_keys.shape[-1] == model.config.backbone_config.hidden_size  # the last stage's width
    feats = F.normalize(torch.stack(features), dim=-1)
    distance = (feats[:, None, None] - bank.vision_keys[None]).abs().sum(-1).min(-1).values  # (N, T)
    _, routes = evaluator.predict(list(range(len(val))), "auto")
    assert torch.equal(routes, distance.argmin(-1))
    truth = torch.as_tensor(val["task"])
    assert stage["auto"]["routing"]["image"]["accuracy"] == pytest.approx(
        (routes == truth).double().mean().item()
    )


@pytest.mark.slow
def test_example_end_to_end_with_grounding_dino(parts, tmp_path):
    """examples/continual_grounding.py on a Grounding DINO folder: additive prompts chosen automatically, 2 tasks,
    results and task files written; a task file loaded into a fresh adapter gives that task's boxes back."""
    tokenizer, processor, _ = parts
    backbone = tmp_path / "gdino"
    save_detector_folder(backbone, tiny_gdino(tokenizer), tokenizer, processor)
    example = load_example()
    argv = ["--model", str(backbone), "--max_tasks", "2", "--train_per_task", "16", "--val_per_task", "6",
            "--max_steps", "2", "--per_device_train_batch_size", "8", "--prompt_length", "2", "--prompt_depth", "2",
            "--rank", "2", "--num_keys", "2", "--output_dir", str(tmp_path / "run"), "--disable_tqdm", "true"]
    results = example.main(argv)
    assert results["peft_config"]["default"]["injection"] == "additive"
    for mode in ("zero-shot", "oracle", "auto"):
        matrix = results["grounding"][mode]["matrices"]["P@1"]
        assert len(matrix) == 2 and matrix[0][1] is None and all(v is not None for v in matrix[1])
    assert len(results["grounding"]["auto"]["routing_accuracy"]) == 2
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["grounding"] == results["grounding"]
    zero = results["grounding"]["zero-shot"]["matrices"]["P@1"]
    assert zero[0][0] == zero[1][0]
    resumed = example.main(argv + ["--resume_from_checkpoint", "true"])  # every stage finished: nothing retrains
    assert resumed["grounding"] == results["grounding"]
    # the saved adapter, moved task by task through task files into a fresh model, gives the run's final numbers
    def fresh() -> LPIGroundingMethod:
        detector = tf.AutoModelForZeroShotObjectDetection.from_pretrained(backbone).eval()
        return LPIGroundingMethod(wrap(detector))

    trained = fresh()
    trained.load_adapter(tmp_path / "run" / "checkpoint")
    target = fresh()
    for task in (1, 0):
        trained.tuner.save_task(task, tmp_path / f"task{task}.safetensors")
        assert target.tuner.load_task(task, tmp_path / f"task{task}.safetensors") == task
    data = prepare_grounding_dataset(build_grounding_benchmark(0, 16, 6, tasks=GROUNDING_TASKS[:2]))
    val = data["validation"]
    rows = [[i for i, t in enumerate(val["task"]) if t == task] for task in range(2)]
    folder_processor = tf.AutoImageProcessor.from_pretrained(backbone)
    fixed_canvas(folder_processor)
    collator = grounding_collator(target.model, folder_processor, tokenizer)
    evaluator = GroundingEvaluator(Accelerator(cpu=True), target, val, rows, collator)
    again = evaluator.evaluate(1)
    final = results["grounding"]["oracle"]["matrices"]["P@1"][-1]
    assert [again["oracle"]["per_task"][t]["P@1"] for t in (0, 1)] == pytest.approx(final, abs=1e-9)
    assert again["auto"]["routing"]["image"]["accuracy"] == pytest.approx(
        results["grounding"]["auto"]["routing_accuracy"][-1], abs=1e-9
    )
    # the boxes themselves: the task files carry every factor and key of the trained adapter
    reference = GroundingEvaluator(Accelerator(cpu=True), trained, val, rows, collator)
    everything = list(range(len(val)))
    for mode in ("oracle", "auto"):
        (boxes, routes), (expected, expected_routes) = evaluator.predict(everything, mode), reference.predict(
            everything, mode)
        assert torch.equal(boxes, expected) and (routes is None or torch.equal(routes, expected_routes))
    with torch.no_grad():
        plain = reference.predict(everything, "zero-shot")[0]
    assert not torch.equal(plain, reference.predict(everything, "oracle")[0])  # the prompts matter
    with pytest.raises(ValueError, match="pixel_mask"):
        example.main(argv + ["--preprocess_images", "true", "--output_dir", str(tmp_path / "pre")])
