"""Probe the offline world: zero-shot retrieval of the cached backbone per task, then per-task deep prompts.

It answers two questions about the demonstration world before any continual run: is the frozen backbone's
zero-shot retrieval on each task clearly imperfect, and can deep prompts trained on that task's data improve it?
Each task gets its own prompts (task identity known, no continual sequence, no routing): an upper bound on what
the prompts of a continual method can do on that task.

    python examples/world_probe.py                      # LPI prompts (P=8, K=4, r=4), 150 steps per task
    python examples/world_probe.py --prompts vpt        # full-rank VPT-deep prompts instead
    python examples/world_probe.py --steps 0            # zero-shot only

Recall is own-task: the task's validation images against their captions. "strict" counts only the image's own
caption (or, for t2i, the caption's own image); "caption-equal" also accepts a retrieved caption whose text is
identical to the ground truth (world captions repeat).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from peft_lpi.data.backbone import get_offline_backbone, multi_positive_clip_loss
from peft_lpi.data.world import build_offline_benchmark


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="world seed (benchmark and backbone)")
    p.add_argument("--backbone", default=None, help="backbone folder (default: the cached offline backbone)")
    p.add_argument("--prompts", choices=["lpi", "vpt"], default="lpi", help="prompt implementation")
    p.add_argument("--steps", type=int, default=150, help="optimisation steps per task (0: zero-shot only)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-2, help="Adam peak lr (cosine, 5%% warm-up)")
    p.add_argument("--prompt_length", type=int, default=8)
    p.add_argument("--prompt_depth", type=int, default=4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--train_per_task", type=int, default=1500)
    p.add_argument("--val_per_task", type=int, default=250)
    p.add_argument("--tasks", default=None, help="comma-separated task indices (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", default=None, help="write all numbers to this JSON file")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- data


def task_tensors(split: Any, task: int, processor: Any, tokenizer: Any) -> dict[str, Any]:
    """One task's images through the backbone's own processor, captions tokenised, caption-equality ids."""
    rows = [i for i, t in enumerate(split["task"]) if t == task]
    part = split.select(rows)
    captions = [c[0] for c in part["captions"]]
    pixels = processor(images=[im.convert("RGB") for im in part["image"]], return_tensors="pt")["pixel_values"]
    text = tokenizer(captions, padding=True, return_tensors="pt")
    unique = {c: i for i, c in enumerate(sorted(set(captions)))}
    return {
        "pixel_values": pixels,
        "input_ids": text["input_ids"],
        "attention_mask": text["attention_mask"],
        "caption_ids": torch.tensor([unique[c] for c in captions]),
    }


# ------------------------------------------------------------------------------------------- recall


def _embedding(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def own_task_recall(encode_image: Callable, encode_text: Callable, data: dict[str, Any]) -> dict[str, float]:
    """R@1 (percent) of a task's validation images vs. their captions, strict and caption-equal."""
    img = torch.cat([F.normalize(_embedding(encode_image(p)), dim=-1) for p in data["pixel_values"].split(256)])
    txt = torch.cat(
        [
            F.normalize(_embedding(encode_text(i, m)), dim=-1)
            for i, m in zip(data["input_ids"].split(256), data["attention_mask"].split(256))
        ]
    )
    sim = img @ txt.t()
    cap = data["caption_ids"]
    target = torch.arange(len(sim))
    i2t, t2i = sim.argmax(dim=1), sim.argmax(dim=0)
    return {
        "i2t": 100 * (i2t == target).float().mean().item(),
        "t2i": 100 * (t2i == target).float().mean().item(),
        "i2t_eq": 100 * (cap[i2t] == cap).float().mean().item(),
        "t2i_eq": 100 * (cap[t2i] == cap).float().mean().item(),
    }


# ------------------------------------------------------------------------------------------- prompts


