"""Run every row of the results table (baselines, LPI, ablations) on the offline benchmark and write docs/results.md.

    python examples/run_results.py                 # full protocol (long on CPU)
    python examples/run_results.py --quick --jobs 2  # fewer images and steps per task, two rows at a time

Every row is one call of `examples/continual_retrieval.py` (same data, backbone, optimiser and evaluation; only
`--method`, `--learning_rate` and the ablation flags differ), run as a subprocess so that its peak memory is its
own, into `<out>/<row>/seed<N>/`. Rows whose results.json exists are skipped, so the script resumes where it stopped.
Phases, in order:
- sweep: every trained continual method (shared-prompt, s-prompts, lora, lpi) at every AdamW rate of SWEEP_LRS,
  seed 0; each method's rate is then the one with the best final mean R@1 (`--lr METHOD=RATE` overrides);
- main: zero-shot, every method at its rate (seed 0 is the sweep's run) and joint at LPI's rate;
- ablations: LPI variants at LPI's rate (seed 0);
- seeds: the main rows with the other seeds.
`--table_only` just rebuilds the table from what has run. The table is written between the markers
`<!-- results:begin -->` / `<!-- results:end -->` of docs/results.md; text outside the markers is kept.

    python examples/run_results.py --problem grounding   # the grounding section (examples/continual_grounding.py)

`--problem grounding` runs `examples/continual_grounding.py` (offline grounding world, cached OWL-ViT backbone) into
`outputs/results-grounding/<row>/seed<N>/` and writes its section between `<!-- grounding-results:begin -->` /
`<!-- grounding-results:end -->` (appended to the page when the markers are missing). Phases, in order (`--phases`):
- main: LPI with every seed (its runs also give the zero-shot backbone and LPI oracle / auto);
- sweep: shared-prompt and LoRA at GROUNDING_SWEEP_LRS (seed 0; LPI and joint use the example's default rate);
- baselines: joint (seed 0), then every baseline at its rate with the other seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from peft_lpi.io import atomic_path

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "examples" / "continual_retrieval.py"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
QUICK_ARGS = ["--train_per_task", "500", "--val_per_task", "100", "--num_train_epochs", "4"]
KEYED = {"lpi", "s-prompts", "lora", "joint"}


@dataclass
class Row:
    name: str
    label: str
    method: str
    args: list[str] = field(default_factory=list)
    main: bool = False
    cli: Path = CLI


SWEEP_METHODS = ("shared-prompt", "s-prompts", "lora", "lora-small", "lpi")
# LoRA at about LPI's parameter budget: rank 1 on q/v only (4,096 parameters per task on the world backbone vs 3,696)
METHOD_ARGS = {"lora-small": ["--lora_rank", "1", "--lora_target_modules", r".*\.self_attn\.(q_proj|v_proj)"]}
CLI_METHOD = {"lora-small": "lora"}
SWEEP_LRS = (5e-2, 2e-2, 5e-3, 2e-3, 5e-4)
# LPI's best shared-grid rate was the largest one, so its grid goes further up (until the best is inside).
EXTRA_LRS = {"lpi": (2e-1, 1e-1)}
LABELS = {
    "zero-shot": "zero-shot backbone",
    "shared-prompt": "sequential FT, one shared prompt set",
    "s-prompts": "S-Prompts-style full-rank per-task prompts",
    "lora": "per-task LoRA (r=4, q/k/v/out, both towers)",
    "lora-small": "per-task LoRA at LPI's budget (r=1, q/v, both towers)",
    "lpi": "**LPI** (K=4, P=8, r=4)",
    "joint": "joint multi-task LPI (upper bound)",
    "lpi-reference": "LPI, reference preset (shallow, no correlation module, their alignment; corrected task loss)",
}
ABLATIONS = [  # (name, label, flags): run with LPI's learning rate
    ("no-shared-A", "LPI without the shared layer factor", ["--share_layer_factor", "false"]),
    ("no-interaction", "LPI without the correlation module", ["--interaction", "false"]),
    ("no-align", "LPI without the alignment loss", ["--align_weight", "0"]),
    ("no-task", "LPI without the task loss", ["--task_weight", "0"]),
    *[(f"rank{r}", f"LPI rank {r}", ["--rank", str(r)]) for r in (1, 2, 8, 16)],
    ("depth1", "LPI depth 1 (what the authors' retrieval code ran)", ["--prompt_depth", "1"]),
    ("depth3", "LPI depth 3", ["--prompt_depth", "3"]),
    # shallow insertion puts P prompts into the 16-position text sequence: P = 4 keeps the world's 11-token captions
    ("reference-p4", "LPI, reference preset with P=4 (no caption truncation)",
     ["--lpi_preset", "reference", "--task_loss_mode", "bce", "--prompt_length", "4"]),
]


def lr_tag(lr: float) -> str:
    return f"lr{lr:g}"


def sweep_rows() -> list[Row]:
    """Every trained continual method at every learning rate of the grid (seed 0)."""
    return [
        Row(f"{m}-{lr_tag(lr)}", f"{LABELS[m]}, lr {lr:g}", CLI_METHOD.get(m, m),
            [*METHOD_ARGS.get(m, []), "--learning_rate", f"{lr:g}"])
        for m in SWEEP_METHODS
        for lr in sorted(SWEEP_LRS + EXTRA_LRS.get(m, ()), reverse=True)
    ]


def best_learning_rates(root: Path, overrides: dict[str, float], seed: int = 0) -> dict[str, float]:
    """Per method, the grid rate with the best final mean R@1 (i2t and t2i, the method's own routing) at seed 0."""
    best = dict(overrides)
    for method in SWEEP_METHODS:
        if method in best:
            continue
        scored = []
        for row in sweep_rows():
            if row.name.startswith(f"{method}-lr") and (runs := load(root, row, seeds=[seed])):
                scored.append((row_metrics(runs[0])["mean_R@1"], float(row.args[-1])))
        if scored:
            best[method] = max(scored)[1]
    if "lpi" in best:
        best.setdefault("joint", best["lpi"])
    return best


def main_rows(best: dict[str, float]) -> list[Row]:
    """zero-shot, then every method at its best rate (the folder is the sweep's, so seed 0 is reused)."""
    rows = [Row("zero-shot", LABELS["zero-shot"], "zero-shot", main=True)]
    for method in (*SWEEP_METHODS, "joint"):
        if method in best:
            lr = best[method]
            rows.append(Row(f"{method}-{lr_tag(lr)}", f"{LABELS[method]}, lr {lr:g}", CLI_METHOD.get(method, method),
                            [*METHOD_ARGS.get(method, []), "--learning_rate", f"{lr:g}"], main=True))
        if method == "lpi" and method in best:  # the authors' arithmetic and insertion, at LPI's rate
            lr = best[method]
            rows.append(Row(f"lpi-reference-{lr_tag(lr)}", f"{LABELS['lpi-reference']}, lr {lr:g}", "lpi",
                            # the reference task loss is NaN when a task has no dissimilar earlier task, which is
                            # the case on the offline world (docs/results.md): the corrected loss stands in for it
                            ["--lpi_preset", "reference", "--task_loss_mode", "bce", "--learning_rate", f"{lr:g}"],
                            main=True))
    return rows


def ablation_rows(best: dict[str, float]) -> list[Row]:
    if "lpi" not in best:
        return []
    lr = best["lpi"]
    return [Row(f"lpi-{name}-{lr_tag(lr)}", label, "lpi", [*flags, "--learning_rate", f"{lr:g}"])
            for name, label, flags in ABLATIONS]


def command(row: Row, seed: int, out: Path, quick: bool, extra: list[str]) -> list[str]:
    quick_args = QUICK_ARGS if quick and row.cli == CLI else []  # the grounding example has no quick schedule
    return [
        sys.executable, str(row.cli), "--method", row.method, "--seed", str(seed), "--output_dir", str(out),
        "--disable_tqdm", "true", *quick_args, *row.args, *extra,
    ]


def run_row(row: Row, seed: int, root: Path, quick: bool, extra: list[str], threads: int | None = None) -> None:
    out = root / row.name / f"seed{seed}"
    if (out / "results.json").is_file():
        print(f"[skip] {row.name} seed {seed}: {out / 'results.json'} exists", flush=True)
        return
    out.mkdir(parents=True, exist_ok=True)
    cmd = command(row, seed, out, quick, extra) + (["--cpu_threads", str(threads)] if threads else [])
    print(f"[run ] {row.name} seed {seed}: {' '.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    status = "done" if code == 0 else f"FAILED (exit {code}, see {out / 'log.txt'})"
    print(f"[{status[:4].lower()}] {row.name} seed {seed} in {time.perf_counter() - started:.0f} s {status}", flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------------


def load(root: Path, row: Row, seeds: list[int] | None = None) -> list[dict]:
    """The results.json of the row's seeds on disk (all of them, or only `seeds`)."""
    found = []
    for path in sorted((root / row.name).glob("seed*/results.json")):
        if seeds is None or int(path.parent.name[4:]) in seeds:
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


def verdict(lpi: dict, other: dict, key: str = "mean_R@1", floor: float = 0.5) -> str:
    """LPI against a row on mean R@1: a tie when the gap is within the larger seed spread (at least `floor`)."""
    if key not in lpi or key not in other:
        return "–"
    gap = lpi[key][0] - other[key][0]
    margin = max(lpi[key][1], other[key][1], floor)
    word = "tie" if abs(gap) <= margin else ("LPI wins" if gap > 0 else "LPI loses")
    return f"{word} ({gap:+.1f})"


def table(root: Path, quick: bool, best: dict[str, float], seed: int = 0) -> str:
    mains, ablations, sweep = main_rows(best), ablation_rows(best), sweep_rows()
    stats = {row.name: aggregate(runs) for row in mains + ablations + sweep if (runs := load(root, row))}
    # the sweep compares seed 0 of every rate; the main rows average every seed
    sweep_stats = {row.name: aggregate(runs) for row in sweep if (runs := load(root, row, seeds=[seed]))}
    lpi_row = next((row.name for row in mains if row.method == "lpi"), None)
    lpi = stats.get(lpi_row, {})
    # one-seed rows (ablations, sweep) are compared with LPI's run of the same seed, not with its mean over seeds
    lpi_same_seed = aggregate(runs) if lpi_row and (runs := load(root, Row(lpi_row, "", "lpi"), seeds=[seed])) else {}
    header = (
        "| row | seeds | i2t R@1 | i2t R@5 | t2i R@1 | t2i R@5 | stage-avg R@1 | forgetting R@1 | routing img / txt % "
        "| oracle R@1 | params/task | train s/task | peak MiB | vs LPI (mean R@1) |"
    )
    rule = "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    shown = root.relative_to(ROOT) if root.is_relative_to(ROOT) else root
    rates = ", ".join(f"{m} {lr:g}" for m, lr in best.items())
    lines = [BEGIN, "", f"Results directory: `{shown}`; mode: {'--quick' if quick else 'full'}; "
             f"learning rate per method (best of the sweep): {rates or 'sweep not run'}.", ""]
    # one-seed comparisons have no spread of their own: LPI's seed spread over the main rows is the tie floor
    seed_spread = max(0.5, lpi.get("mean_R@1", (0.0, 0.0))[1])
    sections = (  # (title, rows, their stats, the LPI stats they are compared with, the tie floor)
        ("Main rows: every method at its best learning rate (mean ± sample std over seeds)", mains, stats, lpi, 0.5),
        (f"LPI ablations (seed {seed}, LPI's learning rate; vs LPI's seed-{seed} run, tie within LPI's seed spread)",
         ablations, stats, lpi_same_seed, seed_spread),
        (f"Learning-rate sweep (seed {seed}): the grid every trained method was tuned on; vs LPI's seed-{seed} run",
         sweep, sweep_stats, lpi_same_seed, seed_spread),
    )
    for title, rows, section_stats, reference, floor in sections:
        lines += [f"### {title}", "", header, rule]
        for row in rows:
            s = section_stats.get(row.name)
            if s is None:
                lines.append(f"| {row.label} | 0 | not run |" + " |" * 12)
                continue
            routing = (f"{fmt(s, 'routing_image', spread=False)} / {fmt(s, 'routing_text', spread=False)}"
                       if "routing_image" in s else "– (none)")
            n = max(v[2] for v in s.values())
            versus = "—" if row.name == lpi_row else verdict(reference, s, floor=floor)
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


_WRITE_LOCK = threading.Lock()  # --jobs: rows finish in parallel threads, each rewriting the same page


def write_table(path: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the text between the markers `begin` / `end` of `path` (atomically: a reader never sees a half-written
    page). Without the markers: a new page, or for a section other than retrieval's, appended to the page."""
    with _WRITE_LOCK:
        old = path.read_text() if path.is_file() else ""
        if begin in old and end in old:
            head, rest = old.split(begin, 1)
            content = head + text + rest.split(end, 1)[1]
        elif old and begin != BEGIN:
            content = old.rstrip("\n") + "\n\n" + text + "\n"
        else:
            content = TEMPLATE.format(table=text)
        with atomic_path(path) as tmp:
            tmp.write_text(content)
    print(f"wrote {path}", flush=True)


def run_plan(plan: list[tuple[Row, int]], args: argparse.Namespace, best: dict[str, float]) -> None:
    """Run the rows, `--jobs` at a time (each with cores // jobs threads), rewriting the table after each."""
    root, doc = Path(args.out), Path(args.doc)
    plan = [(row, seed) for row, seed in plan if args.rows is None or row.name in args.rows]
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None

    def one(item: tuple[Row, int]) -> None:
        run_row(item[0], item[1], root, args.quick, args.extra, threads)
        write_table(doc, table(root, args.quick, best, args.seeds[0]))

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, plan))


def parse_overrides(items: list[str]) -> dict[str, float]:
    overrides = {}
    for item in items:
        method, _, rate = item.partition("=")
        if method not in LABELS or not rate:
            raise SystemExit(f"--lr takes METHOD=RATE with METHOD one of {', '.join(LABELS)}; got {item!r}.")
        overrides[method] = float(rate)
    return overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", choices=("retrieval", "grounding"), default="retrieval",
                        help="retrieval (examples/continual_retrieval.py) or grounding (continual_grounding.py).")
    parser.add_argument("--out", default=None,
                        help="Folder of the runs (default outputs/results, or outputs/results-grounding).")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "results.md"), help="Markdown file of the table.")
    parser.add_argument("--quick", action="store_true", help=f"Smaller benchmark: {' '.join(QUICK_ARGS)}.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds of the main rows.")
    parser.add_argument("--phases", default=None,
                        help="Which of sweep,main,ablations,seeds to run, in that order (grounding: main,sweep,"
                        "baselines). Default: all.")
    parser.add_argument("--rows", nargs="*", default=None, help="Only these row names.")
    parser.add_argument("--lr", nargs="*", default=[], help="METHOD=RATE: use this rate instead of the sweep's best.")
    parser.add_argument("--jobs", type=int, default=1, help="Rows run at once (each with cores // jobs threads).")
    parser.add_argument("--table_only", action="store_true", help="Do not run anything; rebuild the table.")
    parser.add_argument("extra", nargs="*", help="Extra arguments for continual_retrieval.py (after --).")
    args = parser.parse_args(argv)
    if args.problem == "grounding":
        args.out = args.out or str(ROOT / "outputs" / "results-grounding")
        return grounding_main(args)
    args.out = args.out or str(ROOT / "outputs" / "results")
    root, overrides, seed = Path(args.out), parse_overrides(args.lr), args.seeds[0]
    if not args.table_only:
        phases = (args.phases or "sweep,main,ablations,seeds").split(",")
        if "sweep" in phases:
            run_plan([(row, seed) for row in sweep_rows()], args, best_learning_rates(root, overrides, seed))
        best = best_learning_rates(root, overrides, seed)
        plan: list[tuple[Row, int]] = []
        if "main" in phases:
            plan += [(row, seed) for row in main_rows(best)]
        if "ablations" in phases:
            plan += [(row, seed) for row in ablation_rows(best)]
        if "seeds" in phases:
            plan += [(row, s) for s in args.seeds[1:] for row in main_rows(best)]
        run_plan(plan, args, best)
    best = best_learning_rates(root, overrides, seed)
    write_table(Path(args.doc), table(root, args.quick, best, seed))



