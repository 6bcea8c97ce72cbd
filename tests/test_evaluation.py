"""Tests for chunked retrieval recall, per-task averages, continual metrics and the `evaluate` metric."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from peft_lpi.evaluation import (
    backward_transfer,
    continual_metrics,
    final_average,
    forgetting,
    per_task_recall,
    retrieval_recall,
    stage_averaged,
)

KS = (1, 5, 10)


def _random_gallery(seed: int = 0, n_images: int = 23, dim: int = 8):
    """Random embeddings with 0-4 captions per image (image 3 has none)."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 5, (n_images,), generator=gen)
    counts[3] = 0
    text_to_image = torch.repeat_interleave(torch.arange(n_images), counts)
    text_to_image = text_to_image[torch.randperm(len(text_to_image), generator=gen)]
    images = torch.randn(n_images, dim, generator=gen) * 3
    texts = torch.randn(len(text_to_image), dim, generator=gen)
    return images, texts, text_to_image


def _brute_force(images, texts, text_to_image, ks):
    """Full argsort ranking with explicit loops."""
    sim = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T
    i2t = torch.zeros(len(images), len(ks), dtype=torch.bool)
    for i in range(len(images)):
        order = torch.argsort(sim[i], descending=True).tolist()
        ranks = [order.index(j) for j in range(len(texts)) if text_to_image[j] == i]
        for c, k in enumerate(ks):
            i2t[i, c] = bool(ranks) and min(ranks) < k
    t2i = torch.zeros(len(texts), len(ks), dtype=torch.bool)
    for j in range(len(texts)):
        order = torch.argsort(sim[:, j], descending=True).tolist()
        rank = order.index(int(text_to_image[j]))
        for c, k in enumerate(ks):
            t2i[j, c] = rank < k
    return i2t, t2i


@pytest.mark.parametrize("chunk_size", [4, 7, 1024])
def test_retrieval_recall_matches_brute_force(chunk_size):
    images, texts, text_to_image = _random_gallery()
    assert chunk_size >= 1024 or (chunk_size < len(images) and chunk_size < len(texts))
    out = retrieval_recall(images, texts, text_to_image, ks=KS, chunk_size=chunk_size)
    i2t, t2i = _brute_force(images, texts, text_to_image, KS)
    assert torch.equal(out["i2t_hits"], i2t)
    assert torch.equal(out["t2i_hits"], t2i)
    assert not out["i2t_hits"][3].any()  # an image without captions is a miss
    for c, k in enumerate(KS):
        assert out[f"i2t_R@{k}"] == pytest.approx(100 * i2t[:, c].float().mean().item())
        assert out[f"t2i_R@{k}"] == pytest.approx(100 * t2i[:, c].float().mean().item())
    assert "i2t_caption_equal_R@1" not in out


def test_retrieval_recall_k_larger_than_gallery():
    images, texts, text_to_image = _random_gallery(n_images=6)
    out = retrieval_recall(images, texts, text_to_image, ks=(1, 50), chunk_size=2)
    assert out["t2i_R@50"] == 100.0
    assert out["i2t_hits"][:, 1].sum() == 5  # every image with a caption


def test_caption_equal_variant_hand_example():
    images = torch.eye(3)
    texts = torch.tensor([[0.0, 1.0, 0.2], [1.0, 0.1, 0.0], [0.0, 1.0, 0.0], [0.9, 0.0, 0.1]])
    text_to_image = torch.tensor([0, 1, 1, 2])
    groups = torch.tensor([7, 7, 3, 11])  # captions 0 and 1 have identical text
    out = retrieval_recall(images, texts, text_to_image, ks=(1, 2), chunk_size=2, text_groups=groups)
    as_bool = lambda rows: torch.tensor(rows, dtype=torch.bool)  # noqa: E731
    assert torch.equal(out["i2t_hits"], as_bool([[0, 0], [1, 1], [0, 1]]))
    assert torch.equal(out["i2t_caption_equal_hits"], as_bool([[1, 1], [1, 1], [0, 1]]))
    assert torch.equal(out["t2i_hits"], as_bool([[0, 0], [0, 1], [1, 1], [0, 1]]))
    assert torch.equal(out["t2i_caption_equal_hits"], as_bool([[1, 1], [1, 1], [1, 1], [0, 1]]))
    assert out["i2t_caption_equal_R@1"] == pytest.approx(200 / 3)
    assert out["t2i_caption_equal_R@1"] == pytest.approx(75.0)


