"""LPI as its authors computed it: our functions against a transcription of their code, on identical tensors.

The `ref_*` functions below transcribe the authors' code (github.com/Kelvin-ywc/LPI, commit 92e5800; the search
index stores these files at the commits where they last changed, 2f48825 / cc1e36f) statement by statement; each
cites the file and lines it comes from. Our code is then run on the same tensors and compared at 1e-5 (fp32).
The table in docs/method.md ("Reference fidelity") lists which test backs which row.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import EOS_ID, random_batch, tiny_clip, tiny_siglip, tiny_vit_bert
from peft import get_peft_model

import peft_lpi  # noqa: F401  (registers LPI with PEFT)
from peft_lpi import LPIConfig
from peft_lpi.continual.losses import hierarchical_alignment_loss, task_contrastive_loss
from peft_lpi.continual.objective import LPIObjective, alignment_terms
from peft_lpi.continual.similarity import similarity_targets
from peft_lpi.tuner.factors import CorrelationModule, LPITaskFactors
from peft_lpi.tuner.routing import kmeans, nearest_task

ATOL = 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# Transcription of the reference arithmetic
# ----------------------------------------------------------------------------------------------------------------------


def ref_decomposed_prompt(dim_1_share, dim_2_visual, dim_2_textual, dim_3_visual, dim_3_textual, d):
    """retrieval/models/prompts/prompts.py:38-57 (DecomposedPrompt.forward); scale = 1 (prompts.py:27)."""
    dim_1_share = dim_1_share.view(-1, 1, 1, d)
    dim_2_visual = dim_2_visual.view(1, -1, 1, d)
    dim_2_textual = dim_2_textual.view(1, -1, 1, d)
    dim_3_visual = dim_3_visual.view(1, 1, -1, d)
    dim_3_textual = dim_3_textual.view(1, 1, -1, d)
    visual = torch.mean(torch.mul(torch.mul(dim_1_share, dim_2_visual), dim_3_visual), dim=3)
    textual = torch.mean(torch.mul(torch.mul(dim_1_share, dim_2_textual), dim_3_textual), dim=3)
    return visual, textual


def ref_clip_loss(logits):
    """retrieval/matrix/matrix.py:75-84 (ClipLoss.forward, single process): symmetric cross-entropy, labels arange."""
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.transpose(0, 1), labels)) / 2


def ref_alignment_retrieval(visual_prompt, textual_prompt):
    """retrieval/models/slinet.py:144-158 (SliNet.cal_loss, 'lpi'): prompts (B, K, P, D) as expanded in forward
    (slinet.py:116-119, 128-129); mean over D, then over the batch; EACH side / 0.01; 0.1 * ClipLoss."""
    temperature = 0.01
    v = torch.mean(visual_prompt, -1)
    if len(v.shape) == 3:
        v = torch.mean(v, 0)
    v = v / temperature
    t = torch.mean(textual_prompt, -1)
    if len(t.shape) == 3:
        t = torch.mean(t, 0)
    t = t / temperature
    layer_score = v @ t.t()
    return 0.1 * ref_clip_loss(layer_score)


def ref_alignment_grounding(visual_prompt, textual_prompt):
    """grounding/maskrcnn_benchmark/modeling/detector/generalized_vl_rcnn.py, GeneralizedVLRCNN.forward, training
    branch ("visual_prompt_for_loss = torch.mean(visual_prompt, -1)" ... "layer_score = 100 * ..."): mean over D,
    L2-normalised over P, cosine x 100, ClipLoss x 0.1."""
    v = torch.mean(visual_prompt, -1)
    v = v / v.norm(dim=-1, keepdim=True)
    t = torch.mean(textual_prompt, -1)
    t = t / t.norm(dim=-1, keepdim=True)
    layer_score = 100 * v @ t.t()
    return ref_clip_loss(layer_score) * 0.1


def ref_nt_bxent_loss(x, target, temperature=1.0):
    """retrieval/matrix/matrix.py:6-33 (nt_bxent_loss; slinet.py imports it as loss.loss.nt_bxent_loss)."""
    target = target.type(torch.float32).to(x.device)
    xcs = F.cosine_similarity(x[None, :, :], x[:, None, :], dim=-1)
    xcs[torch.eye(x.size(0)).bool()] = float("inf")
    loss = F.binary_cross_entropy_with_logits(input=(xcs / temperature).sigmoid(), target=target, reduction="none")
    target_pos = target.bool()
    target_neg = ~target_pos
    loss_pos = torch.zeros(x.size(0), x.size(0)).masked_scatter(target_pos, loss[target_pos])
    loss_neg = torch.zeros(x.size(0), x.size(0)).masked_scatter(target_neg, loss[target_neg])
    loss_pos = loss_pos.sum(dim=1)
    loss_neg = loss_neg.sum(dim=1)
    num_pos = target.sum(dim=1)
    num_neg = x.size(0) - num_pos
    return ((loss_pos / num_pos) + (loss_neg / num_neg)).mean()


def ref_task_loss(task_id, visual_prompts, textual_prompts, task_sim_matrix, temperature=0.001):
    """retrieval/models/slinet.py:167-183 (SliNet.cal_task_loss); `visual_prompts[i]` = self.prompts[i]()[0]."""
    task_sim_matrix = torch.as_tensor(task_sim_matrix[: task_id + 1, : task_id + 1])
    threshold = 0.4
    task_sim_matrix = (task_sim_matrix > threshold).type(torch.int)
    visual_prompt_stack = torch.stack([visual_prompts[i].view(-1) for i in range(task_id + 1)])
    textual_prompt_stack = torch.stack([textual_prompts[i].view(-1) for i in range(task_id + 1)])
    return (
        ref_nt_bxent_loss(visual_prompt_stack, task_sim_matrix, temperature)
        + ref_nt_bxent_loss(textual_prompt_stack, task_sim_matrix, temperature)
    ) / 2


def ref_task_selection(feature, all_keys):
    """retrieval/methods/sprompt.py, SPrompts.get_visual_task_id / get_textual_task_id: L1 to every key of every
    task (a per-key Python loop), min over keys, argmin over tasks."""
    taskselection = []
    for task_centers in all_keys:
        tmpcentersbatch = []
        for center in task_centers:
            tmpcentersbatch.append((((feature - center) ** 2) ** 0.5).sum(1))
        taskselection.append(torch.vstack(tmpcentersbatch).min(0)[0])
    return torch.vstack(taskselection).min(0)[1]


def ref_correlation(v, w, module: CorrelationModule):
    """The correlation formula of docs/method.md with the maps MATERIALISED (the grounding reference's interaction
    module is not in the search index; the formula is what the audit matched at 3e-6):
    W_v2t(l) = (1/r) sum_k L[l,k] In[:,k] Out[:,k]^T; p_w <- LN_w((1-a) p_w + a [p_v, 1] @ W_v2t(l)); likewise v."""
    r, a = module.rank, module.alpha
    w_v2t = torch.einsum("lk,ik,ok->lio", module.v2t_layer, module.v2t_in, module.v2t_out) / r
    w_t2v = torch.einsum("lk,ik,ok->lio", module.t2v_layer, module.t2v_in, module.t2v_out) / r
    out_v, out_w = [v[0]], [w[0]]
    for layer in range(1, v.shape[0]):
        v1 = torch.cat([v[layer], torch.ones(v.shape[1], 1)], dim=-1)
        w1 = torch.cat([w[layer], torch.ones(w.shape[1], 1)], dim=-1)
        out_w.append(module.text_norm((1 - a) * w[layer] + a * v1 @ w_v2t[layer - 1]))
        out_v.append(module.vision_norm((1 - a) * v[layer] + a * w1 @ w_t2v[layer - 1]))
    return torch.stack(out_v), torch.stack(out_w)


def ref_clip_image(vm, projection, pixel_values, visual_prompt):
    """retrieval/models/clip/model.py, VisionTransformer.forward: CLS + patches + position embedding; the layer-0
    prompts (instance_tokens[:, 0]) inserted after CLS WITHOUT a position embedding; ln_pre; all layers with the
    prompts in the sequence; ln_post on token 0; proj. (HF names: pre_layrnorm, post_layernorm, visual_projection.)"""
    x = vm.embeddings(pixel_values)
    x = torch.cat([x[:, :1, :], visual_prompt, x[:, 1:, :]], dim=1)
    x = vm.pre_layrnorm(x)
    for layer in vm.encoder.layers:
        x = layer(x, None)
    return projection(vm.post_layernorm(x[:, 0, :]))


def _causal(length):
    return torch.full((length, length), float("-inf")).triu(1)[None, None]


def ref_clip_text(tm, projection, input_ids, textual_prompt):
    """retrieval/models/clip/prompt_learner.py, PromptLearner.forward ('end'): "X " * P placeholders after BOS, their
    token embeddings replaced by the prompts (prefix / ctx / suffix); TextEncoder.forward: + position embedding over
    the whole sequence, causal transformer, ln_final, the EOT token (its index moved by P) @ text_projection."""
    num = textual_prompt.shape[1]
    embedding = tm.embeddings.token_embedding(input_ids)
    x = torch.cat([embedding[:, :1], textual_prompt, embedding[:, 1:]], dim=1)
    x = x + tm.embeddings.position_embedding.weight[: x.shape[1]]
    for layer in tm.encoder.layers:
        x = layer(x, _causal(x.shape[1]))
    x = tm.final_layer_norm(x)
    eot = (input_ids == EOS_ID).int().argmax(dim=-1) + num
    return projection(x[torch.arange(x.shape[0]), eot])


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def _factors(depth=9, length=16, rank=4, dv=768, dw=512, seed=0, interaction=True):
    torch.manual_seed(seed)
    return LPITaskFactors(depth, length, rank, {"vision": dv, "text": dw}, True, 0.5, interaction, 0.1)


def _ref_prompts_of(f: LPITaskFactors):
    return ref_decomposed_prompt(
        f.layer_factor, f.token_factors["vision"], f.token_factors["text"], f.hidden_factors["vision"],
        f.hidden_factors["text"], f.rank,
    )


def _reference_model(builder, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prompt_depth 9 capped at the tiny towers' 3 layers
        config = LPIConfig.reference("retrieval", num_tasks=2, prompt_length=4, **overrides)
        torch.manual_seed(0)
        return get_peft_model(builder(attn="eager"), config)


# ----------------------------------------------------------------------------------------------------------------------
# Prompts and correlation module
# ----------------------------------------------------------------------------------------------------------------------


def test_cp_prompts_match_reference():
    f = _factors()
    ref_v, ref_w = _ref_prompts_of(f)
    assert torch.allclose(f.raw_prompts("vision"), ref_v, atol=ATOL)
    assert torch.allclose(f.raw_prompts("text"), ref_w, atol=ATOL)


def test_correlation_module_matches_materialised_formula():
    f = _factors(depth=4, length=5, dv=24, dw=16)
    v, w = f.raw_prompts("vision"), f.raw_prompts("text")
    ours_v, ours_w = f.correlation(v, w)
    ref_v, ref_w = ref_correlation(v, w, f.correlation)
    assert torch.allclose(ours_v, ref_v, atol=ATOL) and torch.allclose(ours_w, ref_w, atol=ATOL)


@pytest.mark.parametrize("init, std", [("normal", 0.5), ("kaiming_uniform", 0.5 / math.sqrt(3))])
def test_correlation_init_field(init, std):
    # the grounding reference's maps keep the default init of their parameters: kaiming-uniform (a = sqrt(5)) on
    # (n, r) tensors is U(-1/sqrt(r), 1/sqrt(r)), std 0.29 at r = 4; ours defaults to N(0, 0.5^2)
    torch.manual_seed(0)
    module = CorrelationModule(4, 700, 500, 4, 0.5, 0.1, init)
    values = torch.cat([module.v2t_in.flatten(), module.t2v_in.flatten(), module.v2t_out.flatten()])
    assert abs(values.std().item() - std) < 0.02
    if init == "kaiming_uniform":
        assert values.abs().max() <= 0.5
    model = _reference_model(tiny_clip, interaction=True, interaction_init=init)
    correlation = model.base_model.active_bank.tasks[0].correlation
    if init == "kaiming_uniform":
        assert correlation.v2t_in.abs().max() <= 0.5
    else:
        assert correlation.v2t_in.abs().max() > 0.5  # a normal of std 0.5 over 49 x 4 draws exceeds it


# ----------------------------------------------------------------------------------------------------------------------
# Alignment loss
# ----------------------------------------------------------------------------------------------------------------------


def test_alignment_retrieval_matches_reference():
    config = LPIConfig.reference("retrieval")
    f = _factors(interaction=False)
    ref_v, ref_w = _ref_prompts_of(f)
    batch = 3  # the reference averages the batch-expanded prompts: the same value
    reference = ref_alignment_retrieval(ref_v.expand(batch, -1, -1, -1), ref_w.expand(batch, -1, -1, -1))
    ours = config.align_weight * alignment_terms(config, f.raw_prompts("vision"), f.raw_prompts("text"))["total"]
    assert torch.allclose(ours, reference, atol=ATOL), (ours.item(), reference.item())
    assert 0.01 < reference.item() < 0.1 * math.log(9) * 0.999  # not stuck at log K: real logits


def test_alignment_grounding_matches_reference():
    config = LPIConfig.reference("grounding")
    f = _factors(dv=96, dw=768, interaction=False)  # GLIP-T: Swin stage-1 width 96, BERT 768
    ref_v, ref_w = _ref_prompts_of(f)
    reference = ref_alignment_grounding(ref_v, ref_w)
    ours = config.align_weight * alignment_terms(config, f.raw_prompts("vision"), f.raw_prompts("text"))["total"]
    assert torch.allclose(ours, reference, atol=ATOL), (ours.item(), reference.item())


def test_default_alignment_gradient_matches_reference_scale_and_reaches_every_layer():
    """Done-when of issue 11: with the DEFAULT LPIConfig the alignment term's gradient on the layer factor A at
    initialisation is within 0.1x-10x of the reference's on the same factors, and layers 1..K-1 contribute."""
    config = LPIConfig()
    f = _factors(depth=9, interaction=config.interaction)  # CLIP ViT-B/16 widths, reference K, P, r
    ours = config.align_weight * alignment_terms(config, f.raw_prompts("vision"), f.raw_prompts("text"))["total"]
    (grad_ours,) = torch.autograd.grad(ours, f.layer_factor)
    ref_v, ref_w = _ref_prompts_of(f)
    (grad_ref,) = torch.autograd.grad(ref_alignment_retrieval(ref_v, ref_w), f.layer_factor)
    ratio = grad_ours.norm().item() / grad_ref.norm().item()
    assert 0.1 <= ratio <= 10, ratio
    rows = grad_ours.norm(dim=1)  # (K,)
    assert (rows[1:] > 0.05 * rows.max()).all(), rows  # every layer 1..K-1 receives gradient of the same order

    # what the issue found (the old behaviour): on the prompts AFTER the correlation module the hidden-axis mean of
    # layers 1..K-1 is exactly 0 and they get no gradient; with one division by 0.01 the gradient is ~100x smaller
    correlated = f()
    old = 0.1 * hierarchical_alignment_loss(correlated["vision"], correlated["text"], layer_temperature=0.01,
                                            token_temperature=0.01, token_weight=1.0)["total"]
    (grad_old,) = torch.autograd.grad(old, f.layer_factor)
    assert grad_old[1:].norm() < 1e-6 * grad_ours[1:].norm()
    assert grad_old.norm() < 0.1 * grad_ref.norm()


