"""examples/continual_grounding.py on real-data formats and its Hub push, offline: a RefCOCO run from MDETR files the
test writes (tiny OWL-ViT), the refer-pickle and `datasets` sources, the errors of bad input, and the model card of
the run's grounding results with task files that load back."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from grounding_run import (
    CATEGORIES,
    IMAGE_SIZE,
    load_example,
    tiny_argv,
    tiny_owl_folder,
    write_images,
    write_mdetr_split,
)
from peft import PeftModel, get_peft_model
from transformers import AutoTokenizer, OwlViTForObjectDetection

import peft_lpi  # noqa: F401
from peft_lpi import LPIConfig
from peft_lpi.data.coco import COCO_TASK_ORDER

pytestmark = pytest.mark.usefixtures("one_thread")
EXPRESSIONS = ["the red letter k", "the blue digit 3 on the left", "the large green square", "the yellow circle"]
SUPERCATEGORIES_IN_FILE_ORDER = ["outdoor", "person", "appliance", "sports", "animal"]  # not the authors' order
REPO = "user/refcoco-tiny"


def grid_box(i: int) -> list[float]:
    """COCO xywh box of one cell of a 4x4 grid over the 80x60 image (the tiny OWL's 4x4 patches: its prior boxes)."""
    col, row = i % 4, (i // 4) % 4
    w, h = IMAGE_SIZE[0] / 4, IMAGE_SIZE[1] / 4
    return [col * w, row * h, w, h]


def samples(per_supercategory: int, supercategories=SUPERCATEGORIES_IN_FILE_ORDER) -> list:
    """(supercategory, expression, box) interleaved over the supercategories, in file order."""
    out = []
    for i in range(per_supercategory):
        for j, sup in enumerate(supercategories):
            out.append((sup, EXPRESSIONS[(i + j) % len(EXPRESSIONS)], grid_box(3 * i + j)))
    return out


@pytest.fixture(scope="module")
def refcoco_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("refcoco")
    image_dir = root / "train2014"
    train = write_mdetr_split(root / "final_refcoco_train.json", image_dir, samples(4))
    val = write_mdetr_split(root / "final_refcoco_val.json", image_dir, samples(3))
    return {"root": root, "image_dir": image_dir, "train": train, "val": val, "owl": tiny_owl_folder(root / "owl")}


def refcoco_flags(files) -> list[str]:
    return ["--dataset", "refcoco", "--train_annotations", str(files["train"]), "--val_annotations",
            str(files["val"]), "--image_dir", str(files["image_dir"])]


def run_example(argv: list[str]) -> dict:
    AcceleratorState._reset_state(True)
    try:
        return load_example().main(argv)
    finally:
        AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def refcoco_run(refcoco_files, tmp_path_factory):
    """The example on the MDETR fixture: first 3 tasks of the authors' order, caps 4 / 2, pushed to a stubbed Hub."""
    out = tmp_path_factory.mktemp("run")
    uploaded = tmp_path_factory.mktemp("hub") / "repo"
    calls = []

    def create_repo(api, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(api, *, repo_id, folder_path, **kwargs):
        calls.append(("upload_folder", repo_id, kwargs))
        shutil.copytree(folder_path, uploaded)
        return "commit-info"

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        patch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        patch.setattr(torch, "set_num_threads", lambda n: None)  # the example sizes threads for real runs
        import peft_lpi.report

        patch.setattr(peft_lpi.report, "plot_grounding_results", lambda *a, **k: [])
        results = run_example(tiny_argv(refcoco_files["owl"], out) + refcoco_flags(refcoco_files) + [
            "--max_tasks", "3", "--max_per_task", "4", "2", "--push_to_hub", REPO, "--hub_private", "true"])
    return {"results": results, "out": out, "uploaded": uploaded, "calls": calls}


# ------------------------------------------------------------------------------------------ RefCOCO end to end
def test_refcoco_run_has_the_fixtures_tasks_in_the_authors_order(refcoco_run):
    results, out = refcoco_run["results"], refcoco_run["out"]
    assert results["task_names"] == COCO_TASK_ORDER[:3] == ["appliance", "sports", "outdoor"]
    assert SUPERCATEGORIES_IN_FILE_ORDER[:3] != COCO_TASK_ORDER[:3]  # the order is the authors', not the file's
    for mode in ("zero-shot", "oracle", "auto"):
        matrices = results["grounding"][mode]["matrices"]
        assert set(matrices) == {"P@1", "P@5"}
        for matrix in matrices.values():
            assert [[v is not None for v in row] for row in matrix] == [[True, False, False], [True, True, False],
                                                                        [True, True, True]]
            # 2 validation pairs per task (--max_per_task 4 2 caps the fixture's 3): every figure is 0, 50 or 100
            assert all(v in (0.0, 50.0, 100.0) for row in matrix for v in row if v is not None), matrix
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert [stage["num_pairs"] for stage in state["stages"]] == [2, 4, 6]
    assert len(results["grounding"]["auto"]["routing_accuracy"]) == 3
    assert json.loads((out / "results.json").read_text())["grounding"] == results["grounding"]


# ------------------------------------------------------------------------------------------------ the Hub card
def _card_table(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """Header cells and {first cell: other cells} of the grounding Precision table of a card."""
    lines = text.split("### Precision after the last task (%)", 1)[1].strip().splitlines()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
    return rows[0][1:], {row[0]: row[1:] for row in rows[2:]}


def test_card_shows_the_runs_grounding_results(refcoco_run):
    uploaded = refcoco_run["uploaded"]
    assert [c[0] for c in refcoco_run["calls"]] == ["create_repo", "upload_folder"]
    assert refcoco_run["calls"][0][2]["private"] is True
    saved = json.loads((refcoco_run["out"] / "results.json").read_text())  # what the run wrote, not the card's input
    assert json.loads((uploaded / "results.json").read_text())["grounding"] == saved["grounding"]
    text = (uploaded / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["library_name"] == "peft" and front["pipeline_tag"] == "zero-shot-object-detection"
    assert "referring-expression-comprehension" in front["tags"] and "retrieval" not in front["tags"]
    assert "base_model" not in front  # a local folder is no Hub id
    assert huggingface_hub.ModelCard(text).data.to_dict()["pipeline_tag"] == "zero-shot-object-detection"
    header, rows = _card_table(text)
    names = saved["task_names"]
    blocks = saved["grounding"]
    assert header == [f"{m} {k}" for m in ("zero-shot", "oracle", "auto") for k in ("P@1", "P@5")]
    for t, name in enumerate(names):
        assert f"| {t} | {name} | `tasks/task_{t}.safetensors` |" in text
        for cell, column in zip(rows[f"{t} {name}"], header):
            mode, key = column.split()
            assert float(cell) == pytest.approx(blocks[mode]["matrices"][key][-1][t], abs=0.05), (name, column)
    for label, key in (("final average", "final_average"), ("stage-averaged", "stage_averaged"),
                       ("forgetting", "forgetting"), ("backward transfer", "backward_transfer")):
        for cell, column in zip(rows[f"**{label}**"], header):
            mode, metric = column.split()
            assert float(cell) == pytest.approx(blocks[mode]["summary"][metric][key], abs=0.05), (label, column)
    routing = re.search(r"after each stage: (.*)\.", text).group(1)
    shown = [float(v.rstrip(" %")) for v in routing.split(", ")]
    assert shown == pytest.approx([100 * r for r in blocks["auto"]["routing_accuracy"]], abs=0.05)
    assert "AutoModelForZeroShotObjectDetection" in text and "get_text_features" not in text


def test_task_files_load_back_with_the_same_boxes(refcoco_run, refcoco_files):
    """The pushed task files, loaded into a fresh adapter (load_task) or appended (import_task), give the boxes and
    scores of the trained adapter; the prompts matter (prompt-free scores differ; the tiny OWL's zero-initialised
    box head keeps every box at its patch prior, so the scores decide which box is chosen)."""
    owl, uploaded = refcoco_files["owl"], refcoco_run["uploaded"]
    tokenizer = AutoTokenizer.from_pretrained(owl)
    text = tokenizer(EXPRESSIONS[:3], padding=True, return_tensors="pt")
    torch.manual_seed(1)
    inputs = dict(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=torch.randn(3, 3, 64, 64))
    trained = PeftModel.from_pretrained(OwlViTForObjectDetection.from_pretrained(owl), str(uploaded)).eval()
    config = trained.peft_config["default"]
    shape = dict(prompt_length=config.prompt_length, prompt_depth=config.prompt_depth, rank=config.rank,
                 num_keys=config.num_keys)
    fresh = get_peft_model(OwlViTForObjectDetection.from_pretrained(owl), LPIConfig(num_tasks=3, **shape)).eval()
    for t in range(3):
        assert fresh.base_model.load_task(t, uploaded / f"tasks/task_{t}.safetensors") == t
    appended = get_peft_model(OwlViTForObjectDetection.from_pretrained(owl), LPIConfig(num_tasks=1, **shape)).eval()
    assert appended.base_model.import_task(uploaded / "tasks/task_2.safetensors") == 1
    with torch.no_grad():
        with trained.base_model.prompts_disabled():
            plain = trained(**inputs).logits
        for t in range(3):
            expected = trained(**inputs, task_ids=t)
            assert not torch.allclose(expected.logits, plain)
            got = fresh(**inputs, task_ids=t)
            torch.testing.assert_close(got.pred_boxes, expected.pred_boxes)
            torch.testing.assert_close(got.logits, expected.logits)
        got, expected = appended(**inputs, task_ids=1), trained(**inputs, task_ids=2)
        torch.testing.assert_close(got.pred_boxes, expected.pred_boxes)
        torch.testing.assert_close(got.logits, expected.logits)
    for modality in ("vision", "text"):  # the routing keys travel with the task files
        torch.testing.assert_close(getattr(fresh.base_model.active_bank, f"{modality}_keys"),
                                   getattr(trained.base_model.active_bank, f"{modality}_keys"), equal_nan=True)


# ---------------------------------------------------------------------------------------- data sources (no run)
def load(argv: list[str]):
    """The example's data for these flags (parsed by its own parser; no model, no training)."""
    from transformers import HfArgumentParser

    example = load_example()
    parser = HfArgumentParser((example.GroundingArguments, example.GroundingDataArguments))
    args, data_args, _ = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    return example.load_grounding_data(args, data_args)


def task_counts(split: datasets.Dataset) -> dict[str, int]:
    names = split.features["task"].names
    return {name: split["task"].count(t) for t, name in enumerate(names)}


def test_refcoco_caps_and_task_order(refcoco_files):
    data = load(refcoco_flags(refcoco_files) + ["--task_order", "person", "animal", "appliance"])
    assert data["train"].features["task"].names == ["person", "animal", "appliance"]
    assert task_counts(data["train"]) == {"person": 4, "animal": 4, "appliance": 4}  # default caps 2000 / 500
    assert task_counts(data["validation"]) == {"person": 3, "animal": 3, "appliance": 3}
    row = data["validation"][0]
    first = samples(3)[1]  # the file's first person sample (its first sample is 'outdoor', not a task here)
    assert row["expression"] == first[1]
    x, y, w, h = first[2]
    assert row["box"] == pytest.approx([x, y, x + w, y + h])  # COCO xywh -> xyxy pixels
    capped = load(refcoco_flags(refcoco_files) + ["--max_tasks", "2", "--max_per_task", "3"])
    assert task_counts(capped["train"]) == {"appliance": 3, "sports": 3}
    assert task_counts(capped["validation"]) == {"appliance": 3, "sports": 3}
    drawn = load(refcoco_flags(refcoco_files) + ["--max_tasks", "2", "--max_per_task", "2", "--sample_seed", "0"])
    assert drawn["train"]["expression"] == load(refcoco_flags(refcoco_files) + [
        "--max_tasks", "2", "--max_per_task", "2", "--sample_seed", "0"])["train"]["expression"]


def test_refcoco_from_refer_pickles(refcoco_files, tmp_path):
    files = write_images(tmp_path / "train2014", 2)
    instances = {
        "images": [{"id": i, "file_name": f, "width": IMAGE_SIZE[0], "height": IMAGE_SIZE[1]} for i, f in enumerate(files)],
        "annotations": [{"id": 10 + i, "image_id": i % 2, "category_id": CATEGORIES[sup][0], "bbox": grid_box(i)}
                        for i, sup in enumerate(["sports", "appliance", "sports", "appliance"])],
        "categories": [{"id": cid, "name": n, "supercategory": s} for s, (cid, n) in CATEGORIES.items()],
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    refs = [{"ref_id": i, "ann_id": 10 + i, "image_id": i % 2, "category_id": instances["annotations"][i]["category_id"],
             "split": "train" if i < 2 else "val",
             "sentences": [{"sent": f"the red letter k {i}", "sent_id": 2 * i}, {"sent": "the blue digit 3", "sent_id": 2 * i + 1}]}
            for i in range(4)]
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs))
    data = load(["--dataset", "refcoco", "--refs_file", str(tmp_path / "refs(unc).p"), "--instances_file",
                 str(tmp_path / "instances.json"), "--image_dir", str(tmp_path / "train2014"), "--task_order",
                 "sports", "appliance"])
    assert task_counts(data["train"]) == {"sports": 2, "appliance": 2}  # one ref each, two sentences
    assert task_counts(data["validation"]) == {"sports": 2, "appliance": 2}
    assert data["train"]["expression"] == ["the red letter k 0", "the blue digit 3", "the red letter k 1",
                                           "the blue digit 3"]


def generic_folder(tmp_path: Path, tasks_train: list[str], tasks_val: list[str]) -> Path:
    files = write_images(tmp_path / "images", 3)

    def split(tasks):
        return datasets.Dataset.from_dict({
            "img": [str(tmp_path / "images" / files[i % 3]) for i in range(len(tasks))],
            "ref": [EXPRESSIONS[i % 4] for i in range(len(tasks))],
            "bbox": [grid_box(i) for i in range(len(tasks))],
            "style": tasks,
            "width": [IMAGE_SIZE[0]] * len(tasks), "height": [IMAGE_SIZE[1]] * len(tasks),
        }).cast_column("img", datasets.Image())

    folder = tmp_path / "generic"
    datasets.DatasetDict({"train": split(tasks_train), "test": split(tasks_val)}).save_to_disk(str(folder))
    return folder


GENERIC_COLUMNS = ["--image_column", "img", "--expression_column", "ref", "--box_column", "bbox",
                   "--task_column", "style", "--box_format", "xywh", "--eval_split", "test"]


def test_any_datasets_dataset_with_column_flags(tmp_path):
    folder = generic_folder(tmp_path, ["dusk", "noon", "dusk", "night", "noon", "night"], ["noon", "dusk", "night"])
    data = load(["--dataset", str(folder)] + GENERIC_COLUMNS)
    assert data["train"].features["task"].names == ["dusk", "noon", "night"]  # first-seen order
    assert task_counts(data["train"]) == {"dusk": 2, "noon": 2, "night": 2}
    x, y, w, h = grid_box(0)
    assert data["train"][0]["box"] == pytest.approx([x, y, x + w, y + h])
    ordered = load(["--dataset", str(folder), "--task_order", "night", "noon", "--max_per_task", "1"] + GENERIC_COLUMNS)
    assert ordered["train"].features["task"].names == ["night", "noon"]
    assert task_counts(ordered["train"]) == {"night": 1, "noon": 1}
    assert [ordered["validation"].features["task"].int2str(t) for t in ordered["validation"]["task"]] == ["noon", "night"]
    first_two = load(["--dataset", str(folder), "--max_tasks", "2"] + GENERIC_COLUMNS)
    assert first_two["validation"].features["task"].names == ["dusk", "noon"]
    assert len(first_two["validation"]) == 2


# ------------------------------------------------------------------------------------------------ bad input
def _without_outdoor_in_val(files, tmp_path) -> list[str]:
    """A validation file whose every 'outdoor' box is degenerate: the task is empty after the builder's skips."""
    bad = [(s, e, [b[0], b[1], 0.0, b[3]] if s == "outdoor" else b) for s, e, b in samples(3)]
    path = write_mdetr_split(tmp_path / "val_bad.json", files["image_dir"], bad)
    return ["--dataset", "refcoco", "--train_annotations", str(files["train"]), "--val_annotations", str(path),
            "--image_dir", str(files["image_dir"]), "--max_tasks", "3"]


@pytest.mark.parametrize("case", ["default order", "filtered", "missing image_dir", "missing file", "bad task order",
                                  "missing images", "offline with files", "bad caps"])
def test_refcoco_errors_name_the_problem_and_the_fix(refcoco_files, tmp_path, case):
    flags = refcoco_flags(refcoco_files)
    expected = {
        # the fixture has 5 supercategories: the authors' 4th, 'electronic', has no sample
        "default order": (flags, r"task 'electronic' has no samples in the train split.*--task_order or --max_tasks"),
        "filtered": (_without_outdoor_in_val(refcoco_files, tmp_path),
                     r"task 'outdoor' has no samples in the validation split.*skipped samples.*--val_annotations"),
        "missing image_dir": (flags[:-2], r"needs --image_dir, the COCO 2014 train2014/ folder"),
        "missing file": (flags[:2] + ["--train_annotations", str(tmp_path / "nope.json")] + flags[4:],
                         r"--train_annotations: the MDETR training file not found at .*nope\.json"),
        "bad task order": (flags + ["--task_order", "sports", "cats"], r"\['cats'\] are not COCO supercategories"),
        "missing images": (flags[:-1] + [str(tmp_path)] + ["--max_tasks", "3"],
                           r"12 of the 12 train images are missing.*--image_dir must be the folder"),
        "offline with files": (flags[2:], r"--train_annotations, --val_annotations, --image_dir select real data"),
        "bad caps": (flags + ["--max_per_task", "1", "2", "3"], r"--max_per_task takes one or two counts"),
    }
    argv, message = expected[case]
    with pytest.raises(SystemExit, match=message):
        load(argv)


@pytest.mark.parametrize("case", ["column", "split", "empty task"])
def test_datasets_source_errors(tmp_path, case):
    folder = generic_folder(tmp_path, ["dusk", "noon"], ["dusk"])
    argv, message = {
        "column": (["--dataset", str(folder)] + GENERIC_COLUMNS + ["--expression_column", "sentence"],
                   r"no column 'sentence' \(--expression_column\); its columns are \['img', 'ref', 'bbox', "
                   r"'style', 'width', 'height'\]"),
        "split": (["--dataset", str(folder)] + GENERIC_COLUMNS[:-2] + ["--eval_split", "validation"],
                  r"no split 'validation' \(--eval_split\); its splits are \['test', 'train'\]"),
        "empty task": (["--dataset", str(folder)] + GENERIC_COLUMNS,
                       r"task 'noon' has no samples in the validation split.*--task_column \('style'\)"),
    }[case]
    with pytest.raises(SystemExit, match=message):
        load(argv)


def test_main_stops_on_an_empty_task_before_training(refcoco_files, tmp_path):
    with pytest.raises(SystemExit, match="task 'outdoor' has no samples in the validation split"):
        run_example(tiny_argv(refcoco_files["owl"], tmp_path / "run") + _without_outdoor_in_val(refcoco_files, tmp_path))
    assert not (tmp_path / "run" / "checkpoint").exists()

