"""A tiny 2-task continual run, shared by the fault and robustness tests and run as a script by the SIGKILL test.

As a script: `python tests/fault_run.py OUTPUT_DIR MARKER PAUSE_AT` trains with a checkpoint after every optimiser
step; once the checkpoint of optimiser step PAUSE_AT of task 1 is on disk it writes MARKER and blocks inside the
next training step, so the parent kills it (SIGKILL) in the middle of task 1 with uncheckpointed work in flight.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

SEED = 0


def build_world():
    """(tokenizer, image processor, DatasetDict) of the offline world: 2 tasks, 16 train / 4 validation images each."""
    from peft_lpi.data.backbone import build_world_tokenizer, world_image_processor
    from peft_lpi.data.world import WORLD_TASKS, build_offline_benchmark

    tokenizer = build_world_tokenizer()
    data = build_offline_benchmark(seed=0, train_per_task=16, val_per_task=4, tasks=WORLD_TASKS[:2])
    return tokenizer, world_image_processor([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]), data


def build_base(tokenizer, seed: int = SEED):
    """A 1-layer, width-32 CLIP from the world's config (random weights from `seed`)."""
    from transformers import CLIPModel

    from peft_lpi.data.backbone import tiny_clip_config

    config = tiny_clip_config(tokenizer)
    for tower in (config.vision_config, config.text_config):
        tower.hidden_size, tower.intermediate_size, tower.num_attention_heads, tower.num_hidden_layers = 32, 64, 2, 1
        tower.projection_dim = 16
    config.projection_dim = 16
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


def build_model(tokenizer, seed: int = SEED):
    """`build_base` with an LPI adapter (2 tasks, K=1, P=2, r=2, 2 keys); factors drawn right after the base."""
    from peft import get_peft_model

    from peft_lpi import LPIConfig

    base = build_base(tokenizer, seed)
    return get_peft_model(base, LPIConfig(num_tasks=2, prompt_length=2, prompt_depth=1, rank=2, num_keys=2))


def build_args(output_dir, **overrides):
    from peft_lpi.continual.trainer import ContinualTrainingArguments

    values = dict(
        output_dir=str(output_dir), num_train_epochs=1, per_device_train_batch_size=4, per_device_eval_batch_size=64, optim="adamw", learning_rate=1e-2,
        weight_decay=0.0, disable_tqdm=True, recall_ks=[1, 5], save_steps=1, seed=SEED,
    )
    values.update(overrides)
    return ContinualTrainingArguments(**values)


def make_trainer(world, output_dir, **overrides):
    from accelerate.state import AcceleratorState

    from peft_lpi.continual.trainer import ContinualTrainer

    AcceleratorState._reset_state(True)
    tokenizer, processor, data = world
    return ContinualTrainer(build_model(tokenizer), tokenizer, processor, data, build_args(output_dir, **overrides))


def factors(model) -> dict[str, torch.Tensor]:
    """Every tensor of the active adapter's prompt bank (factors of all tasks, keys), cloned."""
    tuner = model.base_model
    return {k: v.detach().clone() for k, v in tuner.lpi_prompts[tuner.active_adapters[0]].state_dict().items()}


def comparable(results: dict) -> dict:
    """A results dict without what legitimately differs between identical runs (measured seconds and memory, the
    output folder)."""
    kept = {k: v for k, v in results.items() if not any(word in k for word in ("seconds", "memory", "time"))}
    kept["args"] = {k: v for k, v in results["args"].items() if k != "output_dir"}
    return kept


def no_plots() -> None:
    """Skip the matplotlib figures of the report (seconds of CPU in a tiny run); results.json/md are still written."""
    import peft_lpi.report

    peft_lpi.report.plot_results = lambda *args, **kwargs: []


def main(output_dir: str, marker: str, pause_at: int) -> None:
    torch.set_num_threads(1)
    no_plots()
    trainer = make_trainer(build_world(), output_dir)
    save_checkpoint, training_step = trainer.checkpointer.save, trainer._training_step
    paused = {"armed": False}

    def save_then_mark(*args, **kwargs):
        save_checkpoint(*args, **kwargs)
        state = trainer.state
        if state.task == 1 and state.optimizer_steps == pause_at and not paused["armed"]:
            paused["armed"] = True
            Path(marker).write_text(f"task {state.task} step {state.optimizer_steps}\n")

    def step_or_block(*args, **kwargs):
        if paused["armed"]:  # the next step has started (its batch is loaded): wait here for SIGKILL
            while True:
                time.sleep(1)
        return training_step(*args, **kwargs)

    trainer.checkpointer.save, trainer._training_step = save_then_mark, step_or_block
    trainer.train()
    sys.exit(f"fault_run: the run finished without reaching task 1 step {pause_at}")  # the test fails on this


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
