"""Workers for the multi-process tests (an importable module: spawned processes unpickle them by name).

Each worker joins a gloo group through a FileStore (no port), runs its checks and writes its results with
`torch.save` to `out_dir/rank{rank}.pt`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist
from torch import nn


def _losses_module() -> ModuleType:
    """`peft_lpi.continual.losses`, without importing the package in a fresh worker.

    `import peft_lpi` imports PEFT and transformers (10-20 s per process on a busy 2-core machine); the losses are
    pure torch, so a spawned worker loads the same file directly. In the test process the package is already
    imported and the real module is used.
    """
    if "peft_lpi.continual.losses" in sys.modules:
        return sys.modules["peft_lpi.continual.losses"]
    name = "_peft_lpi_losses_for_workers"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "peft_lpi" / "continual" / "losses.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_losses = _losses_module()
contrastive_loss, sigmoid_loss = _losses.contrastive_loss, _losses.sigmoid_loss

GLOBAL_BATCH = 8
IMAGE_DIM, TEXT_DIM, EMBED_DIM = 6, 5, 4
SAMPLE_IDS = [0, 1, 2, 0, 3, 1, 4, 5]  # positives shared across the two ranks' halves (0: 0 & 3, 1: 1 & 5)
CASES = ["clip", "clip_ids", "siglip", "siglip_ids"]


class TinyDualEncoder(nn.Module):
    """Two linear projections plus a learnable logit scale (log) and bias: a parametric stand-in for CLIP/SigLIP."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image_proj = nn.Linear(IMAGE_DIM, EMBED_DIM)
        self.text_proj = nn.Linear(TEXT_DIM, EMBED_DIM)
        self.log_scale = nn.Parameter(torch.tensor(2.0))
        self.bias = nn.Parameter(torch.tensor(-3.0))


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full batch every process derives its shard from: images (N, 6), texts (N, 5), sample ids (N,)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, IMAGE_DIM, generator=g)
    texts = torch.randn(GLOBAL_BATCH, TEXT_DIM, generator=g)
    return images, texts, torch.tensor(SAMPLE_IDS)


def loss_and_grads(
    case: str, model: TinyDualEncoder, images: torch.Tensor, texts: torch.Tensor, ids: torch.Tensor, gather: bool = True
) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss of one case on (a shard of) the batch and the parameter gradients of that loss."""
    model.zero_grad(set_to_none=True)
    image_embeds, text_embeds = model.image_proj(images), model.text_proj(texts)  # (n, 4), (n, 4)
    sample_ids = ids if case.endswith("_ids") else None
    scale = model.log_scale.exp()
    if case.startswith("clip"):
        loss = contrastive_loss(image_embeds, text_embeds, scale, sample_ids=sample_ids, gather=gather)
    else:
        loss = sigmoid_loss(image_embeds, text_embeds, scale, model.bias, sample_ids=sample_ids, gather=gather)
    loss.backward()
    grads = {
        name: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        for name, p in model.named_parameters()
    }
    return loss.item(), grads


def loss_parity_worker(rank: int, world_size: int, store_path: str, out_dir: str) -> None:
    """Per case: this rank's loss (gather=True and gather=False) and the DDP-style mean of the ranks' gradients."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store_path, world_size),
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        assert dist.get_world_size() == world_size
        images, texts, ids = global_batch()
        n = GLOBAL_BATCH // world_size
        shard = slice(rank * n, (rank + 1) * n)
        model = TinyDualEncoder()
        results: dict[str, dict] = {}
        for case in CASES:
            loss, grads = loss_and_grads(case, model, images[shard], texts[shard], ids[shard])
            for g in grads.values():  # what DDP does: mean of the ranks' gradients
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                g /= world_size
            local_loss, _ = loss_and_grads(case, model, images[shard], texts[shard], ids[shard], gather=False)
            results[case] = {"loss": loss, "grads": grads, "local_loss": local_loss}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
