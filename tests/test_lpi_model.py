"""LPI as a PEFT method on tiny CLIP / SigLIP / ViT+BERT dual encoders, each behaviour against an independent
computation (reference injection written here, closed-form counts, explicit einsums, deep copies of the base)."""

from __future__ import annotations

import copy
import importlib
import os
from pathlib import Path

import pytest
import torch
from helpers import EOS_ID, TINY_BUILDERS, random_batch, tiny_clip, tiny_siglip, tiny_vit_bert
from peft import AutoPeftModel, PeftModel, get_peft_model, mapping
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import peft_lpi
from peft_lpi import LPIConfig, register_lpi
from peft_lpi.io import CheckpointError
from peft_lpi.tuner.factors import LPITaskFactors
from peft_lpi.tuner.layer import LPIPromptedLayer

KINDS = ("clip", "siglip", "vit_bert")
SMALL = dict(prompt_depth=2, prompt_length=3, rank=2)  # K, P, r of most tests


# ---------------------------------------------------------------------------------------------------- utilities
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)


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


# ================================================================================================== registration
def test_registration_is_idempotent_and_complete():
    importlib.reload(importlib.import_module("peft_lpi.tuner.registration"))
    import peft_lpi as again  # noqa: F401  (second import is a no-op)

    register_lpi()
    register_lpi()
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["LPI"].__name__ == "LPIConfig"
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["LPI"].__name__ == "LPIModel"
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING["LPI"] == "lpi_"
    assert list(mapping.PEFT_TYPE_TO_PREFIX_MAPPING.values()).count("lpi_") == 1
    model = wrap(tiny_clip())  # still works after re-registration
    assert model.peft_config["default"].peft_type == "LPI"


