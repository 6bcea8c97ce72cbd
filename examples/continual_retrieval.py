"""Continual vision-language retrieval with LPI.

With no arguments it runs the offline benchmark: a procedurally generated image-caption world (6 tasks) and a small
CLIP backbone that the project pretrains once and caches (nothing is downloaded):

    accelerate launch examples/continual_retrieval.py

Real use, the authors' protocol on COCO (12 supercategory tasks) with a real CLIP:

    accelerate launch examples/continual_retrieval.py --model openai/clip-vit-base-patch16 --dataset coco \
        --coco_root /data/coco --epochs 10 --batch_size 64 --optimizer sgd --learning_rate 0.05 \
        --prompt_length 16 --prompt_depth 9 --rank 4 --output_dir outputs/coco-lpi

Any `datasets` dataset with image, caption(s) and task columns works with `--dataset NAME_OR_PATH`.
Several processes on CPU: `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 examples/continual_retrieval.py`.
"""

from __future__ import annotations

import os
import sys

# Busy CPUs: spinning OpenMP threads slow every step 4-10x when another process shares the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from dataclasses import dataclass, field, fields

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from peft.config import PeftConfig
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, HfArgumentParser

import peft_lpi  # noqa: F401  (registers the LPI method with PEFT)
from peft_lpi import LPIConfig
from peft_lpi.continual.baselines import LORA_TARGET_MODULES, build_method
from peft_lpi.continual.trainer import ContinualTrainer, ContinualTrainingArguments

OFFLINE = "offline-world"

# Defaults of the offline benchmark (the training defaults of ContinualTrainingArguments are the COCO protocol).
OFFLINE_TRAINING_DEFAULTS = dict(
    output_dir="outputs/offline-lpi",
    epochs=4,  # ~92 optimiser steps per task (docs/offline_world.md)
    batch_size=64,
    eval_batch_size=512,
    optimizer="adamw",
    learning_rate=None,  # None: the method's rate below
    weight_decay=0.0,
    warmup_steps=5,
    preprocess_images=None,  # None: on for the offline world (32 px images), off for other datasets
)
# AdamW peak learning rate of each method on the offline benchmark: the best of the sweep in docs/results.md
# (`python examples/run_results.py --quick --phases sweep`). Weights that start at zero (LoRA's B) or tiny full-rank
# prompts want a smaller rate than LPI's CP factors; an explicit --learning_rate overrides this table.
OFFLINE_LEARNING_RATES = {
    "lpi": 2e-1,  # flat from 1e-1 to 2e-1 (mean R@1 57.2 vs 57.5); 5e-2 gives 54.3
    "joint": 2e-1,  # LPI's rate
    "s-prompts": 2e-2,
    "shared-prompt": 5e-3,
    "lora": 2e-3,
    "zero-shot": 0.0,  # trains nothing
}


