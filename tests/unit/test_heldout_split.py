"""Held-out data never holds a training prompt: a file is split by the seed (or data.eval_path is the held-out file),
a saved dataset's test split is used where it has one, and repeated prompts never land on both sides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from align.build import load_data
from align.config import RecipeError, recipe_from_dict

REWARDS = [{"name": "exact_match"}]


def recipe(seed: int = 0, **data):
    return recipe_from_dict({"seed": seed, "data": data, "rewards": REWARDS})


def write_jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "answer": str(i)}) + "\n" for i, p in enumerate(prompts)))
    return path


def prompts(data) -> set[str]:
    return set(data["prompt"])


def test_a_file_is_split_by_the_seed_into_disjoint_sets(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [f"{i}+1=" for i in range(64)])
    train, test = load_data(recipe(path=str(path)))
    assert not prompts(train) & prompts(test)  # was: the whole file again, 63 of 64 prompts trained on
    assert len(test) == 6 and len(train) == 58
    again, other_seed = load_data(recipe(path=str(path)))[1], load_data(recipe(seed=1, path=str(path)))[1]
    assert again["prompt"] == test["prompt"] and other_seed["prompt"] != test["prompt"]


def test_parquet_and_a_single_saved_dataset_are_split_too(tmp_path: Path) -> None:
    rows = [{"prompt": f"{i}+2=", "answer": str(i + 2)} for i in range(30)]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "d.parquet", tmp_path / "saved"):
        train, test = load_data(recipe(path=str(source)))
        assert len(test) == 3 and not prompts(train) & prompts(test)


def test_a_repeated_prompt_is_never_on_both_sides(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [f"{i % 10}+1=" for i in range(100)])  # each prompt 10 times
    train, test = load_data(recipe(path=str(path)))
    assert len(prompts(test)) == 1 and len(test) == 10 and len(train) == 90  # a tenth of the prompts, all their rows
    assert not prompts(train) & prompts(test)
    same = write_jsonl(tmp_path / "same.jsonl", ["0+1="] * 50)
    with pytest.raises(RecipeError, match=r"recipe key 'data.path': '.*same.jsonl' has 1 distinct prompt\(s\) in "
                                          r"50 row\(s\)"):
        load_data(recipe(path=str(same)))


@pytest.mark.parametrize("rows", [0, 1])
def test_too_little_data_is_one_line_naming_the_file(tmp_path: Path, rows: int) -> None:
    path = tmp_path / "tiny.jsonl"
    write_jsonl(path, [f"{i}+1=" for i in range(rows)])
    with pytest.raises(RecipeError, match=r"recipe key 'data.path': .*'.*tiny.jsonl'") as err:  # was: 0% -> 100%
        load_data(recipe(path=str(path)))
    assert "\n" not in str(err.value)


def test_eval_path_is_the_held_out_set_less_any_training_prompt(tmp_path: Path) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", [f"{i}+1=" for i in range(20)])
    eval_file = write_jsonl(tmp_path / "eval.jsonl", ["0+1=", "50+1=", "51+1="])
    train, test = load_data(recipe(path=str(train_file), eval_path=str(eval_file)))
    assert len(train) == 20 and test["prompt"] == ["50+1=", "51+1="]
    only_seen = write_jsonl(tmp_path / "seen.jsonl", ["0+1=", "1+1="])
    with pytest.raises(RecipeError, match=r"recipe key 'data.eval_path': '.*seen.jsonl': all 2 held-out prompts"):
        load_data(recipe(path=str(train_file), eval_path=str(only_seen)))
    with pytest.raises(RecipeError, match=r"recipe key 'data.eval_path': data file '.*missing.jsonl' does not exist"):
        load_data(recipe(path=str(train_file), eval_path=str(tmp_path / "missing.jsonl")))


def test_a_saved_dataset_dict_uses_its_test_split_or_is_split_by_the_seed(tmp_path: Path) -> None:
    train_rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(30)]
    test_rows = [{"prompt": f"{i}+9=", "answer": str(i + 9)} for i in range(5)] + [train_rows[0]]
    DatasetDict({"train": Dataset.from_list(train_rows), "test": Dataset.from_list(test_rows)}).save_to_disk(
        str(tmp_path / "both"))
    train, test = load_data(recipe(path=str(tmp_path / "both")))
    assert len(train) == 30 and prompts(test) == {f"{i}+9=" for i in range(5)}  # the repeated row is dropped
    DatasetDict({"train": Dataset.from_list(train_rows)}).save_to_disk(str(tmp_path / "train_only"))
    train, test = load_data(recipe(path=str(tmp_path / "train_only")))  # no test split: a seeded split, not none
    assert len(test) == 3 and not prompts(train) & prompts(test)
    with pytest.raises(RecipeError, match=r"recipe key 'data.eval_split': .* has no split 'validation' \(its splits "
                                          r"are train\)"):
        load_data(recipe(path=str(tmp_path / "train_only"), eval_split="validation"))
    with pytest.raises(RecipeError, match=r"recipe key 'data.path': saved dataset .* has no split 'dev'; its splits: "
                                          r"train"):
        load_data(recipe(path=str(tmp_path / "train_only"), split="dev"))


def test_broken_sources_are_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", \n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    not_saved = tmp_path / "plain_dir"
    not_saved.mkdir()
    for source, message in ((bad, "could not be read as json"), (empty, "has no rows"),
                            (not_saved, "is not a saved dataset")):
        with pytest.raises(RecipeError, match=f"recipe key 'data.path': .*{message}") as err:
            load_data(recipe(path=str(source)))
        assert "\n" not in str(err.value)


@pytest.mark.parametrize(("data", "message"), [
    ({"path": "d.jsonl", "eval_split": "test"},
     "recipe key 'data.eval_split': data.path 'd.jsonl' is a file, which has no splits: remove data.eval_split and "
     "set data.eval_path"),
    ({"path": "d.parquet", "eval_split": "test", "eval_path": "e.parquet"}, "remove data.eval_split"),
    ({"path": "org/dataset", "split": "train", "eval_split": "train"},
     "recipe key 'data.eval_split': 'train' is also data.split"),
    ({"path": "org/dataset", "eval_split": "test", "eval_path": "e.jsonl"},
     "recipe key 'data.eval_path': set one of data.eval_path"),
    ({"task": "arithmetic", "eval_path": "e.jsonl"}, "recipe key 'data.eval_path': holds out rows for data.path"),
])
def test_the_recipe_refuses_held_out_settings_that_cannot_hold_out(data: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message.replace(".", r"\.").replace("(", r"\(")):
        recipe(**data)


def test_a_file_recipe_round_trips_through_its_saved_form() -> None:
    """The default eval_split is unset, so a recipe written to recipe.yaml and read back is not refused."""
    first = recipe(path="d.jsonl", eval_path="e.jsonl")
    assert first.data.eval_split is None
    again = recipe_from_dict(first.model_dump(mode="json"))
    assert again.data == first.data


def test_preference_pairs_from_a_file_hold_out_no_training_prompt(tmp_path: Path) -> None:
    from align.build import train_and_held_out
    from align.data import load_preference_dataset

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i % 12}+1=", "chosen": "a", "rejected": "b"}) + "\n"
                            for i in range(60)))  # 12 prompts, 5 pairs each
    preference = recipe_from_dict({"data": {"path": str(path)}, "algorithm": {"preset": "dpo"}})
    train, test = train_and_held_out(preference, lambda p, split: load_preference_dataset(p, split=split))
    assert len(test) == 5 and len(train) == 55 and not prompts(train) & prompts(test)  # one prompt's five pairs
