"""Global-batch losses on 2 CPU processes (gloo) equal the single-process full-batch losses and gradients."""

from __future__ import annotations

import time
from pathlib import Path

import dist_workers  # tests/ is on sys.path (conftest.py); spawned workers inherit it and unpickle `dist_workers.*`
import pytest
import torch
import torch.multiprocessing as mp

import peft_lpi.continual.losses  # noqa: F401  (the real module, used by dist_workers in this process)

WORLD_SIZE = 2
DEADLINE_S = 120.0


def _run_workers(fn, tmp_path: Path) -> list[dict]:
    """Start WORLD_SIZE spawned workers, join them with a deadline (kill leftovers), return their saved results."""
    store = tmp_path / "store"
    out = tmp_path / "out"
    out.mkdir()
    ctx = mp.start_processes(
        fn, args=(WORLD_SIZE, str(store), str(out)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1.0):  # raises if a worker failed, with its traceback
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {DEADLINE_S:.0f} s")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.mark.distributed
@pytest.mark.slow
def test_global_batch_losses_match_single_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned ranks
    results = _run_workers(dist_workers.loss_parity_worker, tmp_path)

    images, texts, ids = dist_workers.global_batch()
    n = dist_workers.GLOBAL_BATCH // WORLD_SIZE
    model = dist_workers.TinyDualEncoder()
    for case in dist_workers.CASES:
        full_loss, full_grads = dist_workers.loss_and_grads(case, model, images, texts, ids)
        mean_loss = sum(r[case]["loss"] for r in results) / WORLD_SIZE
        assert mean_loss == pytest.approx(full_loss, abs=1e-5), case
        for rank, r in enumerate(results):
            assert set(r[case]["grads"]) == set(full_grads)
            for name, grad in full_grads.items():
                torch.testing.assert_close(
                    r[case]["grads"][name], grad, atol=1e-5, rtol=0, msg=f"{case} {name} rank {rank}"
                )
            # gather=False under several processes: the loss of this rank's shard alone
            shard = slice(rank * n, (rank + 1) * n)
            local_loss, _ = dist_workers.loss_and_grads(case, model, images[shard], texts[shard], ids[shard])
            assert r[case]["local_loss"] == pytest.approx(local_loss, abs=1e-5), case
