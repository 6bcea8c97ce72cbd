"""Hub push / pull without a network: the Hub client is stubbed at its API boundary (HfApi.create_repo /
upload_folder / upload_file), what would be uploaded is asserted, and adapters and tasks are loaded back from a local
folder laid out like a Hub snapshot with offline mode on."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from helpers import random_batch, tiny_clip
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model

import peft_lpi
import peft_lpi.hub as hub
import peft_lpi.report
from peft_lpi import LPIConfig
from peft_lpi.evaluation import continual_metrics
from peft_lpi.io import CheckpointError, read_task_file

BASE_ID = "hf-internal-testing/tiny-clip-lpi"
REPO = "user/lpi-tiny"
TASK_NAMES = ["noisy shapes", "blurry digits"]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Offline mode for every test here: any HTTP request the stubs do not intercept raises instead of hanging."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


class HubStub:
    """Records create_repo / upload_folder / upload_file calls and the bytes of every file they would upload."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.files: dict[str, bytes] = {}

    def install(self, monkeypatch) -> HubStub:
        stub = self

        def create_repo(api, repo_id, **kwargs):
            stub.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(api, *, repo_id, folder_path, **kwargs):
            stub.calls.append(("upload_folder", {"repo_id": repo_id, **kwargs}))
            root = Path(folder_path)
            for path in sorted(root.rglob("*")):
                if path.is_file():
                    stub.files[path.relative_to(root).as_posix()] = path.read_bytes()
            return "commit-info"

        def upload_file(api, *, path_or_fileobj, path_in_repo, repo_id, **kwargs):
            stub.calls.append(("upload_file", {"repo_id": repo_id, "path_in_repo": path_in_repo, **kwargs}))
            stub.files[path_in_repo] = Path(path_or_fileobj).read_bytes()
            return "commit-info"

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_file", upload_file)
        return self

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def card(self) -> ModelCard:
        return ModelCard(self.files["README.md"].decode())


@pytest.fixture
def stub(monkeypatch):
    return HubStub().install(monkeypatch)


def make_base():
    base = tiny_clip()
    base.name_or_path = BASE_ID  # what from_pretrained("hf-internal-testing/...") would record
    return base


def make_model(seed: int = 0, **config):
    torch.manual_seed(seed)
    model = get_peft_model(make_base(), LPIConfig(**{"num_tasks": 2, "prompt_depth": 2, "prompt_length": 3,
                                                     "rank": 2, **config}))
    for task in range(model.base_model.num_tasks):  # distinct keys per task, as after training
        generator = torch.Generator().manual_seed(100 + task)
        model.set_task_keys(task, vision=torch.randn(5, 16, generator=generator),
                            text=torch.randn(5, 16, generator=generator))
    return model


def fake_results() -> dict:
    """A results dict shaped like ContinualTrainer.results(), metrics from the real continual_metrics."""
    keys = ["i2t_R@1", "t2i_R@1", "rmean"]
    matrices = {
        "i2t_R@1": [[50.0, None], [40.0, 60.0]], "t2i_R@1": [[30.0, None], [20.0, 45.0]], "rmean": [[40.0, None],
                                                                                                   [30.0, 52.5]],
    }

    def block():
        nan = {k: [[float("nan") if v is None else v for v in row] for row in m] for k, m in matrices.items()}
        return {"matrices": matrices, "summary": {k: continual_metrics(torch.tensor(nan[k])) for k in keys}}

    return {
        "task_names": TASK_NAMES,
        "task_similarity": [[1.0, 0.25], [0.25, 1.0]],
        "trainable_parameters_per_task": 123,
        "modes": {
            "oracle": {"strict": block(), "caption_equal": block()},
            "auto": {"strict": block(), "caption_equal": block(),
                     "routing_accuracy": [{"image": 1.0, "text": 1.0}, {"image": 0.75, "text": 0.875}]},
        },
    }