class VPTDeep(nn.Module):
    """Minimal full-rank VPT-deep for a CLIPModel (eager attention): P tokens after position 0 in the first K layers.

    Hooks insert the prompts before each layer and strip them after it; the CLIP text causal mask is widened so
    every text token sees the prompts (inserted after BOS).
    """

    def __init__(self, clip: CLIPModel, length: int, depth: int) -> None:
        super().__init__()
        self.length = length
        dv, dt = clip.config.vision_config.hidden_size, clip.config.text_config.hidden_size
        self.vision = nn.Parameter(torch.randn(depth, length, dv) * 0.02)
        self.text = nn.Parameter(torch.randn(depth, length, dt) * 0.02)
        self.enabled = True
        self._handles = []
        for modality, layers in (
            ("vision", clip.vision_model.encoder.layers),
            ("text", clip.text_model.encoder.layers),
        ):
            for index, layer in enumerate(layers[:depth]):
                self._handles.append(layer.register_forward_pre_hook(self._pre(modality, index), with_kwargs=True))
                self._handles.append(layer.register_forward_hook(self._post(), with_kwargs=True))

    def _pre(self, modality: str, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if not self.enabled:
                return args, kwargs
            hidden = args[0]
            prompt = getattr(self, modality)[index].unsqueeze(0).expand(hidden.shape[0], -1, -1).to(hidden.dtype)
            hidden = torch.cat([hidden[:, :1], prompt, hidden[:, 1:]], dim=1)
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            if mask is not None:  # 4D additive (B, 1, L, L): prompt rows/columns visible to all
                b, h, q, k = mask.shape
                wide = mask.new_zeros(b, h, q + self.length, k + self.length)
                wide[:, :, :1, :1] = mask[:, :, :1, :1]
                wide[:, :, :1, 1 + self.length :] = mask[:, :, :1, 1:]
                wide[:, :, 1 + self.length :, :1] = mask[:, :, 1:, :1]
                wide[:, :, 1 + self.length :, 1 + self.length :] = mask[:, :, 1:, 1:]
                wide[:, :, 1 : 1 + self.length, 1 + self.length :] = torch.finfo(mask.dtype).min
                wide[:, :, :1, 1 : 1 + self.length] = torch.finfo(mask.dtype).min  # BOS precedes the prompts
                mask = wide
            if len(args) > 1:
                return (hidden, mask, *args[2:]), kwargs
            if "attention_mask" in kwargs:
                kwargs = {**kwargs, "attention_mask": mask}
            return (hidden,), kwargs

        return hook

    def _post(self) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not self.enabled:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = torch.cat([hidden[:, :1], hidden[:, 1 + self.length :]], dim=1)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook


class PromptRunner:
    """Uniform access to per-task prompts: real LPI through PEFT, or the minimal VPT-deep above."""

    def __init__(self, kind: str, backbone: str, num_tasks: int, args: argparse.Namespace) -> None:
        self.kind = kind
        if kind == "lpi":
            from peft import get_peft_model

            import peft_lpi  # noqa: F401  (registers LPI with PEFT)
            from peft_lpi import LPIConfig

            clip = CLIPModel.from_pretrained(backbone)
            config = LPIConfig(
                num_tasks=num_tasks, prompt_length=args.prompt_length, prompt_depth=args.prompt_depth, rank=args.rank
            )
            self.model = get_peft_model(clip, config)
        else:
            clip = CLIPModel.from_pretrained(backbone, attn_implementation="eager")
            clip.requires_grad_(False)
            self.model = clip
            self.banks = [VPTDeep(clip, args.prompt_length, args.prompt_depth) for _ in range(num_tasks)]
            for bank in self.banks:
                bank.enabled = False
        self.model.eval()

    def train_task(self, task: int) -> list[nn.Parameter]:
        if self.kind == "lpi":
            return self.model.base_model.train_task(task)
        self.select(task)
        return list(self.banks[task].parameters())

    def select(self, task: int) -> None:
        if self.kind == "lpi":
            self.model.base_model.set_task(task)
        else:
            for i, bank in enumerate(self.banks):
                bank.enabled = i == task

    @contextmanager
    def no_prompts(self) -> Iterator[None]:
        if self.kind == "lpi":
            with self.model.base_model.prompts_disabled():
                yield
        else:
            states = [b.enabled for b in self.banks]
            for b in self.banks:
                b.enabled = False
            try:
                yield
            finally:
                for b, s in zip(self.banks, states):
                    b.enabled = s

    def image(self, pixel_values: torch.Tensor) -> Any:
        return self.model.get_image_features(pixel_values=pixel_values)

    def text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)

    def logit_scale(self) -> torch.Tensor:
        clip = self.model.get_base_model() if self.kind == "lpi" else self.model
        return clip.logit_scale.exp()


