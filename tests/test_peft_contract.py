"""PEFT's own generic contract, checked against LPI on tiny CLIP and SigLIP with 1 and 2 tasks.

Each `test_*` below ports one generic check of the huggingface/peft test suite (read from the repository, commit
0000e79d): `tests/testing_common.py` (`PeftCommonTester._test_*`, cited as "common: _test_x") and
`tests/test_custom_models.py` (`TestPeftCustomModel.test_*`, cited as "custom: test_x"; its generic classes
`TestRequiresGrad`, `TestMultipleActiveAdapters`, `TestDefaultTargetModules`, `TestPeftFsdpStateDict` by class name;
the whole file, 356,732 characters at that commit, was read). The checks run on the
adapter as a user gets it from `get_peft_model(model, LPIConfig(...))`; where LPI differs from LoRA on purpose the
port says how (e.g. LPI prompts are not an identity at initialisation, so "disabled" is compared with the base
model, as PEFT does for PaRa). The LPI-specific half of the contract follows: exactly one trainable task, PEFT calls
that never unfreeze a finished task, the status helpers, `peft_type`, finite routing keys and old NaN-key adapters,
and a 2-process DDP step with default settings in a user's own loop.

PEFT checks that cannot apply to LPI (a prompt method on a dual encoder), with the reason:

| PEFT check | why it does not apply |
| --- | --- |
| common: _test_merge_layers, _test_merge_layers_fp16, _test_merge_layers_nan, _test_merge_layers_multi, _test_merge_layers_is_idempotent, _test_safe_merge, _test_safe_merge_broken_adapter_leaves_base_layer_unchanged, _test_safe_merge_non_finite_bias_leaves_base_layer_unchanged; custom: test_disable_adapters_with_merging, the merge half of test_forward_float16 / test_forward_bfloat16 / *_no_autocast | prompts are extra tokens, not weight deltas: there is nothing to merge (merge_adapter / merge_and_unload raise a ValueError saying so, tested in test_merge_raises_clearly) |
| common: _test_generate, _test_generate_pos_args, _test_generate_half_prec, _test_generate_with_mixed_adapter_batches_and_beam_search | CLIP / SigLIP have no generate() |
| common: _test_mixed_adapter_batches | `adapter_names=` per sample is LoRA / RoAD only; LPI mixes *tasks* per sample (set_task(LongTensor)) inside one adapter |
| common: _test_prepare_for_training, _test_passing_input_embeds_works | need get_input_embeddings() / inputs_embeds on the PeftModel; a dual encoder has two towers and CLIPModel.forward takes no inputs_embeds |
| common: _test_weighted_combination_of_adapters, _test_adding_multiple_adapters_with_bias_raises | LoRA / IA3 only (add_weighted_adapter, `bias=`) |
| common: _test_training_layer_indexing | `layers_to_transform` is a LoRA-family option; LPI's depth is `prompt_depth` |
| common: _test_lora_conversion | convert_to_lora needs weight deltas; supports_lora_conversion() is False for LPI |
| common: _test_training_prompt_learning_tasks | only for PEFT's closed list of prompt-learning configs (prompt_encoder); LPI is a BaseTuner |
| custom: test_active_adapter (the "both adapters active" half), test_set_adapter_non_overlapping_modules*, test_multiple_active_adapters_* | LPI activates one adapter at a time (its tasks live inside one adapter); set_adapter([a, b]) raises a ValueError, tested |
| custom: test_in_features_out_features_exposed | LPI wraps whole encoder layers, not Linear / Conv layers |
| custom: test_add_adapter_rejects_duplicate_name_without_mutation with mixed=True | LPI is not mixed-compatible: get_peft_model(..., mixed=True) raises PEFT's ValueError, tested |
| custom: test_disable_adapter_with_bias_warns; TestPeftFsdpStateDict.test_save_load_roundtrip_fsdp_wrapped_learnable_bias | LoRA / BOFT `bias=` only |
| custom: test_delete_adapter_multiple_adapters_with_modules_to_save, test_delete_adapter_fallback_with_modules_to_save_becomes_trainable, test_multiple_adapters_automatic_modules_to_save, test_multiple_adapters_mixed_modules_to_save, test_multiple_adapters_mixed_modules_to_save_order_switched, test_multiple_adapters_no_needless_copy_modules_to_save, test_ignore_mismatched_sizes_with_scalar_modules_to_save, test_loading_model_with_modules_to_save_requires_grad_set_correctly; TestRequiresGrad.test_requires_grad_modules_to_save_default / _disabling / _multiple_adapters (the modules_to_save half of test_requires_grad_follows_inference_mode_modules_to_save is ported without it) | LPIConfig has no `modules_to_save` (no base module is copied or trained; LPIConfig(modules_to_save=...) is a TypeError) |
| custom: test_delete_adapter_multiple_adapters_with_trainable_token_indices, test_set_requires_grad_trainable_tokens, test_loading_model_with_trainble_tokens_requires_grad_set_correctly; TestRequiresGrad.test_requires_grad_follows_inference_mode_trainable_token_indices | `trainable_token_indices` / TrainableTokens: LoRA options and a PEFT method, not LPI's |
| custom: test_multiple_adapters_mixed_modules_to_save_merging_adapters, test_multiple_adapters_same_modules_to_save_merging_adapters_raises, test_multiple_adapters_seq_cls_mixed_modules_to_save_merging_adapters, test_add_weighted_adapter_cat_with_rank_pattern, test_add_weighted_adapter_negative_weight_negates_adapter, test_add_weighted_adapter_with_rslora_identity_single_adapter, test_add_weighted_adapter_with_rslora_identity_two_adapters, test_add_weighted_adapter_subtraction_with_negative_weights, test_add_weighted_adapter_with_different_scaling | add_weighted_adapter (LoRA / IA3 ...) combines weight deltas; LPI has none |
| custom: test_save_pretrained_targeting_lora_to_embedding_layer, test_save_pretrained_targeting_lora_to_embedding_layer_non_transformers, test_save_embedding_layers_excludes_similarly_named_sibling, test_load_does_not_overwrite_similarly_named_sibling, test_load_resized_embedding_ignore_mismatched_sizes (as written: LoRA on an embedding; ported adapted, see test_load_into_resized_base_ignore_mismatched_sizes) | save_embedding_layers saves modules named embed_tokens / lm_head when target_modules name them; LPI targets no embedding and CLIP / SigLIP have no such modules |
| custom: test_weight_bias_attributes, test_gpt2_dora_merge_and_unload, test_gpt2_dora_merge_and_unload_safe_merge, test_dora_save_and_load_remapping, test_unload_adapter_multihead_attention, test_mha_gradients_set_correctly, test_gralora_and_hybrid_gralora_parameter_count, test_monteclora_variational_loss_computation(_eval_mode), test_pvera_reproducible, test_pvera_generator_is_per_adapter, test_pvera_no_generator_seed_means_no_generator; TestMultiRankAdapter.*; TestLayerRepr.*; TestDynamicDispatch.*; TestDefaultTargetModules.test_default_target_modules_not_set_model_type_set_raises / _list_of_str / _str / _osf | method-specific: LoRA layers (weight / bias attributes, DoRA, MultiheadAttention, rank_pattern, reprs, custom-module dispatch), GraLoRA, MonteCLoRA, PVeRA, and the `target_modules` default mappings (LPI has no target_modules; its not-a-dual-encoder error is ported) |
| TestMultipleActiveAdapters.test_multiple_active_adapters_forward, test_multiple_active_adapters_merge_and_unmerge, the merge half of test_merge_layers_multi, test_sequential_merge_matches_batch_merge, test_unmerge_after_sequential_merge_restores_base, test_multiple_active_dora_adapters_merge_matches_forward, test_plain_lora_and_dora_adapters_merge_matches_forward, test_multiple_active_dora_adapters_safe_and_unsafe_merge_agree | more than one active adapter and merging (see the rows above); the switching half of test_merge_layers_multi is ported |
| TestMixedAdapterBatches.* (test_mixed_adapter_batches_mlp, _different_target_layers, _multiple_modules_to_save, _unsupported_layer_raises, _partly_overlapping_target_layers, _lora_conv1d_emb, _lora_conv1d_emb_multiple_modules_to_save, _lora_conv2d, _mha_raises, _length_mismatch_raises, _training_mode_raises, _disabled, _merged_raises, _lora_wrong_adapter_name_raises, _lora_with_dora_raises, _lora_with_dora_but_dora_not_included_works, _lora_opt_timing) | `adapter_names=` per sample is LoRA / RoAd / GLoRA only (LPI mixes tasks per sample inside one adapter) |
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from helpers import random_batch, tiny_clip, tiny_siglip
from peft import (
    PeftModel,
    get_base_model_state_dict,
    get_layer_status,
    get_model_status,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_base_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn

from peft_lpi import LPIConfig
from peft_lpi.tuner.config import LPIPeftType
from peft_lpi.tuner.layer import LPIPromptedLayer

KINDS = ("clip", "siglip")
NUM_TASKS = (1, 2)
SMALL = dict(prompt_depth=2, prompt_length=3, rank=2)
BUILDERS = {"clip": lambda **kw: tiny_clip(layers=2, **kw), "siglip": lambda **kw: tiny_siglip(layers=2, **kw)}
CASES = [pytest.param(kind, n, id=f"{kind}-T{n}") for kind in KINDS for n in NUM_TASKS]


# ---------------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def base_model(kind: str, dtype: torch.dtype | None = None) -> nn.Module:
    """A tiny random model named like a hub checkpoint (PEFT's checks compare it with the saved config and card)."""
    model = BUILDERS[kind]()
    model.name_or_path = model.config._name_or_path = f"tiny-random-{kind}"
    return model.to(dtype) if dtype is not None else model


def config(num_tasks: int, **kwargs) -> LPIConfig:
    return LPIConfig(**{**SMALL, "num_tasks": num_tasks, **kwargs})


def wrap(kind: str, num_tasks: int, seed: int = 0, **kwargs) -> PeftModel:
    base = base_model(kind)
    torch.manual_seed(seed)
    return get_peft_model(base, config(num_tasks, **kwargs))


def inputs(kind: str, batch: int = 3) -> dict[str, torch.Tensor]:
    return random_batch(kind, batch, 8, pad_rows=[1])


def embeds(model: nn.Module, X: dict) -> torch.Tensor:
    """Both towers' outputs of one forward: (B, 2 * D) image and text embeddings side by side."""
    out = model(**X)
    return torch.cat([out.image_embeds, out.text_embeds], dim=-1)


def training_loss(model: nn.Module, X: dict) -> torch.Tensor:
    return model(**X).logits_per_image.sum()


def lpi_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lpi_prompts" in k}


def bank(model: PeftModel, adapter: str = "default"):
    return model.base_model.lpi_prompts[adapter]


def task_requires_grad(model: PeftModel, adapter: str = "default") -> list[bool | str]:
    """Per task: True / False when all its factors agree, "mixed" otherwise."""
    flags = []
    for task in bank(model, adapter).tasks:
        values = {p.requires_grad for p in task.parameters()}
        flags.append(values.pop() if len(values) == 1 else "mixed")
    return flags


def one_task_size(model: PeftModel, adapter: str = "default") -> int:
    return sum(p.numel() for p in bank(model, adapter).tasks[0].parameters())


def check_modelcard(tmp_dirname: str | Path, model: PeftModel) -> None:
    """common: check_modelcard (library_name, base_model) plus the .value the LoRA tag check reads."""
    readme = (Path(tmp_dirname) / "README.md").read_text(encoding="utf-8")
    dct = yaml.safe_load(re.search(r"---\n(.*?)\n---", readme, re.DOTALL).group(1))
    assert dct["library_name"] == "peft"
    assert dct["base_model"] == model.config.to_dict()["_name_or_path"]
    assert model.active_peft_config.peft_type.value == "LPI"


def check_config_json(tmp_dirname: str | Path, model: PeftModel) -> None:
    """common: check_config_json."""
    saved = json.loads((Path(tmp_dirname) / "adapter_config.json").read_text(encoding="utf-8"))
    assert saved["base_model_name_or_path"] == model.config.to_dict()["_name_or_path"]
    assert saved["peft_type"] == "LPI"


def sgd_steps(model: PeftModel, X: dict, steps: int = 3, lr: float = 0.5) -> None:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        training_loss(model, X).backward()
        optimizer.step()
    model.eval()


# ======================================================================================= PEFT's generic checks
@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_model_attr_and_adapter_name(kind, num_tasks):
    """common: _test_model_attr, _test_adapter_name."""
    model = wrap(kind, num_tasks)
    assert all(hasattr(model, name) for name in ("save_pretrained", "from_pretrained", "push_to_hub"))
    named = get_peft_model(base_model(kind), config(num_tasks), adapter_name="test-adapter")
    assert any("test-adapter" in n for n, _ in named.named_parameters())


@pytest.mark.parametrize("safe_serialization", [True, False])
@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_save_pretrained(kind, num_tasks, safe_serialization, tmp_path):
    """common: _test_save_pretrained (every tensor of the state dict allclose after a reload, no missing-keys
    warning, the right files, model card and config)."""
    model = wrap(kind, num_tasks)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    with warnings.catch_warnings(record=True) as recs:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(base_model(kind), tmp_path)
    assert not any("Found missing adapter keys" in str(rec.message) for rec in recs)
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.allclose(before[key].float(), after[key].float()), key  # NaN anywhere would fail here
    target = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    assert (tmp_path / target).exists() and (tmp_path / "adapter_config.json").exists()
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "config.json").exists()
    check_modelcard(tmp_path, model)
    check_config_json(tmp_path, model)


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_save_pretrained_selected_adapters_and_name_substrings(kind, num_tasks, tmp_path):
    """common: _test_save_pretrained_selected_adapters, _test_save_pretrained_adapter_name_substring,
    _test_load_multiple_adapters (no missing keys)."""
    model = wrap(kind, num_tasks)
    expected_number_of_weights = len(get_peft_model_state_dict(model))
    model.add_adapter("new_adapter", config(num_tasks))
    model.save_pretrained(tmp_path / "both")
    loaded = PeftModel.from_pretrained(base_model(kind), tmp_path / "both")
    result = loaded.load_adapter(tmp_path / "both" / "new_adapter", "new_adapter")
    assert result.missing_keys == []
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k]) for k in before)
    model.save_pretrained(tmp_path / "one", selected_adapters=["default"])
    only = PeftModel.from_pretrained(base_model(kind), tmp_path / "one")
    assert "default" in only.peft_config and "new_adapter" not in only.peft_config
    for name in ("default2", "other_default", "foodefault_bar", "efaul"):
        model.add_adapter(name, config(num_tasks))
    model.save_pretrained(tmp_path / "sub", selected_adapters=["default"])
    assert len(load_file(str(tmp_path / "sub" / "adapter_model.safetensors"))) == expected_number_of_weights


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_from_pretrained_config_construction(kind, num_tasks, tmp_path):
    """common: _test_from_pretrained_config_construction."""
    model = wrap(kind, num_tasks)
    model.save_pretrained(tmp_path)
    given = config(num_tasks)
    loaded = PeftModel.from_pretrained(base_model(kind), tmp_path, is_trainable=False, config=given)
    assert loaded.peft_config["default"].inference_mode
    assert loaded.peft_config["default"] is given


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_add_adapter_no_autocast_adapter_dtype(kind, num_tasks, dtype, tmp_path):
    """common: _test_add_adapter_no_autocast_adapter_dtype."""

    def adapter_dtypes(model, adapter_name):
        return {
            p.dtype for n, p in model.named_parameters() if "lpi_" in n and f".{adapter_name}." in n and p.is_floating_point()
        }

    model = get_peft_model(base_model(kind, dtype), config(num_tasks), autocast_adapter_dtype=False)
    assert adapter_dtypes(model, "default") == {dtype}
    model.add_adapter("added", config(num_tasks), autocast_adapter_dtype=False)
    assert adapter_dtypes(model, "added") == {dtype}
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="loaded", autocast_adapter_dtype=False)
    assert adapter_dtypes(model, "loaded") == {dtype}