GROUNDING_CLI = ROOT / "examples" / "continual_grounding.py"
G_BEGIN, G_END = "<!-- grounding-results:begin -->", "<!-- grounding-results:end -->"
GROUNDING_LR = 5e-2  # the example's default rate (LPI, joint): the grounding probe's rate
GROUNDING_SWEEP = {"shared-prompt": (5e-2, 5e-3), "lora": (5e-2, 5e-3)}  # AdamW rates tried at seed 0
GROUNDING_LPI_CHECK = (2e-1, 1e-2)  # LPI at other rates, seed 0: shown, not used (LPI keeps the example's rate)
GROUNDING_LABELS = {
    "lpi": "**LPI** (K=4, P=8, r=4)",
    "shared-prompt": "sequential FT, one shared full-rank prompt set",
    "lora": "per-task LoRA at LPI's budget (q/v, both towers)",
    "joint": "joint multi-task LPI (upper bound)",
}
BASELINE_EVAL = ["--eval_routing", "oracle", "auto"]  # the zero-shot figures come from the LPI runs


def grounding_row(method: str, lr: float, zero_shot: bool | None = None) -> Row:
    """One grounding run; the zero-shot mode is evaluated in LPI's main runs only (it is the same in every run)."""
    zero_shot = method == "lpi" if zero_shot is None else zero_shot
    args = ["--learning_rate", f"{lr:g}", *([] if zero_shot else BASELINE_EVAL)]
    return Row(f"{method}-{lr_tag(lr)}", f"{GROUNDING_LABELS[method]}, lr {lr:g}", method, args, cli=GROUNDING_CLI)


