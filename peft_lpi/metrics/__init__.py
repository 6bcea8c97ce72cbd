"""`evaluate` metrics shipped inside the package, loadable offline by path.

Example:

```python
import evaluate
from peft_lpi.metrics import RETRIEVAL_RECALL_PATH

metric = evaluate.load(RETRIEVAL_RECALL_PATH)
```
"""

from pathlib import Path

RETRIEVAL_RECALL_PATH: str = str(Path(__file__).resolve().parent / "retrieval_recall")

__all__ = ["RETRIEVAL_RECALL_PATH"]