@pytest.mark.slow
@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_adapter_dtype_autocast(kind, num_tasks, tmp_path):
    """custom: test_adapter_dtype_autocast (get_peft_model, add_adapter, from_pretrained, load_adapter; with and
    without autocast and low_cpu_mem_usage). The routing keys are buffers and stay float32 by design."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for autocast in (True, False):
            expected = torch.float32 if autocast else dtype
            model = get_peft_model(base_model(kind, dtype), config(num_tasks), autocast_adapter_dtype=autocast)
            model.add_adapter("other", config(num_tasks), autocast_adapter_dtype=autocast)
            assert {p.dtype for n, p in model.named_parameters() if "lpi_" in n} == {expected}
            folder = tmp_path / f"{dtype}-{autocast}"
            model.save_pretrained(folder)
            for low_cpu_mem_usage in (False, True):
                loaded = PeftModel.from_pretrained(
                    base_model(kind, dtype), folder, autocast_adapter_dtype=autocast, low_cpu_mem_usage=low_cpu_mem_usage
                )
                loaded.load_adapter(
                    folder / "other", adapter_name="other", autocast_adapter_dtype=autocast,
                    low_cpu_mem_usage=low_cpu_mem_usage,
                )
                assert {p.dtype for n, p in loaded.named_parameters() if "lpi_" in n} == {expected}


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_training_gives_grads_to_exactly_the_trainable_params(kind, num_tasks):
    """common: _test_training (every trainable LPI parameter gets a grad, every frozen one and the base none)."""
    model = wrap(kind, num_tasks)
    training_loss(model, inputs(kind)).backward()
    for name, param in model.named_parameters():
        if "lpi_" in name and param.requires_grad:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    assert sum(p.numel() for p in model.parameters() if p.grad is not None) == one_task_size(model)


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_inference_safetensors(kind, num_tasks, tmp_path):
    """common: _test_inference_safetensors."""
    model = wrap(kind, num_tasks)
    X = inputs(kind)
    training_loss(model, X).backward()
    model.eval()
    expected = embeds(model, X)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert "adapter_model.safetensors" in os.listdir(tmp_path) and "adapter_model.bin" not in os.listdir(tmp_path)
    loaded = PeftModel.from_pretrained(base_model(kind), tmp_path)
    assert torch.allclose(embeds(loaded, X), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_training_gradient_checkpointing(kind, num_tasks, use_reentrant):
    """common: _test_training_gradient_checkpointing (same non-zero grads with and without checkpointing)."""
    model = wrap(kind, num_tasks)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model.train(True)
    X = inputs(kind)

    def get_grads():
        for _, param in params:
            param.grad = None
        (model(**X).logits_per_image ** 2).sum().backward()
        return {n: 0.0 if p.grad is None else p.grad.abs().sum().item() for n, p in params}

    normal = get_grads()
    model.prepare_model_for_gradient_checkpointing(model)
    model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    checkpointed = get_grads()
    values = [*normal.values(), *checkpointed.values()]
    threshold = sum(values) / len(values) * 1e-6
    for name in normal:
        if normal[name] > threshold:
            assert checkpointed[name] > 0, name
        if checkpointed[name] > threshold:
            assert normal[name] > 0, name
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (param.requires_grad and "lpi_" in name), name


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_device_map_and_low_cpu_mem_usage(kind, num_tasks, tmp_path):
    """common: _test_peft_model_device_map, _test_load_model_low_cpu_mem_usage (incl. the shared-state refusal of
    inject_adapter_in_model)."""
    model = wrap(kind, num_tasks)
    model.save_pretrained(tmp_path)
    PeftModel.from_pretrained(base_model(kind), tmp_path, device_map={"": "cpu"})
    loaded = PeftModel.from_pretrained(base_model(kind), tmp_path, low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    loaded.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    with pytest.raises(ValueError, match="shared state.*get_peft_model"):
        inject_adapter_in_model(config(num_tasks), base_model(kind), low_cpu_mem_usage=True)


@pytest.mark.parametrize("inactive", [False, True])
@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_delete_adapter(kind, num_tasks, inactive):
    """common: _test_delete_adapter, _test_delete_inactive_adapter, _test_delete_unknown_adapter_raises."""
    model = wrap(kind, num_tasks)
    with pytest.raises(ValueError, match="Adapter unknown-adapter does not exist"):
        model.delete_adapter("unknown-adapter")
    model.add_adapter("delete_me", config(num_tasks))
    if not inactive:
        model.set_adapter("delete_me")
    model.delete_adapter("delete_me")
    assert "delete_me" not in model.peft_config and model.active_adapters == ["default"]
    for module in model.modules():
        for attr in getattr(module, "adapter_layer_names", ()) + getattr(module, "other_param_names", ()):
            assert "delete_me" not in getattr(module, attr)
    assert task_requires_grad(model)[0] is True  # "default" is active and trains its task again
    model.delete_adapter("default")
    assert "default" not in model.peft_config and model.active_adapters == []
    assert not any(p.requires_grad for p in model.parameters())
    model.base_model(**inputs(kind))  # no adapter left: runs the base model


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_unload_adapter(kind, num_tasks):
    """common: _test_unload_adapter."""
    base = base_model(kind)
    num_params_base = len(base.state_dict())
    X = inputs(kind)
    with torch.inference_mode():
        reference = embeds(base, X)
    model = get_peft_model(base, config(num_tasks))
    with torch.inference_mode():
        with_adapter = embeds(model, X)
    model.eval()
    unloaded = model.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
    assert not hasattr(unloaded, "peft_config")
    with torch.inference_mode():
        after = embeds(unloaded, X)
    assert not torch.allclose(with_adapter, after, atol=1e-10, rtol=1e-10)
    assert torch.allclose(reference, after, atol=1e-4, rtol=1e-4)
    assert len(unloaded.state_dict()) == num_params_base


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_get_base_model_state_dict_round_trip(kind, num_tasks):
    """common: _test_get_base_model_state_dict."""
    base = base_model(kind)
    keys = set(base.state_dict())
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, config(num_tasks))
    extracted = get_base_model_state_dict(model)
    assert set(extracted) == keys
    assert all(torch.allclose(original[k], extracted[k]) for k in original)
    with torch.no_grad():
        for param in model.get_base_model().parameters():
            if param.is_floating_point():
                param.add_(torch.randn_like(param) * 0.1)
    result = set_base_model_state_dict(model, original, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    restored = get_base_model_state_dict(model)
    assert all(torch.allclose(original[k], restored[k]) for k in original)


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_only_params_are_updated(kind, num_tasks):
    """custom: test_only_params_are_updated (SGD on model.parameters(): the trainable LPI factors move, frozen ones
    — the other tasks — stay bit-identical, the base stays put)."""
    model = wrap(kind, num_tasks)
    before = copy.deepcopy(model)
    sgd_steps(model, inputs(kind))
    params_before, params_after = dict(before.named_parameters()), dict(model.named_parameters())
    assert params_before.keys() == params_after.keys()
    for name, param_before in params_before.items():
        param_after = params_after[name]
        if "lpi_" in name and param_after.requires_grad:
            assert not torch.allclose(param_before, param_after, atol=1e-4, rtol=1e-4), name
        else:
            assert torch.equal(param_before, param_after), name


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_save_load_roundtrip(kind, num_tasks, tmp_path):
    """custom: test_save_load_roundtrip (outputs differ from the base, and are the same after a reload made under
    another seed)."""
    X = inputs(kind)
    with torch.inference_mode():
        output_base = embeds(base_model(kind), X)
    model = wrap(kind, num_tasks).eval()
    with torch.inference_mode():
        output_before = embeds(model, X)
    assert not torch.allclose(output_base, output_before, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    torch.manual_seed(54321)
    loaded = PeftModel.from_pretrained(base_model(kind), tmp_path)
    with torch.inference_mode():
        assert torch.allclose(output_before, embeds(loaded, X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_parameters_after_loading_model(kind, num_tasks, tmp_path):
    """custom: test_parameters_after_loading_model (train 3 steps, save, reload: every LPI tensor allclose; the
    untrained routing keys used to be NaN and failed here)."""
    model = wrap(kind, num_tasks)
    sgd_steps(model, inputs(kind))
    before = lpi_state(model)
    model.save_pretrained(tmp_path)
    after = lpi_state(PeftModel.from_pretrained(base_model(kind), tmp_path))
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.allclose(value.float(), after[name].float(), atol=1e-4, rtol=1e-4), name


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_disable_adapters(kind, num_tasks):
    """custom: test_disable_adapters. LPI prompts are not an identity at initialisation (like PEFT's PaRa case), so
    disabled outputs are compared with the base model's; training changes the outputs; after the context the
    trained outputs are back; common: _test_disable_adapter likewise."""
    X = inputs(kind)
    base = base_model(kind).eval()
    reference = copy.deepcopy(base).requires_grad_(False)
    outputs_base = embeds(reference, X)
    model = get_peft_model(base, config(num_tasks)).eval()
    outputs_before = embeds(model, X)
    assert not torch.allclose(outputs_base, outputs_before)
    sgd_steps(model, X, lr=0.01)
    outputs_after = embeds(model, X)
    with model.disable_adapter():
        outputs_disabled = embeds(model, X)
    outputs_enabled_after_disable = embeds(model, X)
    assert not torch.allclose(outputs_before, outputs_after, rtol=1e-8, atol=1e-8)
    assert torch.allclose(outputs_base, outputs_disabled, atol=1e-6, rtol=1e-6)
    assert torch.allclose(outputs_after, outputs_enabled_after_disable)


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_disable_adapter_context_state(kind, num_tasks):
    """custom: test_disable_adapters_exiting_context_restores_previous_state, test_disable_adapter_is_reentrant;
    for LPI also: nothing trains while disabled, and the trainability state is back afterwards."""
    model = wrap(kind, num_tasks)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    expected = task_requires_grad(model)
    assert all(not m.disable_adapters for m in layers) and model.has_active_enabled_adapter
    with model.disable_adapter():
        assert all(m.disable_adapters for m in layers) and not model.has_active_enabled_adapter
        assert not any(p.requires_grad for p in model.parameters())
        with model.disable_adapter():
            assert all(m.disable_adapters for m in layers)
        assert all(m.disable_adapters for m in layers) and not model.has_active_enabled_adapter
    assert all(not m.disable_adapters for m in layers) and model.has_active_enabled_adapter
    assert task_requires_grad(model) == expected
    model.disable_adapter_layers()
    with model.disable_adapter():
        pass
    assert all(m.disable_adapters for m in layers)


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_disable_adapters_exiting_context_irregular_state(kind, num_tasks):
    """custom: test_disable_adapters_exiting_context_irregular_state (a warning, then every layer enabled again)."""
    model = wrap(kind, num_tasks)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    layers[0].enable_adapters(False)
    assert {m.disable_adapters for m in layers} == {True, False}
    msg = "The model contains some adapter layers that are enabled and others that are disabled"
    with pytest.warns(UserWarning, match=msg), model.disable_adapter():
        pass
    assert all(not m.disable_adapters for m in layers)
    assert task_requires_grad(model) == [True] + [False] * (num_tasks - 1)


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_delete_adapter_cleans_up_and_switches(kind, num_tasks):
    """custom: test_delete_adapter_properly_cleans_up_after_itself, test_delete_adapter_with_multiple_adapters_works."""

    def dict_like_holding(obj, name):
        for attr_name in dir(obj):
            if attr_name.startswith("_"):
                continue
            try:
                attr = getattr(obj, attr_name)
            except AttributeError:
                continue
            if callable(getattr(attr, "keys", None)) and hasattr(attr, "__contains__") and name in attr:
                yield attr_name, attr

    model = get_peft_model(base_model(kind), config(num_tasks), adapter_name="foobar")
    holders = list(dict_like_holding(model, "foobar"))
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            holders.extend(dict_like_holding(module, "foobar"))
    assert holders
    model.add_adapter("adapter1", config(num_tasks))
    model.add_adapter("adapter2", config(num_tasks))
    X = inputs(kind)
    model.delete_adapter("foobar")
    assert not [name for name, attr in holders if "foobar" in attr]
    assert model.active_adapters == ["adapter1"]
    model(**X)
    model.delete_adapter("adapter2")
    assert model.active_adapters == ["adapter1"]
    model(**X)


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_active_adapter(kind, num_tasks):
    """custom: test_active_adapter (one active adapter; activating two raises for LPI)."""
    model = wrap(kind, num_tasks)
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    model.add_adapter("other", config(num_tasks))
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    model.set_adapter("other")
    assert model.active_adapters == ["other"] and model.active_adapter == "other"
    assert all(m.active_adapters == ["other"] for m in model.modules() if isinstance(m, LPIPromptedLayer))
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.base_model.set_adapter(["default", "other"])


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_add_adapter_rejects_duplicate_name_without_mutation(kind, num_tasks):
    """custom: test_add_adapter_rejects_duplicate_name_without_mutation (mixed=False)."""
    model = wrap(kind, num_tasks)
    config_before = model.peft_config["default"]
    state_before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="Adapter with name 'default' already exists"):
        model.add_adapter("default", config(num_tasks, rank=3))
    assert model.peft_config["default"] is config_before
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_forward_half_precision(kind, num_tasks, dtype, autocast):
    """custom: test_forward_float16, test_forward_bfloat16, test_forward_float16_no_autocast,
    test_forward_bfloat16_no_autocast (forward half; the merge half does not apply); test_forward_output_finite."""
    model = get_peft_model(base_model(kind, dtype), config(num_tasks), autocast_adapter_dtype=autocast).eval()
    with torch.no_grad():
        out = embeds(model, inputs(kind))
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_merge_raises_clearly():
    model = wrap("clip", 2)
    for call in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match="cannot be merged"):
            call()


# ------------------------------------------- ported from the second half of tests/test_custom_models.py
def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def task_param_names(model: PeftModel, adapter: str, task: int) -> set[str]:
    """Full parameter names of one task's factors of one adapter (what the training of that task may touch)."""
    prefix = f"base_model.lpi_prompts.{adapter}.tasks.{task}."
    names = {name for name, _ in model.named_parameters() if name.startswith(prefix)}
    assert names, prefix
    return names


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_set_requires_grad_two_adapters(kind, num_tasks):
    """custom: test_set_requires_grad (adapter0 trainable; adding adapter1 leaves it frozen and adapter0 as it was;
    set_requires_grad("adapter1") unfreezes only adapter1; set_requires_grad([both], False) freezes both). For LPI
    "trainable" means the adapter's training task: the other tasks stay frozen throughout."""
    model = get_peft_model(base_model(kind), config(num_tasks), adapter_name="adapter0").eval()
    own0 = task_param_names(model, "adapter0", 0)
    assert trainable_names(model) == own0
    model.add_adapter("adapter1", config(num_tasks))
    own1 = task_param_names(model, "adapter1", 0)
    assert trainable_names(model) == own0
    model.set_requires_grad(adapter_names="adapter1")
    assert trainable_names(model) == own0 | own1
    model.set_requires_grad(adapter_names=["adapter0", "adapter1"], requires_grad=False)
    assert trainable_names(model) == set()


TARGETS = {  # the second adapter prompts the same layers, or other ones (the text tower instead of the vision one)
    "same_targets": ({}, {}),
    "different_targets": ({"towers": "vision"}, {"towers": "text", "prompt_depth": 1}),
}


@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_requires_grad_follows_adapter_switches(kind, num_tasks, targets):
    """TestRequiresGrad: test_requires_grad_lora_same_targets / _different_targets (and their IA3 / LoHa / LoKr /
    OFT / BOFT / HRA / VeRA / ... twins: same checks, other factor names), test_requires_grad_follows_inference_mode_*
    (the inference_mode half), and the AdaLoRA case "adding an inference-only adapter must not freeze the active one".
    Exactly the active adapter's training task is trainable after get_peft_model, add_adapter, set_adapter; nothing
    inside disable_adapter(); the previous state after it; nothing after set_adapter(..., inference_mode=True)."""
    first, second = TARGETS[targets]
    model = wrap(kind, num_tasks, **first)
    default = task_param_names(model, "default", 0)
    model.add_adapter("adapter1", config(num_tasks, **second))
    other = task_param_names(model, "adapter1", 0)
    assert trainable_names(model) == default
    model.add_adapter("inference_only", config(num_tasks, inference_mode=True))
    assert trainable_names(model) == default
    model.set_adapter("default")
    assert trainable_names(model) == default
    model.set_adapter("adapter1")
    assert trainable_names(model) == other
    with model.disable_adapter():
        assert trainable_names(model) == set()
    assert trainable_names(model) == other
    model.set_adapter("default", inference_mode=False)
    assert trainable_names(model) == default
    model.set_adapter("default", inference_mode=True)
    assert trainable_names(model) == set()
    model.set_adapter("adapter1", inference_mode=True)
    assert trainable_names(model) == set()


@pytest.mark.parametrize("is_trainable", [False, True])
@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_loading_model_requires_grad_set_correctly(kind, num_tasks, is_trainable, tmp_path):
    """custom: test_loading_model_requires_grad_set_correctly (from_pretrained(is_trainable), then load_adapter
    "other" with the same and "opposite" with the opposite is_trainable, then add_adapter: exactly the adapters that
    asked to train are trainable — for LPI, their training task — and add_adapter requests nothing)."""
    wrap(kind, num_tasks).save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(base_model(kind), tmp_path, is_trainable=is_trainable)
    expected = task_param_names(model, "default", 0) if is_trainable else set()
    assert trainable_names(model) == expected
    model.load_adapter(tmp_path, adapter_name="other", is_trainable=is_trainable)
    if is_trainable:
        expected |= task_param_names(model, "other", 0)
    assert trainable_names(model) == expected
    model.load_adapter(tmp_path, adapter_name="opposite", is_trainable=not is_trainable)
    if not is_trainable:
        expected = task_param_names(model, "opposite", 0)
    assert trainable_names(model) == expected
    model.add_adapter("added", config(num_tasks))
    assert trainable_names(model) == expected


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_loading_adapter_preserves_custom_requires_grad(kind, num_tasks, tmp_path):
    """custom: test_loading_adapter_preserves_custom_requires_grad (a user unfreezes one base weight and freezes one
    adapter factor; load_adapter(is_trainable=False) of another adapter changes neither, and the new one is frozen)."""
    wrap(kind, num_tasks).save_pretrained(tmp_path)
    model = wrap(kind, num_tasks)
    base_weight = next(p for n, p in model.named_parameters() if "lpi_" not in n and p.dim() == 2)
    base_weight.requires_grad = True
    factor_name = sorted(task_param_names(model, "default", 0))[0]
    model.get_parameter(factor_name).requires_grad = False
    existing = {name: param.requires_grad for name, param in model.named_parameters()}
    model.load_adapter(tmp_path, adapter_name="other", is_trainable=False)
    for name, requires_grad in existing.items():
        assert model.get_parameter(name).requires_grad is requires_grad, name
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other." in n)


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_adapter_name_makes_no_difference(kind, num_tasks):
    """custom: test_adapter_name_makes_no_difference (same seed, adapter names "default" / "adapter" / "other-name":
    the same state dict under renamed keys, the same outputs, all different from the base model)."""
    X = inputs(kind)
    with torch.no_grad():
        output_base = embeds(base_model(kind).eval(), X)
    outputs, state_dicts = {}, {}
    for name in ("default", "adapter", "other-name"):
        base = base_model(kind).eval()
        torch.manual_seed(0)
        model = get_peft_model(base, config(num_tasks), adapter_name=name).eval()
        with torch.no_grad():
            outputs[name] = embeds(model, X)
        state_dicts[name] = model.state_dict()
    sd_default = state_dicts["default"]
    for name in ("adapter", "other-name"):
        renamed = {key.replace(".default.", f".{name}."): value for key, value in sd_default.items()}
        assert renamed.keys() == state_dicts[name].keys()
        assert all(torch.equal(value, state_dicts[name][key]) for key, value in renamed.items())
    for output in outputs.values():
        assert not torch.allclose(output_base, output)
    assert torch.allclose(outputs["default"], outputs["adapter"]) and torch.allclose(outputs["adapter"], outputs["other-name"])


@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_switching_adapters_switches_outputs(kind, num_tasks, targets):
    """TestMultipleActiveAdapters.test_merge_layers_multi, the half without merging (set_adapter to a second adapter
    changes the outputs, set_adapter back gives the first adapter's outputs again). With different targets (vision
    tower / text tower) each adapter also leaves the other tower exactly as the base model computes it."""
    X = inputs(kind)
    first, second = TARGETS[targets]
    with torch.inference_mode():
        base = base_model(kind).eval()(**X)
    model = wrap(kind, num_tasks, **first).eval()
    with torch.inference_mode():
        out_1 = model(**X)
    model.add_adapter("adapter-2", config(num_tasks, **second))
    model.set_adapter("adapter-2")
    with torch.inference_mode():
        out_2 = model(**X)
    both = [torch.cat([out.image_embeds, out.text_embeds], dim=-1) for out in (out_1, out_2)]
    assert not torch.allclose(both[0], both[1], atol=1e-3, rtol=1e-3)
    model.set_adapter("default")
    with torch.inference_mode():
        assert torch.allclose(embeds(model, X), both[0], atol=1e-6, rtol=1e-6)
    if targets == "different_targets":
        assert torch.allclose(out_1.text_embeds, base.text_embeds, atol=1e-6, rtol=1e-6)
        assert torch.allclose(out_2.image_embeds, base.image_embeds, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_existing_and_new_model_card(kind, num_tasks, tmp_path):
    """custom: test_existing_model_card (a README already there is kept and extended), test_non_existing_model_card
    (a pre-filled card is written)."""
    model = wrap(kind, num_tasks)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "README.md").write_text("---\nmeta: hello\n---\nThis is a model card\n", encoding="utf-8")
    model.save_pretrained(tmp_path / "old")
    card = (tmp_path / "old" / "README.md").read_text(encoding="utf-8")
    assert "library_name: peft" in card and "meta: hello" in card and "This is a model card" in card
    model.save_pretrained(tmp_path / "new")
    card = (tmp_path / "new" / "README.md").read_text(encoding="utf-8")
    assert "library_name: peft" in card and len(card) > 1000


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_load_into_resized_base_ignore_mismatched_sizes(kind, num_tasks, tmp_path):
    """custom: test_load_resized_embedding_ignore_mismatched_sizes, adapted: LPI's factors follow the towers' width,
    so the "resized" base is one of another width. Loading raises PEFT's size-mismatch error naming both sizes;
    ignore_mismatched_sizes=True loads."""
    wrap(kind, num_tasks).save_pretrained(tmp_path)
    wider = {"clip": dict(vision_hidden=64, text_hidden=48), "siglip": dict(hidden=48)}[kind]
    with pytest.raises(RuntimeError) as excinfo:
        PeftModel.from_pretrained(BUILDERS[kind](**wider), tmp_path)
    assert "size mismatch" in str(excinfo.value) and "48" in str(excinfo.value)
    loaded = PeftModel.from_pretrained(BUILDERS[kind](**wider), tmp_path, ignore_mismatched_sizes=True)
    with torch.no_grad():
        assert torch.isfinite(embeds(loaded.eval(), inputs(kind))).all()


def test_no_known_layers_raises_clearly():
    """TestDefaultTargetModules.test_default_target_modules_not_set_raises, adapted: LPI has no target_modules; on a
    model that is not a known dual encoder it raises a ValueError that says how to name the layers (layer_paths)."""

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin0 = nn.Linear(10, 20)

    with pytest.raises(ValueError, match=r"found no vision encoder layers in MLP.*LPIConfig\(layer_paths="):
        get_peft_model(MLP(), config(1))


@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_save_load_roundtrip_fsdp_wrapped(kind, num_tasks):
    """TestPeftFsdpStateDict.test_save_load_roundtrip_fsdp_wrapped (1-process gloo FSDP; get_peft_model_state_dict of
    the wrapped model, set_peft_model_state_dict into a fresh adapter made under another seed: same outputs).
    CLIP's / SigLIP's scalar logit_scale (and logit_bias) are parameters FSDP refuses, so they are `ignored_states`
    (a property of the base models, not of LPI)."""
    import torch.distributed as dist
    from peft import set_peft_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel

    X = inputs(kind)
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = wrap(kind, num_tasks).eval()
        scalars = [p for p in model.parameters() if p.dim() == 0]
        fsdp = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"), ignored_states=scalars)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NO_SHARD on one rank: "full_state_dict will be returned"
            output_before = embeds(fsdp, X)
            state_dict = get_peft_model_state_dict(fsdp)
    finally:
        dist.destroy_process_group()
    assert state_dict and not any("_fsdp_wrapped_module" in key for key in state_dict)
    fresh = wrap(kind, num_tasks, seed=1).eval()
    with torch.no_grad():
        assert not torch.allclose(embeds(fresh, X), output_before)
    result = set_peft_model_state_dict(fresh, state_dict)
    assert not result.unexpected_keys
    with torch.no_grad():
        assert torch.allclose(embeds(fresh, X), output_before, atol=1e-6, rtol=1e-6)


# ===================================================================================== LPI's half of the contract
@pytest.mark.parametrize("kind, num_tasks", CASES)
def test_exactly_one_task_trainable_after_get_peft_model(kind, num_tasks, capsys):
    model = wrap(kind, num_tasks)
    assert task_requires_grad(model) == [True] + [False] * (num_tasks - 1)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == one_task_size(model)
    assert total == sum(p.numel() for p in model.parameters())
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,} ||" in capsys.readouterr().out


