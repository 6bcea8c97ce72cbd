"""Probe the offline grounding world: zero-shot REC of the cached OWL-ViT backbone per task, then per-task LPI prompts.

It answers two questions before any continual grounding run: is the frozen backbone's zero-shot Precision@1 on each
task clearly above chance (and clearly imperfect), and do LPI prompts (both towers of the OWL-ViT detector, trained
with the REC loss on that task's scenes, task identity known) improve it?

    python examples/grounding_probe.py                  # LPI prompts P=8, K=4, r=4; 120 steps per task
    python examples/grounding_probe.py --steps 0        # zero-shot only
    python examples/grounding_probe.py --json probe.json

Precision@k: a validation (scene, expression) pair is a hit when the box of one of the k top-scoring patches has
IoU >= 0.5 with the referred box. "random patch" scores the same backbone's patch boxes with random scores (chance
for this detector); "1/objects" is the chance of picking the right object when the objects are found perfectly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoTokenizer, OwlViTForObjectDetection

from peft_lpi.continual.grounding_loss import rec_loss, rec_predictions, select_query_pairs
from peft_lpi.data.grounding_backbone import get_grounding_backbone, owl_layer_paths, scene_queries
from peft_lpi.data.grounding_world import GROUNDING_TASKS, build_grounding_benchmark, render_task_scenes
from peft_lpi.evaluation.grounding import rec_precision


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="world seed (benchmark and backbone)")
    p.add_argument("--backbone", default=None, help="backbone folder (default: the cached grounding backbone)")
    p.add_argument("--steps", type=int, default=120, help="optimisation steps per task (0: zero-shot only)")
    p.add_argument("--batch_size", type=int, default=32, help="scenes per step (every describable object a query)")
    p.add_argument("--lr", type=float, default=5e-2, help="Adam peak lr (cosine, 5%% warm-up)")
    p.add_argument("--prompt_length", type=int, default=8)
    p.add_argument("--prompt_depth", type=int, default=4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--train_per_task", type=int, default=1000, help="training scenes per task")
    p.add_argument("--val_per_task", type=int, default=250, help="validation (scene, expression) pairs per task")
    p.add_argument("--tasks", default=None, help="comma-separated task indices (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", default=None, help="write all numbers to this JSON file")
    return p.parse_args(argv)


def val_tensors(split: Any, task: int, processor: Any, tokenizer: Any) -> dict[str, torch.Tensor]:
    """One task's validation pairs through the backbone's own processor; boxes xyxy normalised."""
    part = split.select([i for i, t in enumerate(split["task"]) if t == task])
    images = [im.convert("RGB") for im in part["image"]]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    text = tokenizer(list(part["expression"]), padding=True, return_tensors="pt")
    sizes = torch.tensor([[im.width, im.height, im.width, im.height] for im in images], dtype=torch.float32)
    return {
        "pixel_values": pixels,
        "input_ids": text["input_ids"],
        "attention_mask": text["attention_mask"],
        "boxes": torch.tensor(list(part["box"]), dtype=torch.float32) / sizes,
    }


@torch.no_grad()
def precision(model: Any, data: dict[str, torch.Tensor], *, random_scores: bool = False) -> dict[str, float]:
    """P@1/5 of one query per image (each validation pair is its own image row)."""
    model.eval()
    boxes, scores = [], []
    for start in range(0, len(data["boxes"]), 125):
        stop = start + 125
        out = model(
            input_ids=data["input_ids"][start:stop],
            attention_mask=data["attention_mask"][start:stop],
            pixel_values=data["pixel_values"][start:stop],
        )
        logits = out.logits[..., 0]  # (B, N): one query per image
        if random_scores:
            logits = torch.rand(logits.shape, generator=torch.Generator().manual_seed(start))
        b, s = rec_predictions(logits, out.pred_boxes, top_k=5)
        boxes.append(b)
        scores.append(s)
    result = rec_precision(torch.cat(boxes), data["boxes"], ks=(1, 5))
    return {"P@1": result["P@1"], "P@5": result["P@5"]}


def train_task(model: Any, task: int, scenes: list, tokenizer: Any, processor: Any, args: argparse.Namespace) -> float:
    """Adam on task `task`'s LPI factors with the REC loss, every describable object of a scene a query."""
    params = model.base_model.train_task(task)
    optimizer = torch.optim.Adam(params, lr=args.lr)
    warmup = max(1, args.steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, args.steps - warmup)))
        ),
    )
    ids, mask, boxes, valid = scene_queries(scenes, tokenizer)
    pixels = processor(images=[s.image for s in scenes], return_tensors="pt")["pixel_values"]
    q = valid.shape[1]
    generator = torch.Generator().manual_seed(args.seed + task)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(args.steps):
        idx = torch.randint(0, len(scenes), (args.batch_size,), generator=generator)
        rows = (idx[:, None] * q + torch.arange(q)).reshape(-1)
        out = model(input_ids=ids[rows], attention_mask=mask[rows], pixel_values=pixels[idx])
        logits, pred_boxes, _ = select_query_pairs(out.logits, out.pred_boxes, valid[idx])
        loss = rec_loss(logits, pred_boxes, boxes[idx][valid[idx]]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    return float(loss.item())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    backbone = args.backbone or str(get_grounding_backbone(seed=args.seed))
    timings["get_backbone_s"] = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    processor = AutoImageProcessor.from_pretrained(backbone)

    start = time.perf_counter()
    data = build_grounding_benchmark(args.seed, 0, args.val_per_task)
    names = data["validation"].features["task"].names
    tasks = [int(t) for t in args.tasks.split(",")] if args.tasks else list(range(len(names)))
    val = {t: val_tensors(data["validation"], t, processor, tokenizer) for t in tasks}
    objects = {t: float(np.mean([len(s.objects) for s in render_task_scenes(t, args.seed, 200)])) for t in tasks}
    train = (
        {t: render_task_scenes(GROUNDING_TASKS[t], args.seed, args.train_per_task, split="train") for t in tasks}
        if args.steps
        else {}
    )
    timings["data_s"] = time.perf_counter() - start

    owl = OwlViTForObjectDetection.from_pretrained(backbone)
    model: Any = owl
    if args.steps:
        from peft import get_peft_model

        import peft_lpi  # noqa: F401  (registers LPI with PEFT)
        from peft_lpi import LPIConfig

        config = LPIConfig(
            num_tasks=len(names),
            prompt_length=args.prompt_length,
            prompt_depth=args.prompt_depth,
            rank=args.rank,
            layer_paths=owl_layer_paths(owl),
            text_causal=True,
        )
        model = get_peft_model(owl, config)

    rows: list[dict[str, Any]] = []
    for t in tasks:
        base = owl if not args.steps else model
        ctx = model.base_model.prompts_disabled() if args.steps else contextlib.nullcontext()
        with ctx:
            zero = precision(base, val[t])
            chance = precision(base, val[t], random_scores=True)
        row: dict[str, Any] = {
            "task": t,
            "name": names[t],
            "objects_per_scene": objects[t],
            "random_patch": chance,
            "zero_shot": zero,
        }
        if args.steps:
            start = time.perf_counter()
            row["final_loss"] = train_task(model, t, train[t], tokenizer, processor, args)
            row["train_s"] = time.perf_counter() - start
            model.base_model.set_task(t)
            row["prompted"] = precision(model, val[t])
        rows.append(row)
        print(_format_row(row), flush=True)

    summary = {"args": vars(args), "backbone": backbone, "timings": timings, "tasks": rows}
    print(_format_table(rows), flush=True)
    print("timings:", {k: round(v, 1) for k, v in timings.items()})
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _format_row(row: dict[str, Any]) -> str:
    z, r = row["zero_shot"], row["random_patch"]
    text = (
        f"[{row['task']}] {row['name']:<18} random {r['P@1']:5.1f} | zero-shot P@1 {z['P@1']:5.1f} P@5 {z['P@5']:5.1f}"
    )
    if "prompted" in row:
        p = row["prompted"]
        text += f" | LPI P@1 {p['P@1']:5.1f} P@5 {p['P@5']:5.1f} ({row['train_s']:.0f}s, loss {row['final_loss']:.2f})"
    return text


def _format_table(rows: list[dict[str, Any]]) -> str:
    prompted = all("prompted" in r for r in rows)
    head = "| task | objects | 1/objects | random patch P@1 | zero-shot P@1 | zero-shot P@5 |"
    if prompted:
        head += " LPI P@1 | LPI P@5 |"
    lines = [head, "|" + "---|" * (6 + 2 * prompted)]
    for r in rows:
        cells = [
            f"{r['objects_per_scene']:.2f}",
            f"{100 / r['objects_per_scene']:.1f}",
            f"{r['random_patch']['P@1']:.1f}",
            f"{r['zero_shot']['P@1']:.1f}",
            f"{r['zero_shot']['P@5']:.1f}",
        ]
        if prompted:
            cells += [f"{r['prompted'][k]:.1f} ({r['prompted'][k] - r['zero_shot'][k]:+.1f})" for k in ("P@1", "P@5")]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    avg = {k: float(np.mean([r["zero_shot"][k] for r in rows])) for k in ("P@1", "P@5")}
    cells = [
        "",
        "",
        f"{np.mean([r['random_patch']['P@1'] for r in rows]):.1f}",
        f"{avg['P@1']:.1f}",
        f"{avg['P@5']:.1f}",
    ]
    if prompted:
        cells += [
            f"{np.mean([r['prompted'][k] for r in rows]):.1f} "
            f"({np.mean([r['prompted'][k] for r in rows]) - avg[k]:+.1f})"
            for k in ("P@1", "P@5")
        ]
    lines.append("| **average** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