def test_objective_aligns_raw_prompts_and_weights_the_token_level():
    torch.manual_seed(0)
    model = get_peft_model(tiny_clip(), LPIConfig(num_tasks=1, prompt_length=3, prompt_depth=3, rank=2))
    bank = model.base_model.active_bank
    emb = torch.randn(4, 16)
    terms = LPIObjective(model)(emb, emb.flip(0), 0, gather=False)
    raw_v, raw_w = bank.tasks[0].raw_prompts("vision"), bank.tasks[0].raw_prompts("text")
    expected = hierarchical_alignment_loss(raw_v, raw_w, layer_temperature=1e-4, token_temperature=1e-4)
    assert torch.allclose(terms["align_layer"], expected["layer"], atol=ATOL)
    assert torch.allclose(terms["align_token"], expected["token"], atol=ATOL)
    assert torch.allclose(terms["align"], expected["layer"], atol=ATOL)  # default align_token_weight = 0
    config = LPIConfig(num_tasks=1, prompt_length=3, prompt_depth=3, rank=2, align_token_weight=0.5)
    terms = LPIObjective(model, config=config)(emb, emb.flip(0), 0, gather=False)
    assert torch.allclose(terms["align"], expected["layer"] + 0.5 * expected["token"], atol=ATOL)


# ----------------------------------------------------------------------------------------------------------------------
# Task loss
# ----------------------------------------------------------------------------------------------------------------------