def test_config_names_the_trainable_task_and_validates_it():
    model = wrap("clip", 3, trainable_task=2)
    assert task_requires_grad(model) == [False, False, True]
    assert model.base_model.current_task == 2  # selected too: a training forward reaches the trainable task
    with pytest.raises(ValueError, match="trainable_task=3 is not a task"):
        config(3, trainable_task=3)
    with pytest.raises(ValueError, match="finished"):
        config(3, trainable_task=1, finished_tasks=[1])


@pytest.mark.parametrize("kind", KINDS)
def test_peft_calls_never_unfreeze_a_finished_task(kind, tmp_path):
    model = wrap(kind, 3)
    model.train_task(1)
    assert model.base_model.finished_tasks == [0] and model.base_model.trainable_task == 1
    calls = {
        "set_adapter": lambda: model.set_adapter("default"),
        "add_adapter": lambda: model.add_adapter("other", config(3)),
        "set_adapter other": lambda: model.set_adapter("other"),
        "set_adapter back": lambda: model.set_adapter("default"),
        "set_requires_grad": lambda: model.set_requires_grad("default"),
        "base set_requires_grad": lambda: model.base_model.set_requires_grad(["default", "other"]),
        "enable_adapter_layers": lambda: model.enable_adapter_layers(),
        "save_pretrained": lambda: model.save_pretrained(tmp_path),
        "load_adapter": lambda: model.load_adapter(tmp_path, adapter_name="loaded", is_trainable=True),
        "set_task": lambda: model.set_task(0),
        "add_task": lambda: model.add_task(),
    }
    for name, call in calls.items():
        with model.disable_adapter() if name == "enable_adapter_layers" else contextlib.nullcontext():
            call()
        flags = task_requires_grad(model)
        # task 0 (finished) and tasks 2, 3 (not the training task) stay frozen; task 1 trains while "default" is active
        assert flags[0] is False and not any(flags[2:]), (name, flags)
        assert flags[1] is (name != "set_adapter other"), (name, flags)
    # the loaded adapter's state came from the saved config: task 1 trains, task 0 is finished
    assert task_requires_grad(model, "loaded") == [False, True, False]
    assert model.peft_config["loaded"].finished_tasks == [0]
    with pytest.raises(ValueError, match="Task 0 is finished"):
        model.train_task(0)
    assert task_requires_grad(model)[:3] == [False, True, False]
    model.train_task(0, allow_retrain=True)
    assert task_requires_grad(model)[:3] == [True, False, False]
    assert model.base_model.finished_tasks == [1]


