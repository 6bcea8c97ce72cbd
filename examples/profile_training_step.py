"""Where the time of one training step goes, op by op, for the variants of `benchmark_training.py` (no download).

Each round runs a plain step of every variant (its wall time and minor page faults, i.e. fresh memory the step
touches, from `getrusage`), then one more step with every aten op timed alone (a `TorchDispatchMode`), so a stall of
one thread shows in one op and not in the totals by op name. Used to check whether LPI's step does more work than the base step, op by op, when the
wall-clock ratio of `benchmark_training.py` is noisy (docs/benchmarks.md, session 5).

    python examples/profile_training_step.py                       # base and lpi, 2 steps each, top 8 ops
    python examples/profile_training_step.py --variants base,lpi,lora --steps 3 --top 12
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmark_training.py, before torch
import resource
import time
from collections import defaultdict
from typing import Any

import torch
from accelerate import PartialState
from benchmark_forward import add_benchmark_model_arguments
from benchmark_training import VARIANTS, _batch, build, train_step
from torch.utils._python_dispatch import TorchDispatchMode


class OpTimes(TorchDispatchMode):
    """Seconds spent in each aten op (by name and output shape) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ""
        key = (str(func.overloadpacket.__name__), str(shape))
        self.seconds[key] += time.perf_counter() - start
        self.calls[key] += 1
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_model_arguments(parser)
    parser.add_argument("--variants", default="base,lpi", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps per variant (after one warm-up)")
    parser.add_argument("--top", type=int, default=8, help="ops shown per step, by time")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.gradient_checkpointing, args.bf16 = False, False
    if args.threads:
        torch.set_num_threads(args.threads)
    device = PartialState().device
    batch = _batch(args, device)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    models = {name: build(name, args, device) for name in variants}
    for model, loss_fn in models.values():
        train_step(model, loss_fn, batch, False, device)  # warm-up: gradient buffers, kernels
    print(f"{torch.get_num_threads()} threads | batch {args.batch_size} | {device}")
    for step in range(args.steps):
        for name, (model, loss_fn) in models.items():
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            train_step(model, loss_fn, batch, False, device)  # a plain step: its time and page faults
            total = time.perf_counter() - start
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            with OpTimes() as times:  # then one step op by op (the mode's own overhead is not in the op times)
                train_step(model, loss_fn, batch, False, device)
            print(f"\n{name}, step {step + 1}: {total:.2f} s, {faults} minor page faults; op times of the next step:")
            for (op, shape), seconds in sorted(times.seconds.items(), key=lambda kv: -kv[1])[: args.top]:
                print(f"  {op:34s} {shape:22s} x{times.calls[(op, shape)]:<4d} {1e3 * seconds:8.1f} ms")


if __name__ == "__main__":
    main()
