"""Continual vision-language retrieval with LPI.

With no arguments it runs the offline benchmark: a procedurally generated image-caption world (6 tasks) and a small
CLIP backbone that the project pretrains once and caches (nothing is downloaded):

    accelerate launch examples/continual_retrieval.py

Real use, the authors' protocol on COCO (12 supercategory tasks) with a real CLIP:

    accelerate launch examples/continual_retrieval.py --model openai/clip-vit-base-patch16 --dataset coco \
        --coco_root /data/coco --num_train_epochs 10 --per_device_train_batch_size 64 --optim sgd \
        --learning_rate 0.05 --prompt_length 16 --prompt_depth 9 --rank 4 --output_dir outputs/coco-lpi

Every `LPIConfig` field is a flag with LPIConfig's own default (`--num_keys`, `--interaction false`, ...), except
`--prompt_length` / `--prompt_depth` on the offline world's small backbone: see `OFFLINE_LPI_PRESET`.

Any `datasets` dataset with image, caption(s) and task columns works with `--dataset NAME_OR_PATH`.
Several processes on CPU: `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 examples/continual_retrieval.py`.
"""

from __future__ import annotations

import os
import sys

# Busy CPUs: spinning OpenMP threads slow every step 4-10x when another process shares the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import dataclasses
import typing
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, HfArgumentParser

import peft_lpi  # noqa: F401  (registers the LPI method with PEFT)
from peft_lpi import LPIConfig
from peft_lpi.continual.baselines import LORA_TARGET_MODULES, build_method
from peft_lpi.continual.trainer import ContinualTrainer, ContinualTrainingArguments

OFFLINE = "offline-world"

# Defaults of the offline benchmark (the training defaults of ContinualTrainingArguments are the COCO protocol).
OFFLINE_TRAINING_DEFAULTS = dict(
    output_dir="outputs/offline-lpi",
    num_train_epochs=4,  # ~92 optimiser steps per task (docs/offline_world.md)
    per_device_train_batch_size=64,
    per_device_eval_batch_size=512,
    optim="adamw",
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
            "(LPI on all tasks at once, the upper bound). See peft_lpi/continual/baselines/ and docs/results.md."
        },
    )
    lora_rank: int = field(default=4, metadata={"help": "--method lora: LoRA rank of every adapter."})
    lora_target_modules: str = field(
        default=LORA_TARGET_MODULES,
        metadata={"help": "--method lora: PEFT target_modules regex (default: q/k/v/out_proj of both towers)."},
    )
    lpi_preset: str | None = field(
        default=None,
        metadata={
            "help": "'reference': LPI as the authors' retrieval code computed it (LPIConfig.reference('retrieval'): "
            "shallow insertion, no correlation module, their loss arithmetic), with this run's --prompt_length, "
            "--prompt_depth and --rank; the other LPI flags are then ignored, except --task_loss_mode when given."
        },
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


# Fields of LPIConfig that are not command-line flags: set by PEFT or the library, taken from the data (num_tasks,
# task_names) or from --model (base_model_name_or_path), or not expressible as a flag (layer_paths, a dict).
NOT_FLAGS = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
             "inference_mode", "num_tasks", "task_names", "layer_paths", "format_version"}
# The offline world's backbone is small (4 layers per tower, 32 px images): LPIConfig's COCO defaults (P=16, K=9)
# do not fit it, so --model offline-world uses P=8, K=4 (docs/offline_world.md) unless the flag is given.
OFFLINE_LPI_PRESET = {"prompt_length": 8, "prompt_depth": 4}


def _lpi_arguments() -> type:
    """A dataclass of LPIConfig's flag-able fields with LPIConfig's own types, defaults and help (one source)."""
    types = typing.get_type_hints(LPIConfig)  # resolved: LPIConfig's module postpones its annotations
    fields = []
    for f in dataclasses.fields(LPIConfig):
        if f.name in NOT_FLAGS or not f.init:
            continue
        has_default = f.default is not dataclasses.MISSING
        default = {"default": f.default} if has_default else {"default_factory": f.default_factory}
        fields.append((f.name, types[f.name], field(metadata=dict(f.metadata), **default)))
    return dataclasses.make_dataclass("LPIArguments", fields)


LPIArguments = _lpi_arguments()


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
    parser = HfArgumentParser((ModelArguments, LPIArguments, DataArguments, ContinualTrainingArguments))
    parser.set_defaults(**OFFLINE_TRAINING_DEFAULTS, **dict.fromkeys(OFFLINE_LPI_PRESET))  # None: not given
    for name, value in OFFLINE_LPI_PRESET.items():
        default = next(f.default for f in dataclasses.fields(LPIConfig) if f.name == name)
        parser._option_string_actions[f"--{name}"].help += f" Default: {value} with --model {OFFLINE}, else {default}."
    parser._option_string_actions["--learning_rate"].help = (
        "Peak learning rate. Default: the method's AdamW rate on the offline benchmark ("
        + ", ".join(f"{name} {rate:g}" for name, rate in OFFLINE_LEARNING_RATES.items() if rate)
        + "; docs/results.md)."
    )
    parser._option_string_actions["--preprocess_images"].help += " Default: on for the offline world, off otherwise."
    model_args, lpi_args, data_args, train_args = parser.parse_args_into_dataclasses(args=argv)
    for name, value in OFFLINE_LPI_PRESET.items():
        if getattr(lpi_args, name) is None:
            default = next(f.default for f in dataclasses.fields(LPIConfig) if f.name == name)
            setattr(lpi_args, name, value if model_args.model == OFFLINE else default)
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
        log_with=train_args.report_to,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=10))],
    )
    if accelerator.device.type == "cpu":  # share the cores between processes (accelerate sets OMP_NUM_THREADS=1)
        torch.set_num_threads(model_args.cpu_threads or max(1, (os.cpu_count() or 1) // accelerator.num_processes))
    base, tokenizer, image_processor = load_backbone(model_args, accelerator)
    data = load_data(data_args)
    num_tasks = data["train"].features["task"].num_classes
    lpi_kwargs = dataclasses.asdict(lpi_args)  # base_model_name_or_path: PEFT takes the loaded model's own path
    if model_args.lpi_preset is not None:
        if model_args.lpi_preset != "reference":
            sys.exit(f"--lpi_preset takes 'reference', got {model_args.lpi_preset!r}.")
        given = {a.split("=")[0][2:] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")}
        keep = ["prompt_length", "prompt_depth", "rank"] + (["task_loss_mode"] if "task_loss_mode" in given else [])
        preset = LPIConfig.reference("retrieval", **{k: lpi_kwargs[k] for k in keep})
        lpi_kwargs = {k: getattr(preset, k) for k in lpi_kwargs}
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
