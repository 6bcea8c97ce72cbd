"""REC loss for OWL-style detectors: matching, gIoU against an independent formula, and that it trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peft_lpi.continual.grounding_loss import rec_loss, rec_predictions, select_query_pairs, sigmoid_focal_loss


def _giou_reference(a_cxcywh: list[float], b_cxcywh: list[float]) -> float:
    """gIoU of two cxcywh boxes, written from the paper's definition with plain floats."""
    ax0, ay0 = a_cxcywh[0] - a_cxcywh[2] / 2, a_cxcywh[1] - a_cxcywh[3] / 2
    ax1, ay1 = a_cxcywh[0] + a_cxcywh[2] / 2, a_cxcywh[1] + a_cxcywh[3] / 2
    bx0, by0 = b_cxcywh[0] - b_cxcywh[2] / 2, b_cxcywh[1] - b_cxcywh[3] / 2
    bx1, by1 = b_cxcywh[0] + b_cxcywh[2] / 2, b_cxcywh[1] + b_cxcywh[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a_cxcywh[2] * a_cxcywh[3] + b_cxcywh[2] * b_cxcywh[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _problem(seed: int = 0, pairs: int = 6, patches: int = 16):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(pairs, patches, 2, generator=g) * 0.6 + 0.2
    sizes = torch.rand(pairs, patches, 2, generator=g) * 0.2 + 0.1
    boxes = torch.cat([centres, sizes], dim=-1).double()
    target = torch.cat(
        [torch.rand(pairs, 2, generator=g) * 0.6 + 0.2, torch.rand(pairs, 2, generator=g) * 0.2 + 0.1], -1
    )
    logits = torch.randn(pairs, patches, generator=g).double()
    return logits, boxes, target.double()


def test_matching_is_argmin_of_cost_and_terms_match_reference() -> None:
    logits, boxes, target = _problem()
    out = rec_loss(logits, boxes, target, l1_weight=5.0, giou_weight=2.0, cls_weight=1.0)
    prob = logits.softmax(-1)
    for p in range(len(target)):
        costs = []
        for n in range(boxes.shape[1]):
            l1 = sum(abs(x - y) for x, y in zip(boxes[p, n].tolist(), target[p].tolist()))
            costs.append(5 * l1 - 2 * _giou_reference(boxes[p, n].tolist(), target[p].tolist()) - prob[p, n].item())
        assert out.matched[p].item() == min(range(len(costs)), key=costs.__getitem__)
    m = out.matched
    ref_giou = [1 - _giou_reference(boxes[p, m[p]].tolist(), target[p].tolist()) for p in range(len(target))]
    assert out.giou.item() == pytest.approx(sum(ref_giou) / len(ref_giou), abs=1e-12)
    ref_l1 = (boxes[torch.arange(len(m)), m] - target).abs().sum(-1).mean()
    assert out.box_l1.item() == pytest.approx(ref_l1.item(), abs=1e-12)
    assert out.classification.item() == pytest.approx(F.cross_entropy(logits, m).item(), abs=1e-12)
    assert out.loss.item() == pytest.approx(5 * out.box_l1.item() + 2 * out.giou.item() + out.classification.item())


def test_patch_mask_excludes_patches() -> None:
    logits, boxes, target = _problem(1)
    boxes[:, 3, :] = torch.cat([target[:, :2], target[:, 2:]], -1)  # a perfect box at patch 3...
    mask = torch.ones_like(logits, dtype=torch.bool)
    assert (rec_loss(logits, boxes, target).matched == 3).all()
    mask[:, 3] = False  # ...that may not be used
    assert (rec_loss(logits, boxes, target, patch_mask=mask).matched != 3).all()


def test_focal_loss_against_formula() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    targets = torch.tensor([[1.0, 0.0, 0.0]])
    expected = 0.0
    for x, t in zip(logits[0].tolist(), targets[0].tolist()):
        p = 1 / (1 + torch.exp(torch.tensor(-x)).item())
        p_t = p if t else 1 - p
        a_t = 0.25 if t else 0.75
        expected += -a_t * (1 - p_t) ** 2 * torch.log(torch.tensor(p_t)).item()
    assert sigmoid_focal_loss(logits, targets).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("classification", ["softmax", "focal"])
def test_loss_decreases_with_adam(classification: str) -> None:
    torch.manual_seed(0)
    _, _, target = _problem(2, pairs=4, patches=9)
    target = target.float()
    logits = torch.nn.Parameter(torch.randn(4, 9))  # a fixed tiny batch: free per-patch scores and boxes
    raw_boxes = torch.nn.Parameter(torch.randn(4, 9, 4))
    optimizer = torch.optim.Adam([logits, raw_boxes], lr=5e-2)
    losses = []
    for _ in range(80):
        loss = rec_loss(logits, raw_boxes.sigmoid(), target, classification=classification).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    # the top-scoring patch now predicts the referred box
    best, _ = rec_predictions(logits.detach(), raw_boxes.detach().sigmoid(), top_k=1)
    expected = torch.cat([target[:, :2] - target[:, 2:] / 2, target[:, :2] + target[:, 2:] / 2], -1)
    assert (best[:, 0] - expected).abs().max() < 0.05


def test_select_query_pairs_and_predictions() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 3, generator=g)
    boxes = torch.rand(2, 5, 4, generator=g)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    pair_logits, pair_boxes, image = select_query_pairs(logits, boxes, mask)
    assert image.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(pair_logits[1], logits[0, :, 2])
    torch.testing.assert_close(pair_logits[3], logits[1, :, 1])
    torch.testing.assert_close(pair_boxes[2], boxes[1])
    top, scores = rec_predictions(pair_logits, pair_boxes, top_k=3)
    assert top.shape == (4, 3, 4) and torch.all(scores[:, :-1] >= scores[:, 1:])
    best = pair_logits.argmax(-1)
    c = pair_boxes[torch.arange(4), best]
    torch.testing.assert_close(top[:, 0], torch.cat([c[:, :2] - c[:, 2:] / 2, c[:, :2] + c[:, 2:] / 2], -1))


def test_rec_loss_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="rec_loss expects"):
        rec_loss(torch.zeros(2, 5), torch.zeros(2, 4, 4), torch.zeros(2, 4))