# ============================================================================================= config validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_tasks=0), "num_tasks"),
        (dict(num_tasks=-2), "num_tasks"),
        (dict(num_tasks=True), "num_tasks"),
        (dict(num_tasks=1.5), "num_tasks"),
        (dict(rank=0), "rank"),
        (dict(towers="audio"), "towers"),
        (dict(routing_metric="hamming"), "routing_metric"),
        (dict(format_version=99), "newer"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LPIConfig(**kwargs)


# ============================================================================================ parameter counts
def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", KINDS)
def test_closed_form_parameter_counts(kind):
    base = TINY_BUILDERS[kind]()
    dv, dw = widths(base)
    t, k, p, r = 3, 2, 3, 2
    plain = t * (k * r + 2 * p * r + (dv + dw) * r)
    model = wrap(copy.deepcopy(base), num_tasks=t, interaction=False)
    assert _trainable(model) == plain
    model = wrap(copy.deepcopy(base), num_tasks=t, interaction=False, share_layer_factor=False)
    assert _trainable(model) == plain + t * k * r
    model = wrap(copy.deepcopy(base), num_tasks=t, interaction=True)
    extended = t * (
        k * r + 2 * p * r + (dv + dw) * r + 2 * (k - 1) * r + (dv + 1 + dw) * r + (dw + 1 + dv) * r + 2 * (dv + dw)
    )
    assert _trainable(model) == extended
    model = wrap(copy.deepcopy(base), num_tasks=t, towers="vision")
    assert _trainable(model) == t * (k * r + p * r + dv * r)
    wrapped = {m.modality for m in model.modules() if isinstance(m, LPIPromptedLayer)}
    assert wrapped == {"vision"}


def test_depth_is_capped_at_tower_depth_with_warning():
    with pytest.warns(UserWarning, match="prompt_depth"):
        model = wrap(tiny_clip(layers=3), prompt_depth=10, interaction=False)
    assert model.peft_config["default"].prompt_depth == 3
    assert bank_of(model).depth == 3
    layers = [m for m in model.modules() if isinstance(m, LPIPromptedLayer)]
    assert sorted((m.modality, m.layer_index) for m in layers) == [(m, i) for m in ("text", "vision") for i in range(3)]


# ================================================================================================== CP prompts
@pytest.mark.parametrize("kind", KINDS)
def test_cp_prompts_match_independent_reconstruction(kind):
    model = wrap(TINY_BUILDERS[kind](), num_tasks=3, interaction=False)
    bank = bank_of(model)
    prompts = model.task_prompts([0, 1, 2])
    for modality in ("vision", "text"):
        expected = torch.stack([cp_prompts(bank.tasks[t], modality) for t in range(3)])
        torch.testing.assert_close(prompts[modality], expected, rtol=1e-5, atol=1e-6)
        assert prompts[modality].shape == (3, 2, 3, bank.hidden_sizes[modality])
    for task in bank.tasks:  # the layer factor is one object shared by both modalities
        assert task.layer_factor_of("vision") is task.layer_factor_of("text")
    unshared = bank_of(wrap(TINY_BUILDERS[kind](), share_layer_factor=False, interaction=False)).tasks[0]
    assert unshared.layer_factor_of("vision") is not unshared.layer_factor_of("text")


def test_correlation_module_matches_materialised_maps():
    model = wrap(tiny_clip(), num_tasks=2, prompt_depth=3, interaction=True)
    task = bank_of(model).tasks[1]
    corr = task.correlation
    v, w = cp_prompts(task, "vision"), cp_prompts(task, "text")
    r, a = task.rank, corr.alpha

    def mapped(src, layer, inp, out, lay):  # [src, 1] @ W(l), W(l) = (1/r) sum_k L[l,k] In[:,k] Out[:,k]^T
        weight = torch.einsum("k,ik,ok->io", layer[lay - 1], inp, out) / r
        return torch.cat([src[lay], torch.ones(src.shape[1], 1)], dim=-1) @ weight

    got = model.task_prompts([1])
    torch.testing.assert_close(got["vision"][0, 0], v[0])
    torch.testing.assert_close(got["text"][0, 0], w[0])
    for lay in range(1, 3):
        new_w = corr.text_norm((1 - a) * w[lay] + a * mapped(v, corr.v2t_layer, corr.v2t_in, corr.v2t_out, lay))
        new_v = corr.vision_norm((1 - a) * v[lay] + a * mapped(w, corr.t2v_layer, corr.t2v_in, corr.t2v_out, lay))
        torch.testing.assert_close(got["text"][0, lay], new_w, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["vision"][0, lay], new_v, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("interaction", [True, False])
def test_vision_factor_reaches_text_prompts_only_through_interaction(interaction):
    model = wrap(tiny_clip(), num_tasks=3, interaction=interaction)
    before = {k: v.clone() for k, v in model.task_prompts([0, 1, 2]).items()}
    with torch.no_grad():
        bank_of(model).tasks[1].hidden_factors["vision"].add_(1.0)
    after = model.task_prompts([0, 1, 2])
    assert not torch.equal(before["vision"][1], after["vision"][1])
    for other in (0, 2):
        assert torch.equal(before["text"][other], after["text"][other])
        assert torch.equal(before["vision"][other], after["vision"][other])
    assert torch.equal(before["text"][1, 0], after["text"][1, 0])  # layer 0 is never coupled
    assert torch.equal(before["text"][1], after["text"][1]) != interaction


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


# ============================================================================================== trainability
@pytest.mark.parametrize("kind", KINDS)
def test_only_lpi_parameters_are_trainable(kind):
    model = wrap(TINY_BUILDERS[kind](), num_tasks=2)
    for name, param in model.named_parameters():
        assert param.requires_grad == ("lpi_prompts" in name), name
    batch = random_batch(kind, 2, 8)
    img, txt = image_features(model, batch), text_features(model, batch)
    (img.sum() + txt.sum()).backward()
    for name, param in model.named_parameters():
        if "lpi_prompts" in name and ".tasks.0." in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        elif "lpi_prompts" not in name:
            assert param.grad is None, name


# ========================================================================================= mixed-task batches
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_task_batch_equals_per_sample(kind, monkeypatch):
    model = wrap(TINY_BUILDERS[kind](), num_tasks=3)
    batch = random_batch(kind, 4, 8, pad_rows=[1])
    tasks = torch.tensor([0, 2, 1, 2])
    calls = []
    original = LPITaskFactors.forward

    def counting(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(LPITaskFactors, "forward", counting)
    model.set_task(tasks)
    img, txt = features(model, batch)
    # Each distinct task is computed once; under no_grad the second tower pass reuses the cached prompts.
    assert len(calls) == 3 and len({id(c) for c in calls}) == 3
    calls.clear()
    image_features(model, batch), text_features(model, batch)  # with grad enabled
    assert len(calls) == 2 * 3  # with grad: once per distinct task per tower pass, no cache
    monkeypatch.setattr(LPITaskFactors, "forward", original)
    for row, task in enumerate(tasks.tolist()):
        model.set_task(task)
        one = {k: v[row : row + 1] for k, v in batch.items()}
        alone_img, alone_txt = features(model, one)
        torch.testing.assert_close(img[row : row + 1], alone_img, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(txt[row : row + 1], alone_txt, atol=1e-5, rtol=1e-5)


def test_auto_routing_matches_explicit_per_sample_tasks():
    model = wrap(tiny_clip(), num_tasks=3)
    batch = random_batch("clip", 3, 8, pad_rows=[2])
    with torch.no_grad(), model.prompts_disabled():
        img, txt = features(model, batch)
    img, txt = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
    # sample i's prompt-free features are the key of task truth[i]; image and caption routes are independent
    truth_img, truth_txt = torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])
    for task in range(3):
        model.set_task_keys(task, vision=img[truth_img == task], text=txt[truth_txt == task])
    model.set_task("auto")
    with torch.no_grad():
        auto = model(**batch)  # PeftModel.forward routes both modalities
        assert torch.equal(model.base_model.last_routes["vision"], truth_img)
        assert torch.equal(model.base_model.last_routes["text"], truth_txt)
        auto_img, auto_txt = features(model, batch)  # feature methods route their own modality
        assert torch.equal(model.base_model.last_routes["text"], truth_txt)
    model.set_task(truth_img)
    explicit_img = features(model, batch)[0]
    model.set_task(truth_txt)
    explicit_txt = features(model, batch)[1]
    assert torch.equal(auto_img, explicit_img) and torch.equal(auto_txt, explicit_txt)
    torch.testing.assert_close(auto.image_embeds, torch.nn.functional.normalize(explicit_img, dim=-1))
    torch.testing.assert_close(auto.text_embeds, torch.nn.functional.normalize(explicit_txt, dim=-1))


def test_auto_routing_needs_keys():
    model = wrap(tiny_clip(), num_tasks=2)
    with pytest.raises(ValueError, match="keys"):
        model.set_task("auto")


def test_wrapped_layer_accepts_keyword_hidden_states_when_disabled():
    model = wrap(tiny_clip(), num_tasks=1)
    layer = model.base_model.model.vision_model.encoder.layers[0]
    hidden = torch.randn(2, 5, 48)
    with torch.no_grad():
        prompted = layer(hidden_states=hidden, attention_mask=None)
        with model.disable_adapter():
            plain = layer(hidden_states=hidden, attention_mask=None)
        expected = layer.base_layer(hidden, None)
    assert torch.equal(plain, expected) and not torch.allclose(prompted, expected)


def test_task_selection_errors():
    model = wrap(tiny_clip(), num_tasks=3)
    batch = random_batch("clip", 4, 8)
    model.set_task(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="3 per-sample task ids .* 4 samples"):
        image_features(model, batch)
    with pytest.raises(TypeError, match="integer"):
        model.set_task(torch.tensor([0.0, 1.0, 1.0, 0.0]))
    with pytest.raises(IndexError, match="out of range"):
        model.set_task(torch.tensor([0, 3, 1, 0]))
    with pytest.raises(IndexError, match="out of range"):
        model.set_task(torch.tensor([0, -1, 1, 0]))
    with pytest.raises(IndexError, match="out of range"):
        model.set_task(3)
    with pytest.raises(ValueError, match="auto"):
        model.set_task("automatic")
    with pytest.raises(TypeError):
        model.set_task(1.0)


# ===================================================================================== train_task / add_task
def _sgd_step(model, params, batch, kind="clip"):
    optimizer = torch.optim.SGD(params, lr=0.5)
    img, txt = image_features(model, batch), text_features(model, batch)
    (img @ txt.T).diagonal().sum().neg().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_train_task_changes_only_that_task():
    model = wrap(tiny_clip(), num_tasks=3)
    bank = bank_of(model)
    before = [{k: v.clone() for k, v in task.state_dict().items()} for task in bank.tasks]
    params = model.train_task(1)
    assert {id(p) for p in params} == {id(p) for p in bank.tasks[1].parameters()}
    assert all(not p.requires_grad for t in (0, 2) for p in bank.tasks[t].parameters())
    _sgd_step(model, [p for p in model.parameters() if p.requires_grad], random_batch("clip", 3, 8))
    for t, task in enumerate(bank.tasks):
        changed = [not torch.equal(before[t][k], v) for k, v in task.state_dict().items()]
        if t == 1:
            assert all(changed)
        else:
            assert not any(changed)


def test_add_task_grows_and_trains():
    model = wrap(tiny_clip(), num_tasks=2)
    model.set_task_keys(0, vision=torch.randn(5, 16), text=torch.randn(5, 16))
    new = model.add_task()
    assert new == 2 and model.num_tasks == 3 and model.peft_config["default"].num_tasks == 3
    bank = bank_of(model)
    assert bank.vision_keys.shape[0] == 3 and bank.has_keys.tolist() == [True, False, False]
    before = {k: v.clone() for k, v in bank.tasks[new].state_dict().items()}
    old = {k: v.clone() for k, v in bank.tasks[0].state_dict().items()}
    params = model.train_task(new)
    _sgd_step(model, params, random_batch("clip", 3, 8))
    assert all(not torch.equal(before[k], v) for k, v in bank.tasks[new].state_dict().items())
    assert all(torch.equal(old[k], v) for k, v in bank.tasks[0].state_dict().items())


# ============================================================================================ PEFT behaviour
@pytest.mark.parametrize("kind", KINDS)
def test_disable_adapter_and_unload_give_base_outputs(kind):
    base = TINY_BUILDERS[kind]()
    # frozen like the wrapped base: SigLIP's nn.MultiheadAttention pooling head takes another (fast) kernel path
    # when no parameter requires grad, which differs from the slow path in the last bits
    reference = copy.deepcopy(base).requires_grad_(False)
    model = wrap(base, num_tasks=2)
    batch = random_batch(kind, 3, 8, pad_rows=[2])
    ref_img, ref_txt = features(reference, batch)
    with model.disable_adapter():
        img, txt = features(model, batch)
    assert torch.equal(img, ref_img) and torch.equal(txt, ref_txt)
    img, _ = features(model, batch)
    assert not torch.allclose(img, ref_img)  # prompts back on after the context
    unloaded = model.unload()
    assert not any(isinstance(m, LPIPromptedLayer) for m in unloaded.modules())
    img, txt = features(unloaded, batch)
    assert torch.equal(img, ref_img) and torch.equal(txt, ref_txt)


def test_merge_and_unload_raises():
    model = wrap(tiny_clip())
    with pytest.raises(ValueError, match="merge"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="merge"):
        model.merge_adapter()


def test_add_set_delete_adapter(tmp_path):
    base = tiny_clip("eager")
    reference = copy.deepcopy(base)
    model = wrap(base, num_tasks=2, interaction=False)
    batch = random_batch("clip", 3, 8, pad_rows=[1])
    default_img, default_txt = features(model, batch)
    torch.manual_seed(5)
    model.add_adapter("other", LPIConfig(num_tasks=1, prompt_depth=3, prompt_length=2, rank=3, interaction=False))
    assert features(model, batch)[0].equal(default_img)  # adding does not activate
    model.set_adapter("other")
    img, txt = features(model, batch)
    img_other = img
    factors = bank_of(model, "other").tasks[0]
    with torch.no_grad():
        pv, pw = (cp_prompts(factors, m).expand(3, -1, -1, -1) for m in ("vision", "text"))
        ref_img, _ = reference_clip_image(reference, pv, batch["pixel_values"])
        ref_txt, _ = reference_clip_text(reference, pw, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-5)
    model.set_adapter("default")
    img, txt = features(model, batch)
    assert torch.equal(img, default_img) and torch.equal(txt, default_txt)
    model.set_adapter("other")
    model.save_pretrained(tmp_path)  # a non-default adapter goes to <dir>/<name>/, keys without the name
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "other", adapter_name="again")
    assert torch.equal(features(reloaded, batch)[0], img_other)
    model.delete_adapter("other")
    assert "other" not in model.peft_config and "other" not in model.base_model.lpi_prompts
    assert model.active_adapters == ["default"]
    img, txt = features(model, batch)
    assert torch.equal(img, default_img) and torch.equal(txt, default_txt)


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_round_trip(kind, tmp_path):
    base = TINY_BUILDERS[kind]()
    pristine = copy.deepcopy(base)
    model = wrap(base, num_tasks=3)
    key_width = bank_of(model).vision_keys.shape[-1]  # projection dim (CLIP, ViT+BERT) or hidden size (SigLIP)
    model.set_task_keys(1, vision=torch.randn(5, key_width), text=torch.randn(2, key_width))
    model.set_task(torch.tensor([2, 1, 0]))
    batch = random_batch(kind, 3, 8, pad_rows=[1])
    expected = features(model, batch)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all("default" not in k for k in keys)
    assert any(k.endswith("vision_keys") for k in keys) and any(k.endswith("has_keys") for k in keys)

    for name, low_memory in (("default", False), ("renamed", False), ("default", True)):
        loaded = PeftModel.from_pretrained(
            copy.deepcopy(pristine), tmp_path, adapter_name=name, low_cpu_mem_usage=low_memory
        )
        assert not any(p.is_meta for p in loaded.parameters())
        loaded.set_task(torch.tensor([2, 1, 0]))
        for got, exp in zip(features(loaded, batch), expected, strict=True):
            assert torch.equal(got, exp)
        for key in ("vision_keys", "text_keys", "has_keys"):
            assert torch.equal(getattr(bank_of(loaded), key).nan_to_num(), getattr(bank_of(model), key).nan_to_num())
        assert loaded.base_model.num_tasks == 3

    # load_adapter under another name onto a model that already has an adapter
    other = wrap(copy.deepcopy(pristine), seed=7, num_tasks=3)
    other.load_adapter(tmp_path, adapter_name="second")
    other.set_adapter("second")
    other.set_task(torch.tensor([2, 1, 0]))
    for got, exp in zip(features(other, batch), expected, strict=True):
        assert torch.equal(got, exp)


def test_auto_peft_model_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    base = tiny_clip()
    base.save_pretrained(tmp_path / "base")
    base.name_or_path = str(tmp_path / "base")
    model = wrap(base, num_tasks=2)
    assert model.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")
    model.set_task(1)
    batch = random_batch("clip", 2, 8)
    expected = features(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModel.from_pretrained(tmp_path / "adapter")
    loaded.eval()
    loaded.set_task(1)
    for got, exp in zip(features(loaded, batch), expected, strict=True):
        torch.testing.assert_close(got, exp, atol=0, rtol=0)


# ========================================================================================== task files
def _task_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_save_and_load_task_round_trip(tmp_path):
    model = wrap(tiny_clip(), num_tasks=3)
    model.set_task_keys(1, vision=torch.randn(5, 16), text=torch.randn(5, 16))
    path = tmp_path / "task1.safetensors"
    model.save_task(1, path)
    metadata = _task_metadata(path)
    for field in (
        "format",
        "format_version",
        "library_version",
        "model_type",
        "towers",
        "vision_hidden_size",
        "text_hidden_size",
        "rank",
        "prompt_length",
        "prompt_depth",
        "share_layer_factor",
        "interaction",
    ):
        assert field in metadata, field
    assert metadata["model_type"] == "clip" and metadata["rank"] == "2" and metadata["vision_hidden_size"] == "48"
    assert metadata["library_version"] == peft_lpi.__version__
    expected = {k: v.clone() for k, v in model.task_prompts([1]).items()}
    keys = bank_of(model).vision_keys[1].clone()
    with torch.no_grad():  # scramble task 1, then restore it from the file
        for p in bank_of(model).tasks[1].parameters():
            p.add_(1.0)
        bank_of(model).vision_keys[1] = 0.0
        bank_of(model).has_keys[1] = False
    assert model.load_task(1, path) == 1
    for modality, value in model.task_prompts([1]).items():
        assert torch.equal(value, expected[modality])
    assert torch.equal(bank_of(model).vision_keys[1], keys) and bool(bank_of(model).has_keys[1])


@pytest.mark.parametrize(
    "make_other, field",
    [
        (lambda: wrap(tiny_clip(), num_tasks=1, rank=3), "rank"),
        (lambda: wrap(tiny_clip(), num_tasks=1, prompt_length=4), "prompt_length"),
        (lambda: wrap(tiny_clip(), num_tasks=1, prompt_depth=1), "prompt_depth"),
        (lambda: wrap(tiny_clip(vision_hidden=64), num_tasks=1), "vision_hidden_size"),
        (lambda: wrap(tiny_clip(text_hidden=48), num_tasks=1), "text_hidden_size"),
        (lambda: wrap(tiny_siglip(hidden=32), num_tasks=1), "model_type"),
        (lambda: wrap(tiny_clip(), num_tasks=1, towers="vision"), "towers"),
    ],
)
def test_incompatible_task_file_is_refused(tmp_path, make_other, field):
    other = make_other()
    path = tmp_path / "foreign_task.safetensors"
    other.save_task(0, path)
    target = wrap(tiny_clip(vision_hidden=32) if field == "model_type" else tiny_clip(), num_tasks=2)
    before = snapshot(target)
    for task in (0, None):
        with pytest.raises(CheckpointError, match=field):
            target.load_task(task, path)
    assert target.base_model.num_tasks == 2
    assert_same_state(before, target)


def test_corrupt_truncated_and_foreign_task_files_are_refused(tmp_path):
    model = wrap(tiny_clip(), num_tasks=2)
    good = tmp_path / "good.safetensors"
    model.save_task(0, good)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(64))
    truncated = tmp_path / "truncated.safetensors"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    header_only = tmp_path / "header_cut.safetensors"
    header_only.write_bytes(data[:20])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.randn(3, 3)}, str(foreign), metadata={"format": "pt"})
    before = snapshot(model)
    for path, match in (
        (garbage, "not a readable"),
        (truncated, "not a readable"),
        (header_only, "not a readable"),
        (foreign, "not a peft_lpi task file"),
        (tmp_path / "missing.safetensors", "does not exist"),
    ):
        for task in (1, None):
            with pytest.raises(CheckpointError, match=match):
                model.load_task(task, path)
        assert model.base_model.num_tasks == 2
        assert_same_state(before, model)


