"""Tasks are deterministic with disjoint splits; prompt and preference data load from JSONL, Parquet and disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset

from align.data import build_task, load_preference_dataset, load_prompt_dataset
from align.data.loading import as_text
from align.errors import InputError
from align.models import build_char_tokenizer


@pytest.mark.parametrize("task", ["arithmetic", "sorting", "countdown", "word_problems"])
def test_tasks_are_deterministic_and_splits_disjoint(task: str) -> None:
    a = build_task(task, train_size=200, eval_size=50, seed=3)
    b = build_task(task, train_size=200, eval_size=50, seed=3)
    assert a["train"]["prompt"] == b["train"]["prompt"]
    assert not set(a["train"]["prompt"]) & set(a["test"]["prompt"])
    assert len(a["test"]) == 50


@pytest.mark.parametrize("steps", [1, 3])
def test_word_problem_answers_follow_from_the_story(steps: int) -> None:
    import re

    gains = ("buys", "finds", "is given", "wins")
    data = build_task("word_problems", train_size=300, eval_size=20, seed=1, steps=steps, max_number=12)
    for row in data["train"]:
        story = row["prompt"]
        count = int(re.match(r"\w+ has (\d+) ", story).group(1))
        events = story.split(". Then ", 1)[1].split(". How many")[0].split(", then ")
        assert len(events) == steps
        for event in events:
            n = int(re.search(r"(\d+)", event).group(1))
            assert 1 <= n <= 12
            count += n if any(verb in event for verb in gains) else -n
            assert count >= 0  # never a negative count along the way
        assert row["answer"] == str(count), story


def test_task_options_are_checked() -> None:
    with pytest.raises(InputError, match="has no option 'digitz'; valid options: digits, ops"):
        build_task("arithmetic", train_size=10, eval_size=5, seed=0, digitz=3)


def test_prompt_data_from_jsonl_parquet_and_disk(tmp_path: Path) -> None:
    rows = [{"question": f"{i}+1=", "solution": f"work #### {i + 1}", "level": i % 3} for i in range(20)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for source in (jsonl, tmp_path / "d.parquet", tmp_path / "saved"):
        data = load_prompt_dataset(str(source), split="train", prompt_column="question", answer_column="solution",
                                   answer_regex="#### (.*)")
        assert data[3] == {"prompt": "3+1=", "answer": "4", "level": 0}
    with pytest.raises(InputError, match="has no column 'query'"):
        load_prompt_dataset(str(jsonl), split="train", prompt_column="query", answer_column=None)


def test_preference_data_plain_and_conversational(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "2+2="}],
                                "chosen": [{"role": "assistant", "content": "4"}],
                                "rejected": [{"role": "assistant", "content": "5"}]}) + "\n")
    data = load_preference_dataset(str(path), split="train")
    tokenizer = build_char_tokenizer()
    assert as_text(data[0]["prompt"], tokenizer, add_generation_prompt=True) == "2+2="
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(InputError, match="missing rejected"):
        load_preference_dataset(str(bad), split="train")
