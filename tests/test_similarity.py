"""Task semantic similarity on a tiny offline CLIP / SigLIP."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_clip_model, tiny_siglip_model, tiny_word_tokenizer

from peft_lpi.continual.similarity import (
    cosine_similarity_matrix,
    encode_texts,
    similarity_targets,
    task_similarity_from_captions,
    task_similarity_from_names,
    validate_user_similarity,
)

WORDS = "a photo of the cat dog car truck bus kitchen sink oven animal vehicle on road".split()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def clip(tokenizer):
    return tiny_clip_model(tokenizer)


def test_cosine_similarity_matrix_matches_loops():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(4, 6, generator=g, dtype=torch.float64)
    S = cosine_similarity_matrix(e)
    for i in range(4):
        for j in range(4):
            dot = sum(float(a) * float(b) for a, b in zip(e[i], e[j]))
            cos = dot / math.sqrt(float((e[i] ** 2).sum()) * float((e[j] ** 2).sum()))
            assert S[i, j].item() == pytest.approx(cos, abs=1e-12)
    assert torch.equal(S, S.T)


def test_similarity_targets_threshold_and_diagonal():
    S = torch.tensor([[1.0, 0.4, 0.5], [0.4, 1.0, -0.2], [0.5, -0.2, 1.0]])
    Y = similarity_targets(S, threshold=0.4)
    assert Y.dtype == torch.bool
    assert Y.tolist() == [[False, False, True], [False, False, False], [True, False, False]]


def test_encode_texts_batching_padding_and_mode(clip, tokenizer):
    texts = ["a photo of the cat", "dog", "a truck on the road", "kitchen sink"]
    clip.train()
    full = encode_texts(clip, tokenizer, texts)
    assert clip.training  # mode restored
    clip.eval()
    assert full.shape == (4, 16) and full.dtype == torch.float32
    torch.testing.assert_close(encode_texts(clip, tokenizer, texts, batch_size=3), full, atol=1e-5, rtol=1e-5)
    # CLIP text: causal + EOS pooling, so padding to max_length gives the same embedding
    torch.testing.assert_close(encode_texts(clip, tokenizer, texts, padding="max_length"), full, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        single = clip.get_text_features(**tokenizer(["dog"], return_tensors="pt")).pooler_output
    torch.testing.assert_close(full[1:2], single, atol=1e-5, rtol=1e-5)
    # over-long texts are truncated to the 16 positions of the text tower
    assert encode_texts(clip, tokenizer, ["the cat " * 20]).shape == (1, 16)


def test_encode_texts_siglip(tokenizer):
    model = tiny_siglip_model(tokenizer)
    texts = ["a photo of the cat", "dog"]
    out = encode_texts(model, tokenizer, texts)  # pads to max_length by default
    enc = tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        ref = model.get_text_features(**enc).pooler_output
    assert out.shape == (2, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_task_similarity_from_names(clip, tokenizer):
    names = ["animal", "vehicle", "kitchen"]
    S = task_similarity_from_names(clip, tokenizer, names, template="a photo of the {}")
    embeds = encode_texts(clip, tokenizer, [f"a photo of the {n}" for n in names])
    torch.testing.assert_close(S, cosine_similarity_matrix(embeds))
    assert S.shape == (3, 3)
    torch.testing.assert_close(S.diagonal(), torch.ones(3))
    validate_user_similarity(S, 3)


def test_task_similarity_from_captions(clip, tokenizer):
    captions = [["a cat", "the dog", "a dog on the road"], ["a truck", "the bus on the road"]]
    S = task_similarity_from_captions(clip, tokenizer, captions, batch_size=2)
    means = []
    for caps in captions:
        e = encode_texts(clip, tokenizer, caps)
        means.append(torch.nn.functional.normalize(e, dim=-1).mean(0))
    torch.testing.assert_close(S, cosine_similarity_matrix(torch.stack(means)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"tasks \[1\] have no captions"):
        task_similarity_from_captions(clip, tokenizer, [["a cat"], []])


def test_validate_user_similarity():
    good = [[1.0, 0.3], [0.3, 1.0]]
    out = validate_user_similarity(good, 2)
    assert out.dtype == torch.float32 and out.shape == (2, 2)
    cases = [
        (torch.ones(2, 3), 2, "square"),
        (torch.eye(3), 2, "3 x 3 but there are 2 tasks"),
        (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), 2, "NaN or inf"),
        (torch.tensor([[1.0, 1.5], [1.5, 1.0]]), 2, r"\[-1, 1\]"),
        (torch.tensor([[1.0, 0.2], [0.6, 1.0]]), 2, "not symmetric"),
        ("not a matrix", 2, "numeric"),
    ]
    for S, num_tasks, message in cases:
        with pytest.raises(ValueError, match=message):
            validate_user_similarity(S, num_tasks)
