"""Image-text retrieval Recall@k as an `evaluate` metric, loadable offline from the installed package.

Usage (no network needed: the metric is loaded from a local path):

```python
import evaluate
from peft_lpi.evaluation import RETRIEVAL_RECALL_PATH

metric = evaluate.load(RETRIEVAL_RECALL_PATH)
# one row per caption: its embedding and the index of its image in `image_embeds`
metric.add_batch(text_embeds=text_embeds, text_to_image=text_to_image)  # as often as needed
results = metric.compute(image_embeds=image_embeds, ks=[1, 5, 10])
# {"i2t_R@1": ..., "t2i_R@1": ..., ...} in percent
```

Feature schema: the per-caption inputs are the metric's features (``text_embeds``: a sequence of float32 per row;
``text_to_image``: int64), so they can be accumulated with ``add_batch``. The gallery images are a different number
of rows, so ``image_embeds`` `(N, D)` is a keyword argument of ``compute`` (it cannot share rows with the captions).
Further ``compute`` keywords: ``ks`` (default (1, 5, 10)), ``chunk_size`` (1024), ``text_groups`` `(M,)` (equal ids =
identical caption text; adds the ``*_caption_equal_R@k`` variants), and ``image_task`` `(N,)` + ``text_task`` `(M,)`
+ optional ``num_tasks`` to add per-task recall (``per_task``) and its macro average (``macro_*`` keys).

The computation is `peft_lpi.evaluation.retrieval_recall`. Going through `evaluate` serialises the embeddings to
Arrow (several seconds for 25k x 512); for large galleries inside a training loop call that function directly.
"""

import datasets
import evaluate
import numpy as np
import torch

from peft_lpi.evaluation import per_task_recall, retrieval_recall

_CITATION = """\
@inproceedings{lpi2024,
  title={Low-rank Prompt Interaction for Continual Vision-Language Retrieval},
  booktitle={Proceedings of the 32nd ACM International Conference on Multimedia},
  year={2024},
  note={arXiv:2501.14369}
}
"""

_DESCRIPTION = """\
Recall@k for image-to-text (an image is a hit when any of its captions is among its k nearest captions) and
text-to-image retrieval (a caption is a hit when its image is among its k nearest images), by cosine similarity of
the given embeddings, computed in chunks with top-k so the full similarity matrix is never materialised.
"""

_KWARGS_DESCRIPTION = """
Args:
    text_embeds: (M, D) caption embeddings, one row per caption.
    text_to_image: (M,) index of each caption's image in `image_embeds`.
    image_embeds: (N, D) image embeddings (keyword of `compute`).
    ks: cut-offs, default (1, 5, 10).
    chunk_size: query rows scored at once, default 1024.
    text_groups: optional (M,) ids, equal ids meaning identical caption text.
    image_task, text_task: optional (N,) and (M,) task ids for per-task recall; num_tasks: optional.
Returns:
    `i2t_R@k`, `t2i_R@k` in percent (and `*_caption_equal_R@k` with text_groups; `macro_*` and `per_task` with
    task ids).
Example:
    >>> metric = evaluate.load(RETRIEVAL_RECALL_PATH)
    >>> metric.compute(text_embeds=[[1.0, 0.0], [0.0, 1.0]], text_to_image=[0, 1],
    ...                image_embeds=[[1.0, 0.1], [0.1, 1.0]], ks=[1])
    {'i2t_R@1': 100.0, 't2i_R@1': 100.0}
"""


def _tensor(value, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    return torch.as_tensor(np.asarray(value), dtype=dtype)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    """Recall@k of a joint image-caption gallery (see the module docstring for the input schema)."""

    def _info(self) -> evaluate.MetricInfo:
        info = evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "text_embeds": datasets.Sequence(datasets.Value("float32")),
                    "text_to_image": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2501.14369"],
        )
        # MetricInfo only accepts `format` for scalar features at construction; numpy formatting of the fixed-length
        # float rows works and returns one (M, D) array instead of M Python lists (much faster).
        info.format = "numpy"
        return info

    def _compute(
        self,
        text_embeds,
        text_to_image,
        image_embeds=None,
        ks=(1, 5, 10),
        chunk_size: int = 1024,
        text_groups=None,
        image_task=None,
        text_task=None,
        num_tasks: int | None = None,
    ) -> dict:
        if image_embeds is None:
            raise ValueError("`image_embeds` (N, D) must be passed to `compute`.")
        text_embeds = np.asarray(text_embeds)
        if text_embeds.dtype == object:  # rows of unequal length: let numpy report the mismatch
            text_embeds = np.stack(list(text_embeds))
        texts = _tensor(text_embeds, torch.float32)
        images = _tensor(image_embeds, torch.float32)
        result = retrieval_recall(
            images,
            texts,
            _tensor(text_to_image, torch.long),
            ks=ks,
            chunk_size=chunk_size,
            text_groups=None if text_groups is None else _tensor(text_groups, torch.long),
        )
        scores = {key: value for key, value in result.items() if "R@" in key}
        if image_task is not None and text_task is not None:
            image_task, text_task = _tensor(image_task, torch.long), _tensor(text_task, torch.long)
            if num_tasks is None:
                num_tasks = int(max(image_task.max(), text_task.max())) + 1
            tasks = per_task_recall(result["i2t_hits"], result["t2i_hits"], image_task, text_task, num_tasks, ks)
            scores.update({f"macro_{key}": value for key, value in tasks["macro"].items()})
            scores["per_task"] = tasks["per_task"]
        return scores
