"""Draw docs/figures/injection.png: where LPI's prompts enter the two towers of a frozen dual encoder.

    python docs/figures/make_injection_figure.py                 # writes docs/figures/injection.png
    python docs/figures/make_injection_figure.py --output x.png

Deterministic: no randomness, a fixed size and dpi, matplotlib's bundled DejaVu font and no PNG metadata, so the
same matplotlib version writes the same bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "injection.png"

PROMPT = "#f28e2b"  # prompt tokens and everything that makes them
SHARED = "#e15759"  # the shared layer factor A_t
VISION = "#4e79a7"
TEXT = "#59a14f"
FROZEN = "#d9d9d9"  # frozen backbone
INK = "#222222"

NUM_LAYERS, DEPTH, NUM_PROMPTS = 5, 3, 3  # drawn: 5 encoder layers per tower, the first K = 3 prompted, P = 3
LAYER_H, LAYER_GAP, BOTTOM = 0.78, 0.36, 1.15
TOKEN_W, TOKEN_H = 0.36, 0.34


def box(ax, x, y, w, h, face, edge=INK, lw=1.0, radius=0.06, alpha=1.0, z=1):
    ax.add_patch(
        FancyBboxPatch((x, y), w, h, boxstyle=f"round,pad=0,rounding_size={radius}", fc=face, ec=edge, lw=lw,
                       alpha=alpha, zorder=z)
    )


def arrow(ax, start, end, color=INK, lw=1.2, style="-|>", rad=0.0, ls="-", z=3):
    ax.add_patch(
        FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=11, color=color, lw=lw, linestyle=ls,
                        connectionstyle=f"arc3,rad={rad}", zorder=z, shrinkA=1, shrinkB=1)
    )


def token_row(ax, x, y, labels, colors, text_color=INK, fontsize=7):
    for i, (label, color) in enumerate(zip(labels, colors)):
        ax.add_patch(Rectangle((x + i * TOKEN_W, y), TOKEN_W * 0.92, TOKEN_H, fc=color, ec=INK, lw=0.6, zorder=4))
        ax.text(x + i * TOKEN_W + TOKEN_W * 0.46, y + TOKEN_H / 2, label, ha="center", va="center",
                fontsize=fontsize, color=text_color, zorder=5)


def layer_y(index: int) -> float:
    return BOTTOM + index * (LAYER_H + LAYER_GAP)


def tower(ax, x0, width, name, color, first, rest, pool_text):
    """One tower: embeddings at the bottom, NUM_LAYERS encoder layers, pooling at the top."""
    real = [first, *rest]
    n_real = len(real)
    # Embeddings.
    box(ax, x0, 0.35, width, 0.5, "white", edge=color, lw=1.2)
    ax.text(x0 + width / 2, 0.6, f"{name} embeddings + position embeddings\n(L tokens; prompts get no position)",
            ha="center", va="center", fontsize=7.5)
    for index in range(NUM_LAYERS):
        y = layer_y(index)
        prompted = index < DEPTH
        box(ax, x0, y, width, LAYER_H, FROZEN if not prompted else "#f4f4f4", edge=color, lw=1.4 if prompted else 0.8)
        label = f"layer {index}" + ("  (frozen, prompted)" if prompted else "  (frozen, unchanged)")
        ax.text(x0 + 0.08, y + LAYER_H - 0.13, label, ha="left", va="center", fontsize=7.5, color=INK)
        row_x = x0 + 0.1
        row_y = y + 0.1
        if prompted:
            labels = [first] + [f"p{index},{j + 1}" for j in range(NUM_PROMPTS)] + rest
            colors = ["white"] + [PROMPT] * NUM_PROMPTS + ["white"] * len(rest)
            token_row(ax, row_x, row_y, labels, colors, fontsize=6.5)
            ax.text(x0 + width - 0.08, row_y + TOKEN_H / 2, f"L+P = {n_real + NUM_PROMPTS}\ntokens inside",
                    ha="right", va="center", fontsize=6.5, color=PROMPT)
        else:
            token_row(ax, row_x, row_y, real, ["white"] * n_real, fontsize=6.5)
            ax.text(x0 + width - 0.08, row_y + TOKEN_H / 2, f"L = {n_real}", ha="right", va="center", fontsize=6.5)
        # Between layers: the sequence is back to L tokens (prompts stripped).
        gap_y = y - LAYER_GAP / 2
        arrow(ax, (x0 + width * 0.5, gap_y - LAYER_GAP / 2 + 0.02), (x0 + width * 0.5, gap_y + LAYER_GAP / 2 - 0.02),
              color="#777777", lw=1.0)
        if 0 < index <= DEPTH:
            ax.text(x0 + width * 0.5 + 0.08, gap_y, "strip P prompts: L tokens", ha="left", va="center",
                    fontsize=6.5, color="#555555", style="italic")
    top = layer_y(NUM_LAYERS - 1) + LAYER_H
    arrow(ax, (x0 + width / 2, top + 0.02), (x0 + width / 2, top + 0.3), color="#777777", lw=1.0)
    box(ax, x0, top + 0.3, width, 0.5, "white", edge=color, lw=1.2)
    ax.text(x0 + width / 2, top + 0.55, pool_text, ha="center", va="center", fontsize=7.5)


def draw(output: Path) -> Path:
    plt.rcParams.update({"font.family": "DejaVu Sans", "svg.hashsalt": "peft_lpi"})
    fig, ax = plt.subplots(figsize=(13.5, 8.2))
    ax.set_xlim(0, 13.5)
    ax.set_ylim(0, 8.2)
    ax.axis("off")

    left_x, tower_w = 0.25, 4.1
    right_x = 13.5 - 0.25 - tower_w
    tower(ax, left_x, tower_w, "patch", VISION, "CLS", ["x1", "x2", "x3", "x4"],
          "pool CLS (position 0) -> projection\n-> image embedding")
    tower(ax, right_x, tower_w, "token", TEXT, "BOS", ["a", "red", "bus", "EOS"],
          "pool EOS (index from input_ids) -> projection\n-> text embedding")
    ax.text(left_x + tower_w / 2, 8.0, "vision tower (frozen)", ha="center", fontsize=11, color=VISION, weight="bold")
    ax.text(right_x + tower_w / 2, 8.0, "text tower (frozen)", ha="center", fontsize=11, color=TEXT, weight="bold")

    # Centre: task t's factors.
    cx, cw = 4.75, 4.0
    ax.text(cx + cw / 2, 8.0, "task t's factors (trainable, one set per task)", ha="center", fontsize=10.5,
            weight="bold", color=INK)
    box(ax, cx + 1.05, 6.95, 1.9, 0.62, "#fde0df", edge=SHARED, lw=1.6)
    ax.text(cx + 2.0, 7.26, "$A_t$  ($K \\times r$)\nlayer factor, SHARED", ha="center", va="center", fontsize=8.5,
            color=SHARED, weight="bold")
    box(ax, cx + 0.0, 5.95, 1.55, 0.62, "#dfe8f2", edge=VISION, lw=1.2)
    ax.text(cx + 0.775, 6.26, "$B_t^v$ ($P \\times r$)\n$C_t^v$ ($D_v \\times r$)", ha="center", va="center", fontsize=8)
    box(ax, cx + cw - 1.55, 5.95, 1.55, 0.62, "#e1f0dd", edge=TEXT, lw=1.2)
    ax.text(cx + cw - 0.775, 6.26, "$B_t^w$ ($P \\times r$)\n$C_t^w$ ($D_w \\times r$)", ha="center", va="center", fontsize=8)
    arrow(ax, (cx + 1.3, 6.95), (cx + 0.9, 6.58), color=SHARED)
    arrow(ax, (cx + 2.7, 6.95), (cx + cw - 0.9, 6.58), color=SHARED)
    ax.text(cx + cw / 2, 5.5, r"$\mathrm{prompt}_t^m[l,p,d] = \frac{1}{r}\sum_k A_t[l,k]\,B_t^m[p,k]\,C_t^m[d,k]$",
            ha="center", va="center", fontsize=9, color=INK, zorder=6,
            bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none"))

    # Prompt tensors and the correlation module.
    box(ax, cx + 0.0, 4.3, 1.55, 0.75, "#fdebd9", edge=PROMPT, lw=1.2)
    ax.text(cx + 0.775, 4.675, "visual prompts\n($K \\times P \\times D_v$)", ha="center", va="center", fontsize=8)
    box(ax, cx + cw - 1.55, 4.3, 1.55, 0.75, "#fdebd9", edge=PROMPT, lw=1.2)
    ax.text(cx + cw - 0.775, 4.675, "text prompts\n($K \\times P \\times D_w$)", ha="center", va="center", fontsize=8)
    arrow(ax, (cx + 0.775, 5.95), (cx + 0.775, 5.05), color=VISION)
    arrow(ax, (cx + cw - 0.775, 5.95), (cx + cw - 0.775, 5.05), color=TEXT)
    box(ax, cx + 1.0, 3.05, 2.0, 0.95, "white", edge=INK, lw=1.0, radius=0.1)
    ax.text(cx + 2.0, 3.52, "correlation module\n(layers $l \\geq 1$)\n$W_{v \\to w}$, $W_{w \\to v}$ (rank $r$)\n+ LayerNorm per tower",
            ha="center", va="center", fontsize=7.4)
    arrow(ax, (cx + 0.775, 4.3), (cx + 1.0, 3.75), color=PROMPT, style="<|-|>", rad=0.2)
    arrow(ax, (cx + cw - 0.775, 4.3), (cx + cw - 1.0, 3.75), color=PROMPT, style="<|-|>", rad=-0.2)
    ax.text(cx + cw / 2, 2.72, "couples the two towers' prompts of the\nsame task; acts on prompts, not on data",
            ha="center", va="center", fontsize=7, color="#555555", style="italic")

    # Prompts of layer l go into layer l of each tower (l < K).
    for index in range(DEPTH):
        y = layer_y(index) + 0.1 + TOKEN_H / 2
        arrow(ax, (cx + 0.25, 4.3), (left_x + tower_w + 0.02, y), color=PROMPT, lw=1.0, rad=-0.08 * (index - 1))
        arrow(ax, (cx + cw - 0.25, 4.3), (right_x - 0.02, y), color=PROMPT, lw=1.0, rad=0.08 * (index - 1))
    ax.text(cx + cw / 2, 2.05, "before layer $l < K$: insert layer $l$'s $P$ prompts\nafter token 0 (CLS / BOS), "
            "widen the layer's\nattention mask, run the layer, strip them", ha="center", va="center", fontsize=7.6,
            color=PROMPT, weight="bold")
    ax.text(cx + cw / 2, 1.15, "which task? set_task(t) | set_task(LongTensor)\n| set_task('auto'): k-means keys on "
            "prompt-free,\nL2-normalised features; images and captions\nrouted independently, prompts per sample",
            ha="center", va="center", fontsize=7.2, color=INK)
    ax.text(cx + cw / 2, 0.45, f"(drawn: {NUM_LAYERS} layers per tower, K = {DEPTH}, P = {NUM_PROMPTS})", ha="center",
            va="center", fontsize=7, color="#555555")
    ax.text(right_x + 0.1, 0.12, "causal text tower: BOS does not see the prompts; every later token does",
            ha="left", va="center", fontsize=6.8, color=TEXT)
    ax.text(left_x + 0.1, 0.12, "pooling and masks stay valid: the sequence between layers keeps length L",
            ha="left", va="center", fontsize=6.8, color=VISION)

    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110, metadata={"Software": None}, facecolor="white", bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw the LPI injection figure.")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="PNG to write")
    args = parser.parse_args(argv)
    print(draw(args.output))


if __name__ == "__main__":
    main()
