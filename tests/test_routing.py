"""k-means task keys, nearest-key routing and routing accuracy."""

from __future__ import annotations

import math

import pytest
import torch

from peft_lpi.tuner.routing import kmeans, nearest_task, routing_accuracy


def _blobs(n_per: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four tight blobs around orthogonal unit directions in 8-D (already normalised centres)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(8)[:4] * 3.0  # (4, 8)
    x = centres.repeat_interleave(n_per, 0) + 0.05 * torch.randn(4 * n_per, 8, generator=g)
    perm = torch.randperm(x.shape[0], generator=g)
    return x[perm], torch.eye(8)[:4]


def _match(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Largest distance from a true centre to its nearest found centre."""
    return torch.cdist(truth, found).min(dim=1).values.max().item()


def test_kmeans_recovers_blob_centres():
    x, truth = _blobs()
    centres = kmeans(x, k=4, seed=0)
    assert centres.shape == (4, 8) and centres.dtype == torch.float32
    assert _match(centres, truth) < 0.02  # normalised blobs centre near the unit directions


def test_kmeans_streaming_equals_tensor_and_is_deterministic():
    x, _ = _blobs(n_per=150, seed=1)
    x = torch.cat([x, torch.randn(100, 8)])  # some spread so assignments are not trivial
    a = kmeans(x, k=5, seed=3, num_iters=20)
    b = kmeans(x, k=5, seed=3, num_iters=20)
    assert torch.equal(a, b)
    stream = kmeans(lambda: iter(x.split(37)), k=5, seed=3, num_iters=20)
    torch.testing.assert_close(stream, a, atol=1e-6, rtol=0)
    # a small init sample is chosen by row index, so chunking still does not matter
    s1 = kmeans(x, k=5, seed=3, num_iters=20, init_sample_size=50)
    s2 = kmeans(lambda: (c for c in x.split(64)), k=5, seed=3, num_iters=20, init_sample_size=50)
    torch.testing.assert_close(s1, s2, atol=1e-6, rtol=0)


def test_kmeans_small_and_empty_inputs():
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    with pytest.warns(UserWarning, match="only 2 samples"):
        out = kmeans(x, k=5)
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="task has no samples"):
        kmeans(torch.empty(0, 4), k=5)
    with pytest.raises(ValueError, match="task has no samples"):
        kmeans(lambda: iter([]), k=5)


def test_kmeans_duplicate_points_and_unnormalised():
    x = torch.tensor([[1.0, 0.0]] * 6 + [[0.0, 2.0]] * 6)
    centres = kmeans(x, k=3, normalize=False)  # only 2 distinct points: no crash, finite centres
    assert torch.isfinite(centres).all()
    assert _match(centres, torch.tensor([[1.0, 0.0], [0.0, 2.0]])) < 1e-6


def _brute_nearest(features, keys, metric, available=None):
    out = []
    for f in features:
        f = f / f.norm()
        best, best_t = math.inf, -1
        for t in range(keys.shape[0]):
            if available is not None and not available[t]:
                continue
            for key in keys[t]:
                if metric == "l1":
                    d = sum(abs(float(a) - float(b)) for a, b in zip(f, key))
                elif metric == "l2":
                    d = math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(f, key)))
                else:
                    d = 1 - float(f @ key) / float(key.norm())
                if d < best:
                    best, best_t = d, t
        out.append(best_t)
    return out


@pytest.mark.parametrize("metric", ["l1", "l2", "cosine"])
def test_nearest_task_matches_brute_force(metric):
    g = torch.Generator().manual_seed(7)
    keys = torch.randn(4, 3, 5, generator=g)
    features = torch.randn(40, 5, generator=g)
    pred = nearest_task(features, keys, metric, chunk_size=7)
    assert pred.dtype == torch.long and pred.shape == (40,)
    assert pred.tolist() == _brute_nearest(features, keys, metric)
    available = torch.tensor([True, False, True, False])
    pred = nearest_task(features, keys, metric, available=available)
    assert pred.tolist() == _brute_nearest(features, keys, metric, available.tolist())


def test_nearest_task_errors():
    keys = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="no task is available"):
        nearest_task(torch.randn(5, 4), keys, available=torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="metric"):
        nearest_task(torch.randn(5, 4), keys, metric="l3")
    with pytest.raises(ValueError, match="same D"):
        nearest_task(torch.randn(5, 3), keys)


def test_routing_accuracy_hand_example():
    predicted = torch.tensor([0, 0, 1, 1, 2, 0])
    true = torch.tensor([0, 1, 1, 1, 0, 0])
    out = routing_accuracy(predicted, true, num_tasks=4)
    assert out["accuracy"] == pytest.approx(4 / 6)
    # task 0: samples 0, 4, 5 -> correct 0, 5 (2/3); task 1: samples 1, 2, 3 -> correct 2, 3 (2/3); 2, 3 absent
    assert out["per_task"][:2] == pytest.approx([2 / 3, 2 / 3])
    assert out["per_task"][2:] == [None, None]
    assert out["confusion"] == [[2, 0, 1, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert out["num_samples"] == 6
    assert routing_accuracy(torch.tensor([1]), torch.tensor([1]))["per_task"] == [None, 1.0]