def _task_prompts(num=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 9 * 4 * 8, generator=g)
    # correlated rows so that cos / 0.001 is not saturated everywhere
    return [(base + 0.3 * torch.randn(1, 9 * 4 * 8, generator=g)).view(9, 4, 8) for _ in range(num)]


@pytest.mark.parametrize("task_id", [1, 2, 3])
def test_task_loss_compatibility_mode_matches_reference(task_id):
    vis, txt = _task_prompts(seed=1), _task_prompts(seed=2)
    sim = torch.tensor([[1.0, 0.3, 0.5, 0.1], [0.3, 1.0, 0.2, 0.45], [0.5, 0.2, 1.0, 0.35], [0.1, 0.45, 0.35, 1.0]])
    reference = ref_task_loss(task_id, vis, txt, sim, temperature=0.001)
    seen = task_id + 1
    targets = similarity_targets(sim[:seen, :seen], 0.4)
    ours = torch.stack([
        task_contrastive_loss(torch.stack(p[:seen]).reshape(seen, -1), targets, current_task=task_id,
                              temperature=0.001, mode="reference")
        for p in (vis, txt)
    ]).mean()
    assert torch.isfinite(reference)
    assert torch.allclose(ours, reference, atol=ATOL), (ours.item(), reference.item())


def test_task_loss_compatibility_mode_is_nan_where_the_reference_is():
    vis, txt = _task_prompts(3, seed=3), _task_prompts(3, seed=4)
    sim = torch.ones(3, 3)  # every task similar to every other: rows without negatives
    reference = ref_task_loss(2, vis, txt, sim)
    ours = task_contrastive_loss(torch.stack(vis).reshape(3, -1), similarity_targets(sim, 0.4), current_task=2,
                                 mode="reference")
    assert torch.isnan(reference) and torch.isnan(ours)
    corrected = task_contrastive_loss(torch.stack(vis).reshape(3, -1), similarity_targets(sim, 0.4), current_task=2)
    assert torch.isfinite(corrected)


