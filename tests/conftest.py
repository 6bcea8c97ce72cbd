"""Shared test fixtures: one intra-op thread for tiny models, tiny dual encoders and batches (from helpers.py).

`helpers.py` keeps the builders as plain functions, because scripts the tests start in subprocesses
(fault_run.py, dist_workers.py) import them too; the fixtures here hand them to tests. pytest puts this folder on
`sys.path` (rootdir conftest), so test files and spawned workers import `helpers`, `dist_workers`, `fault_run`
without editing `sys.path` themselves.

Markers (setup.cfg): `slow` (end-to-end runs; `python -m pytest -m "not slow"` is the quick subset, under a minute
on a quiet 2-core machine) and `distributed` (several CPU processes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from helpers import TINY_BUILDERS, random_batch
from torch import nn


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is faster than two on shared CPU cores (restored afterwards).

    Use it per module with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_model() -> Callable[..., nn.Module]:
    """Factory: `tiny_model("clip" | "siglip" | "vit_bert", attn="sdpa", **sizes)`, a tiny random dual encoder."""

    def build(kind: str, *args, **kwargs) -> nn.Module:
        return TINY_BUILDERS[kind](*args, **kwargs)

    return build


@pytest.fixture
def tiny_batch() -> Callable[..., dict[str, torch.Tensor]]:
    """Factory: `tiny_batch(kind, batch=4, seq=8, pad_rows=(), seed=1)`, pixel_values / input_ids / attention_mask."""
    return random_batch
