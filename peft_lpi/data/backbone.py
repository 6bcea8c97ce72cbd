"""The small offline CLIP backbone: pretrained by the project on the generic world pairs, then cached.

Real use of peft_lpi is a real CLIP (e.g. ViT-B/16 on COCO). Offline (no Hub) the project needs *some* frozen dual
encoder that already aligns images and text, so it pretrains a 1.7M-parameter CLIP on the procedurally generated
world (``peft_lpi.data.world``) and saves it as a standard Hugging Face folder: ``CLIPModel.from_pretrained``,
``AutoTokenizer.from_pretrained`` and ``AutoImageProcessor.from_pretrained`` load it exactly like a downloaded CLIP.

The pretraining is deliberately short (an early, not fully converged checkpoint): generic retrieval works, but
retrieval on the continual tasks' shifted domains is clearly imperfect, which is what prompts should then fix.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, PreTrainedTokenizerFast

from ..continual.losses import multi_positive_infonce
from .world import IMAGE_SIZE, WORLD_VERSION, WORLD_VOCABULARY, render_generic_arrays

BACKBONE_FORMAT = "world-backbone-v1"
METADATA_FILE = "world_backbone.json"
TEXT_POSITIONS = 16
DEFAULT_STEPS = 600
DEFAULT_PAIRS = 30_000
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")  # ids 0..3: EOS is 3, never the legacy 2


def word_level_tokenizer(words: Iterable[str], model_max_length: int, **kwargs: Any) -> PreTrainedTokenizerFast:
    """A WordLevel fast tokenizer (lower-case, whitespace split) that wraps each text as [BOS] ... [EOS].

    Ids: [PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3 (never the legacy CLIP EOS 2), then `words` (lower-cased, deduplicated)
    in order. `kwargs` go to `PreTrainedTokenizerFast`.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
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
        model_max_length=model_max_length,
        **kwargs,
    )


def build_world_tokenizer() -> PreTrainedTokenizerFast:
    """The world backbone's tokenizer: `word_level_tokenizer` over the world vocabulary."""
    return word_level_tokenizer(WORLD_VOCABULARY, TEXT_POSITIONS, padding_side="right")


def tiny_clip_config(tokenizer: PreTrainedTokenizerFast) -> CLIPConfig:
    """CLIP config of the offline backbone: 32x32 images, patch 8, width 128, 4+4 layers, 1.7M parameters."""
    common = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4}
    text = dict(
        common,
        vocab_size=len(tokenizer),
        max_position_embeddings=TEXT_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=128,
    )
    vision = dict(common, image_size=IMAGE_SIZE, patch_size=8, num_channels=3, projection_dim=128)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=128)


def world_image_processor(mean: list[float], std: list[float]) -> CLIPImageProcessorPil:
    """A CLIP image processor for 32x32 world images with the world's own statistics (no augmentation).

    The PIL backend explicitly: `CLIPImageProcessor` is the torchvision backend in transformers 5 and, without
    torchvision, falls back to this class with a warning. Saved, it loads back with `AutoImageProcessor` /
    `AutoProcessor` as this class (its config names the model's processor family, "CLIPImageProcessor")."""
    return CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=mean,
        image_std=std,
        do_convert_rgb=True,
    )


def _normalise(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W), the same values the saved image processor produces."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean[:, None, None]) / std[:, None, None]


@torch.no_grad()
def generic_recall(
    model: CLIPModel,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    caption_ids: torch.Tensor,
) -> dict[str, float]:
    """R@1 (percent) on one gallery of image-caption pairs: strict (own index) and caption-equal variants."""
    model.eval()
    img = F.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
    txt = F.normalize(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output, dim=-1)
    sim = img @ txt.t()
    target = torch.arange(len(sim))
    i2t, t2i = sim.argmax(dim=1), sim.argmax(dim=0)
    return {
        "i2t_r1": 100 * (i2t == target).float().mean().item(),
        "t2i_r1": 100 * (t2i == target).float().mean().item(),
        "i2t_r1_caption_equal": 100 * (caption_ids[i2t] == caption_ids).float().mean().item(),
        "t2i_r1_caption_equal": 100 * (caption_ids[t2i] == caption_ids).float().mean().item(),
    }


