"""The offline grounding world (determinism, exact boxes, unambiguous expressions, schema) and its OWL-ViT backbone."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoTokenizer, OwlViTForObjectDetection

from peft_lpi.data.backbone import build_world_tokenizer
from peft_lpi.data.grounding_backbone import (
    METADATA_FILE,
    build_grounding_tokenizer,
    get_grounding_backbone,
    normalise_images,
    owl_layer_paths,
    read_grounding_metadata,
    scene_queries,
)
from peft_lpi.data.grounding_world import (
    GROUNDING_TASKS,
    SCENE_SIZE,
    SceneObject,
    build_grounding_benchmark,
    describe,
    grounding_words,
    render_generic_scenes,
    render_task_scenes,
)

TINY = {"steps": 2, "batch_size": 4, "num_scenes": 16, "heldout_scenes": 8, "progress": False}


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return get_grounding_backbone(tmp_path_factory.mktemp("grounding") / "bb", **TINY)


def _bytes(split: datasets.Dataset) -> list[bytes]:
    return [row["bytes"] for row in split.cast_column("image", datasets.Image(decode=False))["image"]]


def test_benchmark_deterministic_and_schema() -> None:
    a = build_grounding_benchmark(seed=0, train_per_task=3, val_per_task=2)
    b = build_grounding_benchmark(seed=0, train_per_task=3, val_per_task=2)
    c = build_grounding_benchmark(seed=1, train_per_task=3, val_per_task=2)
    assert _bytes(a["train"]) == _bytes(b["train"]) and a["train"]["expression"] == b["train"]["expression"]
    assert _bytes(a["train"]) != _bytes(c["train"])
    assert a["train"].features["task"].names == [t.name for t in GROUNDING_TASKS]
    assert len(a["train"]) == 3 * len(GROUNDING_TASKS) and len(a["validation"]) == 2 * len(GROUNDING_TASKS)
    ids = list(a["train"]["image_id"]) + list(a["validation"]["image_id"])
    assert len(set(ids)) == len(ids)
    row = a["validation"][0]
    assert row["image"].size == (SCENE_SIZE, SCENE_SIZE) and row["expression"].startswith("the ")
    # train and validation scenes differ
    assert not set(_bytes(a["train"])) & set(_bytes(a["validation"]))


def test_boxes_are_exact_and_expressions_unambiguous() -> None:
    scenes = render_generic_scenes(3, 150, style_p=0.0, faint_pattern_p=0.0)
    words = grounding_words()
    assert words <= set(build_world_tokenizer().get_vocab())  # every expression word is a world word
    for scene in scenes:
        img = scene.image.astype(np.int32)
        background = img[0, 0]
        for obj, expression in zip(scene.objects, scene.expressions):
            x0, y0, x1, y1 = (int(v) for v in obj.box)
            assert 0 <= x0 < x1 <= SCENE_SIZE and 0 <= y0 < y1 <= SCENE_SIZE
            inside = np.abs(img[y0:y1, x0:x1] - background).sum(-1) > 60
            # the object is drawn inside its box and touches every side of it
            assert inside[:, 0].any() and inside[:, -1].any() and inside[0].any() and inside[-1].any()
            if expression is not None:
                assert set(expression.split()) <= words
        # boxes do not overlap
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]
        # an expression that describes an object describes no other object of the scene
        described = [e for e in scene.expressions if e is not None]
        assert len(described) == len(set(described))
        assert any(e is not None for e in scene.expressions)


def test_describe_uses_size_then_position_for_twins() -> None:
    def obj(size: str, box: tuple[float, float, float, float], colour: str = "red") -> SceneObject:
        return SceneObject("letters", "k", colour, size, box)

    single = [obj("small", (0, 0, 10, 10)), obj("small", (20, 0, 30, 10), colour="blue")]
    assert describe(single, 0) == "the red letter k"
    sized = [obj("small", (0, 0, 10, 10)), obj("large", (20, 0, 37, 17))]
    assert describe(sized, 1) == "the large red letter k"
    placed = [obj("small", (0, 0, 10, 10)), obj("small", (30, 4, 40, 14))]
    assert describe(placed, 0) == "the red letter k on the left"
    assert describe(placed, 1) == "the red letter k on the right"
    stacked = [obj("small", (0, 0, 10, 10)), obj("small", (2, 30, 12, 40))]
    assert describe(stacked, 1) == "the red letter k at the bottom"
    triple = placed + [obj("small", (50, 50, 60, 60))]
    assert describe(triple, 0) is None


def test_tasks_apply_their_nuisance() -> None:
    dark = render_task_scenes(GROUNDING_TASKS.index(next(t for t in GROUNDING_TASKS if t.style == "dark")), 0, 20)
    plain = render_generic_scenes(0, 20, style_p=0.0, faint_pattern_p=0.0)
    assert np.mean([s.image.mean() for s in dark]) < 0.6 * np.mean([s.image.mean() for s in plain])
    family = {t.name: t.family for t in GROUNDING_TASKS}
    for index, task in enumerate(GROUNDING_TASKS):
        for scene in render_task_scenes(index, 0, 5):
            assert {o.family for o in scene.objects} == {family[task.name]}


def test_tokenizer_eos_is_largest_id() -> None:
    tok = build_grounding_tokenizer()
    enc = tok(["the red letter k on the left"])["input_ids"][0]
    assert enc[0] == tok.bos_token_id and enc[-1] == tok.eos_token_id == max(tok.get_vocab().values())
    assert tok.unk_token_id not in enc


def test_backbone_cache_roundtrip(tiny_backbone: Path) -> None:
    folder = tiny_backbone
    meta = read_grounding_metadata(folder)
    assert meta is not None and meta["steps"] == 2 and "P@1" in meta["heldout_generic"]
    mtime = (folder / METADATA_FILE).stat().st_mtime_ns
    assert get_grounding_backbone(folder, **TINY) == folder  # cached: not retrained
    assert (folder / METADATA_FILE).stat().st_mtime_ns == mtime
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left
    model = OwlViTForObjectDetection.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    processor = AutoImageProcessor.from_pretrained(folder)
    scenes = render_task_scenes(0, 0, 3)
    pixels = processor(images=[s.image for s in scenes], return_tensors="pt")["pixel_values"]
    mean, std = torch.tensor(processor.image_mean), torch.tensor(processor.image_std)
    torch.testing.assert_close(
        pixels, normalise_images(np.stack([s.image for s in scenes]), mean, std), atol=1e-5, rtol=0
    )
    ids, mask, boxes, valid = scene_queries(scenes, tok)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert out.logits.shape == (3, (SCENE_SIZE // 8) ** 2, valid.shape[1])
    # padded query rows are OWL's "no query" (logit at the dtype minimum)
    assert (out.logits[~valid[:, None, :].expand_as(out.logits)] < -1e30).all()
    assert owl_layer_paths(model)["vision"] == "owlvit.vision_model.encoder.layers"


def test_lpi_on_the_owl_detector(tiny_backbone: Path) -> None:
    from peft import get_peft_model

    import peft_lpi  # noqa: F401
    from peft_lpi import LPIConfig
    from peft_lpi.continual.grounding_loss import rec_loss, select_query_pairs

    folder = tiny_backbone
    model = OwlViTForObjectDetection.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    scenes = render_task_scenes(1, 0, 4)
    ids, mask, boxes, valid = scene_queries(scenes, tok)
    pixels = normalise_images(np.stack([s.image for s in scenes]), torch.zeros(3), torch.ones(3))
    reference = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    config = LPIConfig(
        num_tasks=2, prompt_length=4, prompt_depth=2, rank=2, layer_paths=owl_layer_paths(model), text_causal=True
    )
    peft_model = get_peft_model(model, config)
    with peft_model.base_model.prompts_disabled():
        off = peft_model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    torch.testing.assert_close(off.logits, reference.logits)
    params = peft_model.base_model.train_task(1)
    out = peft_model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert not torch.allclose(out.logits, reference.logits)
    assert not torch.equal(out.pred_boxes, reference.pred_boxes)  # prompts reach the box head too
    logits, pred_boxes, _ = select_query_pairs(out.logits, out.pred_boxes, valid)
    rec_loss(logits, pred_boxes, boxes[valid]).loss.backward()
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for p in peft_model.get_base_model().parameters())
