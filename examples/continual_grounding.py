"""Continual referring-expression grounding (REC) with LPI on an OWL-ViT / OWLv2 or Grounding DINO detector.

With no arguments it runs offline: the grounding world (scenes of world objects, one expression and its exact box per
scene, 6 tasks) and the project's small OWL-ViT grounding backbone, pretrained once and cached (nothing is
downloaded). After each task it evaluates the validation pairs of every task seen so far, zero-shot (prompts off) and
with LPI (oracle: the true task; auto: the task routed from the image feature), and writes results.json,
results.md and plots to --output_dir:

    accelerate launch examples/continual_grounding.py

The same ContinualTrainer loop as retrieval (`examples/continual_retrieval.py`): checkpoints per task, resume with
`--resume_from_checkpoint true`, several processes (`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 ...`).
Grounding DINO (`--model IDEA-Research/grounding-dino-tiny`) is prompted with `LPIConfig(injection="additive")`
(its Swin takes no extra tokens). Real data (docs/grounding.md has the full commands): RefCOCO / RefCOCO+ /
RefCOCOg from MDETR's files

    accelerate launch examples/continual_grounding.py --model google/owlv2-base-patch16-ensemble --dataset refcoco \
        --train_annotations mdetr_annotations/final_refcoco_train.json \
        --val_annotations mdetr_annotations/final_refcoco_val.json --image_dir coco/train2014

or from the refer toolkit's pickles (`--refs_file 'refcoco/refs(unc).p' --instances_file refcoco/instances.json`), or
any `datasets` dataset with image / expression / box / task columns (`--dataset FOLDER_OR_HUB_ID`, column flags).
`--push_to_hub user/name` uploads the adapter with a model card of the grounding results.
"""

from __future__ import annotations

import os

# Busy CPUs: spinning OpenMP threads slow every step 4-10x when another process shares the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForZeroShotObjectDetection,
    AutoTokenizer,
    HfArgumentParser,
    OwlViTForObjectDetection,
)

import peft_lpi  # noqa: F401  (registers the LPI method with PEFT)
from peft_lpi.continual.baselines.grounding import (
    GROUNDING_LORA_TARGETS,
    GROUNDING_METHOD_NAMES,
    build_grounding_method,
)
from peft_lpi.continual.grounding import (
    GroundingEvaluator,
    grounding_collator,
    grounding_task_similarity,
    prepare_grounding_dataset,
)
from peft_lpi.continual.grounding_batches import group_pairs_by_image
from peft_lpi.continual.grounding_models import GROUNDING_DINO_TYPES, OWL_TYPES, fixed_canvas, grounding_model_type
from peft_lpi.continual.trainer import ContinualTrainer, ContinualTrainingArguments, _indices_by_task
from peft_lpi.data.preprocess import with_pixel_values

OFFLINE = "offline-grounding"

REAL_DATA_EPOCHS = 5  # the reference's grounding epochs per task; with a real --dataset, unless given

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
        metadata={"help": f"OWL-ViT / OWLv2 or Grounding DINO Hub id or folder (e.g. IDEA-Research/grounding-dino-tiny: "
                          "its Swin tower takes LPI's prompts with injection='additive', set automatically), or "
                          f"'{OFFLINE}' for the project's cached grounding backbone."},
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
    lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "--method lora: PEFT target_modules regex (default: the attention query / value "
                  f"projections of both towers; OWL: {GROUNDING_LORA_TARGETS!r}, Grounding DINO: the Swin backbone's "
                  "and BERT's)."},
    )
    max_tasks: int | None = field(default=None, metadata={"help": "Use only the first N tasks."})
    prompt_length: int = field(default=8, metadata={"help": "LPI prompt length P."})
    prompt_depth: int = field(default=4, metadata={"help": "LPI prompt depth K (layers per tower)."})
    rank: int = field(default=4, metadata={"help": "LPI CP rank r."})
    num_keys: int = field(default=5, metadata={"help": "k-means keys per task (routing on the image feature)."})
    align_weight: float = field(default=0.1, metadata={"help": "Weight of L_align (reference grounding: 0.1)."})
    task_weight: float = field(default=0.1, metadata={"help": "Weight of L_task (reference grounding: 0.1)."})
    cpu_threads: int | None = field(default=None, metadata={"help": "Torch threads per process on CPU."})


REFCOCO_DATASETS = ("refcoco", "refcoco+", "refcocog")  # one builder: the annotation files decide the variant