def test_corrected_task_loss_against_brute_force():
    prompts = torch.stack(_task_prompts(4, seed=5)).reshape(4, -1)
    targets = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 1], [0, 0, 0, 1], [0, 1, 1, 0]], dtype=torch.bool)
    tau = 0.05
    rows = []
    for i in range(4):
        pos, neg = [], []
        for j in range(4):
            if i == j:
                continue  # the diagonal is excluded
            logit = F.cosine_similarity(prompts[i], prompts[j], dim=0) / tau
            term = F.binary_cross_entropy_with_logits(logit, targets[i, j].float())
            (pos if targets[i, j] else neg).append(term)
        rows.append(sum(pos) / len(pos) + sum(neg) / len(neg))
    expected = torch.stack(rows).mean()
    ours = task_contrastive_loss(prompts, targets, current_task=1, temperature=tau)
    assert torch.allclose(ours, expected, atol=ATOL)


# ----------------------------------------------------------------------------------------------------------------------
# Routing and k-means
# ----------------------------------------------------------------------------------------------------------------------


def test_l1_routing_matches_reference_with_equal_keys():
    g = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(6, 5, 32, generator=g), dim=-1)
    feature = F.normalize(torch.randn(200, 32, generator=g), dim=-1)
    reference = ref_task_selection(feature, list(keys))
    ours = nearest_task(feature, keys, "l1")
    assert torch.equal(ours, reference)