@pytest.mark.parametrize("kind", KINDS)
def test_set_requires_grad_and_status_helpers(kind):
    model = wrap(kind, 2)
    model.add_adapter("other", config(2))
    status = get_model_status(model)
    assert status.peft_types == {"default": "LPI", "other": "LPI"}
    assert status.available_adapters == ["default", "other"] and status.active_adapters == ["default"]
    assert status.requires_grad == {"default": True, "other": False}
    assert status.devices == {"default": ["cpu"], "other": ["cpu"]}
    assert status.trainable_params == one_task_size(model) and status.enabled is True
    layers = get_layer_status(model)
    assert len(layers) == 2 * SMALL["prompt_depth"] and {s.module_type for s in layers} == {"LPIPromptedLayer"}
    model.set_requires_grad("other")
    assert get_model_status(model).requires_grad == {"default": True, "other": True}
    assert task_requires_grad(model, "other") == [True, False]
    model.set_requires_grad("default", requires_grad=False)
    assert get_model_status(model).requires_grad == {"default": False, "other": True}
    assert task_requires_grad(model) == [False, False]
    model.set_adapter("default")  # like LoRA: the active adapter trains again, the others freeze
    assert get_model_status(model).requires_grad == {"default": True, "other": False}


@pytest.mark.parametrize("kind", KINDS)
def test_from_pretrained_is_trainable_restores_the_state(kind, tmp_path):
    model = wrap(kind, 3)
    model.train_task(1)
    model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(base_model(kind), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = PeftModel.from_pretrained(base_model(kind), tmp_path, is_trainable=True)
    assert task_requires_grad(trainable) == [False, True, False]
    assert trainable.base_model.finished_tasks == [0] and trainable.base_model.current_task == 1
    with pytest.raises(ValueError, match="finished"):
        trainable.train_task(0)


def test_continual_method_resume_restores_the_state(tmp_path):
    """The trainer's resume path (`LPIMethod.load_adapter`) restores the training task and the finished tasks."""
    from peft_lpi.continual.methods import LPIMethod

    model = wrap("clip", 3)
    model.train_task(1)
    model.train_task(2)
    LPIMethod(model).save_adapter(tmp_path)
    fresh = wrap("clip", 3, seed=1)
    LPIMethod(fresh).load_adapter(tmp_path)
    assert fresh.base_model.trainable_task == 2 and fresh.base_model.finished_tasks == [0, 1]
    assert task_requires_grad(fresh) == [False, False, True]
    assert all(torch.equal(v, lpi_state(model)[k]) for k, v in lpi_state(fresh).items())


def test_peft_type_is_an_enum_value():
    model = wrap("clip", 1)
    peft_type = model.peft_config["default"].peft_type
    assert isinstance(peft_type, LPIPeftType) and peft_type.value == "LPI" and peft_type == "LPI"
    assert get_model_status(model).peft_types == {"default": "LPI"}
    with pytest.raises(ValueError, match="'LPI' is not compatible with the `PeftMixedModel`"):
        get_peft_model(base_model("clip"), config(1), mixed=True)


@pytest.mark.parametrize("kind", KINDS)
def test_keys_are_finite_and_old_nan_key_adapters_load(kind, tmp_path):
    model = wrap(kind, 3)
    width = bank(model).vision_keys.shape[-1]
    assert all(torch.isfinite(v).all() for k, v in lpi_state(model).items() if v.is_floating_point())
    vision, text = torch.randn(5, width), torch.randn(5, width)
    model.set_task_keys(1, vision=vision)
    assert bank(model).has_keys.tolist() == [False, False, False]  # one modality is not enough to route
    model.set_task_keys(1, text=text)
    assert bank(model).has_keys.tolist() == [False, True, False]
    model.save_pretrained(tmp_path)
    # hand-made old-format file: keys of tasks without keys were NaN
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    for key in [k for k in tensors if k.endswith(("vision_keys", "text_keys"))]:
        tensors[key][[0, 2]] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    loaded = PeftModel.from_pretrained(base_model(kind), tmp_path)
    loaded_bank = bank(loaded)
    assert loaded_bank.has_keys.tolist() == [False, True, False]
    assert torch.equal(loaded_bank.vision_keys[1], vision) and torch.equal(loaded_bank.text_keys[1], text)
    assert torch.equal(loaded_bank.vision_keys[0], torch.zeros_like(vision))
    loaded.set_task("auto")  # routing works: every query goes to the only task with keys
    with torch.no_grad():
        loaded(**inputs(kind))
    assert loaded.base_model.last_routes["vision"].tolist() == [1, 1, 1]
    # an old task file with NaN keys imports with zero keys
    model.save_task(0, tmp_path / "task0.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "task0.safetensors"), framework="pt") as handle:
        metadata, task_tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    task_tensors["keys.vision"][:] = float("nan")
    save_file(task_tensors, str(tmp_path / "task0.safetensors"), metadata=metadata)
    new = model.import_task(tmp_path / "task0.safetensors")
    assert torch.equal(bank(model).vision_keys[new], torch.zeros_like(vision)) and not bank(model).has_keys[new]


# ================================================================================= DDP with a user's own loop
TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:  # spawned workers unpickle `dist_peft_workers.*` by name
    sys.path.insert(0, TESTS_DIR)
DEADLINE_S = 240.0


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_default_settings_user_loop_trains_task_1_only(tmp_path, monkeypatch):
    """2 gloo processes, DistributedDataParallel with default settings (find_unused_parameters=False), a plain
    torch loop: train task 0, then `train_task(1)` and train it for 3 steps. Before the fix, every task was trainable
    but only the selected one got gradients, and DDP failed at the second step."""
    import dist_peft_workers

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    out.mkdir()
    ctx = mp.start_processes(
        dist_peft_workers.ddp_user_loop_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {DEADLINE_S:.0f} s")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    results = [torch.load(out / f"rank{rank}.pt") for rank in range(2)]
    for result in results:
        assert result["steps"] == dist_peft_workers.TASK1_STEPS
        for key, value in result["task0_after_task0"].items():
            assert torch.equal(value, result["task0_final"][key]), key  # bit-identical
        assert all(not torch.equal(v, result["task1_final"][k]) for k, v in result["task1_before"].items())
        assert result["trainable_after_train_task"] == [False, True]
    for key, value in results[0]["task1_final"].items():  # DDP kept the replicas in sync
        assert torch.equal(value, results[1]["task1_final"][key]), key
