"""Losses vs independent brute-force computations (explicit Python loops over pairs, float64)."""

from __future__ import annotations

import math

import pytest
import torch

from peft_lpi.continual.losses import (
    contrastive_loss,
    gather_with_grad,
    hierarchical_alignment_loss,
    sigmoid_loss,
    task_contrastive_loss,
)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    dot = sum(float(x) * float(y) for x, y in zip(a, b))
    na = math.sqrt(sum(float(x) ** 2 for x in a))
    nb = math.sqrt(sum(float(y) ** 2 for y in b))
    return dot / (na * nb)


def _logsumexp(values: list[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _brute_clip(img, txt, scale: float, ids) -> float:
    n = img.shape[0]
    ids = list(range(n)) if ids is None else [int(i) for i in ids]
    logits = [[scale * _cos(img[i], txt[j]) for j in range(n)] for i in range(n)]
    total = 0.0
    for direction in ("i2t", "t2i"):
        for i in range(n):
            row = [logits[i][j] if direction == "i2t" else logits[j][i] for j in range(n)]
            lse = _logsumexp(row)
            positives = [j for j in range(n) if ids[j] == ids[i]]
            total += -sum(row[j] - lse for j in positives) / len(positives) / n
    return total / 2


def _brute_siglip(img, txt, scale: float, bias: float, ids) -> float:
    n = img.shape[0]
    ids = list(range(n)) if ids is None else [int(i) for i in ids]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if ids[i] == ids[j] else -1.0
            logit = scale * _cos(img[i], txt[j]) + bias
            total += _softplus(-z * logit)  # -log sigmoid(z * logit)
    return total / n


@pytest.mark.parametrize("ids", [None, [0, 1, 0, 2, 1, 3]])
def test_contrastive_loss_matches_brute_force(ids):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(6, 5, generator=g, dtype=torch.float64)
    txt = torch.randn(6, 5, generator=g, dtype=torch.float64)
    scale = torch.tensor(3.7, dtype=torch.float64)
    sample_ids = None if ids is None else torch.tensor(ids)
    loss = contrastive_loss(img, txt, scale, sample_ids=sample_ids)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(_brute_clip(img, txt, 3.7, ids), abs=1e-10)


def test_contrastive_loss_distinct_ids_equal_no_ids_and_fp32():
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    scale = torch.tensor(10.0)
    a = contrastive_loss(img, txt, scale)
    b = contrastive_loss(img, txt, scale, sample_ids=torch.tensor([7, 3, 9, 1]))
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    # half-precision inputs are computed in fp32
    c = contrastive_loss(img.half(), txt.half(), scale.half())
    assert c.dtype == torch.float32 and c.item() == pytest.approx(a.item(), abs=5e-2)


@pytest.mark.parametrize("ids", [None, [0, 1, 0, 2, 1, 3]])
def test_sigmoid_loss_matches_brute_force(ids):
    g = torch.Generator().manual_seed(2)
    img = torch.randn(6, 5, generator=g, dtype=torch.float64)
    txt = torch.randn(6, 5, generator=g, dtype=torch.float64)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    sample_ids = None if ids is None else torch.tensor(ids)
    loss = sigmoid_loss(img, txt, scale, bias, sample_ids=sample_ids)
    assert loss.item() == pytest.approx(_brute_siglip(img, txt, 10.0, -10.0, ids), abs=1e-10)


def test_gather_with_grad_is_identity_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x


def _brute_sym_ce(logits: list[list[float]]) -> float:
    m = len(logits)
    total = 0.0
    for i in range(m):
        total += -(logits[i][i] - _logsumexp(logits[i])) / m  # rows
        col = [logits[j][i] for j in range(m)]
        total += -(logits[i][i] - _logsumexp(col)) / m  # columns
    return total / 2


def _brute_alignment(pv, pw, tau_l, tau_t, normalize):
    k, p = pv.shape[:2]
    uv = [[float(pv[a, b].mean()) for b in range(p)] for a in range(k)]
    uw = [[float(pw[a, b].mean()) for b in range(p)] for a in range(k)]

    def sim(x, y):
        dot = sum(xi * yi for xi, yi in zip(x, y))
        if normalize:
            dot /= math.sqrt(sum(xi * xi for xi in x)) * math.sqrt(sum(yi * yi for yi in y))
        return dot

    layer = [[sim(uv[a], uw[b]) / tau_l for b in range(k)] for a in range(k)]
    col_v = [[uv[a][c] for a in range(k)] for c in range(p)]  # token c's profile over layers
    col_w = [[uw[a][c] for a in range(k)] for c in range(p)]
    token = [[sim(col_v[a], col_w[b]) / tau_t for b in range(p)] for a in range(p)]
    return _brute_sym_ce(layer), _brute_sym_ce(token)


@pytest.mark.parametrize("normalize", [False, True])
def test_hierarchical_alignment_matches_brute_force(normalize):
    g = torch.Generator().manual_seed(3)
    pv = torch.randn(3, 4, 6, generator=g, dtype=torch.float64) * 0.1
    pw = torch.randn(3, 4, 5, generator=g, dtype=torch.float64) * 0.1  # different hidden width
    out = hierarchical_alignment_loss(
        pv, pw, layer_temperature=0.5, token_temperature=0.2, normalize=normalize, layer_weight=2.0, token_weight=0.5
    )
    layer, token = _brute_alignment(pv, pw, 0.5, 0.2, normalize)
    assert out["layer"].item() == pytest.approx(layer, abs=1e-10)
    assert out["token"].item() == pytest.approx(token, abs=1e-10)
    assert out["total"].item() == pytest.approx(2.0 * layer + 0.5 * token, abs=1e-10)


def test_hierarchical_alignment_single_layer_is_zero_and_has_grad():
    pv = torch.randn(1, 4, 6, requires_grad=True)
    pw = torch.randn(1, 4, 5, requires_grad=True)
    out = hierarchical_alignment_loss(pv, pw)
    assert out["layer"].item() == 0.0
    out["total"].backward()
    assert pv.grad is not None and torch.isfinite(pv.grad).all()
    with pytest.raises(ValueError, match="same K and P"):
        hierarchical_alignment_loss(torch.randn(2, 4, 6), torch.randn(3, 4, 6))


def _brute_task(prompts, targets, tau: float, double_sigmoid: bool) -> float:
    t = prompts.shape[0]
    rows = []
    for i in range(t):
        pos, neg = [], []
        for j in range(t):
            if i == j:
                continue
            logit = _cos(prompts[i], prompts[j]) / tau
            if double_sigmoid:
                logit = 1.0 / (1.0 + math.exp(-logit)) if logit > -700 else 0.0
            (pos if targets[i][j] else neg).append(logit)
        if not pos and not neg:
            continue
        value = 0.0
        if pos:
            value += sum(_softplus(-x) for x in pos) / len(pos)  # BCE-with-logits(x, 1)
        if neg:
            value += sum(_softplus(x) for x in neg) / len(neg)  # BCE-with-logits(x, 0)
        rows.append(value)
    return sum(rows) / len(rows)


@pytest.mark.parametrize("double_sigmoid", [False, True])
@pytest.mark.parametrize("tau", [0.5, 0.001])
def test_task_contrastive_matches_brute_force(double_sigmoid, tau):
    g = torch.Generator().manual_seed(4)
    prompts = torch.randn(4, 7, generator=g, dtype=torch.float64)
    targets = torch.tensor(
        [[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool
    )  # row 3: no positives
    loss = task_contrastive_loss(prompts, targets, current_task=2, temperature=tau, double_sigmoid=double_sigmoid)
    assert loss.item() == pytest.approx(_brute_task(prompts, targets.tolist(), tau, double_sigmoid), abs=1e-9)


def test_task_contrastive_double_sigmoid_pinned_by_hand():
    # Three tasks in 2-D: e1 = (1, 0), e2 = (0, 1), e3 = (1, 1) (cosines: G12 = 0, G13 = G23 = 1/sqrt(2) ~ 0.7071).
    # Targets: 1-3 and 2-3 similar, 1-2 not. tau = 0.001, so G/tau = 0 for (1,2) and ~707.1 for (1,3), (2,3).
    # Correct loss (BCE-with-logits on G/tau):
    #   row 1: pos (3): softplus(-707.1) ~ 0;  neg (2): softplus(0) = ln 2 = 0.693147   -> 0.693147
    #   row 2: same as row 1                                                         -> 0.693147
    #   row 3: pos (1, 2): ~0 each; no negatives                                      -> 0
    #   mean = 2 ln 2 / 3 = 0.462098
    # Reference bug (BCE-with-logits on sigmoid(G/tau)): sigmoid(707.1) = 1, sigmoid(0) = 0.5
    #   row 1: pos: softplus(-1) = ln(1 + e^-1) = 0.313262;  neg: softplus(0.5) = ln(1 + e^0.5) = 0.974077 -> 1.287339
    #   row 2: same                                                                             -> 1.287339
    #   row 3: pos: softplus(-1) = 0.313262 (both)                                              -> 0.313262
    #   mean = (2 * 1.287339 + 0.313262) / 3 = 0.962646
    prompts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    targets = torch.tensor([[0, 0, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
    bug = task_contrastive_loss(prompts, targets, current_task=2, temperature=0.001, double_sigmoid=True)
    good = task_contrastive_loss(prompts, targets, current_task=2, temperature=0.001)
    assert bug.item() == pytest.approx(0.962646, abs=1e-5)
    assert good.item() == pytest.approx(0.462098, abs=1e-5)
    assert abs(bug.item() - good.item()) > 0.4


def test_task_contrastive_gradient_only_to_current_row():
    g = torch.Generator().manual_seed(5)
    prompts = torch.randn(4, 6, generator=g).requires_grad_()
    targets = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 1], [1, 0, 1, 0]], dtype=torch.bool)
    task_contrastive_loss(prompts, targets, current_task=1, temperature=0.5).backward()
    assert prompts.grad[1].abs().sum() > 0
    assert torch.count_nonzero(prompts.grad[[0, 2, 3]]) == 0


def test_task_contrastive_no_nan_without_positives_or_negatives():
    prompts = torch.randn(3, 4, requires_grad=True)
    none_similar = torch.zeros(3, 3, dtype=torch.bool)
    all_similar = ~torch.eye(3, dtype=torch.bool)
    for targets in (none_similar, all_similar):
        loss = task_contrastive_loss(prompts, targets, current_task=2)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(prompts.grad).all()
    # a zero prompt (cosine undefined) stays finite too
    zero = torch.zeros(2, 4, requires_grad=True)
    assert torch.isfinite(task_contrastive_loss(zero, all_similar[:2, :2], current_task=1))


def test_task_contrastive_single_task_is_zero_with_grad_path():
    prompts = torch.randn(1, 5, requires_grad=True)
    loss = task_contrastive_loss(prompts, torch.zeros(1, 1, dtype=torch.bool), current_task=0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(prompts.grad, torch.zeros(1, 5))


def test_task_contrastive_rejects_bad_inputs():
    with pytest.raises(ValueError, match="targets"):
        task_contrastive_loss(torch.randn(3, 4), torch.zeros(2, 2, dtype=torch.bool), current_task=0)
    with pytest.raises(ValueError, match="current_task"):
        task_contrastive_loss(torch.randn(3, 4), torch.zeros(3, 3, dtype=torch.bool), current_task=3)
