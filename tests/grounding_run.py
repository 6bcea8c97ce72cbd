"""Tiny continual grounding runs of examples/continual_grounding.py, shared by the grounding CLI, distributed and
fault tests, and run as a script by the ones that need other processes.

Builders: `tiny_owl` (a 2+2-layer OWL-ViT), `save_detector_folder`, `tiny_owl_folder` (`tiny_owl` with the grounding
world's tokenizer and image processor, saved like a Hub checkpoint), `tiny_gdino_folder` (the tiny Grounding DINO of
test_grounding_dino.py, likewise), `checkpoint_tensors` (a finished run's adapter tensors), `write_mdetr_split` (a RefCOCO-style MDETR annotation file and small PNG images),
`load_example` and `tiny_argv` (the example's flags for a run of seconds).

As a script (one torch thread, no plots):

- `python tests/grounding_run.py run MODEL OUTPUT_DIR BATCH_SIZE EXPECTED_PROCESSES [EXAMPLE FLAGS...]` runs the
  example on the offline world (2 tasks) with the detector folder MODEL (`tiny_owl_folder`, `tiny_gdino_folder`);
  under `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2` it is the 2-process run.
- `python tests/grounding_run.py kill OWL OUTPUT_DIR MARKER PAUSE_AT` runs it with a checkpoint after every optimiser
  step; once the checkpoint of optimiser step PAUSE_AT of task 1 is on disk it writes MARKER and blocks inside the
  next training step, so the parent kills it (SIGKILL) in the middle of task 1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# One category per supercategory used by the fixtures (COCO ids and names).
CATEGORIES = {
    "appliance": (78, "microwave"), "sports": (37, "sports ball"), "outdoor": (10, "traffic light"),
    "person": (1, "person"), "animal": (18, "dog"),
}
IMAGE_SIZE = (80, 60)


def tiny_owl(tokenizer: Any) -> Any:
    """A tiny OWL-ViT (2+2 layers, width 32, 64 px images, patch 16) for the grounding world's `tokenizer` (random
    weights from seed 0, detection heads initialised as the backbone does)."""
    from transformers import OwlViTConfig, OwlViTForObjectDetection

    from peft_lpi.data.grounding_backbone import init_detection_heads

    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = dict(small, vocab_size=len(tokenizer), max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    owl = OwlViTForObjectDetection(OwlViTConfig(text_config=text, projection_dim=32,
                                                vision_config=dict(small, image_size=64, patch_size=16)))
    init_detection_heads(owl)
    return owl


def save_detector_folder(path: Path, model: Any, tokenizer: Any, image_processor: Any) -> Path:
    """`path` laid out like a Hub checkpoint of the detector: weights, tokenizer and image processor."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


def tiny_owl_folder(path: Path) -> Path:
    """`tiny_owl` with the grounding world's tokenizer and image processor, saved to `path`."""
    from peft_lpi.data.grounding_backbone import build_grounding_tokenizer, grounding_image_processor

    tokenizer = build_grounding_tokenizer()
    return save_detector_folder(path, tiny_owl(tokenizer), tokenizer,
                                grounding_image_processor([0.2, 0.2, 0.2], [0.3, 0.3, 0.3]))


def tiny_gdino_folder(path: Path) -> Path:
    """The tiny Grounding DINO (Swin + BERT) of tests/test_grounding_dino.py with its BERT tokenizer and 64 px image
    processor, saved to `path`."""
    from test_grounding_dino import tiny_bert_tokenizer, tiny_gdino, tiny_gdino_processor

    tokenizer = tiny_bert_tokenizer()
    return save_detector_folder(path, tiny_gdino(tokenizer), tokenizer, tiny_gdino_processor())


def write_images(image_dir: Path, count: int) -> list[str]:
    """`count` small PNGs (one coloured rectangle each) named like COCO 2014 files; returns the file names."""
    from PIL import Image, ImageDraw

    image_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        name = f"COCO_train2014_{i:012d}.png"
        image = Image.new("RGB", IMAGE_SIZE, (20 * i % 255, 40, 90))
        ImageDraw.Draw(image).rectangle([5 + 3 * i % 40, 5, 35 + 3 * i % 40, 40], fill=(230, 30, 30))
        image.save(image_dir / name)
        names.append(name)
    return names


