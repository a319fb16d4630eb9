"""Weight sync is verified after every sync whenever the engine keeps its own weights: a deliberately stale engine
is caught, with versions and the gap, by the probe alone and inside the controller loop of the local runtime."""

from __future__ import annotations

import pytest
import torch

from align.models import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm
from align.trainers.probe import ProbeCheck, StaleWeightsError
from align.trainers.rollout_hf import HFRolloutEngine
from align.trainers.sequences import response_forward
from rewards import reward


class _Scorer:
    """The part of the Learner protocol the probe uses."""

    def __init__(self, model) -> None:
        self.model = model

    def logprobs(self, rollout):
        with torch.no_grad():
            logp, _, _ = response_forward(self.model, rollout.prompt_ids, rollout.prompt_mask,
                                          rollout.completion_ids, rollout.mask)
        return logp


def test_stale_engine_is_detected_and_a_real_sync_passes() -> None:
    tokenizer = build_char_tokenizer()
    config = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=2)
    learner = build_tiny_causal_lm(len(tokenizer), config)
    engine_model = build_tiny_causal_lm(len(tokenizer), config)  # a separate copy, as in another process
    engine = HFRolloutEngine(engine_model, tokenizer)
    probe = ProbeCheck(["1+1=", "23+4=", "9+9="], tolerance=1e-4)
    assert probe(engine, _Scorer(learner), 0, seed=0).max_gap < 1e-4  # same weights, same version

    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the learner takes a step...
    engine.weight_version = 1  # ...and the engine claims version 1 without loading it: a silent stale sync
    with pytest.raises(StaleWeightsError, match=r"weights v1\) disagrees with the learner \(v1\): max log-prob gap"):
        probe(engine, _Scorer(learner), 1, seed=0)

    engine_model.load_state_dict(learner.state_dict())  # the real sync
    engine.sync_weights(engine_model, 1)
    assert probe(engine, _Scorer(learner), 1, seed=0).max_gap < 1e-4
    with pytest.raises(StaleWeightsError, match=r"v1.*v2"):
        probe(engine, _Scorer(learner), 2, seed=0)  # a version mismatch alone is an error too


@reward("character_sum_for_probe_tests")
def character_sum(completion: str) -> float:
    """A reward with spread on a random model, so every step moves the weights."""
    return float(sum(map(ord, completion)) % 7)


class CopyingEngine(HFRolloutEngine):
    """An in-process engine with its own copy of the weights (as vLLM keeps), loaded at each sync unless
    ``stale`` is set."""

    shares_module = False
    stale_after: int | None = None

    def __init__(self, model, tokenizer, **options) -> None:
        import copy

        super().__init__(copy.deepcopy(model), tokenizer, **options)

    def sync_weights(self, model, version: int) -> None:
        if self.stale_after is None or version <= self.stale_after:
            self.model.load_state_dict(model.state_dict())
        self.weight_version = version


@pytest.fixture
def copying_engine():
    from align.trainers.engines import ROLLOUT_ENGINES

    ROLLOUT_ENGINES.register("copying", lambda model, tokenizer, model_dir, options: CopyingEngine(
        model, tokenizer, **options), engine=CopyingEngine)
    yield CopyingEngine
    ROLLOUT_ENGINES._entries.pop("copying")
    ROLLOUT_ENGINES._info.pop("copying")
    CopyingEngine.stale_after = None


def _recipe(tmp_path) -> dict:
    return {"name": "probe", "model": {"path": "tiny", "sft_warmup": None, "cache_dir": str(tmp_path / "cache"),
                                       "tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2,
                                                "intermediate_size": 64}},
            "data": {"task": "arithmetic", "task_options": {"digits": 1}, "eval_size": 4, "train_size": 32},
            "rollout": {"samples_per_prompt": 2, "prompts_per_step": 2, "max_new_tokens": 3},
            "algorithm": {"preset": "dr_grpo"}, "rewards": [{"name": "character_sum_for_probe_tests"}],
            "learner": {"lr": 1e-2, "steps": 3},
            "logging": {"dir": str(tmp_path / "runs"), "tensorboard": False, "progress": False, "eval_every": 10}}


def test_the_local_loop_probes_an_engine_with_its_own_weights(tmp_path, copying_engine, monkeypatch) -> None:
    from align import api
    from align.trainers.metrics import read_metrics

    # rollout.engine is a closed set in the recipe schema: the engine name the runtime resolves is replaced
    monkeypatch.setattr("align.local.engine_name", lambda recipe: "copying")
    monkeypatch.setattr("align.api.engine_name", lambda recipe: "copying")
    result = api.train(_recipe(tmp_path), progress=False, log=lambda _: None)
    rows = read_metrics(result.run_dir)
    assert [r["weight_version"] for r in rows[1:]] == [1.0, 2.0, 3.0]
    assert all(r["weight_sync/probe_max_gap"] < 1e-4 for r in rows[1:])  # probed every step, and in sync

    copying_engine.stale_after = 1  # from version 2 on, the engine keeps its old weights: caught at step 2
    with pytest.raises(StaleWeightsError, match=r"weights v2\) disagrees with the learner \(v2\)"):
        api.train(_recipe(tmp_path), "runtime.probe_tolerance=1e-5", progress=False, log=lambda _: None)


def test_an_engine_sharing_the_learners_model_is_not_probed(tmp_path) -> None:
    from align import api
    from align.trainers.metrics import read_metrics

    result = api.train(_recipe(tmp_path), "rollout.engine=hf", progress=False, log=lambda _: None)
    assert all("weight_sync/probe_max_gap" not in r for r in read_metrics(result.run_dir))
