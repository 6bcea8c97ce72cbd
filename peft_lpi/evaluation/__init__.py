"""Retrieval recall, continual metrics (accuracy matrix, forgetting, transfer) and the shipped `evaluate` metric.

The metric loads offline by path:

```python
import evaluate
from peft_lpi.evaluation import RETRIEVAL_RECALL_PATH

metric = evaluate.load(RETRIEVAL_RECALL_PATH)
```
"""

from pathlib import Path

from .retrieval import (
    backward_transfer,
    continual_metrics,
    final_average,
    forgetting,
    grouped_continual_metrics,
    per_task_recall,
    retrieval_recall,
    stage_averaged,
    stage_metrics,
)

RETRIEVAL_RECALL_PATH: str = str(Path(__file__).resolve().parent / "retrieval_recall")

__all__ = [
    "RETRIEVAL_RECALL_PATH",
    "backward_transfer",
    "continual_metrics",
    "final_average",
    "forgetting",
    "grouped_continual_metrics",
    "per_task_recall",
    "retrieval_recall",
    "stage_averaged",
    "stage_metrics",
]
