"""Time the task-key k-means (k=5) on 20k L2-normalised features, in memory and streaming, against a naive loop.

    python examples/benchmark_kmeans.py [--n 20000] [--dim 512]
"""

from __future__ import annotations

import argparse
import time

import torch

from peft_lpi.tuner.routing import kmeans


def naive_assign(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """The reference code's per-sample loop (one assignment pass only)."""
    return torch.tensor([int(((centres - row).norm(dim=1)).argmin()) for row in x])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    x = torch.nn.functional.normalize(torch.randn(args.n, args.dim, generator=torch.Generator().manual_seed(0)), dim=1)
    start = time.perf_counter()
    centres = kmeans(x, 5, seed=0)
    in_memory = time.perf_counter() - start
    start = time.perf_counter()
    kmeans(lambda: iter(x.split(4096)), 5, seed=0)
    streaming = time.perf_counter() - start
    start = time.perf_counter()
    naive_assign(x, centres)
    naive_pass = time.perf_counter() - start
    print(f"| k-means k=5 on {args.n} x {args.dim} | seconds |")
    print("|---|---|")
    print(f"| in memory (up to 50 Lloyd iterations) | {in_memory:.2f} |")
    print(f"| streaming, chunks of 4096 | {streaming:.2f} |")
    print(f"| ONE assignment pass as a per-sample Python loop (reference style) | {naive_pass:.2f} |")


if __name__ == "__main__":
    main()