def test_retrieval_recall_validates_inputs():
    with pytest.raises(ValueError, match="index the 2 images"):
        retrieval_recall(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="positive"):
        retrieval_recall(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 1]), ks=(0,))


def test_per_task_recall():
    hits_i2t = torch.tensor([[1, 1], [0, 1], [0, 0], [1, 1]], dtype=torch.bool)
    hits_t2i = torch.tensor([[1, 1], [0, 0], [1, 1]], dtype=torch.bool)
    out = per_task_recall(hits_i2t, hits_t2i, torch.tensor([0, 0, 2, 2]), torch.tensor([0, 2, 2]), 3, ks=(1, 5))
    assert out["tasks"] == [0, 2]
    assert out["per_task"][0] == {"i2t_R@1": 50.0, "i2t_R@5": 100.0, "t2i_R@1": 100.0, "t2i_R@5": 100.0, "rmean": 87.5}
    assert out["per_task"][2] == {"i2t_R@1": 50.0, "i2t_R@5": 50.0, "t2i_R@1": 50.0, "t2i_R@5": 50.0, "rmean": 50.0}
    assert out["macro"]["i2t_R@5"] == 75.0 and out["macro"]["rmean"] == 68.75
    assert out["i2t"][1].isnan().all()


NAN = math.nan
HAND = [[80.0, NAN, NAN], [70.0, 60.0, NAN], [50.0, 55.0, 90.0]]


@pytest.mark.parametrize(
    "matrix",
    [
        HAND,
        torch.tensor(HAND),
        [[80.0], [70.0, 60.0], [50.0, 55.0, 90.0]],  # ragged
        [[80.0, NAN, 10.0], [70.0, 60.0, 20.0], [50.0, 55.0, 90.0]],  # zero-shot entries of future tasks ignored
    ],
)
def test_continual_metrics_hand_computed(matrix):
    assert final_average(matrix) == pytest.approx(65.0)
    assert stage_averaged(matrix) == pytest.approx((200 / 3 + 57.5 + 90) / 3)
    assert forgetting(matrix) == pytest.approx((30 + 5) / 2)  # positive = forgot
    assert backward_transfer(matrix) == pytest.approx((-30 - 5) / 2)


def test_continual_metrics_partial_run_and_single_task():
    assert continual_metrics([[80.0, NAN, NAN], [70.0, 60.0, NAN]]) == pytest.approx(
        {"final_average": 65.0, "stage_averaged": 67.5, "forgetting": 10.0, "backward_transfer": -10.0}
    )
    assert continual_metrics([[42.0]]) == {
        "final_average": 42.0,
        "stage_averaged": 42.0,
        "forgetting": 0.0,
        "backward_transfer": 0.0,
    }


def test_evaluate_metric_loads_offline_and_matches(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
        monkeypatch.setenv(var, "1")
    import evaluate

    from peft_lpi.evaluation import RETRIEVAL_RECALL_PATH

    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True, raising=False)
    monkeypatch.setattr(evaluate.config, "HF_HUB_OFFLINE", True, raising=False)
    images, texts, text_to_image = _random_gallery(seed=1)
    groups = text_to_image % 5
    metric = evaluate.load(RETRIEVAL_RECALL_PATH, keep_in_memory=True)
    metric.add_batch(text_embeds=texts[:20], text_to_image=text_to_image[:20])
    metric.add_batch(text_embeds=texts[20:].numpy(), text_to_image=text_to_image[20:].tolist())
    got = metric.compute(image_embeds=images, ks=KS, chunk_size=5, text_groups=groups)
    expected = retrieval_recall(images, texts, text_to_image, ks=KS, text_groups=groups)
    assert got == pytest.approx({key: value for key, value in expected.items() if "R@" in key})

    image_task, text_task = torch.arange(len(images)) % 2, text_to_image % 2
    got = metric.compute(
        text_embeds=texts, text_to_image=text_to_image, image_embeds=images, image_task=image_task, text_task=text_task
    )
    tasks = per_task_recall(expected["i2t_hits"], expected["t2i_hits"], image_task, text_task, 2, KS)
    assert got["macro_rmean"] == pytest.approx(tasks["macro"]["rmean"])
    assert got["per_task"][1] == pytest.approx(tasks["per_task"][1])