def _synthetic_task(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(200, 600, (1,), generator=g))
    dim = int(torch.randint(16, 48, (1,), generator=g))
    clusters = int(torch.randint(3, 12, (1,), generator=g))
    centres = torch.randn(clusters, dim, generator=g)
    spread = torch.rand(clusters, generator=g) * 1.5 + 0.3
    labels = torch.randint(clusters, (n,), generator=g)
    return F.normalize(centres[labels] + torch.randn(n, dim, generator=g) * spread[labels, None], dim=-1)


def test_kmeans_inertia_no_worse_than_scikit_learn_on_average():
    """The reference keys come from `KMeans(n_clusters=5, random_state=0)` (retrieval/methods/sprompt.py,
    SPrompts.clustering) on L2-normalised features; ours must be at least as good on average over 24 tasks."""
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    ratios = []
    for seed in range(24):
        x = _synthetic_task(seed)
        ours = kmeans(x, 5, seed=0)
        inertia = float((torch.cdist(x.double(), ours.double()).amin(dim=1) ** 2).sum())
        reference = sklearn_cluster.KMeans(n_clusters=5, random_state=0).fit(x.numpy()).inertia_
        ratios.append(inertia / reference)
    mean = sum(ratios) / len(ratios)
    assert mean <= 1.0, (mean, ratios)
    assert max(ratios) < 1.05, ratios


