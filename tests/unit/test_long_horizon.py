"""Long Horizon Temperature Scaling by resampling (arXiv 2302.03686; align/trainers/resampling.py): weights by
hand, frequencies on a toy distribution, the recipe keys, and the option honoured by the workload."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import pytest
import torch

import rewards
from align.algorithms import PRESETS
from align.config import RecipeError, recipe_from_dict
from align.errors import InputError
from align.trainers.protocols import Rollout, SamplingParams
from align.trainers.resampling import (
    effective_sample_size,
    long_horizon_resample,
    resample,
    sequence_logprob,
    tempered_log_weights,
)
from align.trainers.sampler import PromptSampler
from align.trainers.workload import PolicyWorkload
from rewards import RewardComposer
from rewards.adapters import ComposerRewardFunction


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=0, atol=1e-9)


def test_weights_and_ess_by_hand() -> None:
    """Group 0, T = 0.5: w ~ p^(1/T - 1) = p, so p = (0.5, 0.25, 0.25) keeps its weights; ESS = 1 / (0.25 + 2 *
    0.0625) = 8/3. Group 1, T = 2 would be p^(-1/2) = (1/0.8, 1/0.2) = (1.25, 5) -> (0.2, 0.8); ESS = 1 / 0.68."""
    seq = torch.tensor([0.5, 0.64, 0.25, 0.04, 0.25], dtype=torch.float64).log()
    groups = torch.tensor([0, 1, 0, 1, 0])  # interleaved: weights normalise within each group
    lw = tempered_log_weights(seq, groups, temperature=0.5)
    close(lw.exp()[[0, 2, 4]], [0.5, 0.25, 0.25])
    close(effective_sample_size(lw, groups)[0], 8 / 3)
    lw2 = tempered_log_weights(seq, groups, temperature=2.0)
    close(lw2.exp()[[1, 3]], [0.2, 0.8])
    close(effective_sample_size(lw2, groups)[1], 1 / 0.68)
    close(tempered_log_weights(seq, groups, temperature=1.0).exp(), [1 / 3, 0.5, 1 / 3, 0.5, 1 / 3])  # T = 1: uniform
    # log p(y) sums the masked token log-probs
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]])
    close(sequence_logprob(logp, torch.tensor([[1, 1, 0], [1, 0, 0]])), [-3.0, -0.5])


def test_weights_refuse_what_would_poison_them() -> None:
    groups = torch.zeros(2, dtype=torch.long)
    with pytest.raises(InputError, match="finite number > 0"):
        tempered_log_weights(torch.zeros(2), groups, temperature=0.0)
    with pytest.raises(InputError, match="finite sequence log-probs"):
        tempered_log_weights(torch.tensor([0.0, -math.inf]), groups, temperature=2.0)
    with pytest.raises(InputError, match="draws must be >= 1"):
        resample(torch.zeros(2), groups, 0)


def test_resample_keeps_groups_together_and_follows_the_weights() -> None:
    """Groups come out in ascending id order, each contiguous; a candidate of weight 1 is every draw."""
    groups = torch.tensor([1, 0, 1, 0])
    lw = torch.tensor([-math.inf, 0.0, 0.0, -math.inf])  # group 1: row 2 only; group 0: row 1 only
    assert resample(lw, groups, 3).tolist() == [1, 1, 1, 2, 2, 2]


class ToyEngine:
    """Two-token completions from a known distribution: "a." with p 0.6 (a: 0.6, then . with 1), "bx" and "by"
    with 0.2 each (b: 0.4, then x or y with 0.5). Records what it is asked for."""

    SEQS: ClassVar[dict[str, tuple[float, float]]] = {"a.": (0.6, 1.0), "bx": (0.4, 0.5), "by": (0.4, 0.5)}

    def __init__(self) -> None:
        self.calls: list[tuple[int, SamplingParams]] = []

    def generate(self, prompts: Sequence[str], columns: Mapping[str, Sequence[Any]], *, samples_per_prompt: int,
                 params: SamplingParams, seed: int | None = None) -> Rollout:
        self.calls.append((samples_per_prompt, params))
        b = len(prompts) * samples_per_prompt
        names = list(self.SEQS)
        probs = torch.tensor([self.SEQS[n][0] * self.SEQS[n][1] for n in names])
        pick = torch.multinomial(probs, b, replacement=True, generator=torch.Generator().manual_seed(seed or 0))
        completions = [names[i] for i in pick.tolist()]
        logp = torch.tensor([[math.log(p) for p in self.SEQS[c]] for c in completions])
        return Rollout(prompts=[p for p in prompts for _ in range(samples_per_prompt)], completions=completions,
                       prompt_ids=torch.ones(b, 1, dtype=torch.long), prompt_mask=torch.ones(b, 1),
                       completion_ids=pick.unsqueeze(-1).repeat(1, 2), mask=torch.ones(b, 2), logp=logp,
                       group_ids=torch.arange(len(prompts)).repeat_interleave(samples_per_prompt), weight_version=0,
                       columns={k: [v[i] for i in range(len(prompts)) for _ in range(samples_per_prompt)]
                                for k, v in columns.items()})


def test_resampled_frequencies_match_the_sequence_level_tempered_distribution() -> None:
    """T = 0.5: p^2 / Z = (0.36, 0.04, 0.04) / 0.44 = (0.818, 0.091, 0.091). Per-token temperature would give "a."
    0.6^2 / (0.6^2 + 0.4^2) = 0.692 (the myopic answer the paper corrects), and plain sampling 0.6. 4000 prompts,
    G = 4 chosen from 32 candidates each, one fixed seed; the SIR bias at this pool size is about 0.003."""
    engine = ToyEngine()
    candidates = engine.generate([f"q{i}" for i in range(4000)], {}, samples_per_prompt=32,
                                 params=SamplingParams(max_new_tokens=2), seed=11)
    chosen, metrics = long_horizon_resample(candidates, temperature=0.5, samples_per_prompt=4, seed=12)
    counts = Counter(chosen.completions)
    freq = {k: counts[k] / len(chosen) for k in ToyEngine.SEQS}
    assert abs(freq["a."] - 0.36 / 0.44) < 0.015, freq
    assert abs(freq["bx"] - 0.04 / 0.44) < 0.015 and abs(freq["by"] - 0.04 / 0.44) < 0.015, freq
    assert abs(freq["a."] - 0.692) > 0.1  # not what per-token temperature gives
    # each prompt's 4 rows are contiguous, from that prompt's own candidates, with their logp unchanged
    assert chosen.group_ids.tolist() == torch.arange(4000).repeat_interleave(4).tolist()
    assert all(p == f"q{g}" for p, g in zip(chosen.prompts, chosen.group_ids.tolist(), strict=True))
    logp_of = {c: [math.log(p) for p in ToyEngine.SEQS[c]] for c in ToyEngine.SEQS}
    close(chosen.logp, [logp_of[c] for c in chosen.completions])
    # ESS with weights (0.6, 0.2, 0.2)-proportional: each pool's ESS is at most 32 and at least 1
    assert 1.0 <= metrics["lhts/ess"] <= 32.0 and metrics["lhts/ess_frac"] == pytest.approx(metrics["lhts/ess"] / 32)
    assert 0.0 < metrics["lhts/unique_frac"] <= 1.0
    again, _ = long_horizon_resample(candidates, temperature=0.5, samples_per_prompt=4, seed=12)
    assert again.completions == chosen.completions  # the seed fixes the draw (a resumed run samples the same)


@rewards.reward("lhts_test_is_a")
def lhts_test_is_a(completion: str) -> float:
    return float(completion == "a.")


def test_the_workload_asks_for_k_candidates_at_temperature_one_and_trains_on_the_resampled_rows() -> None:
    engine = ToyEngine()
    work = PolicyWorkload(spec=PRESETS.get("dr_grpo"), engine=engine,
                          rewards=ComposerRewardFunction(RewardComposer(["lhts_test_is_a"])), learner=None,  # type: ignore[arg-type]
                          prompts=["p0", "p1", "p2"], columns={"answer": ["x", "y", "z"]},
                          sampler=PromptSampler(3, 0), prompts_per_step=3, samples_per_prompt=4,
                          sampling=SamplingParams(max_new_tokens=2), long_horizon_temperature=0.5,
                          long_horizon_candidates=8)
    collected = work.collect(1, 0, prefetch=False)
    assert [n for n, _ in engine.calls] == [32]  # 4 requested x 8 candidates per prompt
    assert engine.calls[0][1].temperature == 1.0
    batch, rollout = collected.batch, collected.rollout
    assert len(rollout) == 12 and rollout.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    answer_of = {"p0": "x", "p1": "y", "p2": "z"}  # the columns follow the chosen rows
    assert rollout.columns["answer"] == [answer_of[p] for p in rollout.prompts]
    assert all(len(set(rollout.prompts[4 * g : 4 * g + 4])) == 1 for g in range(3))
    torch.testing.assert_close(batch.logp, rollout.logp, rtol=0, atol=0)  # pi_old = the engine's T=1 log-probs
    for key in ("lhts/ess", "lhts/ess_frac", "lhts/unique_frac"):
        assert key in collected.metrics
    plain = PolicyWorkload(spec=PRESETS.get("dr_grpo"), engine=ToyEngine(),
                           rewards=ComposerRewardFunction(RewardComposer(["lhts_test_is_a"])), learner=None,  # type: ignore[arg-type]
                           prompts=["p0"], columns={}, sampler=PromptSampler(1, 0), prompts_per_step=1,
                           samples_per_prompt=4, sampling=SamplingParams(max_new_tokens=2))
    assert "lhts/ess" not in plain.collect(1, 0, prefetch=False).metrics
    assert [n for n, _ in plain.engine.calls] == [4]  # type: ignore[attr-defined]


GOOD = {"name": "r", "rewards": [{"name": "exact_match"}]}


def test_recipe_keys_are_validated_in_one_line() -> None:
    rollout = recipe_from_dict({**GOOD, "rollout": {"long_horizon_temperature": 0.5}}).rollout
    assert rollout.candidates() == 4  # the default k
    assert recipe_from_dict({**GOOD, "rollout": {"long_horizon_temperature": 2, "long_horizon_candidates": 1}}
                            ).rollout.candidates() == 1
    assert recipe_from_dict(GOOD).rollout.candidates() == 1
    cases = {
        "bad_temperature": ({"long_horizon_temperature": 0}, ["'rollout.long_horizon_temperature'", "greater than 0"]),
        "bad_candidates": ({"long_horizon_temperature": 0.5, "long_horizon_candidates": 0},
                           ["'rollout.long_horizon_candidates'", "greater than or equal to 1"]),
        "with_per_token_temperature": ({"long_horizon_temperature": 0.5, "temperature": 0.7},
                                       ["'rollout.long_horizon_temperature'", "rollout.temperature = 0.7",
                                        "rollout.temperature: 1"]),
        "with_top_p": ({"long_horizon_temperature": 0.5, "top_p": 0.9}, ["rollout.top_p = 0.9"]),
        "candidates_alone": ({"long_horizon_candidates": 4}, ["'rollout.long_horizon_candidates'",
                                                              "only with rollout.long_horizon_temperature"]),
    }
    for name, (section, words) in cases.items():
        with pytest.raises(RecipeError) as caught:
            recipe_from_dict({**GOOD, "rollout": section})
        message = str(caught.value)
        assert "\n" not in message, name
        for word in words:
            assert word in message, (name, word, message)
    # a recipe written out (recipe.yaml) reads back
    dumped = recipe_from_dict({**GOOD, "rollout": {"long_horizon_temperature": 0.5}}).model_dump(mode="json")
    assert recipe_from_dict(dumped).rollout.long_horizon_temperature == 0.5
    assert recipe_from_dict(recipe_from_dict(GOOD).model_dump(mode="json")).rollout.long_horizon_candidates is None
