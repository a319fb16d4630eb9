"""Built-in rewards on hand-made inputs."""

from __future__ import annotations

import pytest

from rewards.functions.code import SandboxError, code_tests, extract_code
from rewards.functions.length import dapo_overlong, length_budget
from rewards.functions.matching import exact_match, extract_answer, format_check, math_equivalence
from rewards.functions.repetition import ends_in_loop, repeated_ngram_fraction, repetition_penalty


@pytest.mark.parametrize(("completion", "answer", "expected"), [
    ("so <answer> 42 </answer>", "42", 1.0),
    ("the result is \\boxed{7}", "7", 1.0),
    ("  Paris ", "paris", 1.0),
    ("<answer>41</answer>", "42", 0.0),
])
def test_exact_match(completion: str, answer: str, expected: float) -> None:
    assert exact_match(completion, answer) == expected


def test_extract_answer_modes() -> None:
    text = "<answer>a</answer> then \\boxed{b}"
    assert extract_answer(text) == "a"
    assert extract_answer(text, "boxed") == "b"
    assert extract_answer("no tags", "tag") == ""
    with pytest.raises(ValueError, match="extract must be"):
        extract_answer(text, "middle")


@pytest.mark.parametrize(("completion", "answer", "expected"), [
    ("the answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("<answer>2/4</answer>", "\\frac{1}{2}", 1.0),
    ("<answer>3</answer>", "2", 0.0),
    ("I do not know", "2", 0.0),
])
def test_math_equivalence(completion: str, answer: str, expected: float) -> None:
    assert math_equivalence(completion, answer) == expected


def test_format_check() -> None:
    assert format_check("<think>hm</think> <answer>4</answer>") == 1.0
    assert format_check("<answer>4</answer>") == 0.0
    assert format_check("ab", pattern="a.") == 1.0


@pytest.mark.parametrize(("length", "expected"), [(10, 0.0), (12, 0.0), (14, -0.5), (16, -1.0), (17, -1.0)])
def test_dapo_overlong_matches_eq_13(length: int, expected: float) -> None:
    # L_max = 16, L_cache = 4: free up to 12, linear to -1 at 16, -1 beyond
    assert dapo_overlong([0] * length, max_length=16, cache_length=4) == pytest.approx(expected)


def test_length_budget_tightens_over_training() -> None:
    ids = [0] * 300
    assert length_budget(ids, 0, start_budget=400, end_budget=200, ramp_steps=100) == 0.0
    assert length_budget(ids, 50, start_budget=400, end_budget=200, ramp_steps=100) == 0.0  # budget 300
    assert length_budget(ids, 100, start_budget=400, end_budget=200, ramp_steps=100) == pytest.approx(-0.5)
    assert length_budget([0] * 500, 1000, start_budget=400, end_budget=200, ramp_steps=100) == -1.0


def test_repetition_and_loops() -> None:
    assert repeated_ngram_fraction([1, 2, 3, 4], 2) == 0.0
    assert repeated_ngram_fraction([1, 2, 1, 2, 1, 2], 2) == pytest.approx(1 - 2 / 5)
    assert ends_in_loop([5, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3], 4, 5)
    assert not ends_in_loop([1, 2, 3, 1, 2, 3, 1, 2, 3], 4, 5)
    assert repetition_penalty([9, 7, 7, 7, 7]) == -1.0
    assert repetition_penalty([1, 2, 3, 4, 5]) == 0.0


def test_code_tests_scores_the_fraction_passed() -> None:
    completion = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```"
    assert extract_code(completion).startswith("def add")
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]
    assert code_tests(completion, tests) == pytest.approx(2 / 3)
    assert code_tests("def add(a, b): return a - b", tests) == 0.0
    assert code_tests("this is not python", tests) == 0.0  # loads with an error: every test fails


def test_code_that_forges_an_exit_is_an_error_not_a_pass() -> None:
    with pytest.raises(SandboxError, match="no result"):
        code_tests("import os\nos._exit(0)", ["assert True"])
    with pytest.raises(SandboxError, match="no result"):
        code_tests("import sys\nprint('deadbeef 1 1')\nsys.stdout.flush()\nimport os\nos._exit(0)", ["assert False"])


def test_reward_model_scores_with_a_local_classifier(tmp_path) -> None:
    from align.models import TinyModelConfig, build_char_tokenizer, build_tiny_classifier
    from rewards.functions.reward_model import reward_model

    tokenizer = build_char_tokenizer()
    model = build_tiny_classifier(len(tokenizer), config=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2,
                                                                       intermediate_size=64))
    tokenizer.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    scores = reward_model(["1+1=", "1+1=", "2+2="], ["2", "22", "4"], path=str(tmp_path), batch_size=2)
    assert len(scores) == 3 and len(set(scores)) == 3
    again = reward_model(["1+1="], ["22"], path=str(tmp_path))  # same score alone as in a padded batch
    assert again[0] == pytest.approx(scores[1], abs=1e-5)
    with pytest.raises(ValueError, match="needs options"):
        reward_model(["a"], ["b"])
