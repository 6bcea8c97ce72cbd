"""Task keys and task-identity routing.

After a task is trained, `kmeans` summarises the (L2-normalised, prompt-free) features of its training data into
k keys; at inference `nearest_task` sends each query to the task owning its nearest key, and `routing_accuracy`
scores that choice against the true task ids. Everything is vectorised (no per-sample Python loops) and follows the
inputs' device.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["kmeans", "nearest_task", "routing_accuracy"]

FeatureSource = Tensor | Callable[[], Iterable[Tensor]]

_P31 = 2**31 - 1  # prime modulus of the row-priority hash


# ----------------------------------------------------------------------------------------------------------------------
# k-means
# ----------------------------------------------------------------------------------------------------------------------


def _row_priority(index: Tensor, seed: int) -> Tensor:
    """Deterministic pseudo-random priority of global row indices (< 2**31), unique per row.

    Used for the init sample: the rows with the smallest priorities form a uniform-like sample that depends only on
    (seed, row index), never on how the rows are chunked.
    """
    rng = random.Random(seed)
    a1, b1, a2, b2 = (rng.randrange(1, _P31) for _ in range(4))
    x = (index * a1 + b1) % _P31  # products < 2**62: no int64 overflow
    x = x ^ (x >> 16)
    x = (x * a2 + b2) % _P31
    return x * 2**31 + index  # unique: ties broken by the row index


def _prepare(chunk: Tensor, dim: int | None, normalize: bool, device: torch.device | None) -> Tensor:
    if chunk.ndim != 2 or (dim is not None and chunk.shape[1] != dim):
        raise ValueError(f"feature chunks must be (n, {dim if dim is not None else 'D'}), got {tuple(chunk.shape)}.")
    x = chunk.detach().to(device=device, dtype=torch.float32)
    return F.normalize(x, dim=-1) if normalize else x


def _sample_pass(
    chunks: Callable[[], Iterable[Tensor]], max_rows: int, seed: int, normalize: bool
) -> tuple[Tensor, int]:
    """One pass: count the rows and keep the `max_rows` rows of smallest priority (in row order).

    Returns (sample (m, D) float32, N). Memory O(max_rows * D + chunk).
    """
    sample: Tensor | None = None
    prio: Tensor | None = None
    total, dim, device = 0, None, None
    for chunk in chunks():
        if device is None:
            device = chunk.device
        x = _prepare(chunk, dim, normalize, device)  # (n, D)
        dim = x.shape[1]
        if x.shape[0] == 0:
            continue
        p = _row_priority(torch.arange(total, total + x.shape[0], device=device), seed)  # (n,)
        total += x.shape[0]
        sample = x if sample is None else torch.cat([sample, x])
        prio = p if prio is None else torch.cat([prio, p])
        if sample.shape[0] > max_rows:
            keep = torch.topk(prio, max_rows, largest=False).indices
            sample, prio = sample[keep], prio[keep]
    if sample is None:
        raise ValueError("kmeans: the task has no samples (empty features); cannot build its keys.")
    order = torch.argsort(prio % 2**31)  # back to row order
    return sample[order], total


def _kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Greedy k-means++ seeding on x (m, D), m >= k, as scikit-learn's `KMeans(init="k-means++")`.

    Each new centre is the best of 2 + int(log k) candidates sampled proportionally to the squared distance to the
    nearest chosen centre (the one that lowers the potential most). Sampling runs on the CPU generator. Returns (k, D).
    """
    m = x.shape[0]
    trials = 2 + int(math.log(k))
    chosen = [int(torch.randint(m, (1,), generator=generator))]
    d2 = ((x - x[chosen[0]]) ** 2).sum(dim=1).double()  # (m,) squared distance to the nearest chosen centre
    for _ in range(1, k):
        total = d2.sum()
        if total > 0:
            candidates = torch.multinomial((d2 / total).cpu(), trials, replacement=True, generator=generator)
            candidates = candidates.to(x.device)
            cand_d2 = torch.cdist(x[candidates], x, compute_mode="donot_use_mm_for_euclid_dist").double() ** 2
            potentials = torch.minimum(d2[None, :], cand_d2).sum(dim=1)  # (trials,)
            best = int(potentials.argmin())
            idx = int(candidates[best])
            d2 = torch.minimum(d2, cand_d2[best])
        else:  # fewer than k distinct points: take the first unused row (duplicates are harmless)
            idx = next(i for i in range(m) if i not in chosen)
            d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(dim=1).double())
        chosen.append(idx)
    return x[chosen].clone()  # (k, D)


