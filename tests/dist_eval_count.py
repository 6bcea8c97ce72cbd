"""Counts the samples that go through each tower during one stage evaluation; launched by
tests/test_evaluator_distributed.py with 1 or 2 processes.

Usage: python dist_eval_count.py OUT_DIR EXPECTED_PROCESSES
       ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 dist_eval_count.py OUT_DIR 2
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch

torch.set_num_threads(1)

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import InitProcessGroupKwargs, gather_object  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import CLIPModel  # noqa: E402

import peft_lpi  # noqa: E402, F401
from peft_lpi import LPIConfig  # noqa: E402
from peft_lpi.continual.trainer import ContinualTrainer, ContinualTrainingArguments  # noqa: E402
from peft_lpi.data.backbone import build_world_tokenizer, tiny_clip_config, world_image_processor  # noqa: E402
from peft_lpi.data.world import WORLD_TASKS, build_offline_benchmark  # noqa: E402


def main() -> None:
    out, expected = Path(sys.argv[1]), int(sys.argv[2])
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=120))])
    if accelerator.num_processes != expected:
        raise SystemExit(f"expected {expected} processes, got {accelerator.num_processes}")
    tokenizer = build_world_tokenizer()
    # 16 validation images per task, one caption each: every shard and batch is full under 1 and 2 processes, so
    # no sample is encoded twice as padding and the counts compare exactly.
    data = build_offline_benchmark(seed=0, train_per_task=16, val_per_task=16, tasks=WORLD_TASKS[:2])
    torch.manual_seed(0)
    config = tiny_clip_config(tokenizer)
    config.vision_config.num_hidden_layers = 1
    config.text_config.num_hidden_layers = 1
    base = CLIPModel(config).eval()
    model = get_peft_model(base, LPIConfig(num_tasks=2, prompt_length=2, prompt_depth=1, rank=2, num_keys=2))
    args = ContinualTrainingArguments(
        output_dir=str(out), per_device_eval_batch_size=4, disable_tqdm=True, recall_ks=[1],
    )
    trainer = ContinualTrainer(model, tokenizer, world_image_processor([0.5] * 3, [0.25] * 3), data, args,
                               accelerator=accelerator)
    for task in range(2):
        trainer._build_task_keys(task)
    counts = {"vision": 0, "text": 0}

    def counter(modality: str):
        def hook(module, args, kwargs):
            inputs = kwargs.get("pixel_values" if modality == "vision" else "input_ids")
            inputs = inputs if inputs is not None else args[0]
            counts[modality] += int(inputs.shape[0])

        return hook

    base.vision_model.register_forward_pre_hook(counter("vision"), with_kwargs=True)
    base.text_model.register_forward_pre_hook(counter("text"), with_kwargs=True)
    entry = trainer.evaluator.evaluate(1)
    per_process = gather_object([counts])
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "counts.json").write_text(json.dumps({
            "num_processes": accelerator.num_processes, "per_process": per_process,
            "num_images": entry["num_images"], "num_texts": entry["num_texts"], "modes": trainer.evaluator.modes,
            "routing": entry["auto"]["routing"], "recall": entry["oracle"]["strict"]["macro"],
            "auto_recall": entry["auto"]["strict"]["macro"],
        }))
    # every process leaves the process group before exiting: gloo threads torn down at interpreter exit can abort
    # a child ("terminate called without an active exception"), seen once on a loaded machine
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
