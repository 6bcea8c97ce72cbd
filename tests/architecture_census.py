"""The census of Hugging Face dual-encoder families: tiny random builders, inputs and tower read-outs.

Used by tests/test_architectures.py (the checks) and tests/test_docs.py (the README's supported-families table).
Every entry builds a tiny model from a config (no downloads), a batch of 2 samples whose second caption is padded,
and reads the outputs of each tower through the path a user calls (feature methods, or the model's forward for the
detection / segmentation / grounding heads). `expected` is what LPI must do with the family:

- "prompted": `get_peft_model` accepts it and both towers are prompted correctly (deep insertion);
- "additive": the vision tower cannot take extra tokens (Swin windows); it is prompted with `injection="additive"`;
- "text only": a CNN vision tower; `towers="text"` works, `towers="both"` is refused at `get_peft_model`;
- "refused": `get_peft_model` raises an error naming the family, the reason and the way out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers as tf
from torch import nn

VOCAB, MAX_POS, SEQ = 64, 16, 7
PAD, BOS, EOS = 0, 2, 3
IMAGE, PATCH = 16, 8


@dataclass(frozen=True)
class Family:
    """One census configuration."""

    name: str  # row name in the README table
    build: Callable[[], nn.Module]
    expected: str  # "prompted", "additive", "text only" or "refused"
    towers: dict[str, str] = field(default_factory=dict)  # modality -> expected layers path (detection check)
    text_inputs: str = "ids"  # how captions are fed: "ids" (input_ids + attention_mask), "ids_no_mask"
    pixels: tuple[int, ...] = (3, IMAGE, IMAGE)  # shape of one sample's pixel_values
    read: str = "features"  # "features", "video", "owl_detection", "clipseg", "flava", "blip_itr", "gdino", "kosmos"
    config: dict[str, Any] = field(default_factory=dict)  # extra LPIConfig fields
    refusal: str = ""  # a word the get_peft_model error must contain (refused / text-only families)
    notes: str = ""  # the README's notes column


def _text(**extra: Any) -> dict:
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=MAX_POS, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, **extra,
    )


def _vision(**extra: Any) -> dict:
    values = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE,
                  patch_size=PATCH, initializer_range=0.02)  # BLIP's default (1e-10) makes a near-constant tower
    values.update(extra)
    return values


def _eval(model: nn.Module) -> nn.Module:
    return model.eval()


def build(family: Family) -> nn.Module:
    """The family's tiny model, with the same random weights on every call (seeded)."""
    torch.manual_seed(0)
    return family.build()


