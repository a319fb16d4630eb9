"""Datasets: synthetic verifiable tasks built offline, and loaders for JSONL, Parquet and saved datasets."""

from align.data.loading import load_preference_dataset, load_prompt_dataset
from align.data.tasks import TASKS, build_task

__all__ = ["TASKS", "build_task", "load_preference_dataset", "load_prompt_dataset"]