def _lloyd_in_memory(x: Tensor, centres: Tensor, num_iters: int, tol: float) -> tuple[Tensor, float]:
    """Lloyd's iterations on an in-memory x (m, D) from `centres` (k, D). Returns (centres, inertia)."""
    k = centres.shape[0]
    for _ in range(num_iters):
        d = torch.cdist(x, centres, compute_mode="donot_use_mm_for_euclid_dist")  # (m, k)
        assign = d.argmin(dim=1)
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, assign, x.double())
        counts = torch.bincount(assign, minlength=k).double()
        new = (sums / counts.clamp_min(1)[:, None]).to(centres.dtype)
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:  # deterministic: i-th empty cluster <- i-th farthest point
            far = torch.topk(d.gather(1, assign[:, None]).squeeze(1), min(len(empty), x.shape[0])).indices
            for rank, c in enumerate(empty):
                new[c] = x[far[min(rank, far.shape[0] - 1)]]
        shift = (new - centres).norm(dim=1).max().item()
        centres = new
        if shift <= tol and not empty:
            break
    d = torch.cdist(x, centres, compute_mode="donot_use_mm_for_euclid_dist")
    return centres, float((d.amin(dim=1).double() ** 2).sum())


def _lloyd_pass(
    chunks: Callable[[], Iterable[Tensor]], centres: Tensor, normalize: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One assignment pass. Returns (sums (k, D) f64, counts (k,) f64, far_d (<=k,), far_x (<=k, D)): per-centre
    sums and counts, and the points farthest from their centre (descending), to re-seed empty clusters."""
    k, dim = centres.shape
    sums = torch.zeros(k, dim, dtype=torch.float64, device=centres.device)
    counts = torch.zeros(k, dtype=torch.float64, device=centres.device)
    far_d = centres.new_empty(0)
    far_x = centres.new_empty(0, dim)
    for chunk in chunks():
        x = _prepare(chunk, dim, normalize, centres.device)  # (n, D)
        if x.shape[0] == 0:
            continue
        # exact per-pair distances: the result of a row does not depend on the chunking
        d = torch.cdist(x, centres, compute_mode="donot_use_mm_for_euclid_dist")  # (n, k)
        assign = d.argmin(dim=1)  # (n,)  (argmin + gather: Tensor.min(dim) is much slower on CPU)
        dmin = d.gather(1, assign[:, None]).squeeze(1)  # (n,)
        sums.index_add_(0, assign, x.double())
        counts.index_add_(0, assign, torch.ones_like(dmin, dtype=torch.float64))
        cand_d = torch.cat([far_d, dmin])
        cand_x = torch.cat([far_x, x])
        top = torch.topk(cand_d, min(k, cand_d.shape[0])).indices
        far_d, far_x = cand_d[top], cand_x[top]
    return sums, counts, far_d, far_x


def kmeans(
    features: FeatureSource,
    k: int = 5,
    *,
    num_iters: int = 50,
    seed: int = 0,
    normalize: bool = True,
    tol: float = 1e-6,
    chunk_size: int = 65536,
    init_sample_size: int = 10_000,
    n_init: int = 4,
) -> Tensor:
    """k-means (greedy k-means++ and Lloyd), in memory or streaming, deterministic given `seed`.

    Args:
        features: (N, D) tensor, or a callable returning a FRESH iterator of (n_i, D) chunks each time it is called
            (e.g. `lambda: (encode(batch) for batch in loader)`); the data are read 1 + (Lloyd iterations) times.
        k: number of centres (task keys).
        num_iters: maximum Lloyd iterations (one pass over the data each).
        seed: seeds a `torch.Generator` (k-means++ sampling) and the init sample.
        normalize: L2-normalise every feature row first (the keys are centres of normalised features).
        tol: stop when no centre moves by more than this (L2).
        chunk_size: rows per chunk when `features` is a tensor.
        init_sample_size: k-means++ runs on a sample of at most this many rows, chosen by a seeded hash of the row
            index, so a tensor and a stream of the same rows (in the same order) give the same result.
        n_init: restarts: `n_init` greedy k-means++ seedings, each refined by Lloyd on the sample; the one of lowest
            inertia on the sample seeds the Lloyd passes over all the data (when the data fit in the sample, the
            sample is the data and no further pass is needed). scikit-learn's `KMeans(n_clusters=5, random_state=0)`
            (the reference) runs one greedy k-means++ seeding; several restarts make ours at least as good on
            average (tests/test_reference_fidelity.py).

    Memory: O(init_sample_size * D) for the init sample plus O(k * D + chunk * (k + D)) per pass; the features are
    never held in full. Empty clusters are re-seeded to the point farthest from its centre in the last pass.

    Returns:
        (k, D) float32 centres on the features' device. If N < k, warns and returns the N (normalised) points.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if isinstance(features, Tensor):
        tensor = _prepare(features, None, normalize, features.device) if normalize else features  # once, not per pass
        normalize = False

        def chunks() -> Iterator[Tensor]:
            return iter(tensor.split(chunk_size)) if tensor.shape[0] else iter([tensor])

    elif callable(features):
        chunks = features
    else:
        raise TypeError("features must be a (N, D) tensor or a callable returning an iterator of (n, D) chunks.")

    sample, total = _sample_pass(chunks, max(init_sample_size, k), seed, normalize)  # (m, D)
    if total == 0:
        raise ValueError("kmeans: the task has no samples (empty features); cannot build its keys.")
    if total < k:
        warnings.warn(f"kmeans: only {total} samples for k={k}; returning the {total} points as centres.", stacklevel=2)
        return sample

    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}.")
    generator = torch.Generator().manual_seed(seed)
    best: tuple[Tensor, float] | None = None
    for _ in range(n_init):
        seeded = _kmeans_plus_plus(sample, k, generator)  # (k, D)
        candidate = _lloyd_in_memory(sample, seeded, num_iters, tol)
        if best is None or candidate[1] < best[1]:
            best = candidate
    centres = best[0]
    whole = sample.shape[0] == total  # the sample is all the data: Lloyd on it has already converged
    del sample
    for _ in range(0 if whole else num_iters):
        sums, counts, far_d, far_x = _lloyd_pass(chunks, centres, normalize)
        new = (sums / counts.clamp_min(1)[:, None]).to(centres.dtype)  # (k, D)
        empty = torch.nonzero(counts == 0).flatten().tolist()
        for rank, c in enumerate(empty):  # deterministic: i-th empty cluster <- i-th farthest point
            new[c] = far_x[min(rank, far_x.shape[0] - 1)]
        shift = (new - centres).norm(dim=1).max().item()
        centres = new
        if shift <= tol and not empty:
            break
    return centres


