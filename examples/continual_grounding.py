"""Continual referring-expression grounding (REC) with LPI on an OWL-ViT detector.

With no arguments it runs offline: the grounding world (scenes of world objects, one expression and its exact box per
scene, 6 tasks) and the project's small OWL-ViT grounding backbone, pretrained once and cached (nothing is
downloaded). After each task it evaluates the validation pairs of every task seen so far, zero-shot (prompts off) and
with LPI (oracle: the true task; auto: the task routed from the image feature), and writes results.json,
results.md and plots to --output_dir:

    accelerate launch examples/continual_grounding.py

The same ContinualTrainer loop as retrieval (`examples/continual_retrieval.py`): checkpoints per task, resume with
`--resume_from_checkpoint true`, several processes (`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 ...`).
A real OWL-ViT (`--model google/owlvit-base-patch32`) with any REC dataset in the shared schema
(`peft_lpi.data.grounding`, e.g. `peft_lpi.data.refcoco`) is the same code; docs/grounding.md has the commands.
"""

from __future__ import annotations

import os

# Busy CPUs: spinning OpenMP threads slow every step 4-10x when another process shares the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from transformers import AutoImageProcessor, AutoTokenizer, HfArgumentParser, OwlViTForObjectDetection

import peft_lpi  # noqa: F401  (registers the LPI method with PEFT)
from peft_lpi.continual.baselines.grounding import (
    GROUNDING_LORA_TARGETS,
    GROUNDING_METHOD_NAMES,
    build_grounding_method,
)
from peft_lpi.continual.grounding import GroundingEvaluator, grounding_task_similarity, prepare_grounding_dataset
from peft_lpi.continual.grounding_batches import SceneQueryCollator, group_pairs_by_image
from peft_lpi.continual.trainer import ContinualTrainer, ContinualTrainingArguments, _indices_by_task
from peft_lpi.data.preprocess import text_token_limit, with_pixel_values
from peft_lpi.tuner.shallow import text_prompt_positions

OFFLINE = "offline-grounding"

# Defaults of the offline run, chosen to fit 5 minutes on 2 CPU cores with the backbone cached (docs/grounding.md).
OFFLINE_TRAINING_DEFAULTS = dict(
    output_dir="outputs/offline-grounding-lpi",
    num_train_epochs=100,  # max_steps decides
    max_steps=60,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=200,
    optim="adamw",
    learning_rate=5e-2,  # the grounding probe's rate (docs/grounding.md)
    weight_decay=0.0,
    warmup_steps=3,
    preprocess_images=None,  # None: on for the offline world (64 px scenes), off for other models' data
    eval_routing=["zero-shot", "oracle", "auto"],
    recall_ks=[1, 5],
)


