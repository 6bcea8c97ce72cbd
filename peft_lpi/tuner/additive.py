"""Additive prompts (`LPIConfig(injection="additive")`): prompts added to fixed token positions, no extra tokens.

What the authors did for GLIP's Swin backbone (Kelvin-ywc/LPI, grounding/maskrcnn_benchmark/modeling/bert/
modeling_bert.py): before each prompted Swin block, the block's (P, D) prompt is reshaped to the block's width W as
(P*D/W, W), laid out as an h x w grid (h = floor(sqrt(n)), w = n / h) and added to the top-left h x w tokens of the
(B, H, W, C) map (16x96 at width 96, 8 tokens at 192, 4 at 384); the text prompts are added to the first P
positions of the BERT hidden states. Here the text (and any sequence tower, ViT included) gets its P prompts added
to positions 1..P: position 0 (CLS / BOS, which many towers pool) is left as the tokens' own, as with insertion
(the authors' BERT code also adds to position 0). The sequence never changes length, so masks, windows, pooling and
position-dependent heads are untouched; it is the only mode that fits Swin's windowed (B, H*W, C) blocks.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .layer import LPIPromptedLayer


def reshape_to_width(prompts: torch.Tensor, width: int) -> torch.Tensor:
    """(B, P, D) prompts as (B, P*D/width, width): the same numbers at a stage's width (D = the first stage's)."""
    batch, length, dim = prompts.shape
    if (length * dim) % width:
        raise ValueError(
            f"Additive LPI prompts of {length} x {dim} values cannot be reshaped to a layer of width {width}: "
            f"P * D = {length * dim} is not a multiple of it. Choose prompt_length so that prompt_length * {dim} is a "
            "multiple of every prompted stage's width."
        )
    return prompts.reshape(batch, length * dim // width, width)


def grid_shape(num_tokens: int) -> tuple[int, int]:
    """The authors' layout of n prompt tokens on a map: h = floor(sqrt(n)) rows of w = n / h tokens."""
    rows = max(1, math.isqrt(num_tokens))
    if num_tokens % rows:
        raise ValueError(f"{num_tokens} additive prompt tokens do not form a grid of {rows} rows.")
    return rows, num_tokens // rows


class LPIAdditiveLayer(LPIPromptedLayer):
    """A tuner layer that adds its (B, P, D) prompts to the hidden states before the wrapped block runs.

    `spatial` blocks (Swin) receive (B, H*W, C) with their (H, W) as `input_dimensions`: the prompts are reshaped to
    C and added to the top-left grid of the map. Sequence blocks get the prompts (reshaped to their width) added to
    positions 1..n.
    """

    def __init__(self, *args: Any, spatial: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spatial = spatial

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden, _, _ = self._split_arguments(args, kwargs)
        prompts = None if self.disable_adapters else self.prompt_source(self.modality, self.layer_index, hidden.shape[0])
        if prompts is None:
            return self.base_layer(*args, **kwargs)
        batch, seq_len, width = hidden.shape
        prompts = reshape_to_width(prompts.to(dtype=hidden.dtype), width)
        num_tokens = prompts.shape[1]
        if self.spatial:
            height, map_width = self._input_dimensions(args, kwargs)
            rows, cols = grid_shape(num_tokens)
            if rows > height or cols > map_width:
                raise ValueError(
                    f"Additive LPI prompts form a {rows} x {cols} grid but layer {self.layer_index} of the "
                    f"{self.modality} tower sees a {height} x {map_width} map. Use a shorter prompt_length."
                )
            grid = hidden.reshape(batch, height, map_width, width)
            addition = torch.zeros_like(grid)
            addition[:, :rows, :cols] = prompts.reshape(batch, rows, cols, width)
            new_hidden = (grid + addition).reshape(batch, seq_len, width)
        else:
            if num_tokens + 1 > seq_len:
                raise ValueError(
                    f"Additive LPI prompts cover positions 1..{num_tokens} but layer {self.layer_index} of the "
                    f"{self.modality} tower receives {seq_len} tokens. Use a shorter prompt_length or longer inputs."
                )
            addition = torch.cat(
                [hidden.new_zeros(batch, 1, width), prompts, hidden.new_zeros(batch, seq_len - 1 - num_tokens, width)],
                dim=1,
            )
            new_hidden = hidden + addition
        if args:
            return self.base_layer(new_hidden, *args[1:], **kwargs)
        kwargs = dict(kwargs)
        kwargs[self._parameter_names[0]] = new_hidden
        return self.base_layer(**kwargs)

    def _input_dimensions(self, args: tuple, kwargs: dict) -> tuple[int, int]:
        names = self._parameter_names
        position = names.index("input_dimensions") if "input_dimensions" in names else None
        if position is not None and position < len(args):
            dims = args[position]
        else:
            dims = kwargs.get("input_dimensions")
        if dims is None:
            raise ValueError(f"Layer {self.layer_index} of the {self.modality} tower got no input_dimensions.")
        return int(dims[0]), int(dims[1])