# ----------------------------------------------------------------------------------------------------------------------
# Shallow insertion
# ----------------------------------------------------------------------------------------------------------------------


def _layer0(model, modality):
    bank = model.base_model.active_bank
    return bank.task_prompts(torch.tensor([0]))[modality][:, 0]  # (1, P, D)


def test_shallow_clip_matches_reference_forward():
    model = _reference_model(tiny_clip)
    base = model.base_model.model
    batch = random_batch("clip", pad_rows=[1, 2])
    with torch.no_grad():
        out = model(**batch)
        vp = _layer0(model, "vision").expand(4, -1, -1)
        tp = _layer0(model, "text").expand(4, -1, -1)
        with model.disable_adapter():  # the hand-built forward must run on the frozen modules without our hooks
            ref_img = ref_clip_image(base.vision_model, base.visual_projection, batch["pixel_values"], vp)
            ref_txt = ref_clip_text(base.text_model, base.text_projection, batch["input_ids"], tp)
            plain = model(**batch)
    assert torch.allclose(out.image_embeds, F.normalize(ref_img, dim=-1), atol=ATOL)  # CLIPModel normalises
    assert torch.allclose(out.text_embeds, F.normalize(ref_txt, dim=-1), atol=ATOL)
    assert (out.image_embeds - plain.image_embeds).abs().max() > 1e-3  # the prompts do something
    assert (out.text_embeds - plain.text_embeds).abs().max() > 1e-3
    assert out.text_model_output.last_hidden_state.shape == batch["input_ids"].shape + (32,)  # prompts removed
    deep = _reference_model(tiny_clip, injection="deep", prompt_depth=1)
    with torch.no_grad():
        assert (deep(**batch).image_embeds - F.normalize(ref_img, dim=-1)).abs().max() > 1e-3  # depth 1 is NOT what the reference ran


def test_shallow_siglip_matches_hand_built_forward():
    model = _reference_model(tiny_siglip)
    base = model.base_model.model
    batch = random_batch("siglip", pad_rows=[1])
    batch.pop("attention_mask")  # SigLIP: max-length padding, no mask
    with torch.no_grad():
        out = model(**batch)
        vp = _layer0(model, "vision").expand(4, -1, -1)
        tp = _layer0(model, "text").expand(4, -1, -1)
        with model.disable_adapter():
            vm, tm = base.vision_model, base.text_model
            x = vm.embeddings(batch["pixel_values"])  # no CLS: the prompts follow token 0
            x = torch.cat([x[:, :1], vp, x[:, 1:]], dim=1)
            for layer in vm.encoder.layers:
                x = layer(x, None)
            x = torch.cat([x[:, :1], x[:, 1 + vp.shape[1]:]], dim=1)
            ref_img = vm.head(vm.post_layernorm(x))
            ids = batch["input_ids"]
            e = tm.embeddings.token_embedding(ids)
            t = torch.cat([e[:, :1], tp, e[:, 1:]], dim=1) + tm.embeddings.position_embedding.weight[: ids.shape[1] + 4]
            for layer in tm.encoder.layers:
                t = layer(t, None)
            ref_txt = tm.head(tm.final_layer_norm(t)[:, -1])  # SigLIP pools the last token
    assert torch.allclose(out.image_embeds, F.normalize(ref_img, dim=-1), atol=ATOL)
    assert torch.allclose(out.text_embeds, F.normalize(ref_txt, dim=-1), atol=ATOL)


