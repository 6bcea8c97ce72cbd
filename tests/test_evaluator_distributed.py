"""A 2-process evaluation encodes each split once per routing mode: the towers see exactly the samples a 1-process
evaluation gives them, split between the processes, and the gathered routes give the same routing accuracy."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from helpers import run_command

SCRIPT = Path(__file__).with_name("dist_eval_count.py")


@pytest.mark.distributed
def test_two_process_evaluation_encodes_each_split_once_per_mode(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "TOKENIZERS_PARALLELISM": "false"}
    run_command([sys.executable, str(SCRIPT), str(tmp_path / "one"), "1"], env)
    run_command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(SCRIPT), str(tmp_path / "two"), "2"], env)
    one = json.loads((tmp_path / "one" / "counts.json").read_text())
    two = json.loads((tmp_path / "two" / "counts.json").read_text())
    assert one["num_processes"] == 1 and two["num_processes"] == 2 and one["modes"] == ["oracle", "auto"]
    images, texts = one["num_images"], one["num_texts"]
    (single,) = one["per_process"]
    # One process: "oracle" encodes every image once with its task's prompts; "auto" once prompt-free to route
    # and once with the routed prompts (the tuner's routing pass) — 3 passes per split, no more.
    assert single == {"vision": 3 * images, "text": 3 * texts}
    # Two processes: the same passes, each process doing half of every one (no extra pass to recompute routes).
    assert two["per_process"] == [{"vision": 3 * images // 2, "text": 3 * texts // 2}] * 2
    assert two["routing"] == one["routing"]  # routes gathered with the embeddings, in dataset order
    for key, value in one["recall"].items():
        assert abs(two["recall"][key] - value) < 1e-6, key
    for key, value in one["auto_recall"].items():
        assert abs(two["auto_recall"][key] - value) < 1e-6, key
