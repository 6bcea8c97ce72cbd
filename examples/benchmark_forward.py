"""Forward-time overhead of LPI deep prompts on a ViT-B/16-sized CLIP (random weights, CPU, no download).

Measures, under `torch.inference_mode`, the median wall time of the image and text towers' feature methods for:

- base:        the unwrapped CLIP (a deep copy taken before wrapping);
- prompted:    LPI with one task for the whole batch (`set_task(0)`);
- mixed-task:  LPI with a different task per sample (`set_task(LongTensor)`), i.e. the oracle-routed batch;
- auto-routed: LPI with `set_task("auto")` (a prompt-free routing pass, then the prompted pass), with random keys
               stored for every task through `set_task_keys`.

Variants are timed round-robin (one run of each per repeat, rotating the order) after a warm-up run each, so slow
drift of a shared machine spreads over all of them. Targets: prompted/base <= 1.10 * (197 + 16) / 197 (vision:
16 prompt tokens on 197 image tokens, +10 %), the text analogue 1.10 * (L + P) / L, and mixed/single <= 1.05.

    python examples/benchmark_forward.py                      # defaults: batch 8, depth 9, length 16, rank 4
    python examples/benchmark_forward.py --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from peft import get_peft_model
from transformers import CLIPConfig, CLIPModel

import peft_lpi
from peft_lpi import LPIConfig

IMAGE_TOKENS = (224 // 16) ** 2 + 1  # 197


def vit_b16_clip_config(text_length: int) -> CLIPConfig:
    """CLIP ViT-B/16 sizes: vision 768 x 12 layers x 12 heads (224 px, patch 16), text 512 x 12 x 8, projection 512."""
    vision = dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=16,
    )
    text = dict(
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=8,
        max_position_embeddings=text_length,
        vocab_size=49408,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=512)


def make_inputs(config: CLIPConfig, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Random images and captions padded to the full 77 positions (BOS ... EOS, pad), as CLIP's processor pads."""
    generator = torch.Generator().manual_seed(seed)
    text = config.text_config
    length = text.max_position_embeddings
    input_ids = torch.full((batch, length), text.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        n = int(torch.randint(8, length + 1, (1,), generator=generator))
        ids = torch.randint(1, text.bos_token_id, (n,), generator=generator)
        ids[0], ids[-1] = text.bos_token_id, text.eos_token_id
        input_ids[row, :n], attention_mask[row, :n] = ids, 1
    pixel_values = torch.randn(batch, 3, 224, 224, generator=generator)
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


def time_round_robin(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for _ in range(warmup):  # auto-routed = a base pass + a mixed pass: both warmed by their own variants
        for name in names:
            if not name.endswith("/auto"):
                variants[name]()
    for repeat in range(repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            start = clock()
            variants[name]()
            times[name].append(clock() - start)
    return times


def add_benchmark_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The batch and LPI shape flags every ViT-B/16 benchmark script shares (same names, same defaults)."""
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--depth", type=int, default=9, help="prompt_depth K")
    parser.add_argument("--length", type=int, default=16, help="prompt_length P")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--text-length", type=int, default=77, help="text positions (captions padded to this)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first (auto excluded)")
    parser.add_argument("--tasks", type=int, default=4, help="tasks in the adapter (mixed batches cycle through them)")
    parser.add_argument("--no-interaction", action="store_true", help="switch the correlation module off")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's). On a shared, oversubscribed machine --threads 1 gives far "
        "steadier numbers: LPI's prompt generation is many small ops, each of which waits for a descheduled thread.",
    )
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: time.perf_counter; cpu: time.process_time, the CPU time of this process, which other jobs on a "
        "shared machine do not inflate (meaningful with --threads 1; idle-waiting threads would distort it)",
    )
    parser.add_argument("--towers", default="vision,text", help="which towers to time: vision,text")
    parser.add_argument("--no-auto", action="store_true", help="skip the auto-routed measurements")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    config = vit_b16_clip_config(args.text_length)
    base = CLIPModel(config).eval()
    base.set_attn_implementation(args.attn)
    reference = copy.deepcopy(base)
    lpi_config = LPIConfig(
        num_tasks=args.tasks,
        prompt_depth=args.depth,
        prompt_length=args.length,
        rank=args.rank,
        interaction=not args.no_interaction,
    )
    model = get_peft_model(base, lpi_config).eval()
    inputs = make_inputs(config, args.batch_size, args.seed)
    mixed = torch.arange(args.batch_size) % args.tasks
    generator = torch.Generator().manual_seed(args.seed + 1)
    for task in range(args.tasks):  # random unit keys: routing then costs what it costs with real keys
        keys = torch.nn.functional.normalize(torch.randn(lpi_config.num_keys, 2, 512, generator=generator), dim=-1)
        model.set_task_keys(task, vision=keys[:, 0], text=keys[:, 1])

    def call(target, modality: str, task=None) -> Callable[[], object]:
        def run() -> object:
            if task is not None:
                model.set_task(task)
            if modality == "vision":
                return target.get_image_features(pixel_values=inputs["pixel_values"])
            return target.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])

        return run

    towers = [t.strip() for t in args.towers.split(",") if t.strip()]
    variants: dict[str, Callable[[], object]] = {}
    for modality in towers:
        variants[f"{modality}/base"] = call(reference, modality)
        variants[f"{modality}/prompted"] = call(model, modality, 0)
        variants[f"{modality}/mixed"] = call(model, modality, mixed)
        if not args.no_auto:
            variants[f"{modality}/auto"] = call(model, modality, "auto")

    print(
        f"CLIP ViT-B/16 sizes, random weights | batch {args.batch_size} | K={args.depth} P={args.length} "
        f"r={args.rank} tasks={args.tasks} interaction={not args.no_interaction} | attn={args.attn} | "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
        f" | {args.warmup} warm-up + {args.repeats} timed runs per variant (median, {args.clock} clock)"
    )
    with torch.inference_mode():
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        times = time_round_robin(variants, args.repeats, args.warmup, clock)
    median = {name: statistics.median(values) for name, values in times.items()}

    tokens = {"vision": IMAGE_TOKENS, "text": args.text_length}
    rows, results = [], {}
    for modality in towers:
        base_t, prompted_t, mixed_t = (median[f"{modality}/{v}"] for v in ("base", "prompted", "mixed"))
        target = 1.10 * (tokens[modality] + args.length) / tokens[modality]
        entry = {
            "base_s": base_t,
            "prompted_s": prompted_t,
            "mixed_s": mixed_t,
            "prompted_over_base": prompted_t / base_t,
            "prompted_over_base_target": target,
            "mixed_over_single": mixed_t / prompted_t,
            "mixed_over_single_target": 1.05,
        }
        rows.append(
            (
                f"{modality}: prompted / base",
                f"{prompted_t:.3f} s / {base_t:.3f} s",
                prompted_t / base_t,
                f"<= {target:.3f}",
                prompted_t / base_t <= target,
            )
        )
        rows.append(
            (
                f"{modality}: mixed-task / single-task",
                f"{mixed_t:.3f} s / {prompted_t:.3f} s",
                mixed_t / prompted_t,
                "<= 1.050",
                mixed_t / prompted_t <= 1.05,
            )
        )
        if not args.no_auto:
            auto_t = median[f"{modality}/auto"]
            entry.update(auto_s=auto_t, auto_over_oracle=auto_t / mixed_t, auto_over_base=auto_t / base_t)
            rows.append(
                (
                    f"{modality}: auto-routed / oracle",
                    f"{auto_t:.3f} s / {mixed_t:.3f} s",
                    auto_t / mixed_t,
                    "(info)",
                    None,
                )
            )
            rows.append(
                (f"{modality}: auto-routed / base", f"{auto_t:.3f} s / {base_t:.3f} s", auto_t / base_t, "(info)", None)
            )
        results[modality] = entry

    width = max(len(r[0]) for r in rows)
    print(f"\n| {'measure'.ljust(width)} | median times          | ratio | target   | met |")
    print(f"|{'-' * (width + 2)}|-----------------------|-------|----------|-----|")
    for label, detail, ratio, target, met in rows:
        mark = "" if met is None else ("yes" if met else "NO")
        print(f"| {label.ljust(width)} | {detail.ljust(21)} | {ratio:5.3f} | {target.ljust(8)} | {mark.ljust(3)} |")

    if args.json:
        payload = {
            "args": vars(args),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "peft_lpi": peft_lpi.__version__,
            "runs_s": times,
            "median_s": median,
            "results": results,
        }
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
