"""The prompted layer (peft_lpi.tuner.layer): injection against a layer-by-layer reference, eager == sdpa,
padding, hidden states, gradient checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    KINDS,
    TINY_BUILDERS,
    bank_of,
    cp_prompts,
    features,
    image_features,
    random_batch,
    reference_clip_image,
    reference_clip_text,
    text_features,
    tiny_clip,
    tiny_siglip,
    tiny_vit_bert,
    wrap,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)


# ====================================================================================== injection correctness
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_clip_injection_matches_layer_by_layer_reference(attn):
    base = tiny_clip(attn)
    reference = copy.deepcopy(base)
    reference.set_attn_implementation("eager")
    model = wrap(base, num_tasks=2, interaction=False)
    model.set_task(1)
    batch = random_batch("clip", 4, 8, pad_rows=[1, 3])
    factors = bank_of(model).tasks[1]
    with torch.no_grad():
        pv, pw = (cp_prompts(factors, m).expand(4, -1, -1, -1) for m in ("vision", "text"))
        ref_txt, ref_txt_states = reference_clip_text(reference, pw, batch["input_ids"], batch["attention_mask"])
        ref_img, ref_img_states = reference_clip_image(reference, pv, batch["pixel_values"])
        out_img = model.get_image_features(pixel_values=batch["pixel_values"], output_hidden_states=True)
        out_txt = model.get_text_features(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
    torch.testing.assert_close(out_txt.pooler_output, ref_txt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_img.pooler_output, ref_img, atol=1e-5, rtol=1e-5)
    # hidden states recorded without the prompt positions, equal to the reference's per-layer states
    for got, expected in zip(out_txt.hidden_states, ref_txt_states, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for got, expected in zip(out_img.hidden_states, ref_img_states, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_clip_injection_with_interaction_uses_task_prompts():
    base = tiny_clip("eager")
    reference = copy.deepcopy(base)
    model = wrap(base, num_tasks=2, prompt_depth=3, interaction=True)
    model.set_task(0)
    batch = random_batch("clip", 3, 8, pad_rows=[2])
    with torch.no_grad():
        prompts = model.task_prompts([0])
        ref_txt, _ = reference_clip_text(
            reference, prompts["text"].expand(3, -1, -1, -1), batch["input_ids"], batch["attention_mask"]
        )
        ref_img, _ = reference_clip_image(reference, prompts["vision"].expand(3, -1, -1, -1), batch["pixel_values"])
        img, txt = features(model, batch)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-5)


_ATTN_BUILDERS = {
    "clip": lambda attn: tiny_clip(attn),
    "siglip": lambda attn: tiny_siglip(attn),
    "vit_bert": lambda attn: tiny_vit_bert(attn),
}


@pytest.mark.parametrize("kind", KINDS)
def test_eager_and_sdpa_agree(kind):
    batch = random_batch(kind, 4, 8, pad_rows=[0, 2])
    outputs = []
    for attn in ("eager", "sdpa"):
        model = wrap(_ATTN_BUILDERS[kind](attn), num_tasks=2)
        model.set_task(1)
        outputs.append(features(model, batch))
    for got, expected in zip(outputs[0], outputs[1]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "vit_bert"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padding_does_not_change_caption_embedding(kind, attn):
    model = wrap(_ATTN_BUILDERS[kind](attn), num_tasks=1)
    batch = random_batch(kind, 3, 8, pad_rows=[1, 2])
    with torch.no_grad():
        padded = text_features(model, batch)
        for row in range(3):
            length = int(batch["attention_mask"][row].sum())
            alone = {k: v[row : row + 1, :length] for k, v in batch.items() if k != "pixel_values"}
            unpadded = text_features(model, alone)
            torch.testing.assert_close(padded[row : row + 1], unpadded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_prompts_change_outputs_and_hidden_states_keep_base_shapes(kind):
    base = TINY_BUILDERS[kind]()
    reference = copy.deepcopy(base)
    model = wrap(base)
    batch = random_batch(kind, 2, 8, pad_rows=[1])
    img, txt = features(model, batch)
    ref_img, ref_txt = features(reference, batch)
    # well above float noise (BERT's 0.02-std init makes the effect on its pooled text small but real)
    assert (img - ref_img).abs().max() > 1e-4 and (txt - ref_txt).abs().max() > 1e-4
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        ref = reference(**batch, output_hidden_states=True)
    for tower in ("vision_model_output", "text_model_output"):
        got, expected = getattr(out, tower).hidden_states, getattr(ref, tower).hidden_states
        assert len(got) == len(expected)
        assert [g.shape for g in got] == [e.shape for e in expected]
        torch.testing.assert_close(got[0], expected[0])  # embeddings: before any prompt


@pytest.mark.parametrize("kind", ["clip", "siglip"])  # VisionTextDualEncoderModel has no checkpointing support
def test_gradient_checkpointing_gives_same_loss_and_grads(kind):
    batch = random_batch(kind, 3, 8, pad_rows=[1])
    results = []
    for checkpointing in (False, True):
        base = TINY_BUILDERS[kind]()
        if checkpointing:
            base.gradient_checkpointing_enable()
        model = wrap(base, num_tasks=2)
        params = model.train_task(1)
        model.train()
        calls = []
        # a pre-hook inside the checkpointed forward (the non-reentrant recompute stops early, before post-hooks)
        query = base.text_model.encoder.layers[0].base_layer.self_attn.q_proj  # once per layer pass on either path
        hook = query.register_forward_pre_hook(lambda *args, calls=calls: calls.append(1))
        img, txt = image_features(model, batch), text_features(model, batch)
        loss = (img @ txt.T).logsumexp(-1).mean() + img.pow(2).mean()
        loss.backward()
        hook.remove()
        assert len(calls) == (2 if checkpointing else 1)  # checkpointing re-runs the prompted layer in backward
        results.append((loss.detach(), [p.grad.clone() for p in params]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for plain, checkpointed in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(plain, checkpointed, atol=1e-5, rtol=1e-4)
    assert base.is_gradient_checkpointing