def test_task_file_with_wrong_tensors_is_refused(tmp_path):
    model = wrap(tiny_clip(), num_tasks=2)
    path = tmp_path / "t.safetensors"
    model.save_task(0, path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors.pop("factors.layer_factor")
    save_file(tensors, str(path), metadata=metadata)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        model.load_task(None, path)
    assert_same_state(before, model)


def test_import_task_appends_copy_of_source_task(tmp_path):
    base = tiny_clip()
    source = wrap(copy.deepcopy(base), seed=1, num_tasks=3)
    source.set_task_keys(2, vision=torch.randn(5, 16), text=torch.randn(5, 16))
    source.save_task(2, tmp_path / "t2.safetensors")
    target = wrap(copy.deepcopy(base), seed=2, num_tasks=1)
    old = snapshot(target)
    new = target.import_task(tmp_path / "t2.safetensors")
    assert new == 1 and target.base_model.num_tasks == 2 and target.peft_config["default"].num_tasks == 2
    for modality, value in target.task_prompts([1]).items():
        assert torch.equal(value, source.task_prompts([2])[modality])
    assert torch.equal(bank_of(target).text_keys[1], bank_of(source).text_keys[2])
    assert bank_of(target).has_keys.tolist() == [False, True]
    for key, value in old.items():  # task 0 untouched
        if ".tasks.0." in key:
            assert torch.equal(value, target.state_dict()[key])
    batch = random_batch("clip", 2, 8)
    source.set_task(2)
    target.set_task(1)
    for got, exp in zip(features(target, batch), features(source, batch), strict=True):
        assert torch.equal(got, exp)


def test_atomic_task_save(tmp_path, monkeypatch):
    model = wrap(tiny_clip(), num_tasks=2)
    path = tmp_path / "task.safetensors"
    model.save_task(0, path)
    expected = {k: v.clone() for k, v in model.task_prompts([0]).items()}

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("disk went away mid-write")

    import peft_lpi.io

    monkeypatch.setattr(peft_lpi.io, "save_file", failing_save)
    with torch.no_grad():
        bank_of(model).tasks[0].token_factors["vision"].add_(1.0)
    with pytest.raises(RuntimeError, match="mid-write"):
        model.save_task(0, path)
    assert sorted(os.listdir(tmp_path)) == ["task.safetensors"]
    monkeypatch.undo()
    fresh = wrap(tiny_clip(), seed=3, num_tasks=1)
    fresh.load_task(0, path)
    for modality, value in fresh.task_prompts([0]).items():
        assert torch.equal(value, expected[modality])


# ================================================================================================ bad models
def test_plain_bert_is_refused_with_a_clear_message():
    from transformers import BertConfig, BertModel

    bert = BertModel(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=16,
        )
    )
    with pytest.raises(ValueError, match="layer_paths") as info:
        get_peft_model(bert, LPIConfig(**SMALL))
    message = str(info.value)
    assert "vision" in message and "BertModel" in message and "vision_model" in message


