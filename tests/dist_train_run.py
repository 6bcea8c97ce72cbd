"""A tiny 2-task continual run, launched by tests/test_distributed_trainer.py with 1 or 2 processes.

Usage: python dist_train_run.py OUT_DIR BATCH_SIZE EXPECTED_PROCESSES
       ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 dist_train_run.py OUT_DIR BATCH_SIZE 2
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch

torch.set_num_threads(1)

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import InitProcessGroupKwargs  # noqa: E402
from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPModel  # noqa: E402

import peft_lpi  # noqa: E402, F401
from peft_lpi import LPIConfig  # noqa: E402
from peft_lpi.continual.trainer import ContinualTrainer, ContinualTrainingArguments  # noqa: E402
from peft_lpi.data.backbone import build_world_tokenizer, tiny_clip_config, world_image_processor  # noqa: E402
from peft_lpi.data.world import WORLD_TASKS, build_offline_benchmark  # noqa: E402


def main() -> None:
    out, batch_size, expected = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=120))])
    if accelerator.num_processes != expected:  # every wrong launcher combination exits 0 otherwise
        raise SystemExit(f"expected {expected} processes, got {accelerator.num_processes}")
    tokenizer = build_world_tokenizer()
    data = build_offline_benchmark(seed=0, train_per_task=48, val_per_task=12, tasks=WORLD_TASKS[:2])
    processor = world_image_processor([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    torch.manual_seed(0)
    config = tiny_clip_config(tokenizer)
    config.vision_config.num_hidden_layers = 2
    config.text_config.num_hidden_layers = 2
    model = get_peft_model(
        CLIPModel(config).eval(), LPIConfig(num_tasks=2, prompt_length=2, prompt_depth=2, rank=2, num_keys=3)
    )
    args = ContinualTrainingArguments(
        output_dir=str(out), num_train_epochs=2, per_device_train_batch_size=batch_size, per_device_eval_batch_size=16, optim="adamw",
        learning_rate=1e-2, weight_decay=0.0, disable_tqdm=True, recall_ks=[1, 5],
    )
    results = ContinualTrainer(model, tokenizer, processor, data, args, accelerator=accelerator).train()
    if accelerator.is_main_process:
        bank = accelerator.unwrap_model(model).base_model.lpi_prompts["default"]
        save_file({k: v.detach().contiguous() for k, v in bank.state_dict().items()}, str(out / "factors.safetensors"))
        (out / "summary.json").write_text(json.dumps({"num_processes": accelerator.num_processes, **results}))


if __name__ == "__main__":
    main()
