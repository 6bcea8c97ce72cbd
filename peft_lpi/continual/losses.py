"""Pure tensor loss functions of LPI.

* `contrastive_loss` / `sigmoid_loss`: the retrieval objective L_clip (CLIP's InfoNCE or SigLIP's sigmoid loss),
  with negatives from the global batch under several processes (`gather_with_grad`).
* `hierarchical_alignment_loss`: L_align, the layer- and token-level contrastive alignment of the two modalities'
  prompts.
* `task_contrastive_loss`: L_task, the task contrastive constraint between the prompts of the tasks seen so far.

All losses are computed in (at least) float32 whatever the input dtype, on the inputs' device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "contrastive_loss",
    "gather_with_grad",
    "hierarchical_alignment_loss",
    "multi_positive_infonce",
    "sigmoid_loss",
    "reference_task_loss",
    "task_contrastive_loss",
]


# ----------------------------------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather + cat along dim 0 whose backward sums the gradients of every rank and keeps this rank's slice.

    The backward is a collective: every rank must call backward through the same gathers (true for a symmetric
    training step).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # x: (n, ...) -> (world * n, ...)
        rank, world = _world()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        ctx.rank, ctx.local = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # grad: (world * n, ...) -> (n, ...)
        grad = grad.contiguous().clone()  # all_reduce works in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.local
        return grad[start : start + ctx.local]


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather `x` along dim 0 across ranks, keeping the autograd graph.

    Identity unless torch.distributed is initialised with world_size > 1. Every rank must pass a tensor of the same
    shape (keep Accelerate's `even_batches=True` or drop the last batch). Unlike `accelerator.gather`, the result
    carries gradient back to each rank's own slice, so a loss over the global batch trains every rank's encoder.
    """
    _, world = _world()
    if world == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def _gather_no_grad(x: Tensor) -> Tensor:
    """Plain all_gather + cat along dim 0 (for ids); identity on a single process."""
    _, world = _world()
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 if an input is float64 (never compute a loss in half precision)."""
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _global_batch(
    image_embeds: Tensor, text_embeds: Tensor, sample_ids: Tensor | None, gather: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, int]:
    """Normalise and (optionally) gather the batch.

    Returns (img_local (n,D), txt_local (n,D), img_all (N,D), txt_all (N,D), ids_local (n,)|None, ids_all (N,)|None,
    offset) where `offset` = rank * n is the position of this rank's rows among the N global columns.
    """
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image_embeds and text_embeds must both be (N, D) with the same shape (one caption per image), got "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}."
        )
    if sample_ids is not None and sample_ids.shape != (image_embeds.shape[0],):
        raise ValueError(f"sample_ids must have shape ({image_embeds.shape[0]},), got {tuple(sample_ids.shape)}.")
    dtype = _compute_dtype(image_embeds, text_embeds)
    img = F.normalize(image_embeds.to(dtype), dim=-1)  # (n, D)
    txt = F.normalize(text_embeds.to(dtype), dim=-1)  # (n, D)
    if sample_ids is not None:
        sample_ids = sample_ids.to(img.device)  # NCCL gathers device tensors
    rank, world = _world()
    if not gather or world == 1:
        return img, txt, img, txt, sample_ids, sample_ids, 0
    img_all = gather_with_grad(img)  # (N, D), N = world * n
    txt_all = gather_with_grad(txt)  # (N, D)
    ids_all = _gather_no_grad(sample_ids) if sample_ids is not None else None
    return img, txt, img_all, txt_all, sample_ids, ids_all, rank * img.shape[0]


def _positives(
    ids_local: Tensor | None, ids_all: Tensor | None, n: int, num_cols: int, offset: int, device: torch.device
) -> Tensor:
    """Bool (n, N) matrix of positive pairs: equal sample ids, or the diagonal (shifted by `offset`) without ids."""
    if ids_local is None:
        rows = torch.arange(n, device=device) + offset
        return rows[:, None] == torch.arange(num_cols, device=device)[None, :]
    return ids_local.to(device)[:, None] == ids_all.to(device)[None, :]


# ----------------------------------------------------------------------------------------------------------------------
# Retrieval losses
# ----------------------------------------------------------------------------------------------------------------------


def contrastive_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor | float,
    *,
    sample_ids: Tensor | None = None,
    gather: bool = True,
) -> Tensor:
    """Symmetric InfoNCE of CLIP over the (global) batch.

    Args:
        image_embeds: (n, D) image embeddings of this process (normalised inside).
        text_embeds: (n, D) matching text embeddings (row i describes image i).
        logit_scale: scalar tensor (or float), ALREADY exponentiated (CLIP's `logit_scale.exp()`).
        sample_ids: optional (n,) LongTensor; samples with equal ids (e.g. a hash of the caption, or the image id)
            are all positives of each other, with a uniform soft target over the positives. None: only the diagonal.
        gather: under several processes, gather the batch with gradient so negatives come from every rank.

    Under W processes each rank computes its LOCAL rows against ALL N = W*n columns (open_clip's `local_loss`) and
    takes the mean over its rows; the mean of the per-rank losses is the single-process loss of the full batch, and
    with `gather_with_grad` DDP's gradient average equals the full-batch gradient.
    """
    img, txt, img_all, txt_all, ids, ids_all, offset = _global_batch(image_embeds, text_embeds, sample_ids, gather)
    scale = torch.as_tensor(logit_scale, dtype=img.dtype, device=img.device)
    logits_per_image = scale * img @ txt_all.T  # (n, N)
    logits_per_text = scale * txt @ img_all.T  # (n, N)
    if ids is None:
        labels = torch.arange(img.shape[0], device=img.device) + offset  # (n,)
        return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))
    pos = _positives(ids, ids_all, img.shape[0], img_all.shape[0], offset, img.device)  # (n, N) bool
    return multi_positive_infonce(logits_per_image, logits_per_text, pos)


def multi_positive_infonce(logits_per_image: Tensor, logits_per_text: Tensor, positives: Tensor) -> Tensor:
    """Symmetric InfoNCE with a uniform soft target over each row's positives (CLIP's loss when positives = I).

    Args:
        logits_per_image, logits_per_text: (n, N) scaled similarities of the local rows against all columns.
        positives: (n, N) bool or 0/1; every row has at least one positive (itself).
    Why: captions repeat (the offline world, COCO duplicates); a duplicate counted as a negative would push
    identical texts apart. Also the offline backbone's pretraining loss (peft_lpi.data.backbone).
    """
    target = positives.to(logits_per_image.dtype)
    target = target / target.sum(dim=1, keepdim=True)
    loss_i = -(target * F.log_softmax(logits_per_image, dim=1)).sum(dim=1).mean()
    loss_t = -(target * F.log_softmax(logits_per_text, dim=1)).sum(dim=1).mean()
    return 0.5 * (loss_i + loss_t)


def sigmoid_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    sample_ids: Tensor | None = None,
    gather: bool = True,
) -> Tensor:
    """SigLIP's pairwise sigmoid loss over the (global) batch.

    loss = -1/N * sum_i sum_j log sigmoid(z_ij * (s * x_i.y_j + b)), z_ij = +1 for positive pairs, -1 otherwise
    (SigLIP paper: normalised by the number of images). Embeddings are L2-normalised inside, `logit_scale` is
    already exponentiated, `logit_bias` is added as is. `sample_ids` and `gather` as in `contrastive_loss`: each
    rank sums its local images against all texts and divides by its local batch size, so the mean over ranks equals
    the single-process loss of the full batch (and DDP's gradient mean its gradient).
    """
    img, _, _, txt_all, ids, ids_all, offset = _global_batch(image_embeds, text_embeds, sample_ids, gather)
    scale = torch.as_tensor(logit_scale, dtype=img.dtype, device=img.device)
    bias = torch.as_tensor(logit_bias, dtype=img.dtype, device=img.device)
    logits = scale * img @ txt_all.T + bias  # (n, N)
    pos = _positives(ids, ids_all, img.shape[0], txt_all.shape[0], offset, img.device)  # (n, N) bool
    z = pos.to(img.dtype) * 2 - 1  # (n, N) in {-1, +1}
    return -F.logsigmoid(z * logits).sum() / img.shape[0]


# ----------------------------------------------------------------------------------------------------------------------
# Prompt losses
# ----------------------------------------------------------------------------------------------------------------------


def _symmetric_ce(logits: Tensor) -> Tensor:
    """Symmetric cross-entropy of a square (M, M) logit matrix with target row i <-> column i."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def hierarchical_alignment_loss(
    prompts_v: Tensor,
    prompts_w: Tensor,
    *,
    layer_temperature: float = 1e-4,
    token_temperature: float = 1e-4,
    normalize: bool = False,
    layer_weight: float = 1.0,
    token_weight: float = 0.0,
) -> dict[str, Tensor]:
    """Hierarchical low-rank contrastive alignment (L_align) of one task's visual and textual prompts.

    Args:
        prompts_v: (K, P, D_v) visual prompts (K prompted layers, P tokens): the RAW CP prompts, before the
            correlation module (its LayerNorm makes the hidden-axis mean of every row exactly 0, which would leave
            nothing to align; see docs/method.md).
        prompts_w: (K, P, D_w) textual prompts (raw as well).
        layer_temperature / token_temperature: logits = u_v . u_w / tau. The authors' retrieval code divides EACH
            side by 0.01, i.e. tau = 0.01**2 = 1e-4 (the default); their grounding code uses cosine x 100, i.e.
            `normalize=True` with tau = 0.01.
        normalize: L2-normalise the compared rows first (over the P axis for the layer level, over the K axis for
            the token level).
        layer_weight / token_weight: weights of the two levels in "total". The token level exists in neither of the
            authors' code bases (an extension of ours), so its default weight is 0.

    Each modality is reduced over its hidden axis (mean) to u_v, u_w in R^{K x P}.
    * Layer level: logits = u_v @ u_w.T / tau (K x K), symmetric cross-entropy, layer l <-> layer l.
    * Token level: logits = u_v.T @ u_w / tau (P x P), token p <-> token p. The hidden widths of the two towers
      differ (D_v != D_w), so a token is compared through its profile over the K layers (column p of u), not through
      its hidden vector.
    With K == 1 (or P == 1) the corresponding level is a 1 x 1 cross-entropy, exactly 0.

    Returns:
        {"layer": scalar, "token": scalar, "total": layer_weight * layer + token_weight * token}.
    """
    if prompts_v.ndim != 3 or prompts_w.ndim != 3 or prompts_v.shape[:2] != prompts_w.shape[:2]:
        raise ValueError(
            f"prompts_v and prompts_w must be (K, P, D_v) and (K, P, D_w) with the same K and P, got "
            f"{tuple(prompts_v.shape)} and {tuple(prompts_w.shape)}."
        )
    dtype = _compute_dtype(prompts_v, prompts_w)
    u_v = prompts_v.to(dtype).mean(dim=-1)  # (K, P)
    u_w = prompts_w.to(dtype).mean(dim=-1)  # (K, P)

    def _logits(a: Tensor, b: Tensor, tau: float) -> Tensor:  # a, b: (M, F) -> (M, M)
        if normalize:
            a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        return a @ b.T / tau

    layer = _symmetric_ce(_logits(u_v, u_w, layer_temperature))  # K x K
    token = _symmetric_ce(_logits(u_v.T, u_w.T, token_temperature))  # P x P
    return {"layer": layer, "token": token, "total": layer_weight * layer + token_weight * token}


def task_contrastive_loss(
    prompts: Tensor,
    targets: Tensor,
    *,
    current_task: int,
    temperature: float = 0.001,
    double_sigmoid: bool = False,
    mode: str = "bce",
) -> Tensor:
    """Task contrastive constraint (L_task) between the prompts of the tasks seen so far, for one modality.

    Args:
        prompts: (T', F) one row per task seen so far: that task's prompt tensor of one modality, flattened.
        targets: (T', T') bool, True where two tasks are semantically similar (S_ij > threshold); the diagonal is
            ignored.
        current_task: index of the row being trained; every other row is detached, so only this task's prompts get
            gradient (earlier tasks stay frozen).
        temperature: cosine similarities are divided by it (retrieval reference: 0.001).
        double_sigmoid: reproduce the reference code's bug, BCE-with-logits applied to sigmoid(G / tau) (a probability
            treated as a logit). Off by default. Only meaningful with mode="bce".
        mode: "bce" (default): the corrected loss described below. "reference": the authors' `nt_bxent_loss`
            exactly (see `reference_task_loss`): double sigmoid, and the diagonal is NOT excluded: each task's
            self-similarity is +inf and counts as a positive, and a row without negatives gives NaN.

    G = cosine similarities of the rows (T' x T'), diagonal excluded. Per row: mean BCE-with-logits(G/tau, 1) over
    its positives plus mean BCE-with-logits(G/tau, 0) over its negatives; a row without positives (or negatives)
    drops that term, a row with neither contributes nothing; the rows are averaged. With T' < 2 there is nothing to
    contrast: returns 0 that still has a grad path to `prompts`.
    """
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be (T', F) (one flattened prompt per task), got {tuple(prompts.shape)}.")
    num = prompts.shape[0]
    dtype = _compute_dtype(prompts)
    if num < 2:
        return prompts.to(dtype).sum() * 0.0
    if targets.shape != (num, num):
        raise ValueError(f"targets must be ({num}, {num}) for {num} tasks, got {tuple(targets.shape)}.")
    if not 0 <= current_task < num:
        raise ValueError(f"current_task={current_task} is not a row of the {num} prompts.")
    if mode not in ("bce", "reference"):
        raise ValueError(f"mode must be 'bce' or 'reference', got {mode!r}.")

    is_current = torch.zeros(num, 1, dtype=torch.bool, device=prompts.device)
    is_current[current_task] = True
    x = torch.where(is_current, prompts, prompts.detach()).to(dtype)  # (T', F) grad only through current row
    if mode == "reference":
        return reference_task_loss(x, targets, temperature)
    x = F.normalize(x, dim=-1)
    logits = x @ x.T / temperature  # (T', T') cosine / tau
    if double_sigmoid:
        logits = torch.sigmoid(logits)

    off_diag = ~torch.eye(num, dtype=torch.bool, device=prompts.device)
    targets = targets.to(device=prompts.device, dtype=torch.bool)
    pos = (targets & off_diag).to(dtype)  # (T', T')
    neg = (~targets & off_diag).to(dtype)
    # BCE-with-logits(l, 1) = softplus(-l); BCE-with-logits(l, 0) = softplus(l)  (stable for |l| ~ 1/tau = 1000)
    n_pos, n_neg = pos.sum(dim=1), neg.sum(dim=1)  # (T',)
    row_pos = (F.softplus(-logits) * pos).sum(dim=1) / n_pos.clamp_min(1)
    row_neg = (F.softplus(logits) * neg).sum(dim=1) / n_neg.clamp_min(1)
    valid = ((n_pos + n_neg) > 0).to(dtype)  # rows with neither term contribute nothing
    return ((row_pos + row_neg) * valid).sum() / valid.sum().clamp_min(1)


def reference_task_loss(prompts: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """The authors' task loss (`nt_bxent_loss`), reproduced exactly, for comparisons with their numbers.

    `prompts` (T', F) as in `task_contrastive_loss`; `targets` (T', T') bool positives (the diagonal is forced to
    True: the reference thresholds a similarity matrix whose diagonal is 1). Cosine similarities G with the diagonal
    set to +inf; per pair BCE-with-logits(sigmoid(G / tau), Y) (the sigmoid applied twice); per row the mean over
    its positives (the diagonal included: softplus(-1) = 0.313 added to the sum and 1 to the count) plus the mean
    over its negatives (0 / 0 = NaN for a row without negatives); mean over rows. Not for training: the NaN rows and
    the constant diagonal term are the reasons our default ("bce") differs.
    """
    num = prompts.shape[0]
    dtype = _compute_dtype(prompts)
    x = prompts.to(dtype)
    eye = torch.eye(num, dtype=torch.bool, device=x.device)
    norms = x.norm(dim=-1)
    cosine = (x @ x.T) / (norms[:, None] * norms[None, :]).clamp_min(1e-8)  # F.cosine_similarity, eps 1e-8
    cosine = cosine.masked_fill(eye, float("inf"))
    target = (targets.to(device=x.device, dtype=torch.bool) | eye).to(dtype)
    prob = torch.sigmoid(cosine / temperature)
    loss = F.binary_cross_entropy_with_logits(prob, target, reduction="none")  # (T', T')
    pos = target.bool()
    loss_pos = torch.where(pos, loss, torch.zeros((), dtype=dtype, device=x.device)).sum(dim=1)
    loss_neg = torch.where(~pos, loss, torch.zeros((), dtype=dtype, device=x.device)).sum(dim=1)
    num_pos = target.sum(dim=1)
    num_neg = num - num_pos
    return ((loss_pos / num_pos) + (loss_neg / num_neg)).mean()