class _CustomDualEncoder(nn.Module):
    """A dual encoder whose towers sit under names no lookup knows."""

    def __init__(self, clip):
        super().__init__()
        self.image_tower, self.caption_tower = clip.vision_model, clip.text_model


def test_layer_paths_override(tmp_path):
    clip = tiny_clip()
    custom = _CustomDualEncoder(copy.deepcopy(clip))
    with pytest.raises(ValueError, match="layer_paths"):
        get_peft_model(copy.deepcopy(custom), LPIConfig(**SMALL))
    paths = {"vision": "image_tower.encoder.layers", "text": "caption_tower.encoder.layers"}
    model = wrap(custom, layer_paths=paths, text_causal=True, num_tasks=2)
    reference = wrap(clip, num_tasks=2)
    # same factors; keys differ in width (no projection_dim in a config-less model: hidden sizes are used)
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if ".tasks." in k}, strict=False)
    assert bank_of(model).hidden_sizes == {"vision": 48, "text": 32}
    batch = random_batch("clip", 3, 8, pad_rows=[1])
    model.set_task(1)
    reference.set_task(1)
    with torch.no_grad():
        inner = model.base_model.model
        got = inner.caption_tower(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
        exp = reference.base_model.model.text_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).pooler_output
        torch.testing.assert_close(got, exp, atol=0, rtol=0)
        got = inner.image_tower(pixel_values=batch["pixel_values"]).pooler_output
        exp = reference.base_model.model.vision_model(pixel_values=batch["pixel_values"]).pooler_output
        torch.testing.assert_close(got, exp, atol=0, rtol=0)
