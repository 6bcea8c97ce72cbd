"""The prompt factors (peft_lpi.tuner.factors): closed-form parameter counts, CP prompts against an
independent reconstruction, the correlation module against materialised maps."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    KINDS,
    TINY_BUILDERS,
    bank_of,
    cp_prompts,
    tiny_clip,
    widths,
    wrap,
)
from torch import nn

from peft_lpi.tuner.layer import LPIPromptedLayer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)


# ============================================================================================ parameter counts
def _trainable(model: nn.Module) -> int:
    """All LPI parameters (every task's factors), trainable or frozen: only one task trains at a time."""
    return sum(p.numel() for n, p in model.named_parameters() if "lpi_prompts" in n)


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
