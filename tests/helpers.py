"""Offline test helpers: a word-level tokenizer and tiny dual encoders built from configs (no downloads)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast, SiglipConfig, SiglipModel

from peft_lpi import LPIConfig
from peft_lpi.data.backbone import word_level_tokenizer
from peft_lpi.tuner.factors import LPITaskFactors

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3  # EOS != 2: CLIP then pools at the first EOS token (not argmax of ids)
TINY_VOCAB_SIZE = 100
TINY_MAX_POSITIONS = 16


def tiny_word_tokenizer(words: Iterable[str], model_max_length: int = TINY_MAX_POSITIONS) -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer (lower-case, whitespace/punctuation split) that wraps each text as [BOS] ... [EOS].

    Ids: [PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3, then `words` (deduplicated, lower-cased) in order; at most
    TINY_VOCAB_SIZE ids in all.
    """
    tokenizer = word_level_tokenizer(words, model_max_length, model_input_names=["input_ids", "attention_mask"])
    if len(tokenizer.get_vocab()) > TINY_VOCAB_SIZE:
        raise ValueError(f"{len(tokenizer.get_vocab())} tokens do not fit the tiny vocabulary of {TINY_VOCAB_SIZE}.")
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "[UNK]", "[BOS]", "[EOS]"]) == [PAD_ID, UNK_ID, BOS_ID, EOS_ID]
    return tokenizer


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


# ----------------------------------------------------------------------------------------------------------------
# Tiny dual encoders with configurable widths / depth / attention, and random batches (used by the tuner test files).
# ----------------------------------------------------------------------------------------------------------------
TINY_IMAGE_SIZE, TINY_PATCH_SIZE = 16, 8  # 4 patches (+ CLS where the tower has one)


def _tower(hidden: int, layers: int, heads: int = 2) -> dict:
    return dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads)


