"""The continual example's CLI on a generic `datasets` folder: held-out evaluation split, per-method defaults."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import datasets
import pytest
import torch
from accelerate.state import AcceleratorState
from fault_run import build_base

import peft_lpi
from peft_lpi.data.backbone import build_world_tokenizer, world_image_processor
from peft_lpi.data.world import WORLD_TASKS, build_offline_benchmark

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "continual_retrieval.py"


@pytest.fixture()
def example(monkeypatch):
    spec = importlib.util.spec_from_file_location("continual_retrieval", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "continual_retrieval", module)  # dataclasses resolve annotations there
    monkeypatch.setattr(peft_lpi.report, "plot_results", lambda *a, **k: [])  # seconds of matplotlib
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def local_world(tmp_path):
    """A backbone folder and a generic dataset on disk with ONLY a train split (captions as a plain string)."""
    tokenizer = build_world_tokenizer()
    backbone = tmp_path / "backbone"
    build_base(tokenizer).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    world_image_processor([0.5] * 3, [0.25] * 3).save_pretrained(backbone)
    world = build_offline_benchmark(seed=0, train_per_task=12, val_per_task=2, tasks=WORLD_TASKS[:2])["train"]
    generic = world.map(lambda row: {"caption": row["captions"][0]}, remove_columns=["captions", "image_id"])
    data = tmp_path / "generic"
    datasets.DatasetDict({"train": generic}).save_to_disk(data)
    return backbone, data


def run(example, argv: list[str]) -> dict:
    threads = torch.get_num_threads()
    AcceleratorState._reset_state(True)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch, "set_num_threads", lambda n: None)  # the example sizes threads for real runs
            return example.main(argv)
    finally:
        AcceleratorState._reset_state(True)
        torch.set_num_threads(threads)


def common(backbone: Path, out: Path) -> list[str]:
    return [
        "--model", str(backbone), "--num_train_epochs", "1", "--per_device_train_batch_size", "4", "--max_steps", "1",
        "--prompt_depth", "1", "--prompt_length", "2", "--rank", "2", "--output_dir", str(out), "--disable_tqdm", "true",
        "--recall_ks", "1",
    ]


@pytest.mark.slow
def test_generic_dataset_with_held_out_split_and_method_learning_rate(example, local_world, tmp_path):
    backbone, data = local_world
    loaded = []
    load_data = example.load_data
    example.load_data = lambda args: loaded.append(load_data(args)) or loaded[-1]
    results = run(example, ["--dataset", str(data), "--eval_size", "0.25", *common(backbone, tmp_path / "lpi")])
    assert results["task_names"] == [t.name for t in WORLD_TASKS[:2]]
    split = loaded[0]
    assert (split["train"].num_rows, split["validation"].num_rows) == (18, 6)  # 25 % of 2 x 12 rows held out
    assert sorted(split["validation"]["task"]) == [0, 0, 0, 1, 1, 1]  # stratified by task
    args = results["args"]
    assert args["learning_rate"] == example.OFFLINE_LEARNING_RATES["lpi"]  # no --learning_rate: the method's rate
    assert args["preprocess_images"] is False  # only the offline world is preprocessed by default

    lora = run(example, ["--dataset", str(data), "--eval_size", "6", "--method", "lora", "--learning_rate", "0.01",
                         *common(backbone, tmp_path / "lora")])
    assert lora["args"]["learning_rate"] == 0.01  # an explicit rate wins over the table


def test_generic_dataset_without_eval_split_or_size_is_refused(example, local_world, tmp_path):
    backbone, data = local_world
    with pytest.raises(ValueError, match="'validation' not found.*eval_size"):
        run(example, ["--dataset", str(data), *common(backbone, tmp_path / "out")])
