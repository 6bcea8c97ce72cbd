"""REC metric: IoU / gIoU helpers and Precision@k against brute-force Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from peft_lpi.evaluation.grounding import (
    box_cxcywh_to_xyxy,
    box_iou,
    box_xywh_to_xyxy,
    box_xyxy_to_cxcywh,
    continual_metrics,
    generalized_box_iou,
    rec_precision,
)


def _iou_loop(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def _giou_loop(a: list[float], b: list[float]) -> float:
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = area(a) + area(b) - ix * iy
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return _iou_loop(a, b) - (hull - union) / hull


def _random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * 0.7
    wh = torch.rand(n, 2, generator=generator) * 0.4 + 0.02
    return torch.cat([xy, xy + wh], dim=1)


def test_box_conversions_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    boxes = _random_boxes(20, g)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(boxes)), boxes)
    xywh = torch.tensor([[10.0, 20.0, 5.0, 8.0]])
    assert box_xywh_to_xyxy(xywh).tolist() == [[10.0, 20.0, 15.0, 28.0]]
    assert box_xyxy_to_cxcywh(torch.tensor([[0.0, 0.0, 4.0, 2.0]])).tolist() == [[2.0, 1.0, 4.0, 2.0]]


def test_pairwise_iou_and_giou_match_loops() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = _random_boxes(13, g).double(), _random_boxes(9, g).double()
    iou, giou = box_iou(a, b), generalized_box_iou(a, b)
    for i in range(len(a)):
        for j in range(len(b)):
            assert iou[i, j].item() == pytest.approx(_iou_loop(a[i].tolist(), b[j].tolist()), abs=1e-12)
            assert giou[i, j].item() == pytest.approx(_giou_loop(a[i].tolist(), b[j].tolist()), abs=1e-12)
    assert torch.all(giou <= iou + 1e-12)
    torch.testing.assert_close(box_iou(a, a).diagonal(), torch.ones(len(a), dtype=torch.float64))


def _precision_loop(pred, scores, target, ks, threshold, measure):
    hits = []
    for p, s, t in zip(pred.tolist(), scores.tolist(), target.tolist()):
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))
        ious = [measure(p[i], t) for i in order]
        hits.append([max(ious[:k]) >= threshold for k in ks])
    return hits


@pytest.mark.parametrize("criterion", ["iou", "giou"])
def test_rec_precision_matches_brute_force(criterion: str) -> None:
    g = torch.Generator().manual_seed(2)
    n, c, ks = 60, 12, (1, 5, 10, 20)
    target = _random_boxes(n, g)
    pred = _random_boxes(n * c, g).reshape(n, c, 4)
    # make some candidates near-copies of the target so that hits happen at various ranks
    near = torch.rand(n, c, generator=g) < 0.15
    pred = torch.where(near[..., None], target[:, None, :] + 0.01 * torch.randn(n, c, 4, generator=g), pred)
    scores = torch.randn(n, c, generator=g)
    tasks = torch.randint(0, 4, (n,), generator=g)
    tasks[tasks == 2] = 1  # task 2 absent
    out = rec_precision(pred, target, scores=scores, tasks=tasks, num_tasks=4, ks=ks, criterion=criterion)
    measure = _iou_loop if criterion == "iou" else _giou_loop
    expected = _precision_loop(pred, scores, target, ks, 0.5, measure)
    assert out["hits"].tolist() == expected
    for j, k in enumerate(ks):
        assert out[f"P@{k}"] == pytest.approx(100 * sum(h[j] for h in expected) / n)
        per_task = []
        for t in (0, 1, 3):
            rows = [h[j] for h, tt in zip(expected, tasks.tolist()) if tt == t]
            assert out["per_task"][t][f"P@{k}"] == pytest.approx(100 * sum(rows) / len(rows))
            per_task.append(100 * sum(rows) / len(rows))
        assert out["macro"][f"P@{k}"] == pytest.approx(sum(per_task) / 3)
    assert 2 not in out["per_task"] and math.isnan(out["per_task_matrix"][2, 0].item())
    # P@k is non-decreasing in k, and a hit somewhere happened at a rank > 1
    assert out["P@1"] <= out["P@5"] <= out["P@10"] <= out["P@20"]
    assert out["P@1"] < out["P@20"]


def test_rec_precision_single_box_and_threshold_edge() -> None:
    target = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    pred = torch.tensor([[0.0, 0.0, 1.0, 0.5], [0.0, 0.0, 1.0, 0.49]])  # IoU exactly 0.5, and 0.49
    out = rec_precision(pred, target, ks=(1, 5))
    assert out["hits"].tolist() == [[True, True], [False, False]]
    assert out["P@1"] == 50.0


def test_rec_precision_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="target_boxes"):
        rec_precision(torch.zeros(3, 5, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="scores"):
        rec_precision(torch.zeros(3, 5, 4), torch.zeros(3, 4), scores=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="task ids"):
        rec_precision(torch.zeros(3, 4), torch.zeros(3, 4), tasks=[0, 1, 5], num_tasks=2)


def test_continual_metrics_reused_on_precision_matrix() -> None:
    matrix = [[60.0], [50.0, 70.0], [40.0, 65.0, 80.0]]
    out = continual_metrics(matrix)
    assert out["final_average"] == pytest.approx((40 + 65 + 80) / 3)
    assert out["forgetting"] == pytest.approx(((60 - 40) + (70 - 65)) / 2)
    assert out["backward_transfer"] == pytest.approx(((40 - 60) + (65 - 70)) / 2)
    assert out["stage_averaged"] == pytest.approx(((60 + 50 + 40) / 3 + (70 + 65) / 2 + 80) / 3)
