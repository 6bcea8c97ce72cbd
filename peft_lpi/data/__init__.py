"""Data sources in the shared continual-retrieval schema, and preprocessing with the backbone's own processor."""

# ruff: noqa: F401  (re-exports: keep this file a plain list of imports)
from .coco import COCO_TASK_ORDER, build_coco_continual, clean_caption, continual_features
from .generic import first_tasks, from_datasets
from .preprocess import RetrievalCollator, caption_id, flatten_captions
from .world import WORLD_TASKS, WorldTask, build_offline_benchmark, generate_pretraining_pairs
