"""The small offline grounding backbone: a tiny OWL-ViT detector pretrained on generic grounding-world scenes, cached.

Real use is a real OWL-ViT / OWLv2 (e.g. ``google/owlv2-base-patch16-ensemble``) on RefCOCO. Offline, the project
needs *some* frozen open-vocabulary detector that already grounds expressions, so it pretrains a 1.7M-parameter
``OwlViTForObjectDetection`` (from an ``OwlViTConfig``: 64x64 images, patch 8, width 128, 4+4 layers) on the generic
scenes of `peft_lpi.data.grounding_world` with the REC loss (`peft_lpi.continual.grounding_loss.rec_loss`: every
describable object of a scene is one query) and saves a standard Hugging Face folder:
``OwlViTForObjectDetection.from_pretrained``, ``AutoTokenizer.from_pretrained`` (a word-level tokenizer) and
``AutoImageProcessor.from_pretrained`` load it like a downloaded OWL-ViT. The folder is written atomically and reused
only when its ``grounding_backbone.json`` matches the requested settings, as for the retrieval backbone
(`peft_lpi.data.backbone`).

Tokenizer note: OWL-ViT's text tower pools at the *largest token id* of a sequence (``input_ids.argmax``, CLIP's
legacy rule, which works for CLIP's BPE where EOS has the largest id), so here ``[EOS]`` is the last id of the
vocabulary; a padded query row (all ``[PAD]`` = 0) is what OWL treats as "no query".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import OwlViTConfig, OwlViTForObjectDetection, PreTrainedTokenizerFast

from ..continual.grounding_loss import rec_loss, rec_predictions, select_query_pairs
from ..evaluation.grounding import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, rec_precision
from .backbone import _cosine_lr, cache_root, read_metadata_file, save_cached_folder
from .grounding_world import GROUNDING_WORLD_VERSION, MAX_OBJECTS, SCENE_SIZE, Scene, render_generic_scenes
from .world import WORLD_VOCABULARY

GROUNDING_BACKBONE_FORMAT = "grounding-backbone-v1"
METADATA_FILE = "grounding_backbone.json"
TEXT_POSITIONS = 16
DEFAULT_STEPS = 500
DEFAULT_SCENES = 8_000
DEFAULT_BATCH = 48


def build_grounding_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the world vocabulary: [PAD]=0, [UNK]=1, [BOS]=2, words, [EOS]=last id.

    [EOS] must be the largest id: OWL-ViT pools the text at ``input_ids.argmax(-1)``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2}
    for word in WORLD_VOCABULARY:
        vocab.setdefault(word.lower(), len(vocab))
    vocab["[EOS]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]",
        pair="[BOS] $A [EOS] $B [EOS]",
        special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_max_length=TEXT_POSITIONS,
        padding_side="right",
    )


def tiny_owlvit_config(tokenizer: PreTrainedTokenizerFast) -> OwlViTConfig:
    """OWL-ViT config of the offline grounding backbone: 64x64 images, patch 8 (8x8 patches), width 128, 4+4 layers."""
    common = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4}
    text = dict(
        common,
        vocab_size=len(tokenizer),
        max_position_embeddings=TEXT_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(common, image_size=SCENE_SIZE, patch_size=8, num_channels=3)
    return OwlViTConfig(text_config=text, vision_config=vision, projection_dim=128)


def init_detection_heads(model: OwlViTForObjectDetection, std: float = 0.02) -> None:
    """Re-initialise the box and class heads of a from-scratch OWL detector.

    Why: transformers initialises these ``nn.Linear`` layers with std ``initializer_factor`` (1.0), so a fresh
    model's box logits are in the tens and every ``pred_boxes`` entry saturates at 0 or 1, where the sigmoid has no
    gradient and the box losses cannot train (pretrained checkpoints never see that init). Normal(0, `std`) weights,
    zero biases and a zero last box layer make the initial boxes OWL's own per-patch prior (``box_bias``); the
    class head's logit scale starts at 10.
    """
    for head in (model.box_head, model.class_head):
        for module in head.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=std)
                torch.nn.init.zeros_(module.bias)
    torch.nn.init.zeros_(model.box_head.dense2.weight)
    # logits = (cosine + shift) * (elu(scale) + 1): start at a temperature of 1/10, as CLIP-style heads do
    torch.nn.init.constant_(model.class_head.logit_scale.bias, 9.0)


def grounding_image_processor(mean: list[float], std: list[float]) -> Any:
    """An OWL-ViT image processor for 64x64 scenes with the world's statistics (resize to 64x64, no crop)."""
    from transformers.models.owlvit.image_processing_pil_owlvit import OwlViTImageProcessorPil

    return OwlViTImageProcessorPil(
        do_resize=True,
        size={"height": SCENE_SIZE, "width": SCENE_SIZE},
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=mean,
        image_std=std,
        do_convert_rgb=True,
    )


