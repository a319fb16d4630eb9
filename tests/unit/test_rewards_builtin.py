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


ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert 7 == add(3, 4)"]


@pytest.mark.parametrize("hack", [
    # rebinding exec: the old harness ran each test with exec, so every assert became a no-op
    "import builtins\nbuiltins.exec = lambda *a, **k: None\ndef add(a, b): return 99",
    # reaching into the harness's frame to rebind what it reports
    "import sys\ng = sys._getframe(1).f_globals\ng['report'] = lambda index, text: g['write']("
    "'\\n' + g['json'].dumps([g['nonce'], index, 'True']) + '\\n')\ndef add(a, b): return 99",
    # a value equal to everything: the comparison is made outside, on a literal
    "class Anything:\n    def __eq__(self, other): return True\n    def __repr__(self): return 'Anything()'\n"
    "def add(a, b): return Anything()",
    # forging every report with the harness's nonce: it must guess the expected values, which it never sees
    "import sys, json, atexit\nnonce = sys._getframe(1).f_globals['nonce']\n"
    "atexit.register(lambda: [print(json.dumps([nonce, i, 'True'])) for i in range(3)])\ndef add(a, b): return 99",
    # exiting before the harness reports
    "import os\nos._exit(0)",
])
def test_code_that_tampers_with_the_harness_never_scores_a_pass(hack: str) -> None:
    try:
        score = code_tests(hack, ADD_TESTS)
    except SandboxError:
        return  # a run without a consistent report is an error: the failure policy applies, never a pass
    assert score == 0.0


def test_code_tests_judges_values_outside_and_refuses_tests_it_cannot() -> None:
    from align.errors import InputError
    from rewards.functions.code import IOCase, ValueCase, parse_test

    assert parse_test("assert add(1, 2) == 3") == ValueCase("add(1, 2)", 3)
    assert parse_test("assert [1, 2] == f(x)") == ValueCase("f(x)", [1, 2])
    assert parse_test("assert not is_even(3)") == ValueCase("is_even(3)", False, truth=True)
    assert parse_test({"stdin": "1 2", "stdout": "3"}) == IOCase("1 2", "3")
    for bad in ("assert f(1) == g(2)", "for i in range(3): assert f(i)", "x = 1", "assert (", {"stdin": "1"}):
        with pytest.raises(InputError, match="code_tests"):
            parse_test(bad)  # type: ignore[arg-type]
    assert code_tests("def is_even(x): return x % 2 == 0",
                      ["assert is_even(4)", "assert not is_even(3)", "assert is_even(3)"]) == pytest.approx(2 / 3)
    program = "print(sum(map(int, input().split())))"
    assert code_tests(program, [{"stdin": "1 2\n", "stdout": "3\n"}, {"stdin": "5 5", "stdout": "11"}]) == 0.5
    assert code_tests("def add(a, b): return [a, b]", ["assert add(1, 2) == [1, 2]"]) == 1.0


@pytest.mark.parametrize(("name", "options", "words"), [
    ("exact_match", {"extract": "nosuch_mode"}, "option 'extract' takes one of 'auto', 'tag', 'boxed', 'full'"),
    ("math_equivalence", {"extract": "boxd"}, "(did you mean 'boxed'?)"),
    ("exact_match", {"normalize": "yes"}, "option 'normalize' takes true or false"),
    ("repetition_penalty", {"ngram": 0}, "option 'ngram' takes an integer >= 1; got 0"),
    ("repetition_penalty", {"loop_min_repeats": 1}, "option 'loop_min_repeats' takes an integer >= 2"),
    ("dapo_overlong", {"cache_length": 0}, "option 'cache_length' takes an integer > 0"),
    ("length_budget", {"ramp_steps": -1}, "option 'ramp_steps' takes an integer >= 0"),
    ("length_budget", {"penalty": "high"}, "option 'penalty' takes a number"),
    ("reward_model", {"batch_size": 0}, "option 'batch_size' takes an integer >= 1"),
])
def test_builtin_options_declare_the_values_they_take(name: str, options: dict, words: str) -> None:
    """Declared in the signature, refused before any sample is scored (by the composer, and by align validate)."""
    from align.errors import InputError
    from rewards import RewardComposer, RewardTerm

    with pytest.raises(InputError) as caught:
        RewardComposer([RewardTerm(name, options=options)])
    assert words in str(caught.value)
    RewardComposer([RewardTerm(name, options={"extract": "tag"} if "extract" in options else {})])  # a good value
