"""Training-step, ranking and memory benchmark of LPI against baselines measured in the same run (no download).

On a CLIP with ViT-B/16 sizes and random weights (the config of `benchmark_forward.py`), at one batch size:

1. time of one training step (forward of both towers, loss, backward) of
   - base:  the frozen base model with inputs that require grad (`enable_input_require_grads` on both towers), so
            backward runs through every layer as it must for prompts entering at the first layers;
   - lpi:   LPI (K=9, P=16, r=4, correlation module on; the full objective: contrastive + alignment + task loss),
            training task 1 of 4 with every sample on task 1;
   - lpi-mixed: the same step with a different task per sample (what joint training does);
   - lora:  PEFT LoRA rank 8 on q/k/v/out_proj of both towers (contrastive loss);
   - full:  full fine-tuning of the base model (every weight trainable; informational);
   each ratio three ways: of the medians, paired (median of the ratios of the steps run back to back in one
   round) and of the minima (the least disturbed steps);
   and the FLOPs of one step of each variant (`torch.utils.flop_counter`: clock-free; elementwise ops, and on CPU
   the fused attention kernels, are not counted);
2. evaluation encoding of images with auto routing (`set_task("auto")`) over oracle routing (true task per sample);
3. ranking a 5k x 25k gallery (i2t and t2i Recall@1/5/10): `peft_lpi.evaluation.retrieval_recall` (chunked
   `torch.topk`) against a naive full `argsort` of the similarity matrix: time, peak memory, identical recalls;
4. peak memory of one training step of each variant, with and without gradient checkpointing, each in a fresh
   subprocess (CPU: the rise of the process's peak RSS over its RSS before the step, `/proc/self/clear_refs`;
   CUDA: `torch.cuda.max_memory_allocated` over the memory allocated before the step).

    python examples/benchmark_training.py                          # CPU: batch 8, 3 timed steps per variant
    python examples/benchmark_training.py --json bench.json
    python examples/benchmark_training.py --bf16 --batch-size 256  # on a GPU: images/s for base, LoRA and LPI

The device is Accelerate's (`PartialState().device`): CUDA when one is visible, else CPU. `--bf16` runs the
forward under `torch.autocast` (the factors stay fp32).
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads distort shared machines
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import PartialState
from benchmark_forward import add_benchmark_model_arguments, make_inputs, time_round_robin, vit_b16_clip_config
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPModel

import peft_lpi  # noqa: F401  (registers LPI)
from peft_lpi import LPIConfig
from peft_lpi.continual.baselines import LORA_TARGET_MODULES
from peft_lpi.continual.objective import LPIObjective, base_contrastive_loss
from peft_lpi.evaluation import retrieval_recall
from peft_lpi.tuner.model import embedding_of

VARIANTS = ("base", "lpi", "lpi-mixed", "lora", "full")
TASKS, TRAINED_TASK = 4, 1
RECALL_KS = (1, 5, 10)


# ----------------------------------------------------------------------------------------------------------------------
# Models and one training step
# ----------------------------------------------------------------------------------------------------------------------


def require_input_grads(model: CLIPModel) -> None:
    """Make both towers' embedding outputs require grad, as `PreTrainedModel.enable_input_require_grads` does for
    the text tower: the frozen base then back-propagates through every layer, like LPI does."""

    def hook(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        output.requires_grad_(True)

    model.vision_model.embeddings.register_forward_hook(hook)
    model.text_model.embeddings.register_forward_hook(hook)


def features(model: torch.nn.Module, batch: dict[str, torch.Tensor], **task_ids: object) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 image and text embeddings of a batch through the model's feature methods (LPI: with `task_ids=`)."""
    image = embedding_of(model.get_image_features(pixel_values=batch["pixel_values"], **task_ids))
    text = embedding_of(model.get_text_features(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **task_ids
    ))
    return image.float(), text.float()