# ----------------------------------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------------------------------


def _distances(x: Tensor, keys: Tensor, metric: str) -> Tensor:
    """(n, D) x (M, D) -> (n, M) distances."""
    if metric == "l1":
        return torch.cdist(x, keys, p=1.0)
    if metric == "l2":
        return torch.cdist(x, keys, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    return 1.0 - F.normalize(x, dim=-1) @ F.normalize(keys, dim=-1).T  # cosine distance


def nearest_task(
    features: Tensor,
    keys: Tensor,
    metric: str = "l1",
    *,
    normalize: bool = True,
    chunk_size: int = 4096,
    available: Tensor | None = None,
) -> Tensor:
    """Route each query to the task owning its nearest key.

    Args:
        features: (N, D) prompt-free query features.
        keys: (T, k, D) task keys (pad a task with fewer keys by repeating one of its keys).
        metric: "l1" (reference), "l2" or "cosine" (1 - cos).
        normalize: L2-normalise the query features (keys are used as given: centres of normalised features).
        chunk_size: queries per chunk; memory O(chunk_size * T * k).
        available: optional (T,) bool mask; tasks marked False are never chosen.

    Returns:
        (N,) LongTensor of task indices, argmin over tasks of min over that task's keys of the distance.
    """
    if metric not in ("l1", "l2", "cosine"):
        raise ValueError(f"metric must be 'l1', 'l2' or 'cosine', got {metric!r}.")
    if keys.ndim != 3 or features.ndim != 2 or keys.shape[2] != features.shape[1]:
        raise ValueError(
            f"features must be (N, D) and keys (T, k, D) with the same D, got {tuple(features.shape)} and "
            f"{tuple(keys.shape)}."
        )
    num_tasks, num_keys, dim = keys.shape
    device = features.device
    if available is None:
        available = torch.ones(num_tasks, dtype=torch.bool, device=device)
    else:
        available = available.to(device=device, dtype=torch.bool)
        if available.shape != (num_tasks,):
            raise ValueError(f"available must have shape ({num_tasks},), got {tuple(available.shape)}.")
    if not available.any():
        raise ValueError("nearest_task: no task is available for routing (all tasks masked out or no keys yet).")
    keys = keys.detach().to(device=device, dtype=torch.float32)
    if not torch.isfinite(keys[available]).all():
        raise ValueError("nearest_task: keys of an available task contain NaN or inf.")
    keys = torch.where(available[:, None, None], keys, torch.zeros((), device=device))  # NaN keys of absent tasks
    flat = keys.reshape(num_tasks * num_keys, dim)  # (T*k, D)
    blocked = torch.where(available, 0.0, float("inf"))  # (T,)

    out = []
    for x in features.detach().split(chunk_size):
        x = x.float()
        if normalize:
            x = F.normalize(x, dim=-1)
        d = _distances(x, flat, metric).view(-1, num_tasks, num_keys).amin(dim=2)  # (n, T)
        out.append((d + blocked).argmin(dim=1))
    if not out:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(out)


def routing_accuracy(predicted: Tensor, true: Tensor, num_tasks: int | None = None) -> dict:
    """Task-identity accuracy of routing.

    Returns {"accuracy": float, "per_task": [float | None] (None for tasks absent from `true`),
    "confusion": [[int]] (rows: true task, columns: predicted task), "num_samples": int}.
    """
    predicted = torch.as_tensor(predicted).detach().long().flatten().cpu()
    true = torch.as_tensor(true).detach().long().flatten().cpu()
    if predicted.shape != true.shape:
        raise ValueError(f"predicted and true must have the same length, got {predicted.numel()} and {true.numel()}.")
    if true.numel() == 0:
        raise ValueError("routing_accuracy: no samples.")
    if (predicted < 0).any() or (true < 0).any():
        raise ValueError("routing_accuracy: task ids must be >= 0.")
    seen = int(max(predicted.max(), true.max())) + 1
    if num_tasks is None:
        num_tasks = seen
    elif num_tasks < seen:
        raise ValueError(f"num_tasks={num_tasks} but task id {seen - 1} occurs.")
    confusion = torch.bincount(true * num_tasks + predicted, minlength=num_tasks * num_tasks).view(num_tasks, -1)
    support = confusion.sum(dim=1)  # (T,)
    correct = confusion.diagonal()
    per_task = [(correct[t] / support[t]).item() if support[t] > 0 else None for t in range(num_tasks)]
    return {
        "accuracy": (correct.sum() / true.numel()).item(),
        "per_task": per_task,
        "confusion": confusion.tolist(),
        "num_samples": int(true.numel()),
    }
