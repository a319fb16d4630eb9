"""Loading prompt datasets and preference datasets from files, saved datasets or the hub.

Sources: ``*.jsonl`` / ``*.json``, ``*.parquet``, a directory written by ``Dataset.save_to_disk``, or a dataset
name on the hub (needs network; tests never use one). Preference data follows TRL's format: ``prompt``, ``chosen``,
``rejected`` as strings, or as conversations (lists of ``{"role", "content"}`` messages).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from align.errors import InputError

FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
"""File sources and the ``datasets`` builder that reads each; a file has no splits."""


def is_file_source(path: str) -> bool:
    return Path(path).suffix in FILE_SUFFIXES


def _load(path: str, split: str, subset: str | None = None) -> Any:
    """One split of a source; a file is all one split, whatever ``split`` says."""
    import datasets

    p = Path(path)
    if is_file_source(path):
        return _load_file(p)
    if p.is_dir():
        loaded = _load_saved(p)
        if not isinstance(loaded, datasets.DatasetDict):
            return loaded
        if split not in loaded:
            raise InputError(f"saved dataset {path!r} has no split {split!r}; its splits: {', '.join(loaded)}")
        return loaded[split]
    try:
        return datasets.load_dataset(path, subset, split=split)
    except Exception as err:
        raise InputError(f"could not load dataset {path!r} split {split!r}: {_reason(err)}") from None


def _load_file(path: Path) -> Any:
    import datasets

    if not path.is_file():
        raise InputError(f"data file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise InputError(f"data file {str(path)!r} has no rows (it is empty)")
    builder = FILE_SUFFIXES[path.suffix]
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps a malformed row in its own generation error
        raise InputError(f"data file {str(path)!r} could not be read as {builder}: {_reason(err)}") from None


def _load_saved(path: Path) -> Any:
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise InputError(f"directory {str(path)!r} is not a saved dataset (one written by Dataset.save_to_disk)") \
            from None


def _reason(err: BaseException) -> str:
    """Why loading failed, on one line: past datasets' wrapper (which says only that generation failed) to the
    parser's own message, which names the row."""
    from datasets.exceptions import DatasetGenerationError

    cause = err
    while isinstance(cause, DatasetGenerationError) and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    return " ".join(str(cause).split())[:200] or type(cause).__name__


def dataset_splits(path: str, subset: str | None = None) -> list[str] | None:
    """The split names of a saved ``DatasetDict`` or a hub dataset; None for a file or a single saved ``Dataset``,
    which have no splits."""
    import datasets

    if is_file_source(path):
        return None
    if Path(path).is_dir():
        loaded = _load_saved(Path(path))  # memory-mapped: listing its splits reads no rows
        return list(loaded) if isinstance(loaded, datasets.DatasetDict) else None
    try:
        return list(datasets.get_dataset_split_names(path, subset))
    except Exception as err:
        raise InputError(f"could not list the splits of dataset {path!r}: {_reason(err)}") from None


def split_held_out(data: Any, *, eval_size: int, seed: int, source: str) -> tuple[Any, Any]:
    """A seeded split of one source into (train, held-out), by prompt: a tenth of the distinct prompts (at least 1,
    at most ``eval_size``) and every row that has one of them are held out, so a prompt the file repeats (several
    preference pairs of one prompt, a duplicated row) is never on both sides. Both sides come shuffled.
    ``source`` names the data in errors."""
    texts = [_prompt_text(p) for p in data["prompt"]]
    distinct = list(dict.fromkeys(texts))
    if len(distinct) < 2:
        raise InputError(f"{source!r} has {len(distinct)} distinct prompt(s) in {len(data)} row(s); a training set "
                         "and a held-out set need at least 2 (or set data.eval_path to a file of held-out rows)")
    rng = random.Random(seed)
    held = set(rng.sample(distinct, min(eval_size, max(1, len(distinct) // 10))))
    train_rows = [i for i, text in enumerate(texts) if text not in held]
    held_rows = [i for i, text in enumerate(texts) if text in held]
    rng.shuffle(train_rows)  # as train_test_split would: data.train_size then keeps a random subset, not the head
    rng.shuffle(held_rows)
    return data.select(train_rows), data.select(held_rows)


def drop_training_prompts(held_out: Any, train: Any, *, source: str) -> Any:
    """``held_out`` without the rows whose prompt is also a training prompt (a file may repeat a prompt)."""
    seen = {_prompt_text(p) for p in train["prompt"]}
    unseen = [i for i, p in enumerate(held_out["prompt"]) if _prompt_text(p) not in seen]
    if not unseen:
        raise InputError(f"{source!r}: all {len(held_out)} held-out prompts also appear in the training data, so "
                         "nothing is held out; set data.eval_path to a file of prompts not trained on")
    return held_out if len(unseen) == len(held_out) else held_out.select(unseen)


def _prompt_text(prompt: Any) -> str:
    """A prompt as comparable text: a string as it is, a conversation as canonical JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


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
