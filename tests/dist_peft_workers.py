"""Worker for the DDP check of tests/test_peft_contract.py (an importable module: spawned processes unpickle it).

A user's own training loop on 2 gloo processes: `get_peft_model`, DistributedDataParallel with default settings
(find_unused_parameters=False), a few SGD steps on task 0, then `train_task(1)`, a fresh DDP wrapper and
TASK1_STEPS steps on task 1. Results go to `out_dir/rank{rank}.pt`.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

TASK0_STEPS, TASK1_STEPS = 2, 3


def _task_state(model, task: int) -> dict[str, torch.Tensor]:
    factors = model.base_model.lpi_prompts["default"].tasks[task]
    return {k: v.detach().clone() for k, v in factors.state_dict().items()}


def _train(ddp: DistributedDataParallel, batch: dict, steps: int) -> int:
    optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
    done = 0
    for _ in range(steps):
        optimizer.zero_grad()
        out = ddp(**batch)
        labels = torch.arange(out.logits_per_image.shape[0])
        loss = torch.nn.functional.cross_entropy(out.logits_per_image, labels)
        loss.backward()  # default DDP: fails here if a parameter requires grad but gets none
        optimizer.step()
        done += 1
    return done


def ddp_user_loop_worker(rank: int, world_size: int, store_path: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", store=dist.FileStore(store_path, world_size), rank=rank, world_size=world_size,
        timeout=timedelta(seconds=120),
    )
    try:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from helpers import random_batch, tiny_clip
        from peft import get_peft_model

        from peft_lpi import LPIConfig

        assert dist.get_world_size() == world_size
        torch.manual_seed(0)  # same base and factors on every rank
        model = get_peft_model(
            tiny_clip(layers=2), LPIConfig(num_tasks=2, prompt_depth=2, prompt_length=3, rank=2)
        )
        batch = random_batch("clip", 4, 8, seed=10 + rank)  # each rank its own shard
        _train(DistributedDataParallel(model), batch, TASK0_STEPS)
        task0_after_task0 = _task_state(model, 0)
        task1_before = _task_state(model, 1)
        model.train_task(1)
        trainable = [
            all(p.requires_grad for p in t.parameters()) for t in model.base_model.lpi_prompts["default"].tasks
        ]
        steps = _train(DistributedDataParallel(model), batch, TASK1_STEPS)
        torch.save(
            {
                "steps": steps,
                "task0_after_task0": task0_after_task0,
                "task0_final": _task_state(model, 0),
                "task1_before": task1_before,
                "task1_final": _task_state(model, 1),
                "trainable_after_train_task": trainable,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()
