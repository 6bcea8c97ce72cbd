"""Outputs of a continual run: results JSON, a markdown table, and matplotlib plots, all in one folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .io import atomic_path


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def markdown_table(results: dict[str, Any], variant: str = "strict") -> str:
    """Per-task final recall, continual summary and routing accuracy as markdown."""
    names = results["task_names"]
    lines: list[str] = []
    for mode, mode_results in results["modes"].items():
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
    for mode, mode_results in results["modes"].items():
        matrices = mode_results[variant]["matrices"]
        if not matrices.get("i2t_R@1"):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, key in zip(axes, ("i2t_R@1", "t2i_R@1")):
            data = np.array([[np.nan if v is None else v for v in row] for row in matrices[key]], dtype=float)
            image = ax.imshow(data, vmin=0, vmax=100, cmap="viridis")
            ax.set_title(f"{key} ({mode})")
            ax.set_xlabel("task evaluated")
            ax.set_ylabel("after training task")
            ax.set_xticks(range(len(names)), [n[:10] for n in names], rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(data.shape[0]))
            for (i, j), v in np.ndenumerate(data):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w")
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


def write_report(results: dict[str, Any], output_dir: str | Path, model: Any = None) -> str:
    """Write results.json, results.md and the plots; print and return the markdown table."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(output_dir / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    table = markdown_table(results)
    with atomic_path(output_dir / "results.md") as tmp:
        tmp.write_text("# Continual retrieval results\n\n" + table)
    plot_results(results, output_dir)
    print(table)
    return table