def _tokenise(
    tokenizer: PreTrainedTokenizerFast, captions: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unique-caption token table (U, L), its mask, and each caption's row index (N,)."""
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    enc = tokenizer(unique, padding=True, truncation=True, return_tensors="pt")
    rows = torch.tensor([index[c] for c in captions])
    return enc["input_ids"], enc["attention_mask"], rows


def _cosine_lr(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _metadata(seed: int, steps: int, batch_size: int, lr: float, num_pairs: int) -> dict[str, Any]:
    """The fields that identify a cached backbone (a cache is reused only when all of them match)."""
    return {
        "format": BACKBONE_FORMAT,
        "world_version": WORLD_VERSION,
        "world_seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "num_pairs": num_pairs,
    }


def pretrain_backbone(
    output_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    warmup_steps: int = 50,
    num_pairs: int = DEFAULT_PAIRS,
    heldout_pairs: int = 1000,
    progress: bool = True,
) -> Path:
    """Pretrain the tiny CLIP on generic world pairs and save model, tokenizer and processor to ``output_dir``.

    The folder is written atomically (a temporary sibling folder, then ``os.replace``): an interrupted run never
    leaves a partial folder that a later run would trust. Returns the folder.
    """
    from tqdm.auto import tqdm

    target = Path(output_dir).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_world_tokenizer()
    model = CLIPModel(tiny_clip_config(tokenizer))

    images, captions = render_generic_arrays(seed, num_pairs)
    held_images, held_captions = render_generic_arrays(seed, heldout_pairs, stream=1)
    pixels = images.reshape(-1, 3).astype(np.float64) / 255.0
    mean = torch.tensor(pixels.mean(axis=0), dtype=torch.float32)
    std = torch.tensor(pixels.std(axis=0), dtype=torch.float32)
    del pixels
    ids, mask, rows = _tokenise(tokenizer, captions + held_captions)
    train_rows, held_rows = rows[:num_pairs], rows[num_pairs:]

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
    order = torch.randperm(num_pairs, generator=generator)
    cursor = 0
    model.train()
    bar = tqdm(range(steps), desc="pretraining world backbone", disable=not progress)
    for _ in bar:
        if cursor + batch_size > num_pairs:
            order, cursor = torch.randperm(num_pairs, generator=generator), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        cap = train_rows[idx]
        out = model(
            input_ids=ids[cap], attention_mask=mask[cap], pixel_values=_normalise(images[idx.numpy()], mean, std)
        )
        positives = cap[:, None] == cap[None, :]  # pairs with an identical caption are positives of each other
        loss = multi_positive_infonce(out.logits_per_image, out.logits_per_text, positives)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")

    recall = generic_recall(model, _normalise(held_images, mean, std), ids[held_rows], mask[held_rows], held_rows)
    metadata = _metadata(seed, steps, batch_size, lr, num_pairs)
    metadata["heldout_generic"] = {"gallery": heldout_pairs, **{k: round(v, 2) for k, v in recall.items()}}

    processor = world_image_processor(mean.tolist(), std.tolist())
    return save_cached_folder(target, [model, tokenizer, processor], METADATA_FILE, metadata)


def save_cached_folder(target: Path, parts: Iterable[Any], metadata_file: str, metadata: dict[str, Any]) -> Path:
    """Write `parts` (each with `save_pretrained`) and `metadata_file` into a temporary folder next to `target`, then
    put it in place of `target` in one rename: an interrupted save leaves the previous cache untouched."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for part in parts:
            part.save_pretrained(tmp)
        (tmp / metadata_file).write_text(json.dumps(metadata, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes the folder private; a cache folder follows the umask
        _replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _replace_dir(src: Path, target: Path) -> None:
    """Move a finished folder into place, replacing any older folder at ``target``."""
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, trash / "old")
        os.replace(src, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, target)


def default_cache_dir(seed: int = 0) -> Path:
    """``$PEFT_LPI_CACHE/world-backbone-v1-seed{seed}`` (root defaults to ``~/.cache/peft_lpi``)."""
    return cache_root() / f"{BACKBONE_FORMAT}-seed{seed}"


def cache_root() -> Path:
    """Where offline backbones are cached: ``$PEFT_LPI_CACHE``, default ``~/.cache/peft_lpi``."""
    return Path(os.environ.get("PEFT_LPI_CACHE", "~/.cache/peft_lpi")).expanduser()


def read_metadata_file(path: str | os.PathLike[str], metadata_file: str) -> dict[str, Any] | None:
    """A cached folder's JSON metadata file, or None when absent or unreadable."""
    try:
        return json.loads((Path(path) / metadata_file).read_text())
    except (OSError, ValueError):
        return None


def read_backbone_metadata(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``world_backbone.json`` of a saved backbone, or None when absent or unreadable."""
    return read_metadata_file(path, METADATA_FILE)


def get_offline_backbone(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 128,
    lr: float = 1e-3,
    num_pairs: int = DEFAULT_PAIRS,
    progress: bool = True,
    **kwargs: Any,
) -> Path:
    """Path of the cached world backbone for these settings; pretrains (and caches) it when missing or stale.

    ``cache_dir`` is the backbone folder itself (default: ``default_cache_dir(seed)``). Under several processes
    call it on the main process first (e.g. ``accelerator.main_process_first()``), so only one pretrains.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(seed)
    wanted = _metadata(seed, steps, batch_size, lr, num_pairs)
    found = read_backbone_metadata(target)
    if found is not None and all(found.get(k) == v for k, v in wanted.items()):
        return target
    return pretrain_backbone(
        target, seed=seed, steps=steps, batch_size=batch_size, lr=lr, num_pairs=num_pairs, progress=progress, **kwargs
    )