@dataclass
class GroundingArguments:
    model: str = field(
        default=OFFLINE,
        metadata={"help": f"OWL-ViT Hub id or folder, or '{OFFLINE}' for the project's cached grounding backbone."},
    )
    backbone_cache: str | None = field(default=None, metadata={"help": "Folder of the cached grounding backbone."})
    world_seed: int = field(default=0, metadata={"help": "Seed of the grounding world (and its backbone)."})
    train_per_task: int = field(default=400, metadata={"help": "Offline world: training scenes per task."})
    val_per_task: int = field(default=200, metadata={"help": "Offline world: validation pairs per task."})
    train_all_objects: bool = field(
        default=True,
        metadata={"help": "Offline world: every describable object of a training scene is a training pair (one OWL "
                  "query each, one image forward per scene); false: one random object per scene."},
    )
    method: str = field(
        default="lpi",
        metadata={"help": f"Continual method: {', '.join(GROUNDING_METHOD_NAMES)} (peft_lpi.continual.baselines."
                  "grounding); the zero-shot backbone is the 'zero-shot' evaluation mode of any run."},
    )
    lora_rank: int | None = field(
        default=None, metadata={"help": "--method lora: LoRA rank (default: the rank matching LPI's parameters)."}
    )
    lora_target_modules: str = field(
        default=GROUNDING_LORA_TARGETS, metadata={"help": "--method lora: PEFT target_modules regex."}
    )
    max_tasks: int | None = field(default=None, metadata={"help": "Use only the first N tasks."})
    prompt_length: int = field(default=8, metadata={"help": "LPI prompt length P."})
    prompt_depth: int = field(default=4, metadata={"help": "LPI prompt depth K (layers per tower)."})
    rank: int = field(default=4, metadata={"help": "LPI CP rank r."})
    num_keys: int = field(default=5, metadata={"help": "k-means keys per task (routing on the image feature)."})
    align_weight: float = field(default=0.1, metadata={"help": "Weight of L_align (reference grounding: 0.1)."})
    task_weight: float = field(default=0.1, metadata={"help": "Weight of L_task (reference grounding: 0.1)."})
    cpu_threads: int | None = field(default=None, metadata={"help": "Torch threads per process on CPU."})


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((GroundingArguments, ContinualTrainingArguments))
    parser.set_defaults(**OFFLINE_TRAINING_DEFAULTS)
    parser._option_string_actions["--eval_routing"].help = "Modes to evaluate: zero-shot, oracle, auto."
    parser._option_string_actions["--recall_ks"].help = "Precision@k cut-offs."
    args, train_args = parser.parse_args_into_dataclasses(args=argv)
    accelerator = Accelerator(mixed_precision=train_args.mixed_precision)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(args.cpu_threads or max(1, (os.cpu_count() or 1) // accelerator.num_processes))

    path = args.model
    if path == OFFLINE:
        from peft_lpi.data.grounding_backbone import get_grounding_backbone

        with accelerator.main_process_first():  # one process pretrains, the others reuse the cache
            path = str(get_grounding_backbone(args.backbone_cache, seed=args.world_seed,
                                              progress=accelerator.is_local_main_process))
    base = OwlViTForObjectDetection.from_pretrained(path)
    tokenizer, image_processor = AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)

    from peft_lpi.data.grounding_world import GROUNDING_TASKS, build_grounding_benchmark

    tasks = GROUNDING_TASKS[: args.max_tasks] if args.max_tasks else GROUNDING_TASKS
    data = prepare_grounding_dataset(build_grounding_benchmark(args.world_seed, args.train_per_task,
                                                               args.val_per_task, tasks=tasks,
                                                               train_all_objects=args.train_all_objects))
    data["train"] = group_pairs_by_image(data["train"])  # the expressions of one image: queries of one forward
    if train_args.preprocess_images is None:
        train_args.preprocess_images = args.model == OFFLINE
    if train_args.preprocess_images:  # process every image once (the evaluator reads the same preprocessed split)
        data = {name: with_pixel_values(split, image_processor) for name, split in data.items()}
        train_args.preprocess_images = False  # done here, not again in the trainer
    names = list(data["train"].features["task"].names)

    torch.manual_seed(train_args.seed)
    lpi_kwargs = dict(prompt_length=args.prompt_length, prompt_depth=args.prompt_depth, rank=args.rank,
                      num_keys=args.num_keys, align_weight=args.align_weight, task_weight=args.task_weight)
    model, method = build_grounding_method(args.method, base, len(names), lpi_kwargs, lora_rank=args.lora_rank,
                                           lora_target_modules=args.lora_target_modules)
    if accelerator.is_main_process:
        model.print_trainable_parameters()
    limit = text_token_limit(model, tokenizer)  # shallow injection puts P prompts into every token sequence
    collator = SceneQueryCollator(image_processor, tokenizer,
                                  max_length=None if limit is None else limit - text_prompt_positions(model))
    evaluator = GroundingEvaluator(
        accelerator, method, data["validation"], _indices_by_task(data["validation"], names, "validation"), collator,
        modes=train_args.eval_routing, ks=train_args.recall_ks, batch_size=train_args.per_device_eval_batch_size,
        progress=not train_args.disable_tqdm,
    )
    trainer = ContinualTrainer(
        model, tokenizer, image_processor, data, train_args, accelerator=accelerator, method=method,
        evaluator=evaluator, data_collator=collator,
        task_similarity=grounding_task_similarity(model, tokenizer, names),
    )
    return trainer.train()


if __name__ == "__main__":
    main()
