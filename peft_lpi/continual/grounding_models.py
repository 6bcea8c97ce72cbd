"""Detector families for continual grounding: how each Hugging Face detector is run, scored, trained and featurised.

`LPIGroundingMethod`, `GroundingEvaluator` and `GroundingCollator` (`peft_lpi.continual.grounding`) ask a family
four things, so that the continual loop is the same code for every detector and no transformers code is forked:

- **candidates**: run the detector on ``pixel_values`` (+ ``pixel_mask``) and one expression per image, and give a
  score and a box (cxcywh, normalised) per candidate; the REC prediction is the best-scoring candidate's box;
- **the family's own grounding loss** for the referred box;
- **prompt-free features** of an image (task keys, image-only routing) and of a text (text keys, task similarity);
- **text format**: how an expression is written for the family's tokenizer.

Families:

``OwlFamily`` (``OwlViTForObjectDetection`` / ``Owlv2ForObjectDetection``): candidates are the image patches
(``logits`` of the expression's query row, ``pred_boxes``); loss `grounding_loss.rec_loss` (box L1 + gIoU on the
matched patch + cross-entropy over patches); features from the inner CLIP-like model's ``get_image_features`` /
``get_text_features``. Exactly what the OWL path always did.

``GroundingDinoFamily`` (``GroundingDinoForObjectDetection``: Swin + BERT, with ``LPIConfig(injection="additive")``):

- text: the expression lower-cased, its own ``.`` / ``?`` removed, one trailing ``.`` added, as
  ``GroundingDinoProcessor`` writes a one-label prompt (``"the red mug."``). Grounding DINO splits its text into
  phrases at ``[CLS]``, ``[SEP]``, ``.`` and ``?`` (its text self-attention blocks and its label maps), so this
  makes the whole expression one phrase: the span the loss trains and the score reads;
- candidates: the decoder's queries (``pred_boxes``); the score of a query is the max over the expression's phrase
  tokens of its ``logits`` (sigmoid is monotone, so the ranking is that of transformers'
  ``post_process_grounded_object_detection``, which takes the max of the sigmoid over all text positions; here the
  ``[CLS]`` / ``.`` / ``[SEP]`` positions, which the model's loss trains as negatives, are left out);
- loss: **the model's own training loss** for one box whose positive span is the whole expression
  (`grounding_dino_rec_loss`): transformers' Hungarian matcher (with one target: the query of least cost),
  transformers' sigmoid focal loss over every valid (query, token) pair with the matched query's phrase tokens
  positive (x2), box L1 (x ``bbox_loss_coefficient``) + gIoU (x ``giou_loss_coefficient``) on the matched query,
  and the same on the two-stage encoder proposals; sums over the batch / number of boxes. Why: the reference
  trained GLIP with GLIP's own grounding loss; this is the same choice for Grounding DINO. It is assembled here
  rather than taken from the forward's ``labels=`` because transformers (5.x) builds the positive tokens of image
  i > 0 from row ``label + len(label_maps[i])`` of the batch's stacked label maps instead of ``label + (labels
  of the images before i)``: with one label per image, every image after the second is trained on the SECOND
  image's token positions (tests/test_grounding_dino.py checks this function against ``labels=`` on each image
  alone, where that indexing is right). The auxiliary per-decoder-layer losses (``config.auxiliary_loss``, off in
  the released checkpoints) are not included;
- image feature: the last Swin stage's map (``model.backbone.conv_encoder``), averaged over its positions. The
  reference flattens GLIP's last level, which needs one fixed image size and gives ~10^6 dimensions; the average
  is a compact summary of the same map. Its width is the Swin's last-stage width (``backbone_config.hidden_size``),
  the tuner's vision key width for this family;
- text feature: the BERT ``text_backbone`` run as the model runs it (its phrase attention mask and position ids),
  averaged over the valid tokens.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .grounding_loss import owl_rec_terms, select_query_pairs

__all__ = [
    "GroundingDinoFamily",
    "GroundingFamily",
    "OwlFamily",
    "fixed_canvas",
    "grounding_dino_rec_loss",
    "grounding_family",
    "grounding_model_type",
]

MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask", "pixel_mask")
OWL_TYPES = ("owlvit", "owlv2")
GROUNDING_DINO_TYPES = ("grounding-dino",)


def grounding_model_type(model: nn.Module) -> str | None:
    """``config.model_type`` of the detector inside `model` (a PeftModel, DDP wrapper or the detector)."""
    for module in model.modules():
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if isinstance(model_type, str) and model_type in OWL_TYPES + GROUNDING_DINO_TYPES:
            return model_type
    return None


def _inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {key: batch[key] for key in MODEL_INPUTS if batch.get(key) is not None}


class GroundingFamily:
    """What the continual grounding loop needs from one detector family (see the module docstring)."""

    name = ""

    def __init__(self, model: nn.Module):
        self.model = model  # the PeftModel

    def format_expression(self, expression: str) -> str:
        return expression

    def min_text_length(self) -> int | None:
        """Fewest token positions a tokenised batch must have (None: any)."""
        return None

    def max_text_length(self) -> int | None:
        """Most tokens the detector reads of an expression (None: only the text tower's own limit)."""
        return None

    def forward(self, model: nn.Module, batch: dict[str, Any], task_ids: Any = None, **kwargs: Any) -> Any:
        """The detector's outputs on the batch's model inputs; `task_ids` chooses the prompts for this call."""
        if task_ids is not None:
            kwargs["task_ids"] = task_ids
        return model(**_inputs(batch), **kwargs)

    def candidates(self, outputs: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B, N) and cxcywh boxes (B, N, 4) of the N candidates of each (image, expression) pair."""
        raise NotImplementedError

    def rec_terms(self, model: nn.Module, batch: dict[str, Any], task: int | torch.Tensor | None,
                  rec_kwargs: dict[str, Any]) -> dict:
        """The family's grounding loss of a batch with task `task`'s prompts: {"rec", "box_l1", "giou",
        "classification"} (+ family extras), each a scalar tensor. `task` is passed on as the forward's ``task_ids``:
        one task, a (B,) tensor of each image's task (the joint baseline's mixed batches), or None (no task ids: a
        model without LPI prompts, e.g. the LoRA baseline's active adapter)."""
        raise NotImplementedError

    def image_features(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def tower_features(self, modality: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """fp32 features of one tower ("vision" / "text") from a collated batch: `image_features` or
        `text_features` of the model as it is (the caller switches prompts or adapters off for the keys)."""
        if modality == "vision":
            features = self.image_features(inputs["pixel_values"], inputs.get("pixel_mask"))
        else:
            features = self.text_features(inputs["input_ids"], inputs.get("attention_mask"))
        return features.float()


class OwlFamily(GroundingFamily):
    """OWL-ViT / OWLv2: patches are the candidates, `rec_loss` the loss, the CLIP-like towers the features."""

    name = "owl"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        from .grounding import owl_dual_encoder

        self.encoder = owl_dual_encoder(model)

    def candidates(self, outputs: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        # one query per image, or several when the rows are grouped by image (`grounding_batches`: query_mask)
        logits, boxes, _ = select_query_pairs(outputs.logits, outputs.pred_boxes, batch.get("query_mask"))
        return logits, boxes

    def rec_terms(self, model: nn.Module, batch: dict[str, Any], task: int | torch.Tensor | None,
                  rec_kwargs: dict[str, Any]) -> dict:
        return owl_rec_terms(self.forward(model, batch, task_ids=task), batch, rec_kwargs)

    def image_features(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        features = self.encoder.get_image_features(pixel_values=pixel_values)
        return features if isinstance(features, torch.Tensor) else features.pooler_output

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        features = self.encoder.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return features if isinstance(features, torch.Tensor) else features.pooler_output


class GroundingDinoFamily(GroundingFamily):
    """Grounding DINO: queries are the candidates, the model's own loss trains, Swin / BERT give the features."""

    name = "grounding-dino"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoModel

        inner = next((m for m in model.modules() if isinstance(m, GroundingDinoModel)), None)
        if inner is None:
            raise ValueError(f"{type(model).__name__} holds no GroundingDinoModel.")
        self.inner = inner
        tuner = getattr(model, "base_model", None)
        config = getattr(tuner, "active_config", None)
        if config is not None and config.injection != "additive":
            raise ValueError(
                "Grounding DINO's Swin tower cannot take extra prompt tokens: create the adapter with "
                f"LPIConfig(injection='additive') (got injection={config.injection!r})."
            )

    def format_expression(self, expression: str) -> str:
        text = re.sub(r"[.?]", " ", expression).strip().lower()
        text = " ".join(text.split())
        if not text:
            raise ValueError(
                f"Empty referring expression {expression!r}: Grounding DINO needs at least one word to ground."
            )
        return text + "."

    def min_text_length(self) -> int | None:
        """Additive text prompts cover positions 1..P: a batch needs at least P + 1 positions (padding is masked
        out of everything the detector reads, so the extra positions change no output)."""
        tuner = getattr(self.model, "base_model", None)
        config = getattr(tuner, "active_config", None)
        if config is None or "text" not in config.prompted_modalities:
            return None
        return int(config.prompt_length) + 1

    def max_text_length(self) -> int | None:
        return int(self.inner.config.max_text_len)

    def phrase_mask(self, input_ids: torch.Tensor, width: int) -> torch.Tensor:
        """(B, width) bool: the expression's phrase tokens (the positions of transformers' label maps)."""
        from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

        maps = build_label_maps(input_ids.new_zeros(input_ids.shape[0], 1, width), input_ids)  # (labels, width) each
        return torch.stack([m.sum(0) > 0 for m in maps])

    def candidates(self, outputs: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = outputs.logits  # (B, Q, max_text_len); masked text positions are -inf
        input_ids = outputs.input_ids if getattr(outputs, "input_ids", None) is not None else batch["input_ids"]
        phrase = self.phrase_mask(input_ids, logits.shape[-1])
        empty = ~phrase.any(-1)
        if bool(empty.any()):
            raise ValueError(
                f"{int(empty.sum())} expression(s) of the batch have no phrase tokens after tokenisation; Grounding "
                "DINO cannot score them (format them with GroundingDinoFamily.format_expression)."
            )
        scores = logits.masked_fill(~phrase[:, None, :], torch.finfo(logits.dtype).min).amax(-1)
        return scores, outputs.pred_boxes

    def rec_terms(self, model: nn.Module, batch: dict[str, Any], task: int | torch.Tensor | None,
                  rec_kwargs: dict[str, Any]) -> dict:
        if rec_kwargs:
            raise ValueError(
                f"rec_kwargs {sorted(rec_kwargs)} apply to OWL's rec_loss only: Grounding DINO trains with its own "
                "loss, whose weights are in its config (bbox_loss_coefficient, giou_loss_coefficient, class_cost, "
                "bbox_cost, giou_cost, focal_alpha)."
            )
        outputs = self.forward(model, batch, task_ids=task)
        return grounding_dino_rec_loss(outputs, batch["input_ids"], batch["attention_mask"], batch["boxes"],
                                       self.inner.config)

    def image_features(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last Swin stage's map averaged over all its positions. `pixel_mask` is deliberately not used: the
        trainer builds the keys from ``pixel_values`` alone, so routing must see the same feature; give every image
        one fixed canvas (the image processor's ``pad_size``, as examples/continual_grounding.py does) so that the
        feature of an image does not depend on the other images of its batch."""
        full = torch.ones(pixel_values.shape[0], *pixel_values.shape[-2:], dtype=torch.long, device=pixel_values.device)
        feature_map, _ = self.inner.backbone.conv_encoder(pixel_values, full)[-1]  # (B, C, h, w)
        return feature_map.mean((-2, -1))

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        from transformers.models.grounding_dino.modeling_grounding_dino import (
            generate_masks_with_special_tokens_and_transfer_map,
        )

        limit = self.inner.config.max_text_len
        input_ids = input_ids[:, :limit]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask[:, :limit]
        self_attention, position_ids = generate_masks_with_special_tokens_and_transfer_map(
            input_ids, self.inner.special_tokens
        )
        hidden = self.inner.text_backbone(
            input_ids, self_attention[:, None], torch.zeros_like(input_ids), position_ids, return_dict=True
        ).last_hidden_state
        weight = mask.to(hidden.dtype)[..., None]
        return (hidden * weight).sum(1) / weight.sum(1).clamp(min=1)


def grounding_family(model: nn.Module) -> GroundingFamily:
    """The `GroundingFamily` of the detector inside `model`, from its ``config.model_type``."""
    model_type = grounding_model_type(model)
    if model_type in OWL_TYPES:
        return OwlFamily(model)
    if model_type in GROUNDING_DINO_TYPES:
        return GroundingDinoFamily(model)
    raise ValueError(
        f"{type(model).__name__} is not a supported grounding detector: continual grounding runs on "
        f"OWL-ViT / OWLv2 (model_type {OWL_TYPES}) and Grounding DINO (model_type {GROUNDING_DINO_TYPES})."
    )


def fixed_canvas(image_processor: Any) -> Any:
    """Make a padding image processor (Grounding DINO's) pad every image to one fixed canvas, the largest its resize
    can give (``longest_edge`` squared; ``height`` x ``width``; ``max_height`` x ``max_width``), and return it.

    Why: it pads each batch to the batch's largest image, so an image's pixels, and its pooled backbone feature
    (task keys, routing), would depend on which images share its batch. The ``pixel_mask`` keeps the detector
    blind to the padding. Costs memory: a 640 x 480 COCO image resized to 1067 x 800 is padded to 1333 x 1333.
    """
    inner = getattr(image_processor, "image_processor", None) or image_processor
    if not getattr(inner, "do_pad", False):
        return image_processor
    size = inner.size

    def get(name: str) -> int | None:
        value = size.get(name) if isinstance(size, dict) else getattr(size, name, None)
        return None if value is None else int(value)

    if get("longest_edge") is not None:
        height = width = get("longest_edge")
    elif get("height") is not None and get("width") is not None:
        height, width = get("height"), get("width")
    elif get("max_height") is not None and get("max_width") is not None:
        height, width = get("max_height"), get("max_width")
    else:
        raise ValueError(f"Cannot tell the largest image {type(inner).__name__} produces from its size {size}.")
    inner.pad_size = {"height": height, "width": width}
    return image_processor


def grounding_dino_rec_loss(
    outputs: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_boxes: torch.Tensor, config: Any
) -> dict[str, torch.Tensor]:
    """Grounding DINO's loss for one referred box per image, its positive span the expression's phrase tokens.

    Args:
        outputs: a ``GroundingDinoObjectDetectionOutput`` (``logits``, ``pred_boxes``; with ``config.two_stage``
            also ``encoder_logits`` / ``encoder_pred_boxes``).
        input_ids, attention_mask: the (B, L) text the model read.
        target_boxes: (B, 4) referred boxes, cxcywh normalised.
        config: the model's ``GroundingDinoConfig`` (matching costs, loss coefficients, focal alpha).

    Returns:
        {"rec": total, "box_l1", "giou", "classification": the final decoder layer's unweighted terms,
        "encoder": the weighted encoder-proposal total (0 without two_stage)}.
    """
    from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher, sigmoid_focal_loss
    from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

    from ..evaluation.grounding import box_cxcywh_to_xyxy, paired_generalized_box_iou

    batch, width = target_boxes.shape[0], outputs.logits.shape[-1]
    maps = build_label_maps(outputs.logits, input_ids)
    phrase = torch.stack([m.sum(0) > 0 for m in maps]).to(outputs.logits.dtype)  # (B, W)
    if bool((phrase.sum(-1) == 0).any()):
        raise ValueError("An expression of the batch has no phrase tokens: Grounding DINO cannot ground it.")
    valid = torch.zeros(batch, width, dtype=torch.bool, device=phrase.device)
    valid[:, : min(width, attention_mask.shape[1])] = attention_mask[:, :width].bool()
    matcher = GroundingDinoHungarianMatcher(
        class_cost=config.class_cost, bbox_cost=config.bbox_cost, giou_cost=config.giou_cost
    )
    targets = [{"class_labels": torch.zeros(1, dtype=torch.long, device=phrase.device), "boxes": target_boxes[i : i + 1]}
               for i in range(batch)]
    rows = torch.arange(batch, device=phrase.device)

    def level(logits: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        indices = matcher({"logits": logits, "pred_boxes": boxes, "label_maps": tuple(phrase[:, None])}, targets)
        matched = torch.stack([i[0] for i in indices]).reshape(batch).to(phrase.device)
        onehot = torch.zeros_like(logits)
        onehot[rows, matched] = phrase
        mask = valid[:, None, :].expand_as(logits)
        ce = sigmoid_focal_loss(logits[mask], onehot[mask], num_boxes=batch, alpha=config.focal_alpha, gamma=2)
        box = boxes[rows, matched]
        l1 = (box - target_boxes).abs().sum() / batch
        giou = (1 - paired_generalized_box_iou(box_cxcywh_to_xyxy(box), box_cxcywh_to_xyxy(target_boxes))).sum() / batch
        return ce, l1, giou

    def weighted(ce: torch.Tensor, l1: torch.Tensor, giou: torch.Tensor) -> torch.Tensor:
        # transformers' weights: loss_ce 2.0, loss_bbox bbox_loss_coefficient, loss_giou giou_loss_coefficient
        return 2.0 * ce + config.bbox_loss_coefficient * l1 + config.giou_loss_coefficient * giou

    ce, l1, giou = level(outputs.logits, outputs.pred_boxes)
    encoder = ce.new_zeros(())
    if config.two_stage and getattr(outputs, "encoder_logits", None) is not None:
        encoder = weighted(*level(outputs.encoder_logits, outputs.encoder_pred_boxes))
    return {"rec": weighted(ce, l1, giou) + encoder, "box_l1": l1, "giou": giou, "classification": ce,
            "encoder": encoder}