def build(variant: str, args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, Callable]:
    """The model of one variant (same random weights for all) and a function computing its loss on a batch."""
    torch.manual_seed(args.seed)
    base = CLIPModel(vit_b16_clip_config(args.text_length))
    base.set_attn_implementation(args.attn)
    base.requires_grad_(variant == "full")
    if args.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    if variant in ("base", "full"):
        if variant == "base":
            require_input_grads(base)
        model = base.to(device).train()

        def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return base_contrastive_loss(model, *features(model, batch), gather=False)

        return model, loss_fn

    if variant == "lora":
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGET_MODULES)
        model = get_peft_model(base, config).to(device).train()

        def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return base_contrastive_loss(model.base_model.model, *features(model, batch), gather=False)

        return model, loss_fn

    config = LPIConfig(num_tasks=TASKS, prompt_depth=args.depth, prompt_length=args.length, rank=args.rank)
    model = get_peft_model(base, config).to(device).train()
    model.base_model.train_task(TRAINED_TASK)
    similarity = torch.eye(TASKS, device=device) * 0.5 + 0.3  # task 1 has positives and negatives among 0..1
    objective = LPIObjective(model, task_similarity=similarity)
    tasks = torch.arange(args.batch_size, device=device) % TASKS if variant == "lpi-mixed" else TRAINED_TASK

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with model.reuse_prompts():  # one prompt computation feeds both towers and the prompt losses
            return objective(*features(model, batch, task_ids=tasks), TRAINED_TASK, gather=False)["loss"]

    return model, loss_fn


def train_step(model: torch.nn.Module, loss_fn: Callable, batch: dict, bf16: bool, device: torch.device) -> float:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn(batch)
    loss.backward()
    model.zero_grad(set_to_none=False)  # keep the gradient buffers, as a training loop between steps does
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loss.item()


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------------
# Peak memory, measured in a child process
# ----------------------------------------------------------------------------------------------------------------------


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory a block adds above what was in use when it started, in MiB (CPU: RSS; CUDA: allocated)."""

    def __init__(self, device: torch.device):
        self.device, self.mib = device, float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak RSS) to the current RSS
            self.start = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _rss_kib("VmHWM") * 1024
        self.mib = (peak - self.start) / 2**20


def naive_recall(images: torch.Tensor, texts: torch.Tensor, text_to_image: torch.Tensor) -> dict[str, float]:
    """Recall@k by sorting every row of the full similarity matrices: the baseline of the ranking benchmark."""
    images = torch.nn.functional.normalize(images, dim=-1)
    texts = torch.nn.functional.normalize(texts, dim=-1)
    out = {}
    order = (images @ texts.T).argsort(dim=1, descending=True)  # (N, M) caption indices
    is_own = text_to_image[order] == torch.arange(images.shape[0]).unsqueeze(1)
    first = is_own.float().argmax(dim=1)  # rank of the best-ranked own caption
    for k in RECALL_KS:
        out[f"i2t_R@{k}"] = 100.0 * (first < k).double().mean().item()
    del order, is_own
    order = (texts @ images.T).argsort(dim=1, descending=True)  # (M, N) image indices
    rank = (order == text_to_image.unsqueeze(1)).float().argmax(dim=1)
    for k in RECALL_KS:
        out[f"t2i_R@{k}"] = 100.0 * (rank < k).double().mean().item()
    return out


def ranking_gallery(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random embeddings with a signal: a caption is its image's embedding plus noise (R@1 well below 100 %)."""
    generator = torch.Generator().manual_seed(args.seed)
    n_images, per_image, dim = args.gallery_images, args.captions_per_image, 512
    images = torch.randn(n_images, dim, generator=generator)
    text_to_image = torch.arange(n_images).repeat_interleave(per_image)
    texts = images[text_to_image] + 6.0 * torch.randn(n_images * per_image, dim, generator=generator)
    return images, texts, text_to_image


def child(args: argparse.Namespace) -> dict:
    """One measurement in a fresh process, so that no other variant's freed memory hides this one's peak."""
    device = PartialState().device
    if args.child == "ranking-naive" or args.child == "ranking-chunked":
        images, texts, text_to_image = ranking_gallery(args)
        start = time.perf_counter()
        with PeakMemory(torch.device("cpu")) as memory:
            if args.child == "ranking-naive":
                recall = naive_recall(images, texts, text_to_image)
            else:
                full = retrieval_recall(images, texts, text_to_image, ks=RECALL_KS, chunk_size=args.chunk_size)
                recall = {k: v for k, v in full.items() if "_R@" in k}
        return {"seconds": time.perf_counter() - start, "peak_mib": memory.mib, "recall": recall}
    model, loss_fn = build(args.child, args, device)
    batch = _batch(args, device)
    with PeakMemory(device) as memory:  # the first step: activations plus the gradient buffers it allocates
        train_step(model, loss_fn, batch, args.bf16, device)
    return {"peak_mib": memory.mib, "trainable": count_trainable(model)}


