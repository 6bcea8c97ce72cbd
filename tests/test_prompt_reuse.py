"""Prompts once per training step: in one `LPIMethod.training_loss` the trained task's factors and correlation module
run once (both towers and the prompt losses share them), frozen tasks' prompts come from a cache keyed on their
parameters' versions, and the gradients equal those of the recomputing path."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from helpers import random_batch, tiny_clip, tiny_siglip
from peft import get_peft_model

from peft_lpi import LPIConfig
from peft_lpi.continual.methods import LPIMethod
from peft_lpi.continual.objective import LPIObjective
from peft_lpi.tuner.factors import CorrelationModule, LPITaskFactors

NUM_TASKS, TRAINED, BATCH = 3, 2, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)


def setup(kind: str, dtype: torch.dtype = torch.float32) -> tuple[LPIMethod, dict, list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    base = tiny_clip() if kind == "clip" else tiny_siglip()
    config = LPIConfig(num_tasks=NUM_TASKS, prompt_depth=3, prompt_length=3, rank=2, align_weight=0.5, task_weight=0.5)
    model = get_peft_model(base, config).train().to(dtype)
    method = LPIMethod(model)
    similarity = torch.tensor([[1.0, 0.6, 0.1], [0.6, 1.0, 0.2], [0.1, 0.2, 1.0]])
    method.objective = LPIObjective(model, similarity)
    params = method.parameters_for_task(TRAINED)
    batch = random_batch(kind, BATCH, pad_rows=(1,))
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    batch["caption_ids"] = torch.arange(BATCH)
    return method, batch, params


class CallCounter:
    """Counts LPITaskFactors.forward and CorrelationModule.forward calls per task (by module identity)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, method: LPIMethod):
        self.factors: Counter[int] = Counter()
        self.correlation: Counter[int] = Counter()
        tasks = method.tuner.active_bank.tasks
        index = {id(t): i for i, t in enumerate(tasks)} | {id(t.correlation): i for i, t in enumerate(tasks)}
        for cls, counter in ((LPITaskFactors, self.factors), (CorrelationModule, self.correlation)):
            original = cls.forward

            def counted(module, *args, _original=original, _counter=counter, **kwargs):
                _counter[index[id(module)]] += 1
                return _original(module, *args, **kwargs)

            monkeypatch.setattr(cls, "forward", counted)

    def reset(self) -> None:
        self.factors.clear()
        self.correlation.clear()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_one_prompt_computation_per_task_per_step(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    method, batch, params = setup(kind)
    counter = CallCounter(monkeypatch, method)
    optimizer = torch.optim.SGD(params, lr=0.1)
    for step in range(3):
        counter.reset()
        terms = method.training_loss(method.model, batch, TRAINED)
        assert terms["align"] > 0 and terms["task"] > 0  # both prompt losses ran
        terms["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        # the trained task once per step; the frozen earlier tasks (used by L_task) once in all, then cached
        expected = {TRAINED: 1} if step else {t: 1 for t in range(TRAINED + 1)}
        assert dict(counter.factors) == expected, f"step {step}"
        assert dict(counter.correlation) == expected, f"step {step}"
    # a frozen task changed in place (e.g. load_task) is recomputed, never served stale
    with torch.no_grad():
        method.tuner.active_bank.tasks[0].layer_factor.mul_(2.0)
    counter.reset()
    method.training_loss(method.model, batch, TRAINED)
    assert dict(counter.factors) == {0: 1, TRAINED: 1}


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_gradients_equal_the_recomputing_path(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # float64 towers: the two paths sum the prompt gradients in another order, which alone moves fp32 results by ~1e-5
    method, batch, params = setup(kind, torch.float64)
    terms = method.training_loss(method.model, batch, TRAINED)
    terms["loss"].backward()
    shared = [p.grad.clone() for p in params]
    shared_terms = {k: v.detach() for k, v in terms.items()}
    method.model.zero_grad(set_to_none=True)

    # the old path: every caller recomputes the prompts from the factors (no cache of any kind), sticky set_task
    bank = method.tuner.active_bank
    monkeypatch.setattr(bank, "_prompts_of", lambda task: bank.tasks[task]())
    method.tuner.set_task(TRAINED)
    outputs = method.model(
        pixel_values=batch["pixel_values"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    )
    terms = method.objective(outputs.image_embeds.float(), outputs.text_embeds.float(), TRAINED, sample_ids=batch["caption_ids"])
    terms["loss"].backward()
    for name, value in shared_terms.items():
        torch.testing.assert_close(terms[name].detach(), value, rtol=1e-6, atol=1e-6, msg=name)
    assert any(p.grad.abs().sum() > 0 for p in params)
    for shared_grad, param in zip(shared, params):
        torch.testing.assert_close(param.grad, shared_grad, rtol=1e-6, atol=1e-6)


def test_reuse_prompts_is_scoped_and_reentrant() -> None:
    method, _, _ = setup("clip")
    tuner, bank = method.tuner, method.tuner.active_bank
    with tuner.reuse_prompts():
        first = bank._prompts_of(TRAINED)["vision"]
        assert first.requires_grad
        with tuner.reuse_prompts():
            assert bank._prompts_of(TRAINED)["vision"] is first
        assert bank._prompts_of(TRAINED)["vision"] is first  # the inner exit does not end the outer scope
    assert bank._step_cache is None
    outside = bank._prompts_of(TRAINED)["vision"]
    assert outside is not first and torch.equal(outside, first)