@dataclass
class ModelArguments:
    model: str = field(
        default=OFFLINE,
        metadata={"help": f"Hub id or local folder of a dual encoder, or '{OFFLINE}' for the project's cached backbone."},
    )
    backbone_cache: str | None = field(default=None, metadata={"help": "Folder of the cached offline backbone."})
    method: str = field(
        default="lpi",
        metadata={
            "help": "Continual method: lpi, zero-shot, shared-prompt, s-prompts, lora (per-task LoRA, rank 4) or joint "
            "(LPI on all tasks at once, the upper bound). See peft_lpi/continual/baselines.py and docs/results.md."
        },
    )
    lora_rank: int = field(default=4, metadata={"help": "--method lora: LoRA rank of every adapter."})
    lora_target_modules: str = field(
        default=LORA_TARGET_MODULES,
        metadata={"help": "--method lora: PEFT target_modules regex (default: q/k/v/out_proj of both towers)."},
    )
    prompt_length: int = field(default=8, metadata={"help": "LPIConfig.prompt_length (P)."})
    prompt_depth: int = field(default=4, metadata={"help": "LPIConfig.prompt_depth (K)."})
    rank: int = field(default=4, metadata={"help": "LPIConfig.rank (r)."})
    init_std: float = field(default=0.5, metadata={"help": "LPIConfig.init_std."})
    no_interaction: bool = field(default=False, metadata={"help": "Disable the correlation module."})
    no_shared_layer_factor: bool = field(default=False, metadata={"help": "Each modality its own layer factor."})
    align_weight: float = field(default=0.1, metadata={"help": "Weight of the alignment loss (0 disables it)."})
    task_weight: float = field(default=0.1, metadata={"help": "Weight of the task loss (0 disables it)."})
    routing_metric: str = field(default="l1", metadata={"help": "Routing distance: l1, l2 or cosine."})
    lpi_preset: str | None = field(
        default=None,
        metadata={
            "help": "'reference': LPI as the authors' retrieval code computed it (LPIConfig.reference('retrieval'): "
            "shallow insertion, no correlation module, their loss arithmetic), with this run's --prompt_length, "
            "--prompt_depth and --rank; the other LPI flags are then ignored (but --task_loss_mode)."
        },
    )
    task_loss_mode: str | None = field(
        default=None, metadata={"help": "LPIConfig.task_loss_mode: 'bce' or 'reference'. Default: the config's."}
    )
    push_to_hub: str | None = field(
        default=None,
        metadata={"help": "After training, upload the adapter with a model card of the run to this Hub repo "
                  "(user/name; main process only; needs `hf auth login`). LPI adapters only."},
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the --push_to_hub repo as private."})
    cpu_threads: int | None = field(
        default=None,
        metadata={"help": "On CPU, torch threads per process (default: cores // processes; several runs sharing a "
                  "machine want fewer)."},
    )


@dataclass
class DataArguments:
    dataset: str = field(default=OFFLINE, metadata={"help": f"'{OFFLINE}', 'coco', or a datasets name/path."})
    coco_root: str | None = field(default=None, metadata={"help": "COCO 2014 root (images + annotations/)."})
    karpathy_split: str | None = field(default=None, metadata={"help": "Optional Karpathy dataset_coco.json."})
    image_column: str = field(default="image", metadata={"help": "Image column of a generic dataset."})
    caption_column: str = field(default="caption", metadata={"help": "Caption column of a generic dataset."})
    task_column: str = field(default="task", metadata={"help": "Task column of a generic dataset."})
    train_split: str = field(default="train", metadata={"help": "Training split of a generic dataset."})
    eval_split: str = field(default="validation", metadata={"help": "Evaluation split of a generic dataset."})
    eval_size: float | None = field(
        default=None,
        metadata={"help": "Generic dataset without --eval_split: hold out this fraction (< 1) or number (>= 1) of "
                  "training rows, stratified by task, as the evaluation split."},
    )
    world_seed: int = field(default=0, metadata={"help": "Seed of the offline world."})
    train_per_task: int = field(default=1500, metadata={"help": "Offline world: training images per task."})
    val_per_task: int = field(default=250, metadata={"help": "Offline world: validation images per task."})
    max_tasks: int | None = field(default=None, metadata={"help": "Use only the first N tasks."})


def load_backbone(args: ModelArguments, accelerator: Accelerator):
    path = args.model
    if path == OFFLINE:
        from peft_lpi.data.backbone import get_offline_backbone

        with accelerator.main_process_first():  # one process pretrains, the others reuse the cache
            path = str(get_offline_backbone(args.backbone_cache, progress=accelerator.is_local_main_process))
    model = AutoModel.from_pretrained(path)
    return model, AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)


