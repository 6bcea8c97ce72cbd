"""Run every row of the results table (baselines, LPI, ablations) on the offline benchmark and write docs/results.md.

    python examples/run_results.py                 # full protocol (long on CPU)
    python examples/run_results.py --quick         # fewer images and steps per task (what fits a CPU hour)

Every row is one call of `examples/continual_retrieval.py` (same data, backbone, optimiser and evaluation; only
`--method` and the ablation flags differ), run as a subprocess so that its peak memory is its own, into
`<out>/<row>/seed<N>/`. Rows whose results.json exists are skipped, so the script resumes where it stopped.
Order: the main rows with seed 0, the ablations (seed 0), the learning-rate rows (seed 0), then the extra seeds of
the main rows.
`--table_only` just rebuilds the table from what has run. The table is written between the markers
`<!-- results:begin -->` / `<!-- results:end -->` of docs/results.md; text outside the markers is kept.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "examples" / "continual_retrieval.py"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
QUICK_ARGS = ["--train_per_task", "500", "--val_per_task", "100", "--epochs", "2"]
KEYED = {"lpi", "s-prompts", "lora", "joint"}


@dataclass
class Row:
    name: str
    label: str
    method: str
    args: list[str] = field(default_factory=list)
    main: bool = False


MAIN_ROWS = [
    Row("zero-shot", "zero-shot backbone", "zero-shot", main=True),
    Row("shared-prompt", "sequential FT, one shared prompt set", "shared-prompt", main=True),
    Row("s-prompts", "S-Prompts-style full-rank per-task prompts", "s-prompts", main=True),
    Row("lora", "per-task LoRA (r=4, q/k/v/out, both towers) at the shared lr", "lora", main=True),
    Row("lpi", "**LPI** (K=4, P=8, r=4)", "lpi", main=True),
    Row("joint", "joint multi-task LPI (upper bound)", "joint", main=True),
]
ABLATION_ROWS = [
    Row("lpi-no-shared-A", "LPI without the shared layer factor", "lpi", ["--no_shared_layer_factor", "true"]),
    Row("lpi-no-interaction", "LPI without the correlation module", "lpi", ["--no_interaction", "true"]),
    Row("lpi-no-align", "LPI without the alignment loss", "lpi", ["--align_weight", "0"]),
    Row("lpi-no-task", "LPI without the task loss", "lpi", ["--task_weight", "0"]),
    *[Row(f"lpi-rank{r}", f"LPI rank {r}", "lpi", ["--rank", str(r)]) for r in (1, 2, 8, 16)],
    Row("lpi-depth1", "LPI depth 1 (what the authors' retrieval code ran)", "lpi", ["--prompt_depth", "1"]),
    Row("lpi-depth3", "LPI depth 3", "lpi", ["--prompt_depth", "3"]),
]
# The shared protocol's learning rate (AdamW 2e-2, the offline default chosen for LPI's CP factors) is high for
# weights that start at zero or small scale; these rows give the baselines a 10x smaller one.
LR_ROWS = [
    Row("lora-lr2e-3", "per-task LoRA, lr 2e-3", "lora", ["--learning_rate", "2e-3"]),
    Row("s-prompts-lr2e-3", "S-Prompts-style, lr 2e-3", "s-prompts", ["--learning_rate", "2e-3"]),
    Row("shared-prompt-lr2e-3", "sequential FT shared prompt, lr 2e-3", "shared-prompt", ["--learning_rate", "2e-3"]),
    Row("lpi-lr2e-3", "LPI, lr 2e-3", "lpi", ["--learning_rate", "2e-3"]),
]


def command(row: Row, seed: int, out: Path, quick: bool, extra: list[str]) -> list[str]:
    return [
        sys.executable, str(CLI), "--method", row.method, "--seed", str(seed), "--output_dir", str(out),
        "--progress", "false", *(QUICK_ARGS if quick else []), *row.args, *extra,
    ]


def run_row(row: Row, seed: int, root: Path, quick: bool, extra: list[str]) -> None:
    out = root / row.name / f"seed{seed}"
    if (out / "results.json").is_file():
        print(f"[skip] {row.name} seed {seed}: {out / 'results.json'} exists", flush=True)
        return
    out.mkdir(parents=True, exist_ok=True)
    cmd = command(row, seed, out, quick, extra)
    print(f"[run ] {row.name} seed {seed}: {' '.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    status = "done" if code == 0 else f"FAILED (exit {code}, see {out / 'log.txt'})"
    print(f"[{status[:4].lower()}] {row.name} seed {seed} in {time.perf_counter() - started:.0f} s {status}", flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------------


def load(root: Path, row: Row) -> list[dict]:
    found = []
    for path in sorted((root / row.name).glob("seed*/results.json")):
        found.append(json.loads(path.read_text()))
    return found


def row_metrics(results: dict) -> dict[str, float]:
    """The numbers of one run. Routed methods: "auto" (inferred task); routing-free methods: "oracle" (= theirs)."""
    mode = "auto" if "auto" in results["modes"] else "oracle"
    summary = results["modes"][mode]["strict"]["summary"]
    oracle = results["modes"]["oracle"]["strict"]["summary"]
    num_tasks = len(results["task_names"])
    stages = len(results["train_seconds_per_task"])
    metrics = {f"{k}": summary[k]["final_average"] for k in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5")}
    metrics["stage_avg_R@1"] = (summary["i2t_R@1"]["stage_averaged"] + summary["t2i_R@1"]["stage_averaged"]) / 2
    metrics["forgetting_R@1"] = (summary["i2t_R@1"]["forgetting"] + summary["t2i_R@1"]["forgetting"]) / 2
    metrics["oracle_R@1"] = (oracle["i2t_R@1"]["final_average"] + oracle["t2i_R@1"]["final_average"]) / 2
    metrics["mean_R@1"] = (metrics["i2t_R@1"] + metrics["t2i_R@1"]) / 2
    if mode == "auto":
        final = results["modes"]["auto"]["routing_accuracy"][-1]
        metrics["routing_image"], metrics["routing_text"] = 100 * final["image"], 100 * final["text"]
    metrics["params"] = results["trainable_parameters_per_task"]
    # time per task: a joint stage trains all tasks at once, so its time is divided by the number of tasks
    metrics["seconds_per_task"] = sum(results["train_seconds_per_task"]) / (num_tasks if stages == 1 else stages)
    memory = results.get("peak_memory_mb_per_task") or []
    metrics["peak_mb"] = max(memory) if memory else math.nan
    return metrics


def aggregate(runs: list[dict]) -> dict[str, tuple[float, float, int]]:
    """{metric: (mean, sample std (0 for one run), n)} over seeds."""
    per_run = [row_metrics(r) for r in runs]
    out = {}
    for key in per_run[0]:
        values = [m[key] for m in per_run if key in m and m[key] is not None and not math.isnan(m[key])]
        if values:
            out[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))
    return out


def fmt(stats: dict, key: str, digits: int = 1, spread: bool = True) -> str:
    if key not in stats:
        return "–"
    mean, std, n = stats[key]
    text = f"{mean:.{digits}f}"
    return f"{text} ± {std:.{digits}f}" if spread and n > 1 else text


def verdict(lpi: dict, other: dict, key: str = "mean_R@1") -> str:
    """LPI against a row on mean R@1: a tie when the gap is within the larger seed spread (at least 0.5 points)."""
    if key not in lpi or key not in other:
        return "–"
    gap = lpi[key][0] - other[key][0]
    margin = max(lpi[key][1], other[key][1], 0.5)
    word = "tie" if abs(gap) <= margin else ("LPI wins" if gap > 0 else "LPI loses")
    return f"{word} ({gap:+.1f})"


def table(root: Path, quick: bool) -> str:
    stats = {row.name: aggregate(runs) for row in MAIN_ROWS + ABLATION_ROWS + LR_ROWS if (runs := load(root, row))}
    lpi = stats.get("lpi", {})
    header = (
        "| row | seeds | i2t R@1 | i2t R@5 | t2i R@1 | t2i R@5 | stage-avg R@1 | forgetting R@1 | routing img / txt % "
        "| oracle R@1 | params/task | train s/task | peak MiB | vs LPI (mean R@1) |"
    )
    rule = "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    shown = root.relative_to(ROOT) if root.is_relative_to(ROOT) else root
    lines = [BEGIN, "", f"Results directory: `{shown}`; mode: {'--quick' if quick else 'full'}.", ""]
    sections = (
        ("Main rows (mean ± sample std over seeds)", MAIN_ROWS),
        ("LPI ablations (seed 0)", ABLATION_ROWS),
        ("Learning-rate sensitivity: every trained method at a 10x smaller lr (seed 0)", LR_ROWS),
    )
    for title, rows in sections:
        lines += [f"### {title}", "", header, rule]
        for row in rows:
            s = stats.get(row.name)
            if s is None:
                lines.append(f"| {row.label} | 0 | not run |" + " |" * 12)
                continue
            routing = (f"{fmt(s, 'routing_image', spread=False)} / {fmt(s, 'routing_text', spread=False)}"
                       if "routing_image" in s else "– (none)")
            n = max(v[2] for v in s.values())
            versus = "—" if row.name == "lpi" else verdict(lpi, s)
            lines.append(
                f"| {row.label} | {n} | {fmt(s, 'i2t_R@1')} | {fmt(s, 'i2t_R@5')} | {fmt(s, 't2i_R@1')} | "
                f"{fmt(s, 't2i_R@5')} | {fmt(s, 'stage_avg_R@1')} | {fmt(s, 'forgetting_R@1')} | {routing} | "
                f"{fmt(s, 'oracle_R@1')} | {fmt(s, 'params', 0, False)} | {fmt(s, 'seconds_per_task', 0, False)} | "
                f"{fmt(s, 'peak_mb', 0, False)} | {versus} |"
            )
        lines.append("")
    lines += [
        "Depth 6 / 9 / 12 are capped at the offline backbone's 4 layers, i.e. they are the LPI main row (K=4).",
        "",
        "Regenerate: `python examples/run_results.py" + (" --quick" if quick else "") + "` (resumes; "
        "`--table_only` rebuilds this table from the runs on disk).",
        "",
        END,
    ]
    return "\n".join(lines)


TEMPLATE = """# Results on the offline benchmark