def grounding_sweep_rows() -> list[Row]:
    return ([grounding_row(m, lr) for m, rates in GROUNDING_SWEEP.items() for lr in rates]
            + [grounding_row("lpi", lr, zero_shot=False) for lr in GROUNDING_LPI_CHECK])


def grounding_rates(root: Path, overrides: dict[str, float], seed: int = 0) -> dict[str, float]:
    """Per method, its rate: LPI and joint the example's, the swept baselines the best final P@1 at `seed`."""
    best = {"lpi": GROUNDING_LR, "joint": GROUNDING_LR, **overrides}
    for method, rates in GROUNDING_SWEEP.items():
        scored = [(grounding_metrics(runs[0])["P@1"], lr) for lr in rates
                  if (runs := load(root, grounding_row(method, lr), seeds=[seed]))]
        if method not in best and scored:
            best[method] = max(scored)[1]
    return best


def grounding_main_rows(best: dict[str, float]) -> list[Row]:
    return [grounding_row(m, best[m]) for m in ("lpi", "shared-prompt", "lora", "joint") if m in best]


def grounding_metrics(results: dict, mode: str | None = None) -> dict[str, float]:
    """The numbers of one grounding run in `mode` (default: "auto" when it has it, else "oracle")."""
    g = results["grounding"]
    mode = mode or ("auto" if "auto" in g else "oracle")
    summary, stages = g[mode]["summary"], len(results["train_seconds_per_task"])
    metrics = {"P@1": summary["P@1"]["final_average"], "P@5": summary["P@5"]["final_average"],
               "stage_avg_P@1": summary["P@1"]["stage_averaged"], "forgetting_P@1": summary["P@1"]["forgetting"],
               "bwt_P@1": summary["P@1"]["backward_transfer"]}
    if mode != "zero-shot":
        metrics["oracle_P@1"] = g["oracle"]["summary"]["P@1"]["final_average"]
    if mode == "auto":
        metrics["routing"] = 100 * g["auto"]["routing_accuracy"][-1]
    if mode != "zero-shot":
        metrics["params"] = results["trainable_parameters_per_task"]
        metrics["seconds_per_task"] = sum(results["train_seconds_per_task"]) / (
            len(results["task_names"]) if stages == 1 else stages)
    return metrics


