"""Continual grounding runs on the retrieval machinery: two CPU processes (gloo) == one process with the same global
batch, and a run SIGKILLed in the middle of a task then resumed == an uninterrupted run. Both run
examples/continual_grounding.py (tiny OWL-ViT, offline grounding world, 2 tasks) through tests/grounding_run.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from grounding_run import checkpoint_tensors, load_example, offline_world_argv, tiny_gdino_folder, tiny_owl_folder
from helpers import kill_group_if_running, run_command, sigkill_at_marker

SCRIPT = Path(__file__).with_name("grounding_run.py")
PAUSE_AT = 2  # the child is killed during optimiser step 3 of task 1 (4 steps per task), after step 2's checkpoint
CHILD_DEADLINE_S = 240
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def assert_same_adapter(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float,
                        skip_keys: bool = False) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if skip_keys and (key.endswith("_keys") or key.startswith("keys.safetensors:")):
            continue  # k-means keys (LPI's, in the adapter; LoRA's, in keys.safetensors): compared through routing
        torch.testing.assert_close(got[key], value, rtol=0 if atol == 0 else 1e-4, atol=atol, equal_nan=True, msg=key)


def assert_same_grounding(got: dict, expected: dict) -> None:
    """Precision matrices of every mode and k, their summaries and the routing accuracy per stage: equal."""
    assert got.keys() == expected.keys() == {"zero-shot", "oracle", "auto"}
    for mode, block in expected.items():
        for key, matrix in block["matrices"].items():
            assert got[mode]["matrices"][key] == matrix, (mode, key)
        for key, summary in block["summary"].items():
            assert got[mode]["summary"][key] == pytest.approx(summary, abs=1e-9), (mode, key)
    assert got["auto"]["routing_accuracy"] == expected["auto"]["routing_accuracy"]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    owl = tiny_owl_folder(tmp_path / "owl")
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    run_command([sys.executable, str(SCRIPT), "run", str(owl), str(tmp_path / "one"), "8", "1"], env)
    run_command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
                 "run", str(owl), str(tmp_path / "two"), "4", "2"], env)
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    assert_same_adapter(checkpoint_tensors(tmp_path / "two"), checkpoint_tensors(tmp_path / "one"), atol=1e-5,
                        skip_keys=True)
    assert_same_grounding(two["grounding"], one["grounding"])
    # the comparison has something to compare: some hits and a routing that is not trivially perfect or zero
    assert any(v for block in one["grounding"].values() for row in block["matrices"]["P@5"] for v in row if v)
    assert 0 < one["grounding"]["auto"]["routing_accuracy"][-1] < 1


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("method", ["lpi", "lora"])
def test_grounding_dino_two_processes_match_one_process(tmp_path, method):
    """The same check on Grounding DINO (additive prompts in Swin, its own matcher-based loss, one expression per
    image), for LPI and for the per-task LoRA baseline: the trained parameters and every precision figure agree."""
    gdino = tiny_gdino_folder(tmp_path / "gdino")
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    flags = ["--method", method]
    run_command([sys.executable, str(SCRIPT), "run", str(gdino), str(tmp_path / "one"), "8", "1", *flags], env)
    run_command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
                 "run", str(gdino), str(tmp_path / "two"), "4", "2", *flags], env)
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert one["num_processes"] == 1 and two["num_processes"] == 2 and one["method"] == two["method"] == method
    trained_one, trained_two = checkpoint_tensors(tmp_path / "one"), checkpoint_tensors(tmp_path / "two")
    assert_same_adapter(trained_two, trained_one, atol=1e-5, skip_keys=True)
    # training moved parameters that start at zero (LPI: the correlation LayerNorms' biases; LoRA: the B matrices)
    started_at_zero = [v for k, v in trained_one.items() if k.endswith(("norm.bias", "lora_B.weight"))]
    assert started_at_zero and any(bool(v.any()) for v in started_at_zero), "nothing trained"
    assert_same_grounding(two["grounding"], one["grounding"])


def _run_in_process(argv: list[str]) -> dict:
    AcceleratorState._reset_state(True)
    try:
        with pytest.MonkeyPatch.context() as patch:
            import peft_lpi.report

            patch.setattr(peft_lpi.report, "plot_grounding_results", lambda *a, **k: [])
            patch.setattr(torch, "set_num_threads", lambda n: None)  # the module's one thread stays
            return load_example().main(argv)
    finally:
        AcceleratorState._reset_state(True)


@pytest.mark.slow
def test_sigkill_mid_task_then_resume_matches_uninterrupted_run(tmp_path):
    owl = tiny_owl_folder(tmp_path / "owl")
    marker, killed = tmp_path / "marker", tmp_path / "killed"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the child runs with one thread too: identical float reductions
    with open(tmp_path / "child.log", "wb") as log:
        child = subprocess.Popen([sys.executable, str(SCRIPT), "kill", str(owl), str(killed), str(marker),
                                  str(PAUSE_AT)], env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        argv = offline_world_argv(owl, tmp_path / "full", max_steps=4) + ["--save_steps", "1"]
        full = _run_in_process(argv)  # meanwhile, the uninterrupted run
        sigkill_at_marker(child, marker, tmp_path / "child.log", CHILD_DEADLINE_S)
    finally:
        kill_group_if_running(child)
        torch.set_num_threads(previous)
    assert child.returncode == -signal.SIGKILL
    assert marker.read_text().strip() == f"task 1 step {PAUSE_AT}"
    state = json.loads((killed / "checkpoint" / "trainer_state.json").read_text())
    assert (state["task"], state["optimizer_steps"], len(state["stages"])) == (1, PAUSE_AT, 1)  # mid task 1
    assert not (killed / "results.json").exists()

    torch.set_num_threads(1)
    try:
        resumed = _run_in_process(offline_world_argv(owl, killed, max_steps=4)
                                  + ["--save_steps", "1", "--resume_from_checkpoint", "true"])
    finally:
        torch.set_num_threads(previous)
    assert_same_adapter(checkpoint_tensors(killed), checkpoint_tensors(tmp_path / "full"), atol=1e-6)
    assert_same_grounding(resumed["grounding"], full["grounding"])
    assert json.loads((killed / "results.json").read_text())["grounding"] == full["grounding"]
    assert resumed["train_seconds_per_task"][0] == state["train_seconds"][0]  # task 0 restored, not retrained
