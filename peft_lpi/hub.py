"""Model card and Hugging Face Hub push / pull of LPI adapters and of single tasks.

Entry points:

- `push_adapter_to_hub(model, "user/repo", results=...)`: the whole adapter (every task and its routing keys) with a
  model card generated from the run, `results.json` when results are given, and one standalone task file per task
  under `tasks/` (so a task can be pulled on its own).
- `model.push_to_hub("user/repo")` on a PeftModel holding an LPI adapter does the same: importing `peft_lpi`
  installs a thin wrapper around `PeftModel.push_to_hub` that hands LPI adapters to `push_adapter_to_hub` and every
  other adapter to PEFT's own method unchanged. (PEFT 0.21's own push would save a transformers template card with
  `library_name: transformers` over the one `save_pretrained` writes; PeftModel's method wins attribute lookup, so a
  method on `LPIModel` would never be reached.) The results of the last `ContinualTrainer.train()` on that model are
  used when none are passed.
- `push_task_to_hub(model, task, "user/repo")` / `pull_task_from_hub(model, "user/repo", filename)`: one task's
  factors and keys as a standalone safetensors file (`LPIModel.save_task` / `load_task` / `import_task`).

Loading an adapter pushed here: `import peft_lpi` first (it registers the LPI method with PEFT), then
`PeftModel.from_pretrained(base, "user/repo")`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import huggingface_hub

from ._version import __version__
from .report import grounding_markdown_table, jsonable, markdown_table

LPI_CARD_TAGS = ["peft", "lpi", "continual-learning", "vision-language", "retrieval", "clip"]
# Cards of grounding (REC) adapters: the detector's Hub task instead of retrieval.
GROUNDING_CARD_TAGS = ["peft", "lpi", "continual-learning", "vision-language", "referring-expression-comprehension",
                       "visual-grounding"]
GROUNDING_PIPELINE_TAG = "zero-shot-object-detection"
TASKS_FOLDER = "tasks"
RESULTS_FILE = "results.json"
DEFAULT_COMMIT_MESSAGE = "Upload LPI adapter"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# Config fields shown in the card, in this order (the rest of LPIConfig is PEFT bookkeeping).
_CARD_CONFIG_FIELDS = (
    "num_tasks", "prompt_length", "prompt_depth", "injection", "rank", "towers", "share_layer_factor", "init_std",
    "interaction", "interaction_alpha", "interaction_init", "align_weight", "align_layer_temperature",
    "align_token_temperature", "align_token_weight", "align_normalize", "task_weight", "task_temperature",
    "task_similarity_threshold", "task_loss_double_sigmoid", "task_loss_mode", "num_keys", "routing_metric",
    "layer_paths", "text_causal", "format_version",
)


def task_filename(task: int) -> str:
    """Path inside a repo of the standalone file of task `task` (as `push_adapter_to_hub` lays it out)."""
    return f"{TASKS_FOLDER}/task_{int(task)}.safetensors"


def is_hub_id(name: str | None) -> bool:
    """Whether `name` looks like a Hub model id `owner/name` (and not a local folder)."""
    return bool(name) and bool(_HUB_ID.match(str(name))) and not os.path.isdir(str(name))


def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    return config.to_dict()


def _lpi_tuner(model: Any) -> Any:
    """The LPIModel of a PeftModel (or the LPIModel itself); TypeError for anything else."""
    from .tuner.model import LPIModel

    if isinstance(model, LPIModel):
        return model
    tuner = getattr(model, "base_model", None)
    if isinstance(tuner, LPIModel):
        return tuner
    raise TypeError(
        f"Expected a PeftModel with an LPI adapter (get_peft_model(base, LPIConfig(...))), got {type(model).__name__}."
    )


def _fmt_value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: `{v}`" for k, v in value.items()) or "–"
    return f"`{value}`"


def _framework_versions() -> list[str]:
    import peft
    import torch
    import transformers

    return [
        f"- peft_lpi {__version__}",
        f"- PEFT {peft.__version__}",
        f"- transformers {transformers.__version__}",
        f"- torch {torch.__version__}",
        f"- huggingface_hub {huggingface_hub.__version__}",
    ]


def model_card(
    results: dict[str, Any] | None,
    config: Any,
    base_model: str | None,
    task_names: list[str] | None,
    *,
    trainable_parameters: int | None = None,
    total_parameters: int | None = None,
    repo_id: str | None = None,
    task_files: dict[int, str] | None = None,
    extra_tags: list[str] | None = None,
) -> str:
    """A Hub model card (README.md) for an LPI adapter.

    Args:
        results: the results dict of a `ContinualTrainer` run (recall per task, forgetting, routing accuracy), or None.
            A grounding run's (the ``"grounding"`` key of `GroundingEvaluator.summarize`) gets the REC card: its
            tags, pipeline tag, Precision@k tables and a detector loading snippet.
        config: the `LPIConfig` (or its dict).
        base_model: Hub id or path of the frozen backbone; it goes into the YAML `base_model` only when it looks
            like a Hub id (`owner/name`), since the Hub validates that field.
        task_names: task names in training order (defaults to the results' names, else `task_<i>`).
        trainable_parameters / total_parameters: per task and over all tasks.
        repo_id: where the adapter lives (used in the loading snippet).
        task_files: {task id: path in the repo} of standalone task files.
        extra_tags: tags added to the LPI tags.
    """
    config_dict = _config_dict(config)
    if task_names is None and results:
        task_names = list(results.get("task_names") or [])
    if not task_names:
        task_names = list(config_dict.get("task_names") or [])
    num_tasks = int(config_dict.get("num_tasks") or len(task_names or []) or 0)
    task_names = list(task_names or [])
    task_names += [f"task_{i}" for i in range(len(task_names), num_tasks)]
    if trainable_parameters is None and results:
        trainable_parameters = results.get("trainable_parameters_per_task")
    grounding = _is_grounding_results(results)
    tags = list(dict.fromkeys((GROUNDING_CARD_TAGS if grounding else LPI_CARD_TAGS) + list(extra_tags or [])))
    card_data: dict[str, Any] = {"library_name": "peft", "tags": tags}
    if grounding:
        card_data["pipeline_tag"] = GROUNDING_PIPELINE_TAG
    if is_hub_id(base_model):
        card_data["base_model"] = base_model
    front_matter = huggingface_hub.ModelCardData(**card_data).to_yaml()
    repo = repo_id or "<user>/<repo>"
    base = base_model or "<the base model>"

    lines = ["---", front_matter.strip(), "---", ""]
    lines += [
        f"# LPI adapter for `{base}`" if base_model else "# LPI adapter",
        "",
        _GROUNDING_INTRO if grounding else
        "Low-rank Prompt Interaction (LPI, *Low-rank Prompt Interaction for Continual Vision-Language Retrieval*, "
        "ACM MM 2024) prompts for a frozen dual encoder, trained task after task with "
        "`peft_lpi` as a PEFT method. The adapter holds one low-rank factor set per task "
        "(layer factor shared by both towers, token and hidden factors per tower, the multi-modal correlation "
        "module) and each task's k-means routing keys: at inference the task of every image and caption is "
        "inferred from the keys and the sample is encoded with its task's prompts.",
        "",
        f"- **Base model:** `{base}`",
        "- **PEFT method:** `LPI` (registered by `import peft_lpi`)",
        f"- **Tasks:** {num_tasks}",
    ]
    if trainable_parameters is not None:
        total = total_parameters if total_parameters is not None else trainable_parameters * max(num_tasks, 1)
        lines.append(f"- **Trainable parameters:** {trainable_parameters:,} per task, {total:,} for all tasks "
                     "(the backbone stays frozen)")
    lines += ["", "## Tasks (in training order)", "", "| id | task | standalone file |", "|---|---|---|"]
    for t, name in enumerate(task_names):
        file = f"`{task_files[t]}`" if task_files and t in task_files else "–"
        lines.append(f"| {t} | {name} | {file} |")
    lines += ["", "## LPI configuration", "", "| field | value |", "|---|---|"]
    for key in _CARD_CONFIG_FIELDS:
        if key in config_dict:
            lines.append(f"| `{key}` | {_fmt_value(config_dict[key])} |")
    lines += ["", "## Results", ""]
    table = markdown_table(results) if results and not grounding else ""
    if grounding:
        lines += _grounding_results_section(results)
    elif table.strip():
        lines += [
            "Retrieval recall (%) on the joint validation gallery of all tasks after the last task, with the true "
            "task (oracle) and with inferred tasks (auto); forgetting is last minus best earlier recall per task.",
            "",
            table.rstrip(),
        ]
    else:
        lines.append("_No results were attached to this upload._")
    lines += [
        "",
        "## How to use",
        "",
        "`import peft_lpi` must run before loading: it registers the LPI method with PEFT (without it PEFT raises "
        "`KeyError: 'LPI'`).",
        "",
    ]
    lines += _grounding_usage(base, repo) if grounding else _retrieval_usage(base, repo)
    lines += [
        "One task on its own (into an adapter on the same backbone with the same LPI shape), keys included:",
        "",
        "```python",
        "from peft_lpi.hub import pull_task_from_hub",
        "",
        f'new_task_id = pull_task_from_hub(model, "{repo}", "{task_filename(0)}")',
        "```",
        "",
        "## Framework versions",
        "",
        *_framework_versions(),
        "",
    ]
    return "\n".join(lines)


def _retrieval_usage(base: str, repo: str) -> list[str]:
    return [
        "```python",
        "import peft_lpi  # registers LPI with PEFT",
        "from peft import PeftModel",
        "from transformers import AutoModel",
        "",
        f'base = AutoModel.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(base, "{repo}").eval()',
        'model.set_task("auto")  # route each image / caption to its task with the stored keys',
        "image_embeds = model.get_image_features(pixel_values=pixel_values).pooler_output",
        "text_embeds = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output",
        "```",
        "",
    ]


_GROUNDING_INTRO = (
    "Low-rank Prompt Interaction (LPI, *Low-rank Prompt Interaction for Continual Vision-Language Retrieval*, "
    "ACM MM 2024) prompts for a frozen open-vocabulary detector, trained with `peft_lpi` as a PEFT method for "
    "continual referring-expression comprehension (REC: an image and an expression -> the one box it refers to), "
    "task after task. The adapter holds one low-rank factor set per task (layer factor shared by both towers, token "
    "and hidden factors per tower, the multi-modal correlation module) and each task's k-means routing keys. The "
    "detector's own box and class heads give the boxes; at inference the task of an image is routed from its "
    "prompt-free image feature (as the authors' grounding code does) and its expression gets the same task."
)


def _is_grounding_results(results: dict[str, Any] | None) -> bool:
    """Whether a results dict is a grounding (REC) run's (`GroundingEvaluator.summarize` wrote it)."""
    return bool(results) and (results.get("problem") == "grounding" or "grounding" in results)


def _grounding_results_section(results: dict[str, Any]) -> list[str]:
    """The card's grounding results: Precision@k per task and mode after the last task, the continual summary
    (final average, stage-averaged, forgetting, backward transfer) and the routing accuracy after each stage."""
    table = grounding_markdown_table(results)
    if not table.strip():
        return ["_No grounding results were attached to this upload._"]
    modes = ", ".join(f"`{m}`" for m in results["grounding"])
    return [
        "Referring-expression grounding Precision@k (%): a hit when one of the k best-scored boxes has IoU >= 0.5 "
        "with the referred box, on the validation pairs of each task after the last task. Modes "
        f"({modes}): `zero-shot` has the prompts off, `oracle` uses each pair's true task, `auto` the task routed from "
        "the image feature. Final average: over the tasks after the last one; stage-averaged (the authors' figure): "
        "per task the mean over the stages from the one that learned it, then over tasks; forgetting: best earlier "
        "minus last Precision; backward transfer: last minus just-learned Precision (both over the earlier tasks).",
        "",
        table.rstrip(),
    ]


def _grounding_usage(base: str, repo: str) -> list[str]:
    return [
        "```python",
        "import peft_lpi  # registers LPI with PEFT",
        "from peft import PeftModel",
        "from transformers import AutoModelForZeroShotObjectDetection",
        "from peft_lpi.continual.grounding import LPIGroundingMethod",
        "",
        f'base = AutoModelForZeroShotObjectDetection.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(base, "{repo}").eval()',
        "# route each image to its task with the stored keys (prompt-free image feature), then detect",
        'tasks = LPIGroundingMethod(model).encode("vision", {"pixel_values": pixel_values}, "auto")[1]',
        "outputs = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, "
        "task_ids=tasks)",
        "best = outputs.logits[..., 0].argmax(-1)  # the expression's best-scored box: outputs.pred_boxes (cxcywh)",
        "```",
        "",
    ]


def _model_facts(peft_model: Any) -> dict[str, Any]:
    tuner = _lpi_tuner(peft_model)
    bank, config = tuner.active_bank, tuner.active_config
    per_task = sum(p.numel() for p in bank.tasks[0].parameters()) if bank.num_tasks else 0
    total = sum(p.numel() for task in bank.tasks for p in task.parameters())
    base_model = config.base_model_name_or_path or getattr(getattr(tuner.model, "config", None), "_name_or_path", "")
    return {"tuner": tuner, "config": config, "per_task": per_task, "total": total, "base_model": base_model or None}


def save_adapter_for_hub(
    peft_model: Any,
    folder: str | os.PathLike,
    *,
    results: dict[str, Any] | None = None,
    task_names: list[str] | None = None,
    repo_id: str | None = None,
    task_files: bool = True,
    extra_tags: list[str] | None = None,
) -> Path:
    """Write what `push_adapter_to_hub` uploads into `folder`: the active adapter at the top level
    (`adapter_config.json`, `adapter_model.safetensors`), README.md (our card, replacing PEFT's default),
    `results.json` when results are given, and `tasks/task_<i>.safetensors` when `task_files`."""
    folder = Path(folder)
    facts = _model_facts(peft_model)
    tuner = facts["tuner"]
    adapter = tuner.active_adapters[0]
    peft_model.save_pretrained(str(folder), selected_adapters=[adapter])
    if adapter != "default":  # PEFT saves non-default adapters to <folder>/<name>/: the repo root must hold it
        nested = folder / adapter
        for item in nested.iterdir():
            os.replace(item, folder / item.name)
        shutil.rmtree(nested)
    files: dict[int, str] = {}
    if task_files:
        for task in range(tuner.num_tasks):
            files[task] = task_filename(task)
            tuner.save_task(task, folder / files[task])
    if results is not None:
        (folder / RESULTS_FILE).write_text(json.dumps(jsonable(results), indent=2, allow_nan=False))
    card = model_card(
        results, facts["config"], facts["base_model"], task_names, trainable_parameters=facts["per_task"],
        total_parameters=facts["total"], repo_id=repo_id, task_files=files, extra_tags=extra_tags,
    )
    (folder / "README.md").write_text(card, encoding="utf-8")
    return folder


def push_adapter_to_hub(
    peft_model: Any,
    repo_id: str,
    *,
    results: dict[str, Any] | None = None,
    private: bool = False,
    token: str | bool | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    task_names: list[str] | None = None,
    task_files: bool = True,
    extra_tags: list[str] | None = None,
) -> Any:
    """Upload the active LPI adapter (all tasks and keys) with a model card generated from the run.

    Saves with `save_pretrained` into a temporary folder, writes README.md (the LPI card: base model, task names in
    order, LPI config, trainable parameters, the results table, how to load), `results.json` when results are given
    (e.g. what `ContinualTrainer.train()` returned) and one standalone file per task, then
    `HfApi.create_repo(exist_ok=True)` + `HfApi.upload_folder`. Returns the `CommitInfo` of the upload.
    """
    _lpi_tuner(peft_model)  # refuse non-LPI models before touching the network
    api = huggingface_hub.HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, token=token, exist_ok=True, repo_type="model")
    repo_id = getattr(repo, "repo_id", None) or repo_id
    with tempfile.TemporaryDirectory(prefix="peft_lpi_push_") as tmp:
        folder = save_adapter_for_hub(
            peft_model, tmp, results=results, task_names=task_names, repo_id=repo_id, task_files=task_files,
            extra_tags=extra_tags,
        )
        return api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
            commit_description=commit_description, token=token, repo_type="model", revision=revision,
            create_pr=create_pr,
        )


