"""Hostile and careless input: every case exits with code 2 and prints exactly one line on stderr, naming the key or
file and the fix; never a traceback, never a silent "ok" for a recipe that would fail (or do nothing) at step 0.

A case is the files to write under ``tmp_path`` and the CLI arguments; the CLI runs in this process (typer's
``CliRunner``), so the corpus costs seconds. ``{tmp}`` in any text is ``tmp_path``, ``{model}`` a tiny saved model
directory, ``{readonly}`` a directory nothing can be created in. Two cases also run in a real subprocess, where an
exit code from a plugin's ``sys.exit`` would otherwise escape.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from align.cli import app

GOOD: dict[str, Any] = {
    "name": "careless",
    "model": {"path": "tiny", "cache_dir": "{tmp}/cache"},
    "data": {"task": "arithmetic", "task_options": {"digits": 1}, "train_size": 60, "eval_size": 20},
    "rollout": {"max_new_tokens": 4, "samples_per_prompt": 4},
    "algorithm": {"preset": "grpo"},
    "rewards": [{"name": "exact_match", "options": {"extract": "full"}}],
    "logging": {"dir": "{tmp}/runs"},
}
GOOD_TEXT = yaml.safe_dump(GOOD, sort_keys=False)


def recipe(changes: Mapping[str, Any] | None = None, drop: tuple[str, ...] = ()) -> str:
    """GOOD with ``changes`` merged in section by section (a section's keys replace, others stay) as YAML."""
    data = copy.deepcopy(GOOD)
    for key in drop:
        data.pop(key)
    for key, value in (changes or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return yaml.safe_dump(data, sort_keys=False)


def from_file(path: str = "{tmp}/train.jsonl", **changes: Any) -> str:
    """GOOD reading its data from a file, with the saved model directory (the tiny model needs a task)."""
    return recipe({"model": {"path": "{model}"}, "data": {"task": None, "path": path, "task_options": {}}, **changes})


JSONL_ROWS = "".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(20))


def lora(**options: Any) -> dict[str, Any]:
    return {"lora": {"enabled": True, **options}}


@dataclass(frozen=True)
class Case:
    expect: tuple[str, ...]  # substrings of the one error line
    recipe: str | bytes = GOOD_TEXT  # written to recipe.yaml
    overrides: tuple[str, ...] = ()
    files: Mapping[str, str | bytes] = field(default_factory=dict)  # more files under tmp_path ("x/": a directory)
    args: tuple[str, ...] = ()  # the whole command line instead of `validate recipe.yaml <overrides>`


_NO_CONFIG_WEIGHTS = {"run/final/config.json": "{}", "run/final/model.safetensors": b""}

CASES: dict[str, Case] = {
    # --- the recipe file itself -------------------------------------------------------------------------------
    "non_utf8_recipe": Case(("recipe.yaml", "not UTF-8", "0xe9", "save it as UTF-8"),
                            recipe=b"name: caf\xe9\n" + GOOD_TEXT.split("\n", 1)[1].encode()),
    "utf16_recipe": Case(("recipe.yaml", "not UTF-8"), recipe=GOOD_TEXT.encode("utf-16")),
    "duplicate_key": Case(("recipe.yaml", "key 'lr' appears twice", "line", "keep one"),
                          recipe=GOOD_TEXT + "learner:\n  lr: 0.1\n  steps: 3\n  lr: 0.01\n"),
    "duplicate_section": Case(("key 'rollout' appears twice",), recipe=GOOD_TEXT + "rollout: {max_new_tokens: 2}\n"),
    "duplicate_key_in_override": Case(("override algorithm.overrides", "key 'kl' appears twice"),
                                      overrides=("algorithm.overrides={kl: null, kl: k3}",)),
    "recipe_is_a_directory": Case(("is a directory",), args=("validate", "{tmp}")),
    "missing_recipe": Case(("does not exist",), args=("validate", "{tmp}/nope.yaml")),
    # --- numbers --------------------------------------------------------------------------------------------
    "seed_1e23_override": Case(("'seed'", "0 to 4294967294"), overrides=("seed=1e23",)),
    "seed_1e23_yaml": Case(("'seed'", "0 to 4294967294"), recipe=recipe({"seed": "1e23"}).replace("'1e23'", "1e23")),
    "seed_negative": Case(("'seed'", "0 to 4294967294"), recipe=recipe({"seed": -3})),
    "steps_true": Case(("'learner.steps'", "boolean true"), recipe=recipe({"learner": {"steps": True}})),
    "lora_rank_false": Case(("'lora.r'", "boolean false"), recipe=recipe(lora(r=False))),
    "lr_inf": Case(("'learner.lr'", "finite"), overrides=("learner.lr=.inf",)),
    "lr_nan": Case(("'learner.lr'", "finite"), recipe=GOOD_TEXT + "learner: {lr: .nan}\n"),
    "lr_negative": Case(("'learner.lr'", "greater than 0"), recipe=recipe({"learner": {"lr": -1e-4}})),
    "betas_length": Case(("'learner.betas'", "two numbers in [0, 1)"), recipe=recipe({"learner": {"betas": [0.9]}})),
    "betas_range": Case(("'learner.betas'", "two numbers in [0, 1)"),
                        recipe=recipe({"learner": {"betas": [0.9, 1.5]}})),
    "reward_weight_nan": Case(("'rewards.0.weight'", "finite"), overrides=("rewards.0.weight=.nan",)),
    "reward_weight_inf": Case(("'rewards.0.weight'", "finite"), overrides=("rewards.0.weight=-.inf",)),
    "duplicate_reward": Case(("'rewards.1.name'", "'exact_match' is already rewards.0", "appear once"),
                             recipe=recipe({"rewards": [{"name": "exact_match"}, {"name": "exact_match"}]})),
    "tiny_heads": Case(("'model.tiny.hidden_size'", "multiple of num_heads"),
                       recipe=recipe({"model": {"tiny": {"hidden_size": 130, "num_heads": 4}}})),
    # --- the run's name ---------------------------------------------------------------------------------------
    "name_traversal": Case(("'name'", "one path component", "e.g. name: my_run"),
                           overrides=("name=../../../tmp/x",)),
    "name_with_slash": Case(("'name'", "one path component"), recipe=recipe({"name": "team/run"})),
    "name_hidden": Case(("'name'", "no leading '.'"), recipe=recipe({"name": ".run"})),
    "name_empty": Case(("'name'", "not empty"), recipe=recipe({"name": ""})),
    "name_wildcard": Case(("'name'", "wildcards"), recipe=recipe({"name": "run*"})),
    # --- the device --------------------------------------------------------------------------------------------
    "device_gpu": Case(("'runtime.device'", "'gpu' is not a device", "cuda:<index>"),
                       recipe=recipe({"runtime": {"device": "gpu"}})),
    "device_tpu": Case(("'runtime.device'", "'tpu' is not a device"), overrides=("runtime.device=tpu",)),
    "device_missing_cuda_index": Case(("'runtime.device'", "'cuda:97' is not on this machine"),
                                      overrides=("runtime.device=cuda:97",)),
    # --- directories ---------------------------------------------------------------------------------------------
    "logging_dir_is_a_file": Case(("'logging.dir'", "is a file, not a directory"),
                                  files={"notes.txt": "x"}, overrides=("logging.dir={tmp}/notes.txt",)),
    "logging_dir_under_a_file": Case(("'logging.dir'", "is a file"), files={"notes.txt": "x"},
                                     overrides=("logging.dir={tmp}/notes.txt/runs",)),
    "logging_dir_read_only": Case(("'logging.dir'", "cannot create directories", "writable directory"),
                                  overrides=("logging.dir={readonly}/runs",)),
    "cache_dir_read_only": Case(("'model.cache_dir'", "cannot create directories"),
                                overrides=("model.cache_dir={readonly}/cache",)),
    "logging_backend_unknown": Case(("'logging.backends.0'", "'wandb' or 'mlflow'"),
                                    recipe=recipe({"logging": {"backends": ["neptune"]}})),
    # --- the model ---------------------------------------------------------------------------------------------
    "empty_model_dir": Case(("'model.path'", "no config.json", "weights", "Hugging Face model directory"),
                            files={"model/": ""}, overrides=("model.path={tmp}/model",)),
    "model_dir_without_weights": Case(("'model.path'", "no weights"), files={"model/config.json": "{}"},
                                      overrides=("model.path={tmp}/model",)),
    "model_dir_empty_config": Case(("'model.path'", "cannot read the model configuration"),
                                   files={"model/config.json": "{}", "model/model.safetensors": b""},
                                   overrides=("model.path={tmp}/model",)),
    "model_dir_torn_config": Case(("'model.path'", "cannot read the model configuration"),
                                  files={"model/config.json": '{"model_type": "lla', "model/model.safetensors": b""},
                                  overrides=("model.path={tmp}/model",)),
    "model_path_missing": Case(("'model.path'", "does not exist"), overrides=("model.path={tmp}/no/such/model",)),
    "model_hub_id_offline": Case(("'model.path'", "hub is offline or does not have it"),
                                 overrides=("model.path=nobody-here/no-such-model",)),
    "tokenizer_missing": Case(("'model.tokenizer'", "cannot load a tokenizer", "no/tokenizer"),
                              overrides=("model.tokenizer={tmp}/no/tokenizer",)),
    "tiny_without_a_task": Case(("'model.path'", "'tiny' builds a model for a synthetic task"),
                                files={"train.jsonl": JSONL_ROWS}, recipe=from_file(model={"path": "tiny"})),
    "lora_target_typo_tiny": Case(("'lora.target_modules'", "no module named 'qproj'", "did you mean 'q_proj'"),
                                  recipe=recipe(lora(target_modules=["qproj", "v_proj"]))),
    "lora_target_missing_in_dir": Case(("'lora.target_modules'", "no module named 'c_attn'", "q_proj"),
                                       recipe=recipe({"model": {"path": "{model}"},
                                                      **lora(target_modules=["c_attn"])})),
    "lora_no_targets": Case(("'lora.target_modules'", "at least 1 item"), recipe=recipe(lora(target_modules=[]))),
    # --- data --------------------------------------------------------------------------------------------------
    "missing_data_file": Case(("'data.path'", "does not exist"), recipe=from_file("{tmp}/nope.jsonl")),
    "data_without_prompt_column": Case(("'data.path'", "no column 'prompt'", "question"),
                                       files={"train.jsonl": JSONL_ROWS.replace("prompt", "question")},
                                       recipe=from_file()),
    "torn_jsonl": Case(("'data.path'", "train.jsonl", "JSON"), files={"train.jsonl": JSONL_ROWS + '{"pro'},
                       recipe=from_file()),
    "jsonl_of_one_prompt": Case(("'data.path'", "1 distinct prompt(s)", "data.eval_path"),
                                files={"train.jsonl": '{"prompt": "1+1=", "answer": "2"}\n' * 20}, recipe=from_file()),
    "empty_jsonl": Case(("'data.path'", "no rows"), files={"train.jsonl": ""}, recipe=from_file()),
    "digits_zero": Case(("'data.task_options'", "'digits'", "1 to 9"), overrides=("data.task_options.digits=0",)),
    "digits_fifty": Case(("'data.task_options'", "'digits'", "1 to 9"), overrides=("data.task_options.digits=50",)),
    "digits_text": Case(("'data.task_options'", "'digits'", "got 'two'"), overrides=("data.task_options.digits=two",)),
    "ops_unknown": Case(("'data.task_options'", "'ops'", "'+-*'"), overrides=("data.task_options.ops=/",)),
    "sorting_length_one": Case(("'data.task_options'", "'length'", "2 to 32"),
                               recipe=recipe({"data": {"task": "sorting", "task_options": {"length": 1}}})),
    "countdown_numbers_huge": Case(("'data.task_options'", "'numbers'"),
                                   recipe=recipe({"data": {"task": "countdown", "task_options": {"numbers": 40}}})),
    "sft_without_rows_to_validate_on": Case(("'data.train_size'", "SFT warm start", "at least 5"),
                                            overrides=("data.train_size=3",)),
    "task_too_small_for_eval_size": Case(("only 100 distinct problems", "data.eval_size"),
                                         overrides=("data.eval_size=500",)),
    "answers_longer_than_completions": Case(("'rollout.max_new_tokens'", "cannot hold any answer"),
                                            overrides=("data.task_options={digits: 4, ops: '*'}",
                                                       "rollout.max_new_tokens=3")),
    # --- options: unknown names are refused with the valid ones listed -----------------------------------------
    "unknown_task_option": Case(("'data.task_options.digitz'", "digits, ops"),
                                overrides=("data.task_options.digitz=2",)),
    "unknown_reward_option": Case(("'rewards.0.options'", "no option 'extrakt'", "extract"),
                                  overrides=("rewards.0.options.extrakt=full",)),
    "reward_option_bad_value": Case(("'rewards.0.options.extract'", "'nosuch_mode'", "'full'"),
                                    overrides=("rewards.0.options.extract=nosuch_mode",)),
    "unknown_credit": Case(("'credit.name'", "did you mean 'uniform'"), recipe=recipe({"credit": {"name": "unifrom"}})),
    "credit_option_typo": Case(("'credit.options.conflict_wieght'", "did you mean 'conflict_weight'", "mode"),
                               recipe=recipe({"algorithm": {"preset": "gtpo"},
                                              "credit": {"name": "gtpo_conflict",
                                                         "options": {"conflict_wieght": 2.0}}})),
    "credit_option_bad_value": Case(("'credit.options.mode'", "'prefix_suffix' or 'any_position'", "'sideways'"),
                                    recipe=recipe({"algorithm": {"preset": "gtpo"},
                                                   "credit": {"name": "gtpo_conflict",
                                                              "options": {"mode": "sideways"}}})),
    "unknown_engine_option": Case(("'rollout.engine_options.batchsize'", "batch_size"),
                                  recipe=recipe({"rollout": {"engine": "hf", "engine_options": {"batchsize": 8}}})),
    "engine_option_bad_value": Case(("'rollout.engine_options.batch_size'", "valid integer", "'many'"),
                                    recipe=recipe({"rollout": {"engine": "hf",
                                                               "engine_options": {"batch_size": "many"}}})),
    "unknown_algorithm_field": Case(("'algorithm.overrides.klcoef'", "unknown AlgorithmSpec field", "kl_coef"),
                                    overrides=("algorithm.overrides.klcoef=0",)),
    "unknown_loss_option": Case(("has no option 'clip'", "valid options"),
                                overrides=("algorithm.overrides.loss_kwargs={clip: 0.2}",)),
    "algorithm_override_bad_value": Case(("'algorithm.overrides.kl_coef'", "valid number", "'lots'"),
                                         overrides=("algorithm.overrides.kl_coef=lots",)),
    "unknown_runtime_key": Case(("'runtime.gpus'", "unknown key", "device"), overrides=("runtime.gpus=2",)),
    "unknown_logging_key": Case(("'logging.backend'", "unknown key", "backends"),
                                overrides=("logging.backend=wandb",)),
    "unknown_credit_diagnostic": Case(("'logging.credit_diagnostics.0'", "did you mean 'uniform'"),
                                      recipe=recipe({"logging": {"credit_diagnostics": ["unifrom"]}})),
    "preference_without_its_credit": Case(("'credit'", "cdpo", "contrastive_critical"),
                                          recipe=recipe({"algorithm": {"preset": "cdpo"}})),
    "credit_model_missing": Case(("'credit.options'", "does not exist"),
                                 recipe=recipe({"algorithm": {"preset": "cdpo"},
                                                "credit": {"name": "contrastive_critical",
                                                           "options": {"positive_model": "{tmp}/no/model"}}})),
    # --- plugins -----------------------------------------------------------------------------------------------
    "plugin_calls_sys_exit": Case(("'plugins'", "'careless_exit_plugin'", "sys.exit(7)"),
                                  files={"careless_exit_plugin.py": "import sys\nsys.exit(7)\n"},
                                  recipe=recipe({"plugins": ["careless_exit_plugin"]})),
    "plugin_raises": Case(("'plugins'", "'careless_raising_plugin'", "RuntimeError: no config"),
                          files={"careless_raising_plugin.py": "raise RuntimeError('no config')\n"},
                          recipe=recipe({"plugins": ["careless_raising_plugin"]})),
    # --- align train stops at the same line --------------------------------------------------------------------
    "train_name_traversal": Case(("'name'", "one path component"), args=("train", "{tmp}/recipe.yaml",
                                                                      "name=../escape")),
    "train_missing_data_file": Case(("'data.path'", "does not exist"), recipe=from_file("{tmp}/nope.jsonl"),
                                    args=("train", "{tmp}/recipe.yaml")),
    "resume_without_a_run": Case(("--resume", "no run of 'careless' with a checkpoint"),
                                 args=("train", "{tmp}/recipe.yaml", "--resume")),
    "resume_from_a_directory_without_checkpoints": Case(("--resume", "no complete checkpoint"), files={"old/": ""},
                                                        args=("train", "{tmp}/recipe.yaml", "--resume-from",
                                                              "{tmp}/old")),
    # --- align eval ----------------------------------------------------------------------------------------------
    "eval_run_with_empty_config": Case(("cannot read the model configuration", "run/final"),
                                       files=_NO_CONFIG_WEIGHTS,
                                       args=("eval", "{tmp}/run", "--data", "arithmetic", "--size", "20")),
    "eval_run_without_weights": Case(("no weights",), files={"run/final/config.json": "{}"},
                                     args=("eval", "{tmp}/run", "--data", "arithmetic", "--size", "20")),
    "eval_not_a_run": Case(("neither a run directory",), files={"run/": ""},
                           args=("eval", "{tmp}/run", "--data", "arithmetic")),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama with the character tokenizer: a real model directory, built in a second."""
    from align.models.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm

    path = tmp_path_factory.mktemp("model")
    tokenizer = build_char_tokenizer()
    build_tiny_causal_lm(len(tokenizer), TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2,
                                                         intermediate_size=32)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def read_only_dir(tmp_path: Path) -> Path:
    """A directory nothing can be created in. Root ignores permission bits, so for root: /proc, which refuses."""
    if os.geteuid() == 0:
        return Path("/proc")
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o555)
    return path


def fill(text: str, tmp_path: Path, model: Path) -> str:
    if "{readonly}" in text:
        text = text.replace("{readonly}", str(read_only_dir(tmp_path)))
    return text.replace("{tmp}", str(tmp_path)).replace("{model}", str(model))


def write_case(case: Case, tmp_path: Path, model: Path) -> list[str]:
    """Writes the case's files; returns its command line."""
    raw = case.recipe if isinstance(case.recipe, bytes) else fill(case.recipe, tmp_path, model).encode()
    (tmp_path / "recipe.yaml").write_bytes(raw)
    for name, content in case.files.items():
        target = tmp_path / name
        if name.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    args = case.args or ("validate", "{tmp}/recipe.yaml", *case.overrides)
    return [fill(a, tmp_path, model) for a in args]


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_input_is_one_line_and_exit_2(name: str, tmp_path: Path, model_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if name == "device_missing_cuda_index" and torch.cuda.device_count() > 97:
        pytest.skip("this machine has cuda:97")
    case = CASES[name]
    monkeypatch.syspath_prepend(str(tmp_path))  # where plugin cases write their modules
    args = write_case(case, tmp_path, model_dir)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    line = one_error_line(result.stderr)
    for words in case.expect:
        assert words in line, (words, line)


def test_corpus_size() -> None:
    assert len(CASES) >= 40


def test_the_good_recipe_validates(tmp_path: Path, model_dir: Path) -> None:
    """The corpus' base recipe is fine: each case fails for its own reason. The model directory validates too."""
    args = write_case(Case(()), tmp_path, model_dir)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: careless")
    lora_on_dir = recipe({"model": {"path": "{model}"}, **lora(target_modules=["q_proj", "down_proj"])})
    args = write_case(Case((), recipe=lora_on_dir), tmp_path, model_dir)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()  # validate writes nothing
    args = write_case(Case((), recipe=from_file(), files={"train.jsonl": JSONL_ROWS}), tmp_path, model_dir)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


def test_strings_that_yaml_leaves_as_text_still_read_as_numbers(tmp_path: Path, model_dir: Path) -> None:
    """`lr: 1e-4` is a string to YAML 1.1; refusing booleans must not make numbers strict."""
    args = write_case(Case((), recipe=GOOD_TEXT + "learner: {lr: 1e-4, steps: '5'}\nseed: 1e3\n"), tmp_path,
                      model_dir)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name", ["plugin_calls_sys_exit", "non_utf8_recipe"])
def test_in_a_real_process(name: str, tmp_path: Path, model_dir: Path) -> None:
    """Outside the test runner's SystemExit handling: the plugin's exit code 7 must not escape."""
    case = CASES[name]
    args = write_case(case, tmp_path, model_dir)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "align.cli", *args], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    line = one_error_line(out.stderr)
    for words in case.expect:
        assert words in line, (words, line)



def test_yaml_anchors_and_merge_keys_are_not_duplicates() -> None:
    """`<<: *defaults` then a key of its own is YAML's way to override; only a key written twice is refused."""
    from align.config import load_yaml

    assert load_yaml("base: &b {lr: 1, steps: 2}\nlearner:\n  <<: *b\n  lr: 3\n") == {
        "base": {"lr": 1, "steps": 2}, "learner": {"lr": 3, "steps": 2}}
