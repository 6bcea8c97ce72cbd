"""Task semantic similarity S (T x T) for the task contrastive constraint.

The reference embedded the task (supercategory) names with a remote text-embedding API. Here S is computed locally:
by default with the frozen backbone's own text encoder over the task names (`task_similarity_from_names`), or over
the mean of each task's caption embeddings when tasks have no names (`task_similarity_from_captions`), or given by
the user (`validate_user_similarity`). Targets for the constraint are `S > threshold` off the diagonal.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.preprocess import text_token_limit
from ..tuner.model import embedding_of

__all__ = [
    "cosine_similarity_matrix",
    "encode_texts",
    "similarity_targets",
    "task_similarity_from_captions",
    "task_similarity_from_names",
    "validate_user_similarity",
]


def cosine_similarity_matrix(embeds: Tensor) -> Tensor:
    """(T, D) embeddings -> (T, T) cosine similarities (float32 or float64), clamped to [-1, 1]."""
    if embeds.ndim != 2:
        raise ValueError(f"embeds must be (T, D), got {tuple(embeds.shape)}.")
    dtype = torch.promote_types(embeds.dtype, torch.float32) if embeds.is_floating_point() else torch.float32
    x = F.normalize(embeds.to(dtype), dim=-1)  # (T, D)
    return (x @ x.T).clamp_(-1.0, 1.0)  # (T, T)


def similarity_targets(S: Tensor, threshold: float = 0.4) -> Tensor:
    """Bool (T, T) targets Y_ij = S_ij > threshold, with a False diagonal (a task is not its own positive)."""
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"S must be a square (T, T) matrix, got {tuple(S.shape)}.")
    eye = torch.eye(S.shape[0], dtype=torch.bool, device=S.device)
    return (S > threshold) & ~eye


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _default_padding(model: torch.nn.Module) -> bool | str:
    """SigLIP models were trained on texts padded to max_length (no attention mask); everything else pads longest."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    return "max_length" if model_type.startswith("siglip") else True


@torch.no_grad()
def encode_texts(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 256,
    *,
    padding: bool | str | None = None,
    max_length: int | None = None,
) -> Tensor:
    """Embed `texts` with `model.get_text_features` (CLIPModel, SiglipModel, VisionTextDualEncoderModel, ...).

    Args:
        model: a dual encoder with `get_text_features`; run in eval mode (its mode is restored afterwards).
        tokenizer: its tokenizer; inputs are truncated to what the text tower accepts.
        texts: N strings.
        batch_size: texts per forward pass.
        padding: tokenizer padding; None picks "max_length" for SigLIP (trained that way) and True (longest)
            otherwise.
        max_length: truncation / max_length padding length; None: min(tokenizer.model_max_length,
            text_config.max_position_embeddings).

    Returns:
        (N, D) float32 projected embeddings on the CPU (not normalised).
    """
    texts = list(texts)
    if padding is None:
        padding = _default_padding(model)
    if max_length is None:
        max_length = text_token_limit(model, tokenizer)
    device = _model_device(model)
    accepted = set(inspect.signature(model.get_text_features).parameters)
    was_training = model.training
    model.eval()
    try:
        out = []
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size],
                padding=padding,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            inputs = {k: v.to(device) for k, v in enc.items() if k in accepted}  # drop e.g. token_type_ids for CLIP
            out.append(embedding_of(model.get_text_features(**inputs)).float().cpu())  # (b, D)
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("encode_texts got no texts.")
    return torch.cat(out, dim=0)  # (N, D)


def task_similarity_from_names(
    model: torch.nn.Module,
    tokenizer,
    names: Sequence[str],
    template: str = "a photo of {}.",
    **encode_kwargs,
) -> Tensor:
    """S (T, T): cosine similarity of the text embeddings of `template.format(name)` for each task name."""
    if len(names) == 0:
        raise ValueError("task_similarity_from_names needs at least one task name.")
    embeds = encode_texts(model, tokenizer, [template.format(name) for name in names], **encode_kwargs)  # (T, D)
    return cosine_similarity_matrix(embeds)


def task_similarity_from_captions(
    model: torch.nn.Module,
    tokenizer,
    captions_per_task: Sequence[Sequence[str]],
    **encode_kwargs,
) -> Tensor:
    """S (T, T): cosine similarity of each task's mean L2-normalised caption embedding.

    All captions are encoded in one batched stream; use a subset per task if the captions are many.
    """
    counts = [len(c) for c in captions_per_task]
    if not counts:
        raise ValueError("task_similarity_from_captions needs at least one task.")
    empty = [t for t, n in enumerate(counts) if n == 0]
    if empty:
        raise ValueError(f"tasks {empty} have no captions; give every task at least one caption (or a task name).")
    flat = [caption for captions in captions_per_task for caption in captions]
    embeds = F.normalize(encode_texts(model, tokenizer, flat, **encode_kwargs), dim=-1)  # (N, D)
    task_of = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))  # (N,)
    sums = torch.zeros(len(counts), embeds.shape[1], dtype=embeds.dtype).index_add_(0, task_of, embeds)  # (T, D)
    means = sums / torch.tensor(counts, dtype=embeds.dtype)[:, None]
    return cosine_similarity_matrix(means)


def validate_user_similarity(S, num_tasks: int, *, atol: float = 1e-4) -> Tensor:
    """Check a user-given task similarity matrix and return it as a float32 (T, T) tensor clamped to [-1, 1].

    Raises a ValueError naming the problem if S is not a (num_tasks, num_tasks) matrix of finite values in [-1, 1]
    that is symmetric within `atol`.
    """
    try:
        S = torch.as_tensor(S, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError) as err:
        raise ValueError(f"the task similarity matrix must be a numeric (T, T) array-like: {err}") from err
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(
            f"the task similarity matrix must be square (T, T), got shape {tuple(S.shape)}; give one row and one "
            "column per task."
        )
    if S.shape[0] != num_tasks:
        raise ValueError(
            f"the task similarity matrix is {S.shape[0]} x {S.shape[0]} but there are {num_tasks} tasks; give one "
            "row and one column per task, in task order."
        )
    if not torch.isfinite(S).all():
        raise ValueError("the task similarity matrix contains NaN or inf; fill every entry with a finite value.")
    if S.numel() and (S.min() < -1 - atol or S.max() > 1 + atol):
        raise ValueError(
            f"the task similarity matrix has values in [{S.min().item():.4g}, {S.max().item():.4g}] but must lie in "
            "[-1, 1] (a cosine similarity); rescale it."
        )
    asym = (S - S.T).abs().max().item() if S.numel() else 0.0
    if asym > atol or math.isnan(asym):
        raise ValueError(
            f"the task similarity matrix is not symmetric (max |S - S.T| = {asym:.3g} > {atol}); use (S + S.T) / 2."
        )
    return S.clamp(-1.0, 1.0)