def load_data(args: DataArguments):
    if args.dataset == OFFLINE:
        from peft_lpi.data.world import build_offline_benchmark

        data = build_offline_benchmark(args.world_seed, args.train_per_task, args.val_per_task)
    elif args.dataset == "coco":
        from peft_lpi.data.coco import build_coco_continual

        if not args.coco_root:
            sys.exit("--dataset coco needs --coco_root (a folder with train2014/, val2014/ and annotations/).")
        data = build_coco_continual(args.coco_root, karpathy_split=args.karpathy_split)
    else:
        from peft_lpi.data.generic import from_datasets

        eval_size = int(args.eval_size) if args.eval_size is not None and args.eval_size >= 1 else args.eval_size
        data = from_datasets(
            args.dataset, image_column=args.image_column, caption_column=args.caption_column,
            task_column=args.task_column, train_split=args.train_split, eval_split=args.eval_split,
            eval_size=eval_size,
        )
    if args.max_tasks:
        from peft_lpi.data.generic import first_tasks

        data = first_tasks(data, args.max_tasks)
    return data


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, ContinualTrainingArguments))
    parser.set_defaults(**OFFLINE_TRAINING_DEFAULTS)
    parser._option_string_actions["--learning_rate"].help = (
        "Peak learning rate. Default: the method's AdamW rate on the offline benchmark ("
        + ", ".join(f"{name} {rate:g}" for name, rate in OFFLINE_LEARNING_RATES.items() if rate)
        + "; docs/results.md)."
    )
    parser._option_string_actions["--preprocess_images"].help += " Default: on for the offline world, off otherwise."
    model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=argv)
    if train_args.learning_rate is None:
        if model_args.method not in OFFLINE_LEARNING_RATES:
            sys.exit(f"Unknown --method {model_args.method!r}; choose one of {', '.join(OFFLINE_LEARNING_RATES)}.")
        train_args.learning_rate = OFFLINE_LEARNING_RATES[model_args.method]
    if train_args.preprocess_images is None:
        train_args.preprocess_images = data_args.dataset == OFFLINE
    from datetime import timedelta

    accelerator = Accelerator(
        mixed_precision=train_args.mixed_precision,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        log_with=train_args.log_with,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=10))],
    )
    if accelerator.device.type == "cpu":  # share the cores between processes (accelerate sets OMP_NUM_THREADS=1)
        torch.set_num_threads(model_args.cpu_threads or max(1, (os.cpu_count() or 1) // accelerator.num_processes))
    base, tokenizer, image_processor = load_backbone(model_args, accelerator)
    data = load_data(data_args)
    num_tasks = data["train"].features["task"].num_classes
    lpi_kwargs = dict(
        prompt_length=model_args.prompt_length,
        prompt_depth=model_args.prompt_depth,
        rank=model_args.rank,
        init_std=model_args.init_std,
        interaction=not model_args.no_interaction,
        share_layer_factor=not model_args.no_shared_layer_factor,
        align_weight=model_args.align_weight,
        task_weight=model_args.task_weight,
        routing_metric=model_args.routing_metric,
        base_model_name_or_path=model_args.model,
    )
    if model_args.lpi_preset is not None:
        if model_args.lpi_preset != "reference":
            sys.exit(f"--lpi_preset takes 'reference', got {model_args.lpi_preset!r}.")
        keep = ("prompt_length", "prompt_depth", "rank", "base_model_name_or_path")
        preset = LPIConfig.reference("retrieval", **{k: lpi_kwargs[k] for k in keep})
        skip = {f.name for f in fields(PeftConfig)} - {"base_model_name_or_path"} | {"num_tasks", "task_names"}
        lpi_kwargs = {f.name: getattr(preset, f.name) for f in fields(LPIConfig) if f.name not in skip}
    if model_args.task_loss_mode is not None:
        lpi_kwargs["task_loss_mode"] = model_args.task_loss_mode
    torch.manual_seed(train_args.seed)
    model, method = build_method(
        model_args.method, base, num_tasks, lpi_kwargs, lora_rank=model_args.lora_rank,
        lora_target_modules=model_args.lora_target_modules,
    )
    if accelerator.is_main_process and hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()
    if model_args.push_to_hub:
        from peft_lpi.hub import is_lpi_model

        if not is_lpi_model(model):  # refuse before training, not after it
            sys.exit(f"--push_to_hub uploads LPI adapters; --method {model_args.method} does not produce one.")
    trainer = ContinualTrainer(
        model, tokenizer, image_processor, data, train_args, accelerator=accelerator, method=method
    )
    results = trainer.train()
    if model_args.push_to_hub and accelerator.is_main_process:
        from peft_lpi.hub import push_adapter_to_hub

        push_adapter_to_hub(trainer.model, model_args.push_to_hub, results=results, private=model_args.hub_private)
        print(f"Pushed the adapter and its model card to the Hub repo {model_args.push_to_hub}.")
    return results


if __name__ == "__main__":
    main()