def features(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        image = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        text = model.get_text_features(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).pooler_output
    return image, text


def write_snapshot(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = "a" * 40) -> Path:
    """Lay `files` out as huggingface_hub's cache does for a downloaded model repo (refs/main -> snapshot)."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


# ------------------------------------------------------------------------------------------------ the card
def test_model_card_has_front_matter_tasks_config_parameters_results_and_loading():
    config = LPIConfig(num_tasks=2, prompt_depth=9, prompt_length=16, rank=4)
    text = hub.model_card(fake_results(), config, "openai/clip-vit-base-patch16", None, trainable_parameters=5284,
                          total_parameters=10568, repo_id=REPO)
    card = ModelCard(text)
    assert card.data.library_name == "peft"
    assert card.data.base_model == "openai/clip-vit-base-patch16"
    assert card.data.tags == ["peft", "lpi", "continual-learning", "vision-language", "retrieval", "clip"]
    body = card.text
    assert body.index("| 0 | noisy shapes |") < body.index("| 1 | blurry digits |")  # task names in order
    assert "| `rank` | `4` |" in body and "| `prompt_depth` | `9` |" in body and "| `prompt_length` | `16` |" in body
    assert "5,284 per task, 10,568 for all tasks" in body
    assert "| 1 blurry digits | 60.0 | 45.0 |" in body  # final-stage recall per task
    assert "| **forgetting** | 10.0 | 10.0 |" in body  # 50 -> 40 and 30 -> 20
    assert "Routing (task-ID) accuracy after the last task: images 75.0 %, captions 87.5 %." in body
    assert "import peft_lpi" in body and f'PeftModel.from_pretrained(base, "{REPO}")' in body
    assert body.index("import peft_lpi") < body.index("PeftModel.from_pretrained")
    assert f"PEFT {__import__('peft').__version__}" in body and f"peft_lpi {peft_lpi.__version__}" in body


def test_model_card_without_results_and_with_a_local_base_model(tmp_path):
    text = hub.model_card(None, {"num_tasks": 3, "rank": 2}, str(tmp_path), ["a", "b"])
    card = ModelCard(text)
    assert card.data.library_name == "peft" and card.data.base_model is None  # a path is no Hub id
    assert str(tmp_path) in card.text and "No results were attached" in card.text
    assert "| 2 | task_2 |" in card.text  # missing names are filled in


def test_save_pretrained_with_plain_string_peft_type_does_not_crash(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)  # PEFT writes its own card: must not trip over peft_type == "LPI"
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft"
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LPI"


# ------------------------------------------------------------------------------------------------ pushing
EXPECTED_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors", "results.json",
                  "tasks/task_0.safetensors", "tasks/task_1.safetensors"}


def test_push_adapter_uploads_adapter_card_results_and_task_files(stub):
    model = make_model()
    results = fake_results()
    assert hub.push_adapter_to_hub(model, REPO, results=results, private=True, commit_message="LPI run") == "commit-info"
    assert stub.names() == ["create_repo", "upload_folder"]
    create, upload = stub.calls[0][1], stub.calls[1][1]
    assert create["repo_id"] == REPO and create["exist_ok"] is True and create["private"] is True
    assert upload["repo_id"] == REPO and upload["commit_message"] == "LPI run"
    assert set(stub.files) == EXPECTED_FILES
    card = stub.card()
    assert card.data.library_name == "peft" and card.data.base_model == BASE_ID
    assert "lpi" in card.data.tags and "continual-learning" in card.data.tags
    assert "| 1 | blurry digits | `tasks/task_1.safetensors` |" in card.text
    per_task = sum(p.numel() for p in model.base_model.active_bank.tasks[0].parameters())
    assert f"{per_task:,} per task, {2 * per_task:,} for all tasks" in card.text
    assert json.loads(stub.files["results.json"])["modes"]["auto"]["routing_accuracy"][1]["image"] == 0.75
    assert json.loads(stub.files["adapter_config.json"])["peft_type"] == "LPI"


def test_peft_model_push_to_hub_delegates_to_the_lpi_card(stub, monkeypatch):
    model = make_model()
    model.push_to_hub(REPO, results=fake_results(), private=False, commit_message="via PeftModel", tags=["my-tag"],
                      max_shard_size="1GB")
    assert stub.names() == ["create_repo", "upload_folder"]
    assert set(stub.files) == EXPECTED_FILES
    card = stub.card()
    assert card.data.tags[-1] == "my-tag" and card.data.library_name == "peft"
    assert "| 0 noisy shapes | 50.0 | 30.0 |" not in card.text  # last stage is shown, not stage 0
    assert "| 0 noisy shapes | 40.0 | 20.0 |" in card.text
    with pytest.raises(TypeError, match="unexpected arguments"):
        model.push_to_hub(REPO, safe_serialization=False)

    # Any other adapter goes through PEFT's own push_to_hub, untouched.
    spy = []
    monkeypatch.setattr(hub, "push_adapter_to_hub", lambda *a, **k: spy.append(a))

    def refuse(api, repo_id, **kwargs):
        raise RuntimeError("reached PEFT's own push_to_hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    lora = get_peft_model(tiny_clip(), LoraConfig(target_modules=["q_proj"], r=2))
    with pytest.raises(RuntimeError, match="PEFT's own push_to_hub"):
        lora.push_to_hub(REPO)
    assert spy == []


def test_push_task_uploads_one_task_file(stub, tmp_path):
    model = make_model()
    hub.push_task_to_hub(model, 1, REPO)
    hub.push_task_to_hub(model, 0, REPO, "shared/first.safetensors")
    assert stub.names() == ["create_repo", "upload_file", "create_repo", "upload_file"]
    assert [c[1]["path_in_repo"] for c in stub.calls if c[0] == "upload_file"] == [
        "tasks/task_1.safetensors", "shared/first.safetensors"]
    path = tmp_path / "t.safetensors"
    path.write_bytes(stub.files["tasks/task_1.safetensors"])
    tensors, metadata = read_task_file(path)
    assert metadata["rank"] == "2" and metadata["model_type"] == "clip"
    assert torch.equal(tensors["keys.vision"], model.base_model.active_bank.vision_keys[1])
    stub.calls.clear()
    with pytest.raises(TypeError, match="LPI adapter"):
        hub.push_task_to_hub(tiny_clip(), 0, REPO)
    with pytest.raises(IndexError, match="out of range"):
        hub.push_task_to_hub(model, 2, REPO)
    assert stub.calls == []  # refused before any request


def test_non_default_adapter_is_pushed_at_the_repo_root(stub):
    model = make_model()
    torch.manual_seed(3)
    model.add_adapter("other", LPIConfig(num_tasks=1, prompt_depth=1, prompt_length=2, rank=3))
    model.set_adapter("other")
    hub.push_adapter_to_hub(model, REPO)
    assert set(stub.files) == {"README.md", "adapter_config.json", "adapter_model.safetensors",
                               "tasks/task_0.safetensors"}
    assert json.loads(stub.files["adapter_config.json"])["rank"] == 3


# ------------------------------------------------------------------------------------ loading back, offline
def test_load_back_from_a_hub_snapshot_offline(stub, tmp_path, monkeypatch):
    model = make_model()
    hub.push_adapter_to_hub(model, REPO, results=fake_results())
    cache = tmp_path / "hub"
    snapshot = write_snapshot(cache, REPO, stub.files)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    batch = random_batch("clip", 4, 8, pad_rows=[1])

    loaded = PeftModel.from_pretrained(make_base(), REPO).eval()  # resolved through refs/main, no request
    for selection in (1, torch.tensor([1, 0, 1, 0]), "auto"):
        model.set_task(selection)
        loaded.set_task(selection)
        for got, expected in zip(features(loaded, batch), features(model, batch), strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert loaded.base_model.num_tasks == 2

    # One task on its own, into another adapter on the same backbone: appended, keys included.
    target = make_model(seed=7, num_tasks=1)
    new_id = hub.pull_task_from_hub(target, REPO, "tasks/task_1.safetensors")
    assert new_id == 1 and target.base_model.num_tasks == 2
    for modality, prompts in target.task_prompts([1]).items():
        assert torch.equal(prompts, model.task_prompts([1])[modality])
    assert torch.equal(target.base_model.active_bank.text_keys[1], model.base_model.active_bank.text_keys[1])
    # ... or over an existing task.
    assert hub.pull_task_from_hub(target, REPO, "tasks/task_0.safetensors", task=0) == 0
    for modality, prompts in target.task_prompts([0]).items():
        assert torch.equal(prompts, model.task_prompts([0])[modality])

    # A task that does not fit is refused, naming the mismatch, and changes nothing.
    other = make_model(seed=8, rank=3)
    before = {k: v.clone() for k, v in other.base_model.active_bank.state_dict().items()}
    with pytest.raises(CheckpointError, match="rank"):
        hub.pull_task_from_hub(other, REPO, "tasks/task_0.safetensors")
    after = other.base_model.active_bank.state_dict()
    assert all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)
    # Offline and not in the snapshot: a clear error, no request.
    with pytest.raises(Exception, match="offline|cannot find|not found|LocalEntryNotFound"):
        hub.pull_task_from_hub(copy.deepcopy(target), REPO, "tasks/task_9.safetensors")
    assert (snapshot / "README.md").is_file()


# ------------------------------------------------------------------------------------------- the example's flag
@pytest.mark.slow
def test_example_push_to_hub_flag_uploads_after_training(stub, tmp_path, monkeypatch):
    import importlib.util
    import sys

    from accelerate.state import AcceleratorState
    from fault_run import build_base

    from peft_lpi.data.backbone import build_world_tokenizer, world_image_processor

    tokenizer = build_world_tokenizer()
    backbone = tmp_path / "backbone"
    build_base(tokenizer).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    world_image_processor([0.5] * 3, [0.25] * 3).save_pretrained(backbone)
    spec = importlib.util.spec_from_file_location(
        "continual_retrieval", Path(__file__).resolve().parents[1] / "examples" / "continual_retrieval.py")
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "continual_retrieval", example)  # dataclasses resolve annotations there
    monkeypatch.setattr(peft_lpi.report, "plot_results", lambda *a, **k: [])  # seconds of matplotlib
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch, "set_num_threads", lambda n: None)  # the example sizes threads for real runs
            results = example.main([
                "--model", str(backbone), "--train_per_task", "8", "--val_per_task", "2", "--max_tasks", "2",
                "--num_train_epochs", "1", "--per_device_train_batch_size", "4", "--max_steps", "1", "--prompt_depth", "1",
                "--prompt_length", "2", "--rank", "2", "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true",
                "--recall_ks", "1", "--push_to_hub", "user/example-run", "--hub_private", "true",
            ])
    finally:
        AcceleratorState._reset_state(True)
        torch.set_num_threads(threads)
    assert stub.names() == ["create_repo", "upload_folder"] and stub.calls[0][1]["private"] is True
    card = stub.card()
    names = results["task_names"]
    assert "| 0 | " + names[0] + " |" in card.text and "| 1 | " + names[1] + " |" in card.text
    assert "Routing (task-ID) accuracy after the last task" in card.text
    assert json.loads(stub.files["results.json"])["modes"] == results["modes"]
    assert str(backbone) in card.text and card.data.base_model is None  # a local backbone is no Hub id