{table}
"""


def write_table(path: Path, text: str) -> None:
    if path.is_file() and BEGIN in (old := path.read_text()) and END in old:
        head, rest = old.split(BEGIN, 1)
        content = head + text + rest.split(END, 1)[1]
    else:
        content = TEMPLATE.format(table=text)
    path.write_text(content)
    print(f"wrote {path}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "results"), help="Folder of the runs.")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "results.md"), help="Markdown file of the table.")
    parser.add_argument("--quick", action="store_true", help=f"Smaller benchmark: {' '.join(QUICK_ARGS)}.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds of the main rows.")
    parser.add_argument("--phases", default="main,ablations,lr,seeds", help="Which of main,ablations,lr,seeds to run.")
    parser.add_argument("--rows", nargs="*", default=None, help="Only these row names.")
    parser.add_argument("--table_only", action="store_true", help="Do not run anything; rebuild the table.")
    parser.add_argument("extra", nargs="*", help="Extra arguments for continual_retrieval.py (after --).")
    args = parser.parse_args(argv)
    root = Path(args.out)
    if not args.table_only:
        phases = args.phases.split(",")
        plan: list[tuple[Row, int]] = []
        if "main" in phases:
            plan += [(row, args.seeds[0]) for row in MAIN_ROWS]
        if "ablations" in phases:
            plan += [(row, args.seeds[0]) for row in ABLATION_ROWS]
        if "lr" in phases:
            plan += [(row, args.seeds[0]) for row in LR_ROWS]
        if "seeds" in phases:
            plan += [(row, seed) for seed in args.seeds[1:] for row in MAIN_ROWS]
        for row, seed in plan:
            if args.rows is None or row.name in args.rows:
                run_row(row, seed, root, args.quick, args.extra)
                write_table(Path(args.doc), table(root, args.quick))
    write_table(Path(args.doc), table(root, args.quick))


if __name__ == "__main__":
    main()
