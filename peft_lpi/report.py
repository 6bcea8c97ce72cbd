"""Outputs of a continual run: the results dict, results JSON, a markdown table, matplotlib plots, printed lines.

Pure functions of the per-stage evaluations (`ContinualTrainer.state.stages`): the trainer and the evaluator hand
their numbers here instead of formatting them themselves.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .evaluation import stage_metrics
from .io import atomic_path


def jsonable(value: Any) -> Any:
    """`value` with tensors as lists, tuples as lists, NaN/inf as None, paths as str and non-str/int keys as str:
    what `json.dumps(..., allow_nan=False)` accepts."""
    if isinstance(value, dict):
        return {(k if isinstance(k, str | int) else str(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, os.PathLike):
        return str(value)
    return value


def accuracy_matrix(
    stages: Sequence[dict[str, Any]], mode: str, key: str, num_tasks: int, variant: str = "strict"
) -> list[list[float]]:
    """R[stage][task] of one metric key (e.g. 'i2t_R@1') from the per-stage evaluations, NaN for unseen tasks."""
    matrix = []
    for entry in stages:
        per_task = entry[mode][variant]["per_task"]
        matrix.append([per_task[t][key] if t in per_task else float("nan") for t in range(num_tasks)])
    return matrix


def retrieval_summary(
    stages: Sequence[dict[str, Any]], modes: Sequence[str], num_tasks: int, recall_ks: Sequence[int],
    schedule: list[list[int]],
) -> dict[str, Any]:
    """The "modes" part of the results: per routing mode and recall variant, the accuracy matrices of every metric
    and their continual summary (final average, stage-averaged, forgetting, backward transfer); under "auto" the
    routing accuracy after each stage."""
    keys = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in recall_ks] + ["rmean"]
    modes_results: dict[str, Any] = {}
    for mode in modes:
        mode_results: dict[str, Any] = {}
        for variant in ("strict", "caption_equal"):
            matrices = {key: accuracy_matrix(stages, mode, key, num_tasks, variant) for key in keys}
            summary = {key: stage_metrics(m, schedule) for key, m in matrices.items()} if matrices else {}
            mode_results[variant] = {"matrices": matrices, "summary": summary}
        if mode == "auto":
            mode_results["routing_accuracy"] = [
                {"image": e[mode]["routing"]["image"]["accuracy"], "text": e[mode]["routing"]["text"]["accuracy"]}
                for e in stages
            ]
        modes_results[mode] = mode_results
    return {"modes": modes_results}


def stage_line(entry: dict[str, Any], modes: Sequence[str], title: str) -> str:
    """One printed line of a stage's evaluation: macro R@1 per mode and the image routing accuracy."""
    parts = []
    for mode in modes:
        macro = entry[mode]["strict"]["macro"]
        parts.append(f"{mode}: i2t R@1 {macro['i2t_R@1']:.1f} t2i R@1 {macro['t2i_R@1']:.1f}")
        if "routing" in entry[mode]:
            parts.append(f"routing img {100 * entry[mode]['routing']['image']['accuracy']:.1f}%")
    return f"[after task {title}] " + " | ".join(parts)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def markdown_table(results: dict[str, Any], variant: str = "strict") -> str:
    """Per-task final recall, continual summary and routing accuracy as markdown."""
    names = results["task_names"]
    lines: list[str] = []
    for mode, mode_results in results.get("modes", {}).items():
        block = mode_results[variant]
        matrices = block["matrices"]
        if not matrices or not matrices.get("i2t_R@1"):
            continue
        last = len(matrices["i2t_R@1"]) - 1
        lines.append(f"### {mode} routing ({variant} recall, %)")
        lines.append("")
        metric_keys = [k for k in matrices if k != "rmean"]
        lines.append("| task | " + " | ".join(metric_keys) + " |")
        lines.append("|---|" + "---|" * len(metric_keys))
        for t, name in enumerate(names):
            row = [_fmt(matrices[k][last][t]) for k in metric_keys]
            lines.append(f"| {t} {name} | " + " | ".join(row) + " |")
        summary = block["summary"]
        for label, key in (("final average", "final_average"), ("stage-averaged", "stage_averaged"),
                           ("forgetting", "forgetting"), ("backward transfer", "backward_transfer")):
            lines.append(f"| **{label}** | " + " | ".join(_fmt(summary[k][key]) for k in metric_keys) + " |")
        if "routing_accuracy" in mode_results and mode_results["routing_accuracy"]:
            final = mode_results["routing_accuracy"][-1]
            lines.append("")
            lines.append(
                f"Routing (task-ID) accuracy after the last task: images {100 * final['image']:.1f} %, "
                f"captions {100 * final['text']:.1f} %."
            )
        lines.append("")
    similarity = results.get("task_similarity")
    if similarity:
        lines.append("### Task semantic similarity (frozen text encoder)")
        lines.append("")
        lines.append("| | " + " | ".join(str(i) for i in range(len(names))) + " |")
        lines.append("|---|" + "---|" * len(names))
        for i, row in enumerate(similarity):
            lines.append(f"| {i} {names[i]} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_results(results: dict[str, Any], output_dir: Path, variant: str = "strict") -> list[Path]:
    """Accuracy-matrix heatmaps and per-task recall across stages (i2t R@1 and t2i R@1), as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    names = results["task_names"]
    for mode, mode_results in results.get("modes", {}).items():
        matrices = mode_results[variant]["matrices"]
        if not matrices.get("i2t_R@1"):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, key in zip(axes, ("i2t_R@1", "t2i_R@1")):
            image = _draw_accuracy_matrix(ax, matrices[key], f"{key} ({mode})", names)
        fig.colorbar(image, ax=axes, shrink=0.8)
        path = output_dir / f"accuracy_matrix_{mode}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(7, 4.5))
        data = np.array([[np.nan if v is None else v for v in row] for row in matrices["i2t_R@1"]], dtype=float)
        for t, name in enumerate(names):
            ax.plot(range(data.shape[0]), data[:, t], marker="o", label=f"{t} {name}")
        ax.set_xlabel("stage (after training task)")
        ax.set_ylabel("i2t R@1 (%)")
        ax.set_title(f"Recall of each task across stages ({mode} routing)")
        ax.legend(fontsize=7)
        path = output_dir / f"recall_across_stages_{mode}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def grounding_markdown_table(results: dict[str, Any]) -> str:
    """REC results as markdown: final Precision@k per task and mode, the continual summary, routing accuracy."""
    names = results["task_names"]
    blocks = results.get("grounding", {})
    lines: list[str] = []
    if not blocks:
        return ""
    modes = list(blocks)
    keys = list(next(iter(blocks.values()))["matrices"])
    lines.append("### Precision after the last task (%)")
    lines.append("")
    lines.append("| task | " + " | ".join(f"{m} {k}" for m in modes for k in keys) + " |")
    lines.append("|---|" + "---|" * (len(modes) * len(keys)))
    for t, name in enumerate(names):
        cells = [_fmt(blocks[m]["matrices"][k][-1][t]) if blocks[m]["matrices"][k] else "–" for m in modes for k in keys]
        lines.append(f"| {t} {name} | " + " | ".join(cells) + " |")
    for label, key in (("final average", "final_average"), ("stage-averaged", "stage_averaged"),
                       ("forgetting", "forgetting"), ("backward transfer", "backward_transfer")):
        cells = [_fmt(blocks[m]["summary"][k][key]) if blocks[m]["summary"] else "–" for m in modes for k in keys]
        lines.append(f"| **{label}** | " + " | ".join(cells) + " |")
    routing = blocks.get("auto", {}).get("routing_accuracy")
    if routing:
        lines.append("")
        lines.append("Routing (task-ID) accuracy on the image feature after each stage: "
                     + ", ".join(f"{100 * r:.1f} %" for r in routing) + ".")
    lines.append("")
    return "\n".join(lines)


def plot_grounding_results(results: dict[str, Any], output_dir: Path) -> list[Path]:
    """Heatmaps of the Precision@1 matrix of every mode, and each task's P@1 across stages, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = results["task_names"]
    blocks = results.get("grounding", {})
    if not blocks or not next(iter(blocks.values()))["matrices"].get("P@1"):
        return []
    written = []
    fig, axes = plt.subplots(1, len(blocks), figsize=(4.5 * len(blocks), 4.2), squeeze=False)
    for ax, (mode, block) in zip(axes[0], blocks.items()):
        image = _draw_accuracy_matrix(ax, block["matrices"]["P@1"], f"P@1 ({mode})", names)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    path = output_dir / "grounding_accuracy_matrix.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, style in zip(blocks, ("-", "--", ":")):
        data = np.array([[np.nan if v is None else v for v in row] for row in blocks[mode]["matrices"]["P@1"]],
                        dtype=float)
        for t, name in enumerate(names):
            ax.plot(range(data.shape[0]), data[:, t], style, marker="o", color=f"C{t}",
                    label=f"{t} {name}" if mode == next(iter(blocks)) else None)
    ax.set_xlabel("stage (after training task)")
    ax.set_ylabel("P@1 (%)")
    ax.set_title("P@1 of each task across stages (" + ", ".join(
        f"{s} {m}" for m, s in zip(blocks, ("solid", "dashed", "dotted"))) + ")", fontsize=9)
    ax.legend(fontsize=7)
    path = output_dir / "grounding_precision_across_stages.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
    return written


def write_report(results: dict[str, Any], output_dir: str | Path, model: Any = None) -> str:
    """Write results.json, results.md and the plots; print and return the markdown table."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(output_dir / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    if results.get("problem") == "grounding":  # GroundingEvaluator.summarize: REC Precision@k, not recall
        table = grounding_markdown_table(results) + "\n" + markdown_table(results)
        title, plot = "# Continual grounding (REC) results\n\n", plot_grounding_results
    else:
        table, title, plot = markdown_table(results), "# Continual retrieval results\n\n", plot_results
    with atomic_path(output_dir / "results.md") as tmp:
        tmp.write_text(title + table)
    plot(results, output_dir)
    print(table)
    return table


def _draw_accuracy_matrix(ax: Any, matrix: list[list[float | None]], title: str, names: list[str]) -> Any:
    """One accuracy matrix (stage x task, percent; None = not yet learned) as an annotated heat map on `ax`."""
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    image = ax.imshow(data, vmin=0, vmax=100, cmap="viridis")
    ax.set_title(title)
    ax.set_xlabel("task evaluated")
    ax.set_ylabel("after training task")
    ax.set_xticks(range(len(names)), [n[:10] for n in names], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(data.shape[0]))
    for (i, j), v in np.ndenumerate(data):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w")
    return image
