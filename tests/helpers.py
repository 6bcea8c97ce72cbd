"""Offline test helpers: a word-level tokenizer and tiny dual encoders built from configs (no downloads)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast, SiglipConfig, SiglipModel

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3  # EOS != 2: CLIP then pools at the first EOS token (not argmax of ids)
TINY_VOCAB_SIZE = 100
TINY_MAX_POSITIONS = 16


def tiny_word_tokenizer(words: Iterable[str], model_max_length: int = TINY_MAX_POSITIONS) -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer (lower-case, whitespace/punctuation split) that wraps each text as [BOS] ... [EOS].

    Ids: [PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3, then `words` (deduplicated, lower-cased) in order; at most
    TINY_VOCAB_SIZE ids in all.
    """
    vocab = {"[PAD]": PAD_ID, "[UNK]": UNK_ID, "[BOS]": BOS_ID, "[EOS]": EOS_ID}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    if len(vocab) > TINY_VOCAB_SIZE:
        raise ValueError(f"{len(vocab)} tokens do not fit the tiny vocabulary of {TINY_VOCAB_SIZE}.")
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]",
        pair="[BOS] $A [EOS] $B [EOS]",
        special_tokens=[("[BOS]", BOS_ID), ("[EOS]", EOS_ID)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],
    )


def _text_config(tokenizer: PreTrainedTokenizerFast | None) -> dict:
    return dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TINY_MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id if tokenizer is not None else BOS_ID,
        eos_token_id=tokenizer.eos_token_id if tokenizer is not None else EOS_ID,
        pad_token_id=tokenizer.pad_token_id if tokenizer is not None else PAD_ID,
    )


_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8)


def tiny_clip_model(tokenizer: PreTrainedTokenizerFast | None = None, *, projection_dim: int = 16, seed: int = 0) -> CLIPModel:
    """Tiny random CLIPModel (text: hidden 32, 2 layers, vocab 100, 16 positions; vision: 32, image 16, patch 8)."""
    config = CLIPConfig(text_config=_text_config(tokenizer), vision_config=dict(_VISION), projection_dim=projection_dim)
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


def tiny_siglip_model(tokenizer: PreTrainedTokenizerFast | None = None, *, seed: int = 0) -> SiglipModel:
    """Tiny random SiglipModel with the same sizes as `tiny_clip_model`."""
    config = SiglipConfig(text_config=_text_config(tokenizer), vision_config=dict(_VISION))
    torch.manual_seed(seed)
    return SiglipModel(config).eval()