def normalise_images(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) normalised: what the saved processor gives for 64x64 scenes."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean[:, None, None]) / std[:, None, None]


def scene_queries(
    scenes: list[Scene], tokenizer: PreTrainedTokenizerFast, max_queries: int = MAX_OBJECTS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every describable object of every scene as one query: ids (S*Q, L), mask (S*Q, L), boxes (S, Q, 4), valid (S, Q).

    Boxes are normalised cxcywh. Rows of absent queries are all [PAD] (OWL's "no query").
    """
    texts: list[str] = []
    boxes = torch.zeros(len(scenes), max_queries, 4)
    valid = torch.zeros(len(scenes), max_queries, dtype=torch.bool)
    for s, scene in enumerate(scenes):
        q = 0
        for expression, obj in zip(scene.expressions, scene.objects):
            if expression is None or q >= max_queries:
                continue
            texts.append(expression)
            boxes[s, q] = box_xyxy_to_cxcywh(torch.tensor(obj.box) / SCENE_SIZE)
            valid[s, q] = True
            q += 1
    enc = tokenizer(texts, padding="longest", truncation=True, return_tensors="pt")  # world expressions: <= 9 tokens
    ids = torch.zeros(len(scenes) * max_queries, enc["input_ids"].shape[1], dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows = valid.reshape(-1).nonzero(as_tuple=True)[0]
    ids[rows], mask[rows] = enc["input_ids"], enc["attention_mask"]
    return ids, mask, boxes, valid


@torch.no_grad()
def generic_precision(
    model: OwlViTForObjectDetection,
    pixel_values: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    boxes: torch.Tensor,
    valid: torch.Tensor,
    batch_size: int = 128,
) -> dict[str, float]:
    """Precision@1/5 (percent, IoU >= 0.5) of every query of a set of scenes."""
    model.eval()
    q = valid.shape[1]
    preds, targets = [], []
    for start in range(0, len(pixel_values), batch_size):
        stop = min(start + batch_size, len(pixel_values))
        out = model(
            input_ids=ids[start * q : stop * q],
            attention_mask=mask[start * q : stop * q],
            pixel_values=pixel_values[start:stop],
        )
        logits, pred_boxes, _ = select_query_pairs(out.logits, out.pred_boxes, valid[start:stop])
        preds.append(rec_predictions(logits, pred_boxes, top_k=5)[0])
        targets.append(boxes[start:stop][valid[start:stop]])
    target = torch.cat(targets)
    result = rec_precision(torch.cat(preds), box_cxcywh_to_xyxy(target), ks=(1, 5))
    return {"P@1": result["P@1"], "P@5": result["P@5"]}


def _metadata(seed: int, steps: int, batch_size: int, lr: float, num_scenes: int) -> dict[str, Any]:
    return {
        "format": GROUNDING_BACKBONE_FORMAT,
        "world_version": GROUNDING_WORLD_VERSION,
        "world_seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "num_scenes": num_scenes,
    }


def pretrain_grounding_backbone(
    output_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_steps: int = 50,
    num_scenes: int = DEFAULT_SCENES,
    heldout_scenes: int = 500,
    progress: bool = True,
) -> Path:
    """Pretrain the tiny OWL-ViT on generic scenes with the REC loss; save model, tokenizer, processor atomically.

    Returns the folder. Its ``grounding_backbone.json`` records the settings and the held-out generic P@1/5.
    """
    from tqdm.auto import tqdm

    target = Path(output_dir).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_grounding_tokenizer()
    model = OwlViTForObjectDetection(tiny_owlvit_config(tokenizer))
    init_detection_heads(model)

    scenes = render_generic_scenes(seed, num_scenes)
    held = render_generic_scenes(seed, heldout_scenes, stream=1)
    images = np.stack([s.image for s in scenes])
    pixels = images.reshape(-1, 3).astype(np.float64) / 255.0
    mean = torch.tensor(pixels.mean(axis=0), dtype=torch.float32)
    std = torch.tensor(pixels.std(axis=0), dtype=torch.float32)
    del pixels
    ids, mask, boxes, valid = scene_queries(scenes, tokenizer)
    q = valid.shape[1]

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine_lr(s, steps, warmup_steps))
    generator = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(num_scenes, generator=generator), 0
    model.train()
    bar = tqdm(range(steps), desc="pretraining grounding backbone", disable=not progress)
    for _ in bar:
        if cursor + batch_size > num_scenes:
            order, cursor = torch.randperm(num_scenes, generator=generator), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        rows = (idx[:, None] * q + torch.arange(q)).reshape(-1)
        out = model(
            input_ids=ids[rows],
            attention_mask=mask[rows],
            pixel_values=normalise_images(images[idx.numpy()], mean, std),
        )
        logits, pred_boxes, _ = select_query_pairs(out.logits, out.pred_boxes, valid[idx])
        loss = rec_loss(logits, pred_boxes, boxes[idx][valid[idx]]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")

    held_ids, held_mask, held_boxes, held_valid = scene_queries(held, tokenizer)
    held_pixels = normalise_images(np.stack([s.image for s in held]), mean, std)
    precision = generic_precision(model, held_pixels, held_ids, held_mask, held_boxes, held_valid)
    metadata = _metadata(seed, steps, batch_size, lr, num_scenes)
    metadata["heldout_generic"] = {"scenes": heldout_scenes, **{k: round(v, 2) for k, v in precision.items()}}

    processor = grounding_image_processor(mean.tolist(), std.tolist())
    return save_cached_folder(target, [model, tokenizer, processor], METADATA_FILE, metadata)


def default_grounding_cache_dir(seed: int = 0) -> Path:
    """``$PEFT_LPI_CACHE/grounding-backbone-v1-seed{seed}`` (root defaults to ``~/.cache/peft_lpi``)."""
    return cache_root() / f"{GROUNDING_BACKBONE_FORMAT}-seed{seed}"


def read_grounding_metadata(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``grounding_backbone.json`` of a saved backbone, or None when absent or unreadable."""
    return read_metadata_file(path, METADATA_FILE)


def get_grounding_backbone(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH,
    lr: float = 1e-3,
    num_scenes: int = DEFAULT_SCENES,
    progress: bool = True,
    **kwargs: Any,
) -> Path:
    """Path of the cached grounding backbone for these settings; pretrains (and caches) it when missing or stale.

    Under several processes call it on the main process first (``accelerator.main_process_first()``).
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_grounding_cache_dir(seed)
    wanted = _metadata(seed, steps, batch_size, lr, num_scenes)
    found = read_grounding_metadata(target)
    if found is not None and all(found.get(k) == v for k, v in wanted.items()):
        return target
    return pretrain_grounding_backbone(
        target, seed=seed, steps=steps, batch_size=batch_size, lr=lr, num_scenes=num_scenes, progress=progress, **kwargs
    )


def owl_layer_paths(model: torch.nn.Module) -> dict[str, str]:
    """`LPIConfig.layer_paths` of an OWL detector's nested towers (``owlvit.`` or ``owlv2.`` prefix).

    Until tower detection finds nested towers by itself, pass these explicitly (with ``text_causal=True``: OWL's
    text tower is CLIP's causal one).
    """
    for root in ("owlvit", "owlv2"):
        if isinstance(getattr(model, root, None), torch.nn.Module):
            return {"vision": f"{root}.vision_model.encoder.layers", "text": f"{root}.text_model.encoder.layers"}
    raise ValueError(f"{type(model).__name__} has no 'owlvit' or 'owlv2' sub-model: not an OWL detector.")
