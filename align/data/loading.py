"""Loading prompt datasets and preference datasets from files, saved datasets or the hub.

Sources: ``*.jsonl`` / ``*.json``, ``*.parquet``, a directory written by ``Dataset.save_to_disk``, or a dataset
name on the hub (needs network; tests never use one). Preference data follows TRL's format: ``prompt``, ``chosen``,
``rejected`` as strings, or as conversations (lists of ``{"role", "content"}`` messages).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align.errors import InputError


def _load(path: str, split: str, subset: str | None = None) -> Any:
    import datasets

    p = Path(path)
    if p.suffix in (".jsonl", ".json"):
        if not p.is_file():
            raise InputError(f"data file {path!r} does not exist")
        return datasets.load_dataset("json", data_files=str(p), split="train")
    if p.suffix == ".parquet":
        if not p.is_file():
            raise InputError(f"data file {path!r} does not exist")
        return datasets.load_dataset("parquet", data_files=str(p), split="train")
    if p.is_dir():
        loaded = datasets.load_from_disk(str(p))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    try:
        return datasets.load_dataset(path, subset, split=split)
    except Exception as err:
        raise InputError(f"could not load dataset {path!r} split {split!r}: {' '.join(str(err).split())[:200]}") \
            from None


def load_prompt_dataset(path: str, *, split: str, prompt_column: str, answer_column: str | None,
                        subset: str | None = None, answer_regex: str | None = None) -> Any:
    """A dataset with a ``prompt`` column (and ``answer`` when given), other columns kept for rewards.

    ``answer_regex`` keeps the first group of a match from each answer (GSM8K's ``#### 72`` -> ``72``).
    """
    data = _load(path, split, subset)
    missing = [c for c in (prompt_column, answer_column) if c is not None and c not in data.column_names]
    if missing:
        raise InputError(f"dataset {path!r} has no column {missing[0]!r}; columns: {', '.join(data.column_names)}")
    if prompt_column != "prompt":
        data = data.rename_column(prompt_column, "prompt")
    if answer_column not in (None, "answer"):
        data = data.rename_column(answer_column, "answer")
    if answer_regex is not None and answer_column is not None:
        import re

        pattern = re.compile(answer_regex, re.S)

        def extract(row: dict[str, Any]) -> dict[str, Any]:
            match = pattern.search(str(row["answer"]))
            return {"answer": (match.group(1) if match and match.groups() else str(row["answer"])).strip()}

        data = data.map(extract)
    return data


def load_preference_dataset(path: str, *, split: str) -> Any:
    """TRL-format preference data: ``prompt``, ``chosen``, ``rejected`` (strings or conversations)."""
    data = _load(path, split)
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in data.column_names]
    if missing:
        raise InputError(f"preference dataset {path!r} needs columns prompt, chosen, rejected; missing "
                         f"{', '.join(missing)}")
    return data


def as_text(value: Any, tokenizer: Any, *, add_generation_prompt: bool = False) -> str:
    """A plain string, or a conversation rendered with the tokenizer's chat template."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        text: str = tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=add_generation_prompt)
        return text
    raise InputError(f"expected a string or a list of chat messages, got {type(value).__name__}")