def write_mdetr_split(path: Path, image_dir: Path, samples: list[tuple[str, str, list[float]]]) -> Path:
    """An MDETR COCO-format refexp file (`final_refcoco_{split}.json`): one `images` entry per (supercategory,
    expression, COCO xywh box) sample in the given order, its one annotation, and the categories of `CATEGORIES`."""
    files = write_images(image_dir, 6)
    images, annotations = [], []
    for entry, (supercategory, expression, bbox) in enumerate(samples):
        coco_id = entry % len(files)
        images.append({"file_name": files[coco_id], "height": IMAGE_SIZE[1], "width": IMAGE_SIZE[0], "id": entry,
                       "original_id": coco_id, "caption": expression, "dataset_name": "refcoco",
                       "tokens_negative": [[0, 3]]})
        annotations.append({"area": bbox[2] * bbox[3], "iscrowd": 0, "image_id": entry,
                            "category_id": CATEGORIES[supercategory][0], "id": 1000 + entry, "bbox": bbox,
                            "original_id": 5000 + entry, "tokens_positive": [[0, 3]]})
    categories = [{"id": cid, "name": name, "supercategory": sup} for sup, (cid, name) in CATEGORIES.items()]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def load_example() -> Any:
    """examples/continual_grounding.py as a module (registered in sys.modules: its dataclasses resolve there)."""
    if "continual_grounding" in sys.modules:
        return sys.modules["continual_grounding"]
    spec = importlib.util.spec_from_file_location("continual_grounding", ROOT / "examples" / "continual_grounding.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tiny_argv(owl: Path, output_dir: Path, batch_size: int = 8, max_steps: int = 2) -> list[str]:
    """Flags of a run of seconds on the tiny OWL (LPI P=2, K=2, r=2, 2 keys; no progress bars)."""
    return ["--model", str(owl), "--max_steps", str(max_steps), "--per_device_train_batch_size", str(batch_size),
            "--per_device_eval_batch_size", "8", "--prompt_length", "2", "--prompt_depth", "2", "--rank", "2",
            "--num_keys", "2", "--output_dir", str(output_dir), "--disable_tqdm", "true", "--cpu_threads", "1"]


def offline_world_argv(owl: Path, output_dir: Path, batch_size: int = 8, max_steps: int = 2) -> list[str]:
    """`tiny_argv` on the offline grounding world: 2 tasks of 16 training scenes and 20 validation pairs."""
    return tiny_argv(owl, output_dir, batch_size, max_steps) + ["--max_tasks", "2", "--train_per_task", "16",
                                                                "--val_per_task", "20"]


def no_plots() -> None:
    """Skip the matplotlib figures of the report (seconds of CPU per run); results.json/md are still written."""
    import peft_lpi.report

    peft_lpi.report.plot_grounding_results = lambda *args, **kwargs: []


def checkpoint_tensors(output_dir: Path) -> dict[str, torch.Tensor]:
    """Every adapter tensor of a run's last checkpoint, named by file and key (LPI: one adapter file with every
    task's factors and keys; per-task LoRA: one adapter folder per task, its routing keys in keys.safetensors)."""
    from safetensors.torch import load_file

    root = output_dir / "checkpoint"
    files = sorted(root.rglob("*.safetensors"))
    assert files, f"no safetensors under {root}"
    return {f"{p.relative_to(root)}:{k}": v for p in files for k, v in load_file(str(p)).items()}


def run(owl: str, output_dir: str, batch_size: int, expected: int, extra: list[str] | None = None) -> None:
    no_plots()
    results = load_example().main(offline_world_argv(Path(owl), Path(output_dir), batch_size) + list(extra or []))
    if results["num_processes"] != expected:  # every wrong launcher combination exits 0 otherwise
        raise SystemExit(f"expected {expected} processes, got {results['num_processes']}")


def run_until_killed(owl: str, output_dir: str, marker: str, pause_at: int) -> None:
    from peft_lpi.continual.checkpointing import Checkpointer
    from peft_lpi.continual.trainer import ContinualTrainer

    no_plots()
    save_checkpoint, training_step = Checkpointer.save, ContinualTrainer._training_step
    paused = {"armed": False}

    def save_then_mark(self, state, *args, **kwargs):
        save_checkpoint(self, state, *args, **kwargs)
        if state.task == 1 and state.optimizer_steps == pause_at and not paused["armed"]:
            paused["armed"] = True
            Path(marker).write_text(f"task {state.task} step {state.optimizer_steps}\n")

    def step_or_block(self, *args, **kwargs):
        if paused["armed"]:  # the next step has started (its batch is loaded): wait here for SIGKILL
            while True:
                time.sleep(1)
        return training_step(self, *args, **kwargs)

    Checkpointer.save, ContinualTrainer._training_step = save_then_mark, step_or_block
    load_example().main(offline_world_argv(Path(owl), Path(output_dir), max_steps=4) + ["--save_steps", "1"])
    sys.exit(f"grounding_run: the run finished without reaching task 1 step {pause_at}")  # the test fails on this


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    if sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6:])
    elif sys.argv[1] == "kill":
        run_until_killed(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}: run or kill")