def _stats(per_run: list[dict[str, float]]) -> dict[str, tuple[float, float, int]]:
    out = {}
    for key in per_run[0]:
        values = [m[key] for m in per_run if key in m and not math.isnan(m[key])]
        if values:
            out[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))
    return out


def grounding_table(root: Path, best: dict[str, float], seeds: list[int]) -> str:
    """The grounding section: main rows (mean ± sample std over seeds), LPI per task, routing, the sweep."""
    rows = {row.method: row for row in grounding_main_rows(best)}
    runs = {m: load(root, row) for m, row in rows.items()}
    lpi_runs = runs.get("lpi", [])
    shown = root.relative_to(ROOT) if root.is_relative_to(ROOT) else root
    lines = [G_BEGIN, "", "## Grounding: continual REC on the offline grounding world", "",
             "Every row is `examples/continual_grounding.py` (grounding world seed 0, the cached OWL-ViT grounding "
             "backbone, 6 tasks, 400 training scenes with every describable object a query, 200 validation pairs "
             "per task, 60 AdamW steps of 32 scenes per task) with `--method`, `--learning_rate` and `--seed` "
             f"(training seed: initialisation and data order; the world and backbone are fixed). Runs: `{shown}`. "
             "Precision in percent, final stage, macro over the 6 tasks; mean ± sample std over seeds.", "",
             "| row | seeds | P@1 | P@5 | stage-avg P@1 | forgetting P@1 | routing img % | oracle P@1 | params/task "
             "| train s/task | P@1 vs zero-shot | P@1 vs LPI auto |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    table_rows: list[tuple[str, dict]] = []
    if lpi_runs:
        table_rows.append(("zero-shot backbone (prompts off; the LPI runs' zero-shot mode)",
                           _stats([grounding_metrics(r, "zero-shot") for r in lpi_runs])))
        table_rows.append((f"{rows['lpi'].label}, oracle task", _stats([grounding_metrics(r, "oracle")
                                                                        for r in lpi_runs])))
        table_rows.append((f"{rows['lpi'].label}, auto (image routing)", _stats([grounding_metrics(r)
                                                                                 for r in lpi_runs])))
    for method in ("shared-prompt", "lora", "joint"):
        label = (rows[method].label if method in rows else GROUNDING_LABELS[method]) + (
            " (no routing)" if method == "shared-prompt" else ", auto")
        found = runs.get(method)
        table_rows.append((label, _stats([grounding_metrics(r) for r in found]) if found else {}))
    zero, lpi_auto = (table_rows[0][1], table_rows[2][1]) if lpi_runs else ({}, {})

    def gap(s: dict, reference: dict) -> str:
        if not reference or s is reference:
            return "–"
        diff, spread = s["P@1"][0] - reference["P@1"][0], max(s["P@1"][1], reference["P@1"][1])
        return f"{diff:+.1f} ({'above' if abs(diff) > spread else 'within'} the seed spread {spread:.1f})"

    for label, s in table_rows:
        if not s:
            lines.append(f"| {label} | 0 | not run |" + " |" * 9)
            continue
        n = max(v[2] for v in s.values())
        versus = f"{gap(s, zero)} | {gap(s, lpi_auto) if s is not zero else '–'}"
        routing = fmt(s, "routing") if "routing" in s else "– (none)"
        lines.append(f"| {label} | {n} | {fmt(s, 'P@1')} | {fmt(s, 'P@5')} | {fmt(s, 'stage_avg_P@1')} | "
                     f"{fmt(s, 'forgetting_P@1')} | {routing} | {fmt(s, 'oracle_P@1')} | "
                     f"{fmt(s, 'params', 0, False)} | {fmt(s, 'seconds_per_task', 0, False)} | {versus} |")
    lines += ["", "Routed rows (LPI auto, LoRA, joint) give their auto figures, the shared prompt its only ones; oracle "
              "P@1 is each method with the true task. The seed spread is the training seed's only (the validation "
              "pairs are the same in every run: about +-1.4 points of binomial error on a six-task average). train "
              "s/task is wall time under the run's load (`--jobs` runs at once on a shared machine), not a speed "
              "comparison.", ""]
    if lpi_runs:
        names = lpi_runs[0]["task_names"]
        lines += [f"### LPI per task (final stage, P@1, mean ± std over {len(lpi_runs)} seeds)", "",
                  "| task | zero-shot | LPI oracle | LPI auto | auto - zero-shot | forgetting (auto) |",
                  "|---|---|---|---|---|---|"]
        for t, name in enumerate(names):
            cells = []
            for mode in ("zero-shot", "oracle", "auto"):
                values = [r["grounding"][mode]["matrices"]["P@1"][-1][t] for r in lpi_runs]
                cells.append(_mean_std(values))
            gains = [r["grounding"]["auto"]["matrices"]["P@1"][-1][t] - r["grounding"]["zero-shot"]["matrices"]["P@1"]
                     [-1][t] for r in lpi_runs]
            forgetting = [max(row[t] for row in r["grounding"]["auto"]["matrices"]["P@1"][t:-1])
                          - r["grounding"]["auto"]["matrices"]["P@1"][-1][t] if t < len(names) - 1 else 0.0
                          for r in lpi_runs]
            cells += [_mean_std(gains, signed=True), _mean_std(forgetting)]
            lines.append(f"| {t} {name} | " + " | ".join(cells) + " |")
        routing = [[100 * a for a in r["grounding"]["auto"]["routing_accuracy"]] for r in lpi_runs]
        lines += ["", "LPI image routing accuracy after each stage (tasks 0..stage, mean over seeds): "
                  + ", ".join(f"{statistics.fmean(v):.1f}" for v in zip(*routing)) + " %.", ""]
    sweep = [(row, load(root, row, seeds=[seeds[0]])) for row in grounding_sweep_rows()]
    if any(found for _, found in sweep):
        lines += [f"### Learning-rate check (seed {seeds[0]})", "",
                  "The shared prompt and LoRA use their best rate here in the rows above; LPI and joint keep the "
                  f"example's rate {GROUNDING_LR:g} (LPI's rows here show what other rates give).", "",
                  "| row | P@1 | oracle P@1 |", "|---|---|---|"]
        for row, found in sweep:
            m = grounding_metrics(found[0]) if found else {}
            lines.append(f"| {row.label} | {m.get('P@1', math.nan):.1f} | {m.get('oracle_P@1', math.nan):.1f} |"
                         if found else f"| {row.label} | not run | |")
        lines.append("")
    lines += ["Regenerate: `python examples/run_results.py --problem grounding` (resumes; `--table_only` rebuilds this "
              "section from the runs on disk; each run's command is at the top of its `log.txt`).", "", G_END]
    return "\n".join(lines)


def _mean_std(values: list[float], signed: bool = False) -> str:
    mean = statistics.fmean(values)
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return f"{text} ± {statistics.stdev(values):.1f}" if len(values) > 1 else text


def grounding_main(args: argparse.Namespace) -> None:
    """`--problem grounding`: LPI seeds, the baselines' rate check, the baselines' seeds; the section after each."""
    root, doc, seeds = Path(args.out), Path(args.doc), args.seeds
    overrides = {m: lr for m, lr in parse_overrides(args.lr).items() if m in GROUNDING_LABELS}
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None

    def run(plan: list[tuple[Row, int]]) -> None:
        plan = [(row, s) for row, s in plan if args.rows is None or row.name in args.rows]

        def one(item: tuple[Row, int]) -> None:
            run_row(item[0], item[1], root, False, args.extra, threads)
            write_table(doc, grounding_table(root, grounding_rates(root, overrides, seeds[0]), seeds), G_BEGIN, G_END)

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(one, plan))

    if not args.table_only:
        phases = (args.phases or "main,sweep,baselines").split(",")
        if "main" in phases:
            run([(grounding_row("lpi", overrides.get("lpi", GROUNDING_LR)), s) for s in seeds])
        if "sweep" in phases:
            run([(row, seeds[0]) for row in grounding_sweep_rows()])
        if "baselines" in phases:
            best = grounding_rates(root, overrides, seeds[0])
            run([(grounding_row("joint", best["joint"]), seeds[0])]
                + [(row, s) for s in seeds[1:] for row in grounding_main_rows(best) if row.method != "lpi"])
    write_table(doc, grounding_table(root, grounding_rates(root, overrides, seeds[0]), seeds), G_BEGIN, G_END)


if __name__ == "__main__":
    main()