def _batch(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in make_inputs(vit_b16_clip_config(args.text_length), args.batch_size,
                                                     args.seed).items()}


def run_child(name: str, args: argparse.Namespace, gradient_checkpointing: bool = False) -> dict:
    # the parent's own flags (batch, shapes, threads, bf16, gallery, ...) then the child's part; a child ignores --json
    command = [sys.executable, __file__, *sys.argv[1:], "--child", name]
    if gradient_checkpointing:
        command.append("--gradient-checkpointing")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"child {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------------


def table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| measure | values | ratio |", "|---|---|---|"]
    lines += [f"| {name} | {values} | {ratio} |" for name, values, ratio in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--bf16", action="store_true", help="autocast the forward to bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time, steadier on a machine shared with other jobs (use "
        "with --threads 1)",
    )
    parser.add_argument("--gallery-images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=1024, help="query rows per chunk of retrieval_recall")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma list of training-step variants to time (default all: {','.join(VARIANTS)})")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: time,flops,route,ranking,memory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args)))
        return

    device = PartialState().device
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    header = (
        f"CLIP ViT-B/16 sizes, random weights | batch {args.batch_size} | LPI K={args.depth} P={args.length} "
        f"r={args.rank} tasks={TASKS} | LoRA r=8 q/k/v/out both towers | attn={args.attn} | "
        f"{'bf16 autocast' if args.bf16 else 'fp32'} | {device.type} ({gpu}) | torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads | {args.warmup} warm-up + {args.repeats} timed steps (median, {args.clock} clock)"
    )
    print(header, flush=True)
    rows: list[tuple[str, str, str]] = []
    results: dict = {"header": header, "args": vars(args)}

    if "time" not in skip:
        variants = [name for name in VARIANTS if name in args.variants.split(",")]
        if not {"base", "lpi"} <= set(variants):
            parser.error("--variants must include base and lpi (the ratios are taken against them)")
        models = {name: build(name, args, device) for name in variants}
        batch = _batch(args, device)
        steps = {name: (lambda m=m, f=f: train_step(m, f, batch, args.bf16, device)) for name, (m, f) in models.items()}
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        times = time_round_robin(steps, args.repeats, args.warmup, clock=clock)
        median = {name: statistics.median(v) for name, v in times.items()}
        results["train_step_s"] = {"runs": times, "median": median,
                                   "trainable": {n: count_trainable(m) for n, (m, _) in models.items()}}
        for name in variants:
            rows.append((f"train step: {name} (s; images/s)", f"{median[name]:.3f} s; "
                         f"{args.batch_size / median[name]:.1f} img/s", "" if name == "base" else
                         f"{median[name] / median['base']:.3f} x base"))
        ratios = [("lpi", "base", "lpi / base (requires_grad inputs)"), ("lpi", "lora", "lpi / lora r=8"),
                  ("lpi-mixed", "lpi", "lpi mixed-task / single-task")]
        paired, of_minima = {}, {}
        for top, bottom, label in ratios:
            if top in times and bottom in times:
                # ratio of medians; the median of the per-round ratios (both steps of a pair run back to back, so a
                # slow spell of a shared machine cancels out); and the ratio of the fastest steps (noise only ever
                # adds time, so the minimum is the least disturbed step, as `timeit` reports)
                paired[label] = statistics.median(a / b for a, b in zip(times[top], times[bottom]))
                of_minima[label] = min(times[top]) / min(times[bottom])
                rows.append((f"train step: {label}", f"paired (median of per-round ratios): {paired[label]:.3f}; "
                             f"of the minima: {of_minima[label]:.3f}", f"{median[top] / median[bottom]:.3f}"))
        results["train_step_s"]["paired_ratios"] = paired
        results["train_step_s"]["ratios_of_minima"] = of_minima
        del models, steps

    if "flops" not in skip:
        # what each variant computes, independent of the clock: FLOPs of one training step as torch counts them
        # (matmuls, convolutions and attention; elementwise ops are not counted, so a variant can cost time that
        # this does not show)
        variants = [name for name in VARIANTS if name in args.variants.split(",")]
        batch = _batch(args, device)
        flops = {}
        for name in variants:
            model, loss_fn = build(name, args, device)
            with FlopCounterMode(display=False) as counter:
                train_step(model, loss_fn, batch, args.bf16, device)
            flops[name] = counter.get_total_flops()
            del model, loss_fn
        results["train_step_flops"] = flops
        for name in variants:
            rows.append((f"train step FLOPs: {name}", f"{flops[name] / 1e9:.1f} GFLOP",
                         "" if name == "base" else f"{flops[name] / flops['base']:.4f} x base"))

    if "route" not in skip:
        lpi, _ = build("lpi", args, device)
        lpi.eval()
        generator = torch.Generator().manual_seed(args.seed + 1)
        for task in range(TASKS):  # random unit keys: routing costs what it costs with real keys
            keys = torch.nn.functional.normalize(torch.randn(5, 2, 512, generator=generator), dim=-1).to(device)
            lpi.set_task_keys(task, vision=keys[:, 0], text=keys[:, 1])
        pixels = _batch(args, device)["pixel_values"]
        oracle = torch.arange(args.batch_size, device=device) % TASKS

        def encode(tasks: torch.Tensor | str) -> Callable[[], object]:
            def run() -> object:
                lpi.set_task(tasks)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                    return lpi.get_image_features(pixel_values=pixels)

            return run

        with torch.inference_mode():
            times = time_round_robin({"oracle": encode(oracle), "auto": encode("auto")}, args.repeats, args.warmup)
        median = {name: statistics.median(v) for name, v in times.items()}
        results["encode_images_s"] = {"runs": times, "median": median}
        rows.append(("encode images: auto / oracle routing", f"{median['auto']:.3f} s / {median['oracle']:.3f} s",
                     f"{median['auto'] / median['oracle']:.3f}"))
        del lpi

    if "ranking" not in skip:
        naive = run_child("ranking-naive", args)
        chunked = run_child("ranking-chunked", args)
        same = all(abs(naive["recall"][k] - chunked["recall"][k]) < 1e-9 for k in naive["recall"])
        results["ranking"] = {"naive": naive, "chunked": chunked, "identical_recall": same}
        size = f"{args.gallery_images} x {args.gallery_images * args.captions_per_image}"
        rows.append((f"ranking {size}: chunked top-k / naive argsort, time",
                     f"{chunked['seconds']:.2f} s / {naive['seconds']:.2f} s",
                     f"{chunked['seconds'] / naive['seconds']:.3f}"))
        rows.append((f"ranking {size}: chunked top-k / naive argsort, peak memory",
                     f"{chunked['peak_mib']:.0f} MiB / {naive['peak_mib']:.0f} MiB",
                     f"{chunked['peak_mib'] / naive['peak_mib']:.3f}"))
        rows.append(("ranking: identical recalls", str(same), ""))

    if "memory" not in skip:
        memory: dict[str, dict] = {}
        for gc in (False, True):
            for name in ("base", "lpi", "lora", "full"):
                key = name + ("+gc" if gc else "")
                memory[key] = run_child(name, args, gradient_checkpointing=gc)
                print(f"  peak memory of a step, {key}: {memory[key]['peak_mib']:.0f} MiB", flush=True)
        results["peak_memory_mib"] = memory
        for suffix, label in (("", "no checkpointing"), ("+gc", "gradient checkpointing")):
            mib = {n: memory[n + suffix]["peak_mib"] for n in ("base", "lpi", "lora", "full")}
            values = ", ".join(f"{n} {v:.0f}" for n, v in mib.items())
            rows.append((f"peak memory of a step, {label} (MiB)", values, f"lpi / base {mib['lpi'] / mib['base']:.3f}; "
                         f"lpi / lora {mib['lpi'] / mib['lora']:.3f}; lpi / full FT {mib['lpi'] / mib['full']:.3f}"))
        rows.append(("peak memory: lpi with / without gradient checkpointing", "",
                     f"{memory['lpi+gc']['peak_mib'] / memory['lpi']['peak_mib']:.3f}"))

    print()
    print(table(rows))
    results["table"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