@dataclass
class GroundingDataArguments:
    """Where the REC data comes from (the offline world, RefCOCO-family files, or any `datasets` dataset), and the
    Hub upload after training."""

    dataset: str = field(
        default=OFFLINE,
        metadata={"help": f"'{OFFLINE}' (the offline grounding world), 'refcoco' / 'refcoco+' / 'refcocog' (from "
                  "--train_annotations/--val_annotations or --refs_file/--instances_file, images in --image_dir), "
                  "or a `datasets` folder (save_to_disk) or Hub id with image / expression / box / task columns."},
    )
    train_annotations: str | None = field(
        default=None, metadata={"help": "RefCOCO*: MDETR training file, e.g. final_refcoco_train.json."}
    )
    val_annotations: str | None = field(
        default=None, metadata={"help": "RefCOCO*: MDETR evaluation file, e.g. final_refcoco_val.json."}
    )
    image_dir: str | None = field(default=None, metadata={"help": "RefCOCO*: the COCO 2014 train2014/ folder."})
    refs_file: str | None = field(
        default=None, metadata={"help": "RefCOCO* from the refer toolkit: refs(unc).p / refs(umd).p / refs(google).p."}
    )
    instances_file: str | None = field(default=None, metadata={"help": "RefCOCO* (refer): the dataset's instances.json."})
    refer_train_split: str = field(default="train", metadata={"help": "RefCOCO* (refer): training refs' split."})
    refer_val_split: str = field(
        default="val", metadata={"help": "RefCOCO* (refer): evaluation refs' split (val, testA, testB, test)."}
    )
    train_split: str = field(default="train", metadata={"help": "`datasets` dataset: training split."})
    eval_split: str = field(default="validation", metadata={"help": "`datasets` dataset: evaluation split."})
    image_column: str = field(default="image", metadata={"help": "`datasets` dataset: image column."})
    expression_column: str = field(default="expression", metadata={"help": "`datasets` dataset: expression column."})
    box_column: str = field(default="box", metadata={"help": "`datasets` dataset: box column (absolute pixels)."})
    box_format: str = field(default="xyxy", metadata={"help": "`datasets` dataset: 'xyxy' or COCO 'xywh' boxes."})
    task_column: str = field(default="task", metadata={"help": "`datasets` dataset: task column."})
    image_id_column: str = field(
        default="image_id", metadata={"help": "`datasets` dataset: image id column (absent: the row index)."}
    )
    task_order: list[str] | None = field(
        default=None,
        metadata={"help": "Tasks in continual order (RefCOCO*: supercategories; default the authors' 12-task order; "
                  "`datasets`: default the task column's ClassLabel names or first-seen order)."},
    )
    max_per_task: list[int] | None = field(
        default=None,
        metadata={"help": "Keep at most N samples per task: one value for both splits or TRAIN VAL; 0 = no cap. "
                  "Default: RefCOCO* the authors' caps (2000 500), `datasets` no cap."},
    )
    sample_seed: int | None = field(
        default=None,
        metadata={"help": "With caps, keep a random subset drawn with this seed instead of the first samples."},
    )
    push_to_hub: str | None = field(
        default=None,
        metadata={"help": "After training, upload the adapter with a model card of the grounding results to this "
                  "Hub repo (user/name; main process only; needs `hf auth login`). LPI adapters only."},
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the --push_to_hub repo as private."})


def _fail(message: str) -> None:
    """A command-line mistake: exit with the message (no traceback), as the retrieval example does."""
    sys.exit(message)


def _caps(data_args: GroundingDataArguments, default: dict[str, int] | None) -> dict[str, int | None]:
    """{"train": cap, "validation": cap} from --max_per_task (0: no cap)."""
    values = data_args.max_per_task
    if not values:
        return {"train": None, "validation": None} if default is None else dict(default)
    if len(values) > 2 or any(v < 0 for v in values):
        _fail(f"--max_per_task takes one or two counts >= 0 (TRAIN [VAL]; 0 = no cap), got {values}.")
    train, val = values[0], values[-1]
    return {"train": train or None, "validation": val or None}


def _require_file(path: str | None, flag: str, what: str) -> str:
    if not path:
        _fail(f"--dataset with RefCOCO files needs {flag} ({what}).")
    if not os.path.isfile(path):
        _fail(f"{flag}: {what} not found at {path!r}.")
    return path


def _check_images(data: datasets.DatasetDict, flag: str) -> None:
    """Every image path exists (one clear error instead of a decoding failure in the middle of a run)."""
    for name, split in data.items():
        paths = [image["path"] for image in split.cast_column("image", datasets.Image(decode=False))["image"]]
        missing = [p for p in paths if p and not os.path.isfile(p)]
        if missing:
            _fail(f"{len(missing)} of the {len(paths)} {name} images are missing, e.g. {missing[0]!r}: {flag} must be "
                  "the folder that holds the annotation files' `file_name`s (COCO 2014 train2014/ for RefCOCO*).")


def load_refcoco(data_args: GroundingDataArguments, task_order: list[str]) -> datasets.DatasetDict:
    """RefCOCO / RefCOCO+ / RefCOCOg train + validation from MDETR files or refer pickles, one task per supercategory."""
    from peft_lpi.data.refcoco import REFCOCO_CAPS, build_refcoco_mdetr, build_refcoco_refer

    caps = _caps(data_args, REFCOCO_CAPS)
    if not data_args.image_dir or not os.path.isdir(data_args.image_dir):
        _fail(f"--dataset {data_args.dataset} needs --image_dir, the COCO 2014 train2014/ folder "
              f"(got {data_args.image_dir!r}).")
    common = dict(task_order=task_order, shuffle_seed=data_args.sample_seed)
    if data_args.refs_file or data_args.instances_file:
        refs = _require_file(data_args.refs_file, "--refs_file", "the refer refs(...).p file")
        instances = _require_file(data_args.instances_file, "--instances_file", "the refer instances.json")
        splits = {"train": data_args.refer_train_split, "validation": data_args.refer_val_split}
        data = datasets.DatasetDict({
            name: build_refcoco_refer(refs, instances, data_args.image_dir, splits=split,
                                      max_per_task=caps[name], **common)
            for name, split in splits.items()
        })
    else:
        files = {"train": _require_file(data_args.train_annotations, "--train_annotations", "the MDETR training file"),
                 "validation": _require_file(data_args.val_annotations, "--val_annotations",
                                             "the MDETR evaluation file")}
        data = datasets.DatasetDict({
            name: build_refcoco_mdetr(path, data_args.image_dir, max_per_task=caps[name], **common)
            for name, path in files.items()
        })
    _check_images(data, "--image_dir")
    return data


def _cap_per_task(split: datasets.Dataset, cap: int | None, seed: int | None) -> datasets.Dataset:
    """The first `cap` rows of every task (a seeded random `cap` with `seed`), in the split's order."""
    if cap is None:
        return split
    import random

    by_task: dict[int, list[int]] = {}
    for i, task in enumerate(split["task"]):
        by_task.setdefault(task, []).append(i)
    keep = []
    for task, rows in by_task.items():
        if seed is not None:
            rows = random.Random(f"{seed}-{task}").sample(rows, len(rows))
        keep += rows[:cap]
    return split.select(sorted(keep))


def load_datasets_source(data_args: GroundingDataArguments, max_tasks: int | None) -> datasets.DatasetDict:
    """Any `datasets` dataset (a save_to_disk folder or a Hub id) with image / expression / box / task columns."""
    from peft_lpi.data.grounding import as_grounding_dataset

    source = data_args.dataset
    if os.path.isdir(source) and any(os.path.isfile(os.path.join(source, f)) for f in ("dataset_dict.json",
                                                                                          "state.json")):
        loaded = datasets.load_from_disk(source)
    else:
        loaded = datasets.load_dataset(source)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({data_args.train_split: loaded})
    splits = {"train": data_args.train_split, "validation": data_args.eval_split}
    for flag, split in (("--train_split", data_args.train_split), ("--eval_split", data_args.eval_split)):
        if split not in loaded:
            _fail(f"--dataset {source}: no split {split!r} ({flag}); its splits are {sorted(loaded)}.")
    columns = {"--image_column": data_args.image_column, "--expression_column": data_args.expression_column,
               "--box_column": data_args.box_column, "--task_column": data_args.task_column}
    for split in splits.values():
        present = loaded[split].column_names
        missing = [f"{column!r} ({flag})" for flag, column in columns.items() if column not in present]
        if missing:
            _fail(f"--dataset {source}: the {split} split has no column {', '.join(missing)}; its columns are "
                  f"{present}. Name the right ones with --image_column / --expression_column / --box_column / "
                  "--task_column.")
    kwargs = dict(image_column=data_args.image_column, expression_column=data_args.expression_column,
                  box_column=data_args.box_column, task_column=data_args.task_column,
                  image_id_column=data_args.image_id_column, box_format=data_args.box_format)
    train = as_grounding_dataset(loaded[splits["train"]], task_names=data_args.task_order, **kwargs)
    names = list(train.features["task"].names)
    if max_tasks:
        names = names[:max_tasks]
    data = {"train": as_grounding_dataset(loaded[splits["train"]], task_names=names, **kwargs) if max_tasks
            else train,
            "validation": as_grounding_dataset(loaded[splits["validation"]], task_names=names, **kwargs)}
    caps = _caps(data_args, None)
    return datasets.DatasetDict({name: _cap_per_task(split, caps[name], data_args.sample_seed)
                                 for name, split in data.items()})


def require_every_task(data: datasets.DatasetDict, fix: str) -> None:
    """Every task has samples in every split, or a clear error naming the task, the split and the fix."""
    names = list(data["train"].features["task"].names)
    for split_name, split in data.items():
        counts = Counter(split["task"])
        for t, name in enumerate(names):
            if not counts[t]:
                _fail(f"task {name!r} has no samples in the {split_name} split after filtering "
                      f"({len(split)} samples over {len(counts)} tasks): {fix}")


def load_grounding_data(args: GroundingArguments, data_args: GroundingDataArguments) -> datasets.DatasetDict:
    """The run's REC DatasetDict (train + validation) in the shared schema, every task non-empty."""
    dataset = data_args.dataset
    if dataset == OFFLINE:
        given = [f"--{name}" for name in ("train_annotations", "val_annotations", "image_dir", "refs_file",
                                          "instances_file", "task_order", "max_per_task")
                 if getattr(data_args, name)]
        if given:
            _fail(f"{', '.join(given)} select real data: add --dataset refcoco (or a `datasets` folder / Hub id).")
        from peft_lpi.data.grounding_world import GROUNDING_TASKS, build_grounding_benchmark

        tasks = GROUNDING_TASKS[: args.max_tasks] if args.max_tasks else GROUNDING_TASKS
        return datasets.DatasetDict(
            build_grounding_benchmark(args.world_seed, args.train_per_task, args.val_per_task, tasks=tasks,
                                      train_all_objects=args.train_all_objects)
        )
    if dataset.lower() in REFCOCO_DATASETS:
        from peft_lpi.data.coco import COCO_TASK_ORDER

        order = list(data_args.task_order or COCO_TASK_ORDER)
        unknown = [name for name in order if name not in COCO_TASK_ORDER]
        if unknown:
            _fail(f"--task_order: {unknown} are not COCO supercategories; choose from {COCO_TASK_ORDER}.")
        data = load_refcoco(data_args, order[: args.max_tasks] if args.max_tasks else order)
        fix = ("the annotation files hold no usable referred object of that supercategory (see the warnings above "
               "for skipped samples); check --train_annotations / --val_annotations (or --refs_file and "
               "--refer_*_split), or leave the task out with --task_order or --max_tasks.")
    else:
        data = load_datasets_source(data_args, args.max_tasks)
        fix = (f"check --task_column ({data_args.task_column!r}) and the splits (--train_split / --eval_split), or "
               "leave the task out with --task_order.")
    require_every_task(data, fix)
    return data


def load_detector(path: str, accelerator: Accelerator) -> tuple:
    """The detector at `path` (OWL-ViT / OWLv2 or Grounding DINO, by its config's model_type), its tokenizer and
    image processor, and the LPIConfig settings it needs: Grounding DINO's Swin tower cannot take extra tokens, so
    it gets injection="additive" (prompts added to the top-left window of each stage's map and to BERT's first
    positions, as the authors did for GLIP), and its image processor pads every image to one fixed canvas
    (`fixed_canvas`: image features, hence keys and routing, must not depend on the batch)."""
    model_type = AutoConfig.from_pretrained(path).model_type
    tokenizer, image_processor = AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    if model_type in GROUNDING_DINO_TYPES:
        if accelerator.is_main_process:
            print(f"{path}: Grounding DINO (Swin + BERT): LPI prompts are additive (LPIConfig(injection='additive')); "
                  "loss: the model's own; images padded to one fixed canvas.")
        base = AutoModelForZeroShotObjectDetection.from_pretrained(path)
        return base, tokenizer, fixed_canvas(image_processor), {"injection": "additive"}
    if model_type not in OWL_TYPES:
        raise ValueError(f"--model {path} is a {model_type!r} model; continual grounding runs on OWL-ViT / OWLv2 "
                         f"{OWL_TYPES} and Grounding DINO {GROUNDING_DINO_TYPES} detectors.")
    base = (OwlViTForObjectDetection if model_type == "owlvit" else AutoModelForZeroShotObjectDetection).from_pretrained(
        path
    )
    return base, tokenizer, image_processor, {}


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((GroundingArguments, GroundingDataArguments, ContinualTrainingArguments))
    parser.set_defaults(**OFFLINE_TRAINING_DEFAULTS)
    parser._option_string_actions["--eval_routing"].help = "Modes to evaluate: zero-shot, oracle, auto."
    parser._option_string_actions["--recall_ks"].help = "Precision@k cut-offs."
    args, data_args, train_args = parser.parse_args_into_dataclasses(args=argv)
    if data_args.dataset != OFFLINE:  # the step budget is the offline world's; real data trains by epochs
        given = {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")}
        if "--max_steps" not in given:
            train_args.max_steps = None
        if "--num_train_epochs" not in given:
            train_args.num_train_epochs = REAL_DATA_EPOCHS
    accelerator = Accelerator(
        mixed_precision=train_args.mixed_precision,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=10))],  # a lost process fails the run
    )
    if accelerator.device.type == "cpu":
        torch.set_num_threads(args.cpu_threads or max(1, (os.cpu_count() or 1) // accelerator.num_processes))

    source = load_grounding_data(args, data_args)  # before the model: bad data flags fail fast

    path = args.model
    if path == OFFLINE:
        from peft_lpi.data.grounding_backbone import get_grounding_backbone

        with accelerator.main_process_first():  # one process pretrains, the others reuse the cache
            path = str(get_grounding_backbone(args.backbone_cache, seed=args.world_seed,
                                              progress=accelerator.is_local_main_process))
    base, tokenizer, image_processor, lpi_kwargs = load_detector(path, accelerator)

    data = prepare_grounding_dataset(source)
    if grounding_model_type(base) in OWL_TYPES:  # the expressions of one image: queries of one OWL forward
        data["train"] = group_pairs_by_image(data["train"])
    if train_args.preprocess_images is None:
        train_args.preprocess_images = args.model == OFFLINE
    if train_args.preprocess_images and lpi_kwargs.get("injection") == "additive":
        raise ValueError(
            "--preprocess_images true stores pixel_values only, but Grounding DINO's image processor pads every image "
            "to a fixed canvas and the detector needs the pixel_mask: leave --preprocess_images off (the default)."
        )
    if train_args.preprocess_images:  # process every image once (the evaluator reads the same preprocessed split)
        data = {name: with_pixel_values(split, image_processor) for name, split in data.items()}
        train_args.preprocess_images = False  # done here, not again in the trainer
    names = list(data["train"].features["task"].names)

    torch.manual_seed(train_args.seed)
    lpi_kwargs.update(prompt_length=args.prompt_length, prompt_depth=args.prompt_depth, rank=args.rank,
                      num_keys=args.num_keys, align_weight=args.align_weight, task_weight=args.task_weight)
    model, method = build_grounding_method(args.method, base, len(names), lpi_kwargs, lora_rank=args.lora_rank,
                                           lora_target_modules=args.lora_target_modules)
    if accelerator.is_main_process:
        model.print_trainable_parameters()
    if data_args.push_to_hub:
        from peft_lpi.hub import is_lpi_model

        if not is_lpi_model(model):  # refuse before training, not after it
            _fail("--push_to_hub uploads LPI adapters; this run does not produce one.")
    collator = grounding_collator(model, image_processor, tokenizer)  # texts written and truncated as the model needs
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
    results = trainer.train()
    if data_args.push_to_hub and accelerator.is_main_process:
        push_grounding_adapter(trainer.model, data_args, results)
    return results


def push_grounding_adapter(model: torch.nn.Module, data_args: GroundingDataArguments, results: dict) -> None:
    """Upload the adapter, its task files, results.json and a model card with the grounding results."""
    from peft_lpi.hub import push_adapter_to_hub

    push_adapter_to_hub(model, data_args.push_to_hub, results=results, private=data_args.hub_private)
    print(f"Pushed the adapter and its model card to the Hub repo {data_args.push_to_hub}.")


if __name__ == "__main__":
    main()
