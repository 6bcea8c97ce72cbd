"""Two CPU processes (gloo) give the same training and metrics as one process with the same global batch."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_command
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("dist_train_run.py")


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "TOKENIZERS_PARALLELISM": "false"}
    run_command([sys.executable, str(SCRIPT), str(tmp_path / "one"), "16", "1"], env)
    run_command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(SCRIPT), str(tmp_path / "two"), "8", "2"], env)
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    factors_one = load_file(str(tmp_path / "one" / "factors.safetensors"))
    factors_two = load_file(str(tmp_path / "two" / "factors.safetensors"))
    for key, value in factors_one.items():
        if key.endswith("_keys"):
            continue  # k-means keys: compared through routing accuracy below
        torch.testing.assert_close(factors_two[key], value, rtol=1e-4, atol=1e-5, msg=key)
    for mode in ("oracle", "auto"):
        m1 = one["modes"][mode]["strict"]["matrices"]
        m2 = two["modes"][mode]["strict"]["matrices"]
        for key in m1:
            for row1, row2 in zip(m1[key], m2[key]):
                for a, b in zip(row1, row2):
                    assert (a is None and b is None) or abs(a - b) < 1e-6, (mode, key, row1, row2)
    assert one["modes"]["auto"]["routing_accuracy"] == two["modes"]["auto"]["routing_accuracy"]