def tiny_clip(
    attn: str = "sdpa", vision_hidden: int = 48, text_hidden: int = 32, layers: int = 3, *, seed: int = 0
) -> CLIPModel:
    """Tiny random CLIPModel (vocab 100, 16 positions, BOS=2 / EOS=3 / PAD=0, image 16 patch 8), in eval mode."""
    text = dict(
        _tower(text_hidden, layers),
        vocab_size=TINY_VOCAB_SIZE,
        max_position_embeddings=TINY_MAX_POSITIONS,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    vision = dict(_tower(vision_hidden, layers), image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH_SIZE)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    model.set_attn_implementation(attn)
    return model.eval()


def tiny_siglip(attn: str = "sdpa", hidden: int = 32, layers: int = 3, *, seed: int = 0) -> SiglipModel:
    """Tiny random SiglipModel (equal text and vision widths, as SigLIP requires), in eval mode."""
    text = dict(
        _tower(hidden, layers),
        vocab_size=TINY_VOCAB_SIZE,
        max_position_embeddings=TINY_MAX_POSITIONS,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    vision = dict(_tower(hidden, layers), image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH_SIZE)
    config = SiglipConfig(text_config=text, vision_config=vision)
    torch.manual_seed(seed)
    model = SiglipModel(config)
    model.set_attn_implementation(attn)
    return model.eval()


def tiny_vit_bert(
    attn: str = "sdpa", vision_hidden: int = 48, text_hidden: int = 32, layers: int = 3, *, seed: int = 0
):
    """Tiny random VisionTextDualEncoderModel from a ViTConfig and a BertConfig of different widths, in eval mode."""
    from transformers import BertConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel, ViTConfig

    vision = ViTConfig(**_tower(vision_hidden, layers), image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH_SIZE)
    text = BertConfig(
        **_tower(text_hidden, layers),
        vocab_size=TINY_VOCAB_SIZE,
        max_position_embeddings=TINY_MAX_POSITIONS,
        pad_token_id=PAD_ID,
    )
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=16)
    torch.manual_seed(seed)
    model = VisionTextDualEncoderModel(config)
    model.set_attn_implementation(attn)
    return model.eval()


TINY_BUILDERS = {"clip": tiny_clip, "siglip": tiny_siglip, "vit_bert": tiny_vit_bert}


def random_batch(
    model_kind: str, batch: int = 4, seq: int = 8, pad_rows: Iterable[int] = (), *, seed: int = 1
) -> dict[str, torch.Tensor]:
    """pixel_values (B, 3, 16, 16), input_ids (B, seq) and attention_mask (B, seq) for a tiny model.

    Rows listed in `pad_rows` are shorter and padded with PAD_ID (mask 0): for "clip" each row is BOS ... EOS then
    padding (CLIP pools at the EOS); for "vit_bert" [BOS] ... [EOS] then padding; for "siglip" the tokens are
    followed by padding to `seq` (SigLIP is trained with max-length padding and pools the last position).
    Word ids lie in 4..TINY_VOCAB_SIZE-1 (no special ids inside a caption).
    """
    generator = torch.Generator().manual_seed(seed)
    pad_rows = set(pad_rows)
    pixel_values = torch.randn(batch, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)
    input_ids = torch.full((batch, seq), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros(batch, seq, dtype=torch.long)
    for row in range(batch):
        length = max(3, seq - 2 - row % 3) if row in pad_rows else seq  # tokens in the row, specials included
        words = torch.randint(4, TINY_VOCAB_SIZE, (length,), generator=generator)
        if model_kind in ("clip", "vit_bert"):
            words[0], words[length - 1] = BOS_ID, EOS_ID
        elif model_kind != "siglip":
            raise ValueError(f"Unknown model kind {model_kind!r}.")
        input_ids[row, :length] = words
        attention_mask[row, :length] = 1
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


# ----------------------------------------------------------------------------------------------------------------
# LPI test utilities and the independent reference injection (shared by the tuner test files).
# ----------------------------------------------------------------------------------------------------------------
KINDS = ("clip", "siglip", "vit_bert")
SMALL = dict(prompt_depth=2, prompt_length=3, rank=2)  # K, P, r of most tests


def emb(output) -> torch.Tensor:
    """The projected embedding of a feature method (transformers 5.x: `.pooler_output`)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def image_features(model, batch: dict) -> torch.Tensor:
    return emb(model.get_image_features(pixel_values=batch["pixel_values"]))


def text_features(model, batch: dict) -> torch.Tensor:
    return emb(model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))


def features(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return image_features(model, batch), text_features(model, batch)


def wrap(base: nn.Module, seed: int = 0, **config) -> PeftModel:
    """get_peft_model with seeded factor init (so two wraps with the same seed hold the same factors)."""
    torch.manual_seed(seed)
    return get_peft_model(base, LPIConfig(**{**SMALL, **config}))


def widths(base: nn.Module) -> tuple[int, int]:
    return base.config.vision_config.hidden_size, base.config.text_config.hidden_size


def bank_of(model: PeftModel, adapter: str | None = None):
    tuner = model.base_model
    return tuner.lpi_prompts[adapter or tuner.active_adapters[0]]


def cp_prompts(factors: LPITaskFactors, modality: str) -> torch.Tensor:
    """Independent CP reconstruction (1/r) sum_k A[l,k] B[p,k] C[d,k] by broadcasting: (K, P, D)."""
    a = factors.layer_factor if factors.share_layer_factor else factors.layer_factors[modality]
    b, c = factors.token_factors[modality], factors.hidden_factors[modality]
    return (a[:, None, None, :] * b[None, :, None, :] * c[None, None, :, :]).sum(-1) / a.shape[1]


def snapshot(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lpi_prompts" in k}


def assert_same_state(before: dict[str, torch.Tensor], model: PeftModel) -> None:
    after = snapshot(model)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]) or (
            before[key].is_floating_point()
            and torch.equal(before[key].isnan(), after[key].isnan())
            and torch.equal(before[key].nan_to_num(), after[key].nan_to_num())
        ), key


# -------------------------------------------------------------------- independent reference injection (CLIP)
def _prompted_mask(attention_mask: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """Additive (B, 1, L+P, L+P) mask built from scratch: sequence order [tok0, prompts, tok1..]; causal over the
    real tokens, padding columns hidden, prompts visible to every real token after token 0."""
    batch, length = attention_mask.shape
    total = length + num_prompts
    pos = [0] + [None] * num_prompts + list(range(1, length))  # original position of each widened slot
    allowed = torch.zeros(batch, total, total, dtype=torch.bool)
    for b in range(batch):
        for q in range(total):
            for k in range(total):
                if pos[q] is None:  # prompt rows: output discarded, only must not be fully masked
                    allowed[b, q, k] = True
                elif pos[k] is None:
                    allowed[b, q, k] = pos[q] > 0
                else:
                    allowed[b, q, k] = pos[k] <= pos[q] and bool(attention_mask[b, pos[k]])
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]


def _run_layers(layers, hidden, prompts, mask_fn):
    """Insert prompts[:, l] after token 0 before layer l < K, run the ORIGINAL layer, strip. Returns final + states."""
    depth, num_prompts = prompts.shape[1], prompts.shape[2]
    states = [hidden]
    for index, layer in enumerate(layers):
        if index < depth:
            widened = torch.cat([hidden[:, :1], prompts[:, index], hidden[:, 1:]], dim=1)
            out = layer(widened, mask_fn(num_prompts))
            out = out[0] if isinstance(out, tuple) else out
            hidden = torch.cat([out[:, :1], out[:, 1 + num_prompts :]], dim=1)
        else:
            out = layer(hidden, mask_fn(0))
            hidden = out[0] if isinstance(out, tuple) else out
        states.append(hidden)
    return hidden, states


def reference_clip_text(clip, prompts: torch.Tensor, input_ids, attention_mask):
    """CLIP text features with deep prompts (B, K, P, D), computed layer by layer on an unwrapped eager CLIP."""
    tm = clip.text_model
    hidden = tm.embeddings(input_ids=input_ids)
    hidden, states = _run_layers(tm.encoder.layers, hidden, prompts, lambda p: _prompted_mask(attention_mask, p))
    hidden = tm.final_layer_norm(hidden)
    eos = (input_ids == EOS_ID).int().argmax(-1)
    return clip.text_projection(hidden[torch.arange(len(input_ids)), eos]), states


def reference_clip_image(clip, prompts: torch.Tensor, pixel_values):
    vm = clip.vision_model
    hidden = vm.pre_layrnorm(vm.embeddings(pixel_values))
    hidden, states = _run_layers(vm.encoder.layers, hidden, prompts, lambda p: None)
    return clip.visual_projection(vm.post_layernorm(hidden[:, 0])), states


def run_command(command: list[str], env: dict[str, str], timeout: float = 240) -> None:
    """Run a (multi-process) test script in its own session; kill the whole group past `timeout`; fail on non-zero."""
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{command} timed out")
    assert process.returncode == 0, output.decode()[-4000:]


def sigkill_at_marker(child: subprocess.Popen, marker: Path, log: Path, deadline_s: float) -> None:
    """Wait until `child` (started with ``start_new_session=True``) writes `marker`, then SIGKILL its process group;
    fail with the tail of its `log` if it ends first or `deadline_s` passes."""
    deadline = time.monotonic() + deadline_s
    while not marker.exists():
        if child.poll() is not None:
            pytest.fail(f"the child ended (rc {child.returncode}) before the marker:\n" + log.read_text()[-3000:])
        if time.monotonic() > deadline:
            pytest.fail("the child did not reach the marker in time")
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(timeout=30)


def kill_group_if_running(child: subprocess.Popen) -> None:
    """SIGKILL `child`'s process group if it still runs (a test's cleanup after a failure)."""
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