def train_prompts(
    runner: PromptRunner, task: int, data: dict[str, Any], steps: int, batch_size: int, lr: float, seed: int
) -> float:
    """Adam on one task's prompt parameters with the multi-positive CLIP loss; returns the last loss."""
    params = runner.train_task(task)
    optimizer = torch.optim.Adam(params, lr=lr)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
        ),
    )
    generator = torch.Generator().manual_seed(seed + task)
    n = len(data["caption_ids"])
    scale = runner.logit_scale().detach()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=generator)
        img = F.normalize(_embedding(runner.image(data["pixel_values"][idx])), dim=-1)
        txt = F.normalize(_embedding(runner.text(data["input_ids"][idx], data["attention_mask"][idx])), dim=-1)
        loss = multi_positive_clip_loss(scale * img @ txt.t(), data["caption_ids"][idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return float(loss.item())


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    data = build_offline_benchmark(args.seed, args.train_per_task, args.val_per_task)
    timings["build_benchmark_s"] = time.perf_counter() - start

    start = time.perf_counter()
    backbone = args.backbone or str(get_offline_backbone(seed=args.seed))
    timings["get_backbone_s"] = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    processor = AutoImageProcessor.from_pretrained(backbone)

    names = data["train"].features["task"].names
    tasks = [int(t) for t in args.tasks.split(",")] if args.tasks else list(range(len(names)))
    runner = PromptRunner(args.prompts, backbone, len(names), args)

    start = time.perf_counter()
    val = {t: task_tensors(data["validation"], t, processor, tokenizer) for t in tasks}
    train = {t: task_tensors(data["train"], t, processor, tokenizer) for t in tasks} if args.steps else {}
    timings["preprocess_s"] = time.perf_counter() - start

    rows: list[dict[str, Any]] = []
    for t in tasks:
        with runner.no_prompts():
            zero = own_task_recall(runner.image, runner.text, val[t])
        row: dict[str, Any] = {"task": t, "name": names[t], "zero_shot": zero}
        if args.steps:
            start = time.perf_counter()
            row["final_loss"] = train_prompts(runner, t, train[t], args.steps, args.batch_size, args.lr, args.seed)
            row["train_s"] = time.perf_counter() - start
            runner.select(t)
            row["prompted"] = own_task_recall(runner.image, runner.text, val[t])
        rows.append(row)
        print(_format_row(row), flush=True)

    summary = {"args": vars(args), "backbone": backbone, "timings": timings, "tasks": rows}
    print(_format_table(rows, args), flush=True)
    print("timings:", {k: round(v, 1) for k, v in timings.items()})
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _format_row(row: dict[str, Any]) -> str:
    z = row["zero_shot"]
    text = f"[{row['task']}] {row['name']:<18} zero-shot i2t {z['i2t']:5.1f} t2i {z['t2i']:5.1f}"
    if "prompted" in row:
        p = row["prompted"]
        text += (
            f" | prompted i2t {p['i2t']:5.1f} t2i {p['t2i']:5.1f} ({row['train_s']:.0f}s, loss {row['final_loss']:.2f})"
        )
    return text


def _format_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """A markdown table: strict and caption-equal R@1, zero-shot vs. prompted, with averages."""
    keys = ["i2t", "t2i", "i2t_eq", "t2i_eq"]
    head = "| task | " + " | ".join(f"zs {k}" for k in keys)
    prompted = all("prompted" in r for r in rows)
    if prompted:
        head += " | " + " | ".join(f"{args.prompts} {k}" for k in keys)
    lines = [head + " |", "|" + "---|" * (1 + len(keys) * (2 if prompted else 1))]
    for r in rows + [_average(rows)]:
        cells = [f"{r['zero_shot'][k]:.1f}" for k in keys]
        if prompted:
            cells += [f"{r['prompted'][k]:.1f} ({r['prompted'][k] - r['zero_shot'][k]:+.1f})" for k in keys]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _average(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": "**average**"}
    for part in ("zero_shot", "prompted"):
        if all(part in r for r in rows):
            out[part] = {k: float(np.mean([r[part][k] for r in rows])) for k in rows[0][part]}
    return out


if __name__ == "__main__":
    main()