def _pair(config_cls: type, model_cls: type, text: dict | None = None, vision: dict | None = None,
          **extra: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = config_cls(text_config=text or _text(), vision_config=vision or _vision(), **extra)
        return _eval(model_cls(config))

    return build


def _dual(vision_config: Any, text_config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = tf.VisionTextDualEncoderConfig.from_vision_text_configs(vision_config(), text_config(),
                                                                         projection_dim=16)
        return _eval(tf.VisionTextDualEncoderModel(config))

    return build


def _bert() -> Any:
    return tf.BertConfig(**{k: v for k, v in _text().items() if k not in ("bos_token_id", "eos_token_id")})


def _roberta() -> Any:
    values = {k: v for k, v in _text().items() if k not in ("bos_token_id", "eos_token_id", "max_position_embeddings")}
    return tf.RobertaConfig(**values, max_position_embeddings=MAX_POS + 2, bos_token_id=BOS, eos_token_id=EOS)


def _swin(**extra: Any) -> Any:
    values = dict(image_size=IMAGE, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)
    values.update(extra)
    return tf.SwinConfig(**values)


def _groupvit(depths: list[int]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        vision = dict(hidden_size=32, intermediate_size=64, depths=depths, num_hidden_layers=sum(depths),
                      num_group_tokens=[4, 2, 0][: len(depths)], num_output_groups=[4, 2, 2][: len(depths)],
                      num_attention_heads=2, image_size=IMAGE, patch_size=4)
        config = tf.GroupViTConfig(text_config=_text(), vision_config=vision, projection_dim=16,
                                   projection_intermediate_dim=32)
        return _eval(tf.GroupViTModel(config))

    return build


def _owl(config_cls: type, model_cls: type) -> Callable[[], nn.Module]:
    return _pair(config_cls, model_cls, vision=_vision(), projection_dim=32)


def _flava() -> nn.Module:
    config = tf.FlavaConfig(
        image_config=_vision(), text_config={k: v for k, v in _text().items() if k not in ("bos_token_id", "eos_token_id")},
        multimodal_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        image_codebook_config=dict(hidden_size=8, num_groups=1, num_blocks_per_group=1, vocab_size=16),
        projection_dim=16,
    )
    return _eval(tf.FlavaModel(config))


def _blip(model_cls: type) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        text = {k: v for k, v in _text().items() if k != "max_position_embeddings"}
        config = tf.BlipConfig(text_config=dict(text, max_position_embeddings=MAX_POS, encoder_hidden_size=32),
                               vision_config=_vision(), projection_dim=16, image_text_hidden_size=16)
        return _eval(model_cls(config))

    return build


def _blip2_itr() -> nn.Module:
    config = tf.Blip2Config(
        vision_config=_vision(),
        qformer_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=MAX_POS, encoder_hidden_size=32,
                            pad_token_id=PAD),
        text_config=dict(model_type="opt", vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=MAX_POS, word_embed_proj_dim=32),
        num_query_tokens=4, image_text_hidden_size=16,
    )
    return _eval(tf.Blip2ForImageTextRetrieval(config))


def _kosmos2() -> nn.Module:
    config = tf.Kosmos2Config(
        text_config=dict(vocab_size=VOCAB, embed_dim=32, ffn_dim=64, layers=2, attention_heads=2,
                         max_position_embeddings=MAX_POS + 8, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS),
        vision_config=_vision(), latent_query_num=4,
    )
    return _eval(tf.Kosmos2Model(config))


def _xclip() -> nn.Module:
    config = tf.XCLIPConfig(text_config=_text(), vision_config=dict(_vision(), num_frames=2, mit_hidden_size=32,
                                                                     mit_intermediate_size=64, mit_num_hidden_layers=1,
                                                                     mit_num_attention_heads=2),
                            projection_dim=32, prompt_layers=1, prompt_num_attention_heads=2, prompt_attention_dropout=0.0)
    return _eval(tf.XCLIPModel(config))


def _align() -> nn.Module:
    text = {k: v for k, v in _text().items() if k not in ("bos_token_id", "eos_token_id")}
    vision = dict(image_size=IMAGE, num_channels=3, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=32,
                  depthwise_padding=[], in_channels=[32, 16, 24, 40, 80, 112, 192], out_channels=[16, 24, 40, 80, 112,
                                                                                               192, 320])
    config = tf.AlignConfig(text_config=text, vision_config=dict(vision, image_size=64), projection_dim=32)
    return _eval(tf.AlignModel(config))


def _grounding_dino() -> nn.Module:
    backbone = _swin(out_features=["stage1", "stage2"])
    text = {k: v for k, v in _text().items() if k not in ("bos_token_id", "eos_token_id")}
    config = tf.GroundingDinoConfig(
        backbone_config=backbone, text_config=dict(text, model_type="bert"), d_model=32, encoder_layers=1,
        decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        num_queries=4, num_feature_levels=2, encoder_n_points=1, decoder_n_points=1, max_text_len=SEQ,
        use_timm_backbone=False,
    )
    return _eval(tf.GroundingDinoForObjectDetection(config))


_VIT = "vision_model.encoder.layers"
_CLIP_TOWERS = {"vision": _VIT, "text": "text_model.encoder.layers"}
_BERT_TOWERS = {"vision": _VIT, "text": "text_model.encoder.layer"}

FAMILIES: list[Family] = [
    Family("CLIP", _pair(tf.CLIPConfig, tf.CLIPModel, projection_dim=16), "prompted", _CLIP_TOWERS),
    Family("SigLIP", _pair(tf.SiglipConfig, tf.SiglipModel), "prompted", _CLIP_TOWERS),
    Family("SigLIP2 (NaFlex)", _pair(tf.Siglip2Config, tf.Siglip2Model,
                                     vision=_vision(num_patches=4, image_size=None)), "prompted", _CLIP_TOWERS,
           read="naflex"),
    Family("ChineseCLIP", _pair(tf.ChineseCLIPConfig, tf.ChineseCLIPModel, projection_dim=16), "prompted",
           _BERT_TOWERS),
    Family("AltCLIP", _pair(tf.AltCLIPConfig, tf.AltCLIPModel,
                            text=dict(_text(), max_position_embeddings=MAX_POS + 2, project_dim=16), projection_dim=16),
           "prompted", {"vision": _VIT, "text": "text_model.roberta.encoder.layers"}),
    Family("MetaClip2", _pair(tf.MetaClip2Config, tf.MetaClip2Model, projection_dim=16), "prompted", _CLIP_TOWERS),
    Family("Tipsv2", _pair(tf.Tipsv2Config, tf.Tipsv2Model), "prompted", {"vision": "vision_model.encoder.layer",
                                                                            "text": "text_model.encoder.layers"}),
    Family("OwlViT", _owl(tf.OwlViTConfig, tf.OwlViTModel), "prompted", _CLIP_TOWERS),
    Family("Owlv2", _owl(tf.Owlv2Config, tf.Owlv2Model), "prompted", _CLIP_TOWERS),
    Family("OwlViTForObjectDetection", _owl(tf.OwlViTConfig, tf.OwlViTForObjectDetection), "prompted",
           {"vision": "owlvit." + _VIT, "text": "owlvit.text_model.encoder.layers"}, read="owl_detection"),
    Family("Owlv2ForObjectDetection", _owl(tf.Owlv2Config, tf.Owlv2ForObjectDetection), "prompted",
           {"vision": "owlv2." + _VIT, "text": "owlv2.text_model.encoder.layers"}, read="owl_detection"),
    Family("CLIPSeg", _pair(tf.CLIPSegConfig, tf.CLIPSegModel, projection_dim=16), "prompted", _CLIP_TOWERS),
    Family("CLIPSegForImageSegmentation",
           _pair(tf.CLIPSegConfig, tf.CLIPSegForImageSegmentation, projection_dim=16, extract_layers=[0, 1],
                 reduce_dim=16, decoder_num_attention_heads=2, decoder_intermediate_size=32),
           "prompted", {"vision": "clip." + _VIT, "text": "clip.text_model.encoder.layers"}, read="clipseg"),
    Family("GroupViT", _groupvit([2, 1]), "prompted", {"vision": "vision_model.encoder.stages.0.layers",
                                                       "text": "text_model.encoder.layers"}),
    Family("GroupViT (1-layer first stage)", _groupvit([1, 2]), "prompted",
           {"vision": "vision_model.encoder.stages.0.layers", "text": "text_model.encoder.layers"},
           notes="prompt_depth capped at the first stage's depth (a warning)"),
    Family("FLAVA", _flava, "prompted", {"vision": "image_model.encoder.layer", "text": "text_model.encoder.layer"},
           read="flava"),
    Family("BLIP", _blip(tf.BlipModel), "prompted", {"vision": _VIT, "text": "text_model.encoder.layer"}),
    Family("BlipForImageTextRetrieval", _blip(tf.BlipForImageTextRetrieval), "prompted",
           {"vision": _VIT, "text": "text_encoder.encoder.layer"}, read="blip_itr"),
    Family("Blip2ForImageTextRetrieval", _blip2_itr, "refused", refusal="Q-Former"),
    Family("Aimv2", _pair(tf.Aimv2Config, tf.Aimv2Model, vision=_vision(num_channels=3), projection_dim=16),
           "prompted", _CLIP_TOWERS),
    Family("Kosmos-2", _kosmos2, "prompted", {"vision": "vision_model.model.encoder.layers", "text": "text_model.model.layers"}, read="kosmos"),
    Family("X-CLIP", _xclip, "prompted", _CLIP_TOWERS, pixels=(2, 3, IMAGE, IMAGE), read="video"),
    Family("ALIGN (EfficientNet)", _align, "text only", {"text": "text_model.encoder.layer"}, refusal="CNN",
           pixels=(3, 64, 64)),
    Family("GroundingDino", _grounding_dino, "additive",
           {"vision": "model.backbone.conv_encoder.model.swin.encoder.layers.0.blocks", "text": "model.text_backbone.encoder.layer"},
           read="gdino", config={"injection": "additive"}),
    Family("VisionTextDualEncoder ViT + BERT", _dual(lambda: tf.ViTConfig(**_vision()), _bert), "prompted",
           {"vision": "vision_model.layers", "text": "text_model.encoder.layer"}),
    Family("VisionTextDualEncoder DeiT + BERT", _dual(lambda: tf.DeiTConfig(**_vision()), _bert), "prompted",
           {"vision": "vision_model.layers", "text": "text_model.encoder.layer"}),
    Family("VisionTextDualEncoder Dinov2 + BERT", _dual(lambda: tf.Dinov2Config(**_vision()), _bert), "prompted",
           {"vision": "vision_model.encoder.layer", "text": "text_model.encoder.layer"}),
    Family("VisionTextDualEncoder CLIPVision + BERT", _dual(lambda: tf.CLIPVisionConfig(**_vision()), _bert),
           "prompted", {"vision": "vision_model.encoder.layers", "text": "text_model.encoder.layer"}),
    Family("VisionTextDualEncoder ViT + RoBERTa", _dual(lambda: tf.ViTConfig(**_vision()), _roberta), "prompted",
           {"vision": "vision_model.layers", "text": "text_model.encoder.layer"}),
    Family("VisionTextDualEncoder Swin + BERT", _dual(_swin, _bert), "additive",
           {"vision": "vision_model.encoder.layers.0.blocks", "text": "text_model.encoder.layer"},
           config={"injection": "additive"}),
    Family("VisionTextDualEncoder Swin + RoBERTa", _dual(_swin, _roberta), "additive",
           {"vision": "vision_model.encoder.layers.0.blocks", "text": "text_model.encoder.layer"},
           config={"injection": "additive"}),
]


# ------------------------------------------------------------------------------------------------------ inputs
def make_batch(family: Family, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two samples: pixel_values and captions of SEQ tokens, the second caption padded (2 pad positions)."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, *family.pixels, generator=generator)
    input_ids = torch.randint(4, VOCAB, (2, SEQ), generator=generator)
    input_ids[:, 0] = BOS
    input_ids[0, -1] = EOS
    input_ids[1, SEQ - 3] = EOS
    input_ids[1, SEQ - 2:] = PAD
    attention_mask = (input_ids != PAD).long()
    attention_mask[0] = 1
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


def _pooled(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for name in ("pooler_output", "image_embeds", "text_embeds", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(type(output).__name__)


def read_towers(family: Family, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"vision": (2, ...), "text": (2, ...)}: each tower's output through the path a user calls, one row per sample.

    `model` is the base model or the PeftModel around it (feature methods are called on it, so "auto" routing runs).
    """
    pixels, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        if family.read == "features":
            return {"vision": _pooled(model.get_image_features(pixel_values=pixels)),
                    "text": _pooled(model.get_text_features(input_ids=ids, attention_mask=mask))}
        if family.read == "naflex":
            patches = pixels.flatten(2).transpose(1, 2).reshape(2, 4, -1)  # (B, num_patches, 3*8*8)
            patches = patches[..., : 3 * PATCH * PATCH]
            shapes = torch.tensor([[2, 2], [2, 2]])
            patch_mask = torch.ones(2, 4, dtype=torch.long)
            return {"vision": _pooled(model.get_image_features(pixel_values=patches, pixel_attention_mask=patch_mask,
                                                               spatial_shapes=shapes)),
                    "text": _pooled(model.get_text_features(input_ids=ids, attention_mask=mask))}
        if family.read == "video":
            return {"vision": _pooled(model.get_video_features(pixel_values=pixels)),
                    "text": _pooled(model.get_text_features(input_ids=ids, attention_mask=mask))}
        if family.read == "owl_detection":  # 2 images x 2 queries each: query rows are (image, query) major
            queries = torch.cat([ids, ids.flip(0)])[[0, 2, 1, 3]]
            query_mask = torch.cat([mask, mask.flip(0)])[[0, 2, 1, 3]]
            out = model(input_ids=queries, attention_mask=query_mask, pixel_values=pixels)
            return {"vision": out.image_embeds.flatten(1), "text": out.text_embeds.flatten(1)}
        if family.read == "clipseg":
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
            return {"vision": out.vision_model_output.pooler_output, "text": out.conditional_embeddings,
                    "logits": out.logits}
        if family.read == "flava":
            image = model.get_image_features(pixel_values=pixels)
            text = model.get_text_features(input_ids=ids, attention_mask=mask)
            return {"vision": _pooled(image).flatten(1), "text": _pooled(text).flatten(1)}
        if family.read == "blip_itr":
            itc = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_itm_head=False)
            itm = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_itm_head=True)
            return {"vision": itc.last_hidden_state[:, 0], "text": itc.question_embeds[:, 0], "itm": itm.itm_score}
        if family.read == "kosmos":
            image = model.get_image_features(pixel_values=pixels)
            text = model.text_model(input_ids=ids, attention_mask=mask)
            return {"vision": _pooled(image).flatten(1), "text": text.last_hidden_state.flatten(1)}
        if family.read == "gdino":
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
            return {"vision": out.encoder_last_hidden_state_vision.flatten(1),
                    "text": out.encoder_last_hidden_state_text.flatten(1)}
    raise ValueError(family.read)


# ------------------------------------------------------------------------------------------------ README table
STATUS = {"prompted": "prompted (deep insertion)", "additive": "prompted (`injection=\"additive\"`)",
          "text only": "text tower only (`towers=\"text\"`)", "refused": "refused at `get_peft_model`"}


def census_table() -> str:
    """The README's supported-families table, generated from the census (tests/test_docs.py keeps them equal)."""
    rows = ["| family | status | prompted layers (vision / text) | notes |", "|---|---|---|---|"]
    for family in FAMILIES:
        towers = " / ".join(f"`{family.towers[m]}`" if m in family.towers else "—" for m in ("vision", "text"))
        rows.append(f"| {family.name} | {STATUS[family.expected]} | {towers} | {family.notes} |")
    return "\n".join(rows)