def test_shallow_vit_bert_runs_and_keeps_shapes_and_disable():
    model = _reference_model(tiny_vit_bert)
    batch = random_batch("vit_bert", pad_rows=[1, 3])
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        with model.disable_adapter():
            plain = model(**batch)
        base = tiny_vit_bert(attn="eager")(**batch)  # the untouched backbone
    assert torch.equal(plain.text_embeds, base.text_embeds) and torch.equal(plain.image_embeds, base.image_embeds)
    assert (out.image_embeds - plain.image_embeds).abs().max() > 1e-4
    assert (out.text_embeds - plain.text_embeds).abs().max() > 1e-4
    assert out.text_model_output.last_hidden_state.shape[1] == batch["input_ids"].shape[1]
    assert all(h.shape[1] == batch["input_ids"].shape[1] for h in out.text_model_output.hidden_states)


def test_shallow_refuses_text_longer_than_the_position_table():
    model = _reference_model(tiny_clip)  # 16 positions, P = 4
    batch = random_batch("clip", seq=14)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(**batch)


def test_shallow_unload_removes_the_hooks():
    model = _reference_model(tiny_clip)
    batch = random_batch("clip")
    base = model.base_model.unload()
    fresh = tiny_clip(attn="eager")
    with torch.no_grad():
        assert torch.equal(base(**batch).text_embeds, fresh(**batch).text_embeds)


# ----------------------------------------------------------------------------------------------------------------------
# The reference("retrieval") preset end to end
# ----------------------------------------------------------------------------------------------------------------------


def test_reference_retrieval_preset_one_training_step_matches_reference():
    model = _reference_model(tiny_clip)
    tuner = model.base_model
    base = tuner.model
    batch = random_batch("clip", pad_rows=[2])
    sim = torch.tensor([[1.0, 0.3], [0.3, 1.0]])
    tuner.train_task(1)
    out = model(**batch)
    terms = LPIObjective(model, sim)(out.image_embeds.float(), out.text_embeds.float(), 1, gather=False)

    # reference: SliNet.forward (slinet.py:109-135) with the task's factors, then cal_loss (slinet.py:137-165)
    factors = [tuner.active_bank.tasks[t] for t in (0, 1)]
    prompts = [_ref_prompts_of(f) for f in factors]  # (K, P, D) raw; no correlation module in the retrieval code
    vis, txt = prompts[1]
    bs = batch["input_ids"].shape[0]
    visual_prompt_exp = vis.expand(bs, -1, -1, -1)
    textual_prompt_exp = txt.expand(bs, -1, -1, -1)
    with model.disable_adapter():
        img = ref_clip_image(base.vision_model, base.visual_projection, batch["pixel_values"], visual_prompt_exp[:, 0])
        text = ref_clip_text(base.text_model, base.text_projection, batch["input_ids"], textual_prompt_exp[:, 0])
    img = img / img.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    base_loss = ref_clip_loss(base.logit_scale.exp() * img @ text.t())  # slinet.py:138-141
    alignment = ref_alignment_retrieval(visual_prompt_exp, textual_prompt_exp)  # already x 0.1
    task = 0.1 * ref_task_loss(1, [p[0] for p in prompts], [p[1] for p in prompts], sim)  # slinet.py:160-161
    assert torch.allclose(terms["contrastive"], base_loss, atol=ATOL)
    assert torch.allclose(0.1 * terms["align"], alignment, atol=ATOL)
    assert torch.allclose(0.1 * terms["task"], task, atol=ATOL)
    assert torch.allclose(terms["loss"], base_loss + alignment + task, atol=ATOL)
    terms["loss"].backward()  # one training step's gradient reaches the current task only
    assert factors[1].layer_factor.grad is not None and factors[0].layer_factor.grad is None


def test_reference_preset_settings():
    retrieval, grounding = LPIConfig.reference("retrieval"), LPIConfig.reference("grounding", num_tasks=12)
    assert (retrieval.prompt_depth, retrieval.prompt_length, retrieval.rank, retrieval.num_keys) == (9, 16, 4, 5)
    assert retrieval.injection == "shallow" and not retrieval.interaction and retrieval.routing_metric == "l1"
    assert retrieval.task_loss_mode == "reference" and retrieval.task_temperature == 0.001
    assert grounding.interaction and grounding.interaction_init == "kaiming_uniform" and grounding.align_normalize
    assert grounding.task_temperature == 0.01 and grounding.num_tasks == 12
    with pytest.raises(ValueError, match="retrieval"):
        LPIConfig.reference("segmentation")
    with pytest.raises(TypeError, match="unknown"):
        LPIConfig.reference("retrieval", prompt_lenght=3)
