"""Faults: SIGKILL in the middle of a task then resume, a save failing mid-write, a full disk, a kill between the
two renames of a checkpoint swap; and CPU determinism (same seed -> identical factors and metrics)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fault_run import build_base, build_world, comparable, factors, make_trainer
from helpers import kill_group_if_running, sigkill_at_marker
from peft import PeftModel

import peft_lpi.io
from peft_lpi.io import recover_directory

HERE = Path(__file__).resolve().parent
PAUSE_AT = 2  # the child is killed during optimiser step 3 of task 1 (4 steps per task), after step 2's checkpoint
CHILD_DEADLINE_S = 240


@pytest.fixture(scope="module")
def world():
    return build_world()


@pytest.fixture(autouse=True)
def _quiet_and_single_threaded():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the child runs with one thread too: identical float reductions
    with pytest.MonkeyPatch.context() as patch:
        import peft_lpi.report

        patch.setattr(peft_lpi.report, "plot_results", lambda *a, **k: [])
        yield
    torch.set_num_threads(previous)


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative paths)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def assert_same_factors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[key], value, rtol=0, atol=atol, equal_nan=True, msg=key)
        else:
            assert torch.equal(got[key], value), key


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """Starts the child that will be SIGKILLed, runs two uninterrupted runs in-process meanwhile, then kills it."""
    root = tmp_path_factory.mktemp("faults")
    marker = root / "marker"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    with open(root / "child.log", "wb") as log:
        child = subprocess.Popen(
            [sys.executable, str(HERE / "fault_run.py"), str(root / "killed"), str(marker), str(PAUSE_AT)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        with pytest.MonkeyPatch.context() as patch:
            import peft_lpi.report

            patch.setattr(peft_lpi.report, "plot_results", lambda *a, **k: [])
            first = make_trainer(world, root / "a")
            results_a = first.train()
            second = make_trainer(world, root / "b")
            results_b = second.train()
        torch.set_num_threads(previous)
        sigkill_at_marker(child, marker, root / "child.log", CHILD_DEADLINE_S)
    finally:
        kill_group_if_running(child)
    return {
        "a": (results_a, factors(first.model)), "b": (results_b, factors(second.model)),
        "killed": root / "killed", "returncode": child.returncode, "marker": marker.read_text(),
    }


# ============================================================================================ determinism (CPU)
@pytest.mark.slow
def test_same_seed_gives_identical_factors_and_metrics_on_cpu(runs):
    (results_a, factors_a), (results_b, factors_b) = runs["a"], runs["b"]
    assert_same_factors(factors_b, factors_a)  # bit-identical (atol 0): torch.equal on every tensor
    for key in factors_a:
        assert torch.equal(factors_a[key].nan_to_num(), factors_b[key].nan_to_num()), key
    assert comparable(results_a) == comparable(results_b)
    assert results_a["modes"]["auto"]["routing_accuracy"]  # the metrics compared are real


# ================================================================================================ SIGKILL
@pytest.mark.slow
def test_sigkill_mid_task_then_resume_matches_uninterrupted_run(runs, world):
    assert runs["returncode"] == -signal.SIGKILL
    assert runs["marker"].strip() == f"task 1 step {PAUSE_AT}"
    killed = runs["killed"]
    state = json.loads((killed / "checkpoint" / "trainer_state.json").read_text())
    assert (state["task"], state["optimizer_steps"], len(state["stages"])) == (1, PAUSE_AT, 1)  # mid task 1
    assert not (killed / "results.json").exists()

    resumed = make_trainer(world, killed, resume_from_checkpoint=True)
    results = resumed.train()
    expected_results, expected_factors = runs["a"]
    assert_same_factors(factors(resumed.model), expected_factors, atol=1e-6)
    assert results["modes"] == expected_results["modes"]  # recall matrices, summaries and routing accuracy
    torch.testing.assert_close(torch.tensor(results["task_similarity"]), torch.tensor(expected_results["task_similarity"]))
    assert json.loads((killed / "results.json").read_text())["modes"] == expected_results["modes"]


# ================================================================================ failing writes, full disk
def _checkpoint_with_a_good_save(world, tmp_path):
    trainer = make_trainer(world, tmp_path / "run")
    trainer.checkpointer.save(trainer.state, trainer.task_similarity)
    checkpoint = tmp_path / "run" / "checkpoint"
    saved = factors(trainer.model)
    with torch.no_grad():  # the next save would write different factors
        for param in trainer.model.base_model.active_bank.tasks[0].parameters():
            param.add_(1.0)
    return trainer, checkpoint, saved


def _assert_previous_checkpoint_intact(world, checkpoint: Path, digest: dict[str, str], saved) -> None:
    assert tree_digest(checkpoint) == digest
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["checkpoint"]  # no temporary leftovers
    reloaded = PeftModel.from_pretrained(build_base(world[0]), str(checkpoint))
    assert_same_factors(factors(reloaded), saved)


@pytest.mark.parametrize("error", ["io_error", "disk_full"])
def test_checkpoint_write_failing_mid_file_keeps_previous_checkpoint(world, tmp_path, monkeypatch, error):
    trainer, checkpoint, saved = _checkpoint_with_a_good_save(world, tmp_path)
    digest = tree_digest(checkpoint)
    code = errno.EIO if error == "io_error" else errno.ENOSPC

    def failing_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 10)  # a partial adapter file in the temporary folder
        raise OSError(code, os.strerror(code))

    import peft.peft_model

    monkeypatch.setattr(peft.peft_model, "safe_save_file", failing_save_file)
    with pytest.raises(OSError) as info:
        trainer.checkpointer.save(trainer.state, trainer.task_similarity)
    assert info.value.errno == code
    if error == "disk_full":
        message = str(info.value)
        assert "No space left" in message and "checkpoint" in message and "nothing was replaced" in message
    monkeypatch.undo()
    _assert_previous_checkpoint_intact(world, checkpoint, digest, saved)


def test_full_disk_while_writing_a_task_file_is_a_clear_error(world, tmp_path, monkeypatch):
    model = make_trainer(world, tmp_path / "run").model
    path = tmp_path / "task0.safetensors"
    model.save_task(0, path)
    before = path.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 3)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(peft_lpi.io, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left on the device while writing .*task0.safetensors"):
        model.save_task(0, path)
    assert path.read_bytes() == before
    assert [name for name in os.listdir(tmp_path) if name != "run"] == ["task0.safetensors"]  # no temporary file


def test_kill_between_the_renames_of_a_checkpoint_swap_is_recovered(world, tmp_path, monkeypatch):
    trainer, checkpoint, saved = _checkpoint_with_a_good_save(world, tmp_path)
    digest = tree_digest(checkpoint)
    real_replace = os.replace

    def killed_on_commit(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".checkpoint.") and Path(dst) == checkpoint:
            raise KeyboardInterrupt("killed between the two renames")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", killed_on_commit)
    with pytest.raises(KeyboardInterrupt):
        trainer.checkpointer.save(trainer.state, trainer.task_similarity)
    monkeypatch.undo()
    assert not checkpoint.exists()  # old moved aside, new not yet in place
    assert recover_directory(checkpoint) == checkpoint  # what ContinualTrainer.train(resume_from_checkpoint=True) does first
    _assert_previous_checkpoint_intact(world, checkpoint, digest, saved)
    assert recover_directory(checkpoint) is None  # idempotent