def push_task_to_hub(
    peft_model: Any,
    task: int,
    repo_id: str,
    filename: str | None = None,
    *,
    private: bool = False,
    token: str | bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Upload one task's factors and keys as a standalone task file (default path `tasks/task_<task>.safetensors`)."""
    tuner = _lpi_tuner(peft_model)
    task = tuner._check_task_id(task)
    filename = filename or task_filename(task)
    api = huggingface_hub.HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, token=token, exist_ok=True, repo_type="model")
    repo_id = getattr(repo, "repo_id", None) or repo_id
    with tempfile.TemporaryDirectory(prefix="peft_lpi_task_") as tmp:
        path = Path(tmp) / Path(filename).name
        tuner.save_task(task, path)
        return api.upload_file(
            path_or_fileobj=str(path), path_in_repo=filename, repo_id=repo_id, token=token, repo_type="model",
            revision=revision, create_pr=create_pr,
            commit_message=commit_message or f"Upload LPI task {task} ({filename})",
        )


def pull_task_from_hub(
    peft_model: Any,
    repo_id: str,
    filename: str,
    *,
    task: int | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> int:
    """Download a task file (`hf_hub_download`, so the cache and `HF_HUB_OFFLINE=1` work) and load it into task
    `task`, or append it as a new task when `task` is None (`import_task`). Returns the task id.

    The file is checked completely (backbone, widths, rank, prompt length, depth) before the adapter changes; a file
    that does not fit raises `CheckpointError` naming the mismatch.
    """
    tuner = _lpi_tuner(peft_model)
    path = huggingface_hub.hf_hub_download(
        repo_id, filename, revision=revision, token=token, cache_dir=cache_dir, library_name="peft_lpi",
        library_version=__version__,
    )
    return tuner.load_task(task, path)


# ------------------------------------------------------------------------------------ PeftModel.push_to_hub
_PUSH_KWARGS = {"commit_message", "commit_description", "private", "token", "revision", "create_pr", "results",
                "task_names", "task_files", "extra_tags"}


def is_lpi_model(model: Any) -> bool:
    """Whether `model` is a PeftModel holding an LPI adapter (or an LPIModel)."""
    try:
        _lpi_tuner(model)
    except TypeError:
        return False
    return True


def install_push_to_hub() -> None:
    """Make `PeftModel.push_to_hub` write the LPI card for LPI adapters (idempotent; other adapters unchanged)."""
    from peft import PeftModel

    current = PeftModel.push_to_hub
    if getattr(current, "_peft_lpi_original", None) is not None:
        return
    original = current

    @functools.wraps(original)
    def push_to_hub(self: Any, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        if not is_lpi_model(self):
            return original(self, repo_id, *args, **kwargs)
        if args:
            raise TypeError("push_to_hub takes the repo id positionally and everything else by keyword.")
        kwargs.pop("max_shard_size", None)  # adapters are small: never sharded
        tags = kwargs.pop("tags", None)
        if tags:
            kwargs["extra_tags"] = list(kwargs.get("extra_tags") or []) + list(tags)
        unknown = set(kwargs) - _PUSH_KWARGS
        if unknown:
            raise TypeError(f"push_to_hub of an LPI adapter got unexpected arguments {sorted(unknown)}.")
        if kwargs.get("commit_message") is None:
            kwargs.pop("commit_message", None)
        if kwargs.get("private") is None:
            kwargs.pop("private", None)
        return push_adapter_to_hub(self, repo_id, **kwargs)

    push_to_hub._peft_lpi_original = original  # type: ignore[attr-defined]
    PeftModel.push_to_hub = push_to_hub  # type: ignore[method-assign]
