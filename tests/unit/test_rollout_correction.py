"""Rollout corrections (align/losses/rollout_correction.py): hand-computed weights and statistics for every name, the
recipe key, and the learner applying them on every step (and runtime.overlap's legacy numbers, bit for bit)."""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import replace

import pytest
import torch

from align.config import RecipeError, recipe_from_dict
from align.losses import ROLLOUT_CORRECTIONS, RolloutCorrection, StepNormalizer
from align.losses.rollout_correction import check_options
from align.models import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm
from align.trainers.batches import PolicyBatch
from align.trainers.learner import PolicyLearner, merge_stats
from align.trainers.optim import build_optimizer, build_scheduler
from align.trainers.sequences import response_forward
from align.trainers.strategy import TorchStrategy

P = "rollout_correction/"
TIGHT = {"rtol": 0, "atol": 1e-12}

# Two rows, three response tokens; row 1's last position is padding (its learner log-prob is NaN, its rollout log-prob
# garbage: neither may reach a weight or a statistic).
#   rho, row 0: 0.25, 1.0, 4.0    product 1.0    geometric mean 1.0
#   rho, row 1: 1.5,  2.5, (pad)  product 3.75   geometric mean sqrt(3.75) = 1.9364916731...
# Over the 5 tokens: sum rho = 9.25, sum log rho = log(0.25 * 1 * 4 * 1.5 * 2.5) = log 3.75.
#   k1 = mean(log pi_rollout - log pi_learner) = -log(3.75) / 5 = -0.2643511679...
#   k3 = mean(rho - 1 - log rho) = (9.25 - 5 - log 3.75) / 5 = 0.5856488320...
RHO = torch.tensor([[0.25, 1.0, 4.0], [1.5, 2.5, 1.0]], dtype=torch.float64)
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
ROLLOUT = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, 123.0]], dtype=torch.float64)
LEARNER = ROLLOUT + RHO.log()
LEARNER[1, 2] = math.nan
K1 = -math.log(3.75) / 5
K3 = (9.25 - 5 - math.log(3.75)) / 5
GEO = math.sqrt(3.75)


def run(name: str, **options: float) -> tuple[torch.Tensor, dict[str, float]]:
    return ROLLOUT_CORRECTIONS.get(name)(LEARNER, ROLLOUT, MASK, **options)


# name, options -> (weights, ratio_mean, ratio_max, ratio_min, weight_mean, masked_frac, truncated_frac)
CASES = {
    # token: min(rho_t, 2): 4.0 and 2.5 are capped (2 of 5 tokens)
    "tis": ({}, [[0.25, 1.0, 2.0], [1.5, 2.0, 0.0]], 9.25 / 5, 4.0, 0.25, 6.75 / 5, 0.0, 0.4),
    # row product, min(., 2): row 0 keeps 1.0, row 1's 3.75 is capped at 2 (its 2 tokens)
    "seq_tis": ({}, [[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]], (3 * 1.0 + 2 * 3.75) / 5, 3.75, 1.0, (3 + 4) / 5, 0.0, 0.4),
    # row geometric mean, min(., 2): sqrt(3.75) < 2 is not capped
    "geo_tis": ({}, [[1.0, 1.0, 1.0], [GEO, GEO, 0.0]], (3 + 2 * GEO) / 5, GEO, 1.0, (3 + 2 * GEO) / 5, 0.0, 0.0),
    # token mask [0.5, 2]: 0.25, 4.0 and 2.5 are out (3 of 5), 1.0 and 1.5 keep their ratio
    "mis": ({}, [[0.0, 1.0, 0.0], [1.5, 0.0, 0.0]], 9.25 / 5, 4.0, 0.25, 2.5 / 5, 0.6, 0.0),
    # row product mask [0.25, 4]: both rows in (1.0 and 3.75), each keeps its product
    "seq_mis": ({"hi": 4.0}, [[1.0, 1.0, 1.0], [3.75, 3.75, 0.0]], 10.5 / 5, 3.75, 1.0, 10.5 / 5, 0.0, 0.0),
    # IcePop [0.5, 5]: only 0.25 is out (1 of 5)
    "icepop": ({}, [[0.0, 1.0, 4.0], [1.5, 2.5, 0.0]], 9.25 / 5, 4.0, 0.25, 9.0 / 5, 0.2, 0.0),
    # geometric mask [0.999, 1.001]: row 0 (1.0) kept with weight 1, row 1 (1.936) rejected (2 of 5 tokens)
    "geo_mask": ({}, [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], (3 + 2 * GEO) / 5, GEO, 1.0, 3 / 5, 0.4, 0.0),
}


def test_every_registered_correction_has_a_worked_example() -> None:
    assert set(CASES) == set(ROLLOUT_CORRECTIONS.names())


@pytest.mark.parametrize("name", sorted(CASES))
def test_hand_computed_weights_and_statistics(name: str) -> None:
    options, weights, ratio_mean, ratio_max, ratio_min, weight_mean, masked, truncated = CASES[name]
    w, stats = run(name, **options)
    torch.testing.assert_close(w, torch.tensor(weights, dtype=torch.float64), **TIGHT)
    expected = {"kl_k1": K1, "kl_k3": K3, "ratio_mean": ratio_mean, "ratio_max": ratio_max, "ratio_min": ratio_min,
                "weight_mean": weight_mean, "masked_frac": masked, "truncated_frac": truncated}
    assert stats.keys() == {P + k for k in expected}
    for key, value in expected.items():
        assert stats[P + key] == pytest.approx(value, rel=0, abs=1e-12), key


def test_seq_mis_default_rejects_the_row_whose_product_leaves_half_to_two() -> None:
    # default [1/2, 2]: row 0's product 1.0 stays (weight 1.0), row 1's 3.75 is out
    w, stats = run("seq_mis")
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64), **TIGHT)
    assert stats[P + "masked_frac"] == pytest.approx(0.4, abs=1e-12)


def test_token_and_sequence_levels_give_different_weights_on_the_same_rows() -> None:
    """A swapped level would fail here: tis caps tokens, seq_tis caps the product, geo_tis the geometric mean."""
    by_name = {name: run(name)[0] for name in ("tis", "seq_tis", "geo_tis", "mis", "seq_mis", "geo_mask")}
    names = list(by_name)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.equal(by_name[a], by_name[b]), (a, b)


def test_padding_never_reaches_weights_or_statistics() -> None:
    """Row 1's padding holds NaN / 123.0: ignoring the mask would make row 1's product NaN (or huge) and every
    mean NaN. Changing what the padding holds changes nothing."""
    other = LEARNER.clone()
    other[1, 2] = 50.0  # rho = exp(50 - 123) at the pad if it were read
    for name in ROLLOUT_CORRECTIONS.names():
        w, stats = run(name)
        w2, stats2 = ROLLOUT_CORRECTIONS.get(name)(other, ROLLOUT, MASK)
        assert w[1, 2] == 0 and torch.equal(w, w2), name
        assert stats == stats2 and all(math.isfinite(v) for v in stats.values()), name


def test_a_masked_token_gets_weight_zero_where_its_ratio_would_be_kept_otherwise() -> None:
    # a mask that ignored the bounds would give 4.0 here (token mis) and 3.75 on row 1 (seq_mis)
    assert run("mis")[0][0, 2] == 0.0 and run("seq_mis")[0][1, 0] == 0.0
    assert run("icepop", alpha=0.2)[0][0, 0] == pytest.approx(0.25, abs=1e-12)  # widened: 0.25 is kept


def test_a_long_sequence_does_not_overflow() -> None:
    # 5000 tokens at log rho = 0.1: the product is exp(500), far past float32's exp(88)
    rollout = torch.zeros(2, 5000)
    learner = torch.full((2, 5000), 0.1)
    mask = torch.ones(2, 5000)
    w, stats = ROLLOUT_CORRECTIONS.get("seq_tis")(learner, rollout, mask, cap=2.0)
    assert torch.equal(w, torch.full_like(w, 2.0))
    assert stats[P + "truncated_frac"] == 1.0 and stats[P + "ratio_max"] == pytest.approx(math.exp(20), rel=1e-6)
    assert all(math.isfinite(v) for v in stats.values())
    w, stats = ROLLOUT_CORRECTIONS.get("seq_mis")(learner, rollout, mask)
    assert torch.equal(w, torch.zeros_like(w)) and stats[P + "masked_frac"] == 1.0
    w, _ = ROLLOUT_CORRECTIONS.get("geo_tis")(learner, rollout, mask)  # geometric mean exp(0.1), under the cap
    torch.testing.assert_close(w, torch.full_like(w, math.exp(0.1)))


def test_no_trainable_token_gives_zero_weights_and_no_extremes() -> None:
    w, stats = ROLLOUT_CORRECTIONS.get("tis")(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2))
    assert torch.equal(w, torch.zeros(1, 2)) and P + "ratio_max" not in stats and stats[P + "weight_mean"] == 0


@pytest.mark.parametrize(("name", "options", "words"), [
    ("tis", {"cap": 0.0}, "cap must be > 0"),
    ("seq_tis", {"cap": -1.0}, "cap must be > 0"),
    ("geo_tis", {"cap": 1e9}, "below exp(20)"),
    ("tis", {"cap": math.inf}, "cap must be a finite number"),
    ("tis", {"cap": True}, "cap must be a finite number"),
    ("mis", {"hi": 2.0, "lo": 3.0}, "lo must be < hi"),
    ("seq_mis", {"hi": -2.0}, "hi must be > 0"),
    ("icepop", {"alpha": -0.1}, "alpha must be >= 0"),
    ("icepop", {"alpha": 5.0, "beta": 5.0}, "alpha must be < beta"),
    ("geo_mask", {"lo": 1.001, "hi": 0.999}, "lo must be < hi"),
    ("tis", {"caps": 2.0}, "has no option 'caps'; valid: cap"),
])
def test_bad_options_fail_in_one_line(name: str, options: dict, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)) as err:
        check_options(name, options)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=re.escape(words)):
        RolloutCorrection(name, options)


def test_the_correction_travels_pickled_with_every_share_of_the_batch() -> None:
    batch = PolicyBatch(prompt_ids=torch.ones(4, 2, dtype=torch.long), prompt_mask=torch.ones(4, 2),
                        completion_ids=torch.ones(4, 3, dtype=torch.long), mask=torch.ones(4, 3),
                        logp=torch.zeros(4, 3), advantages=torch.ones(4, 3), group_ids=torch.tensor([0, 0, 1, 1]),
                        normalizer=StepNormalizer(12, 4, 3), correction=RolloutCorrection("icepop", {"beta": 4.0}))
    for share in batch.shards(3):  # the third rank gets a stand-in row, which still runs the correction's forward
        again = pickle.loads(pickle.dumps(share))
        assert again.correction == RolloutCorrection("icepop", {"beta": 4.0})


def test_the_step_correction_is_the_named_one_else_overlaps_legacy_on_stale_rows() -> None:
    named = RolloutCorrection("icepop")
    assert PolicyBatch.correction_for(0, named, "sequence", 3.0) is named  # every step, on-policy included
    assert PolicyBatch.correction_for(1, named, "sequence", 3.0) is named
    assert PolicyBatch.correction_for(0, None, "sequence", 3.0) is None  # on-policy without a name: as before
    assert PolicyBatch.correction_for(1, None, "token", 3.0) == RolloutCorrection("tis", {"cap": 3.0})
    assert PolicyBatch.correction_for(1, None, "sequence", 3.0) == RolloutCorrection("geo_tis", {"cap": 3.0})


def _legacy(proximal: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, level: str,
            cap: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PolicyLearner._importance_weighted before rollout corrections existed, verbatim in its arithmetic."""
    log_w = proximal - logp
    if level == "sequence":
        log_w = ((log_w * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(mask)
    weight = log_w.exp()
    tokens = mask.sum().clamp(min=1)
    stats = {"is/weight_mean": float((weight * mask).sum() / tokens),
             "is/truncated_frac": float(((weight > cap).float() * mask).sum() / tokens)}
    return advantages * weight.clamp(max=cap) * mask, stats


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("cap", [2.0, 1.05])
def test_the_legacy_overlap_path_keeps_its_numbers_bit_for_bit(level: str, cap: float) -> None:
    torch.manual_seed(0)
    mask = (torch.rand(8, 7) > 0.3).float()
    logp = torch.randn(8, 7) * mask
    proximal = logp + 0.3 * torch.randn(8, 7)  # the learner's forward has values at padding too
    advantages = torch.randn(8, 7) * mask
    expected, old_stats = _legacy(proximal, logp, mask, advantages, level, cap)
    weights, stats = RolloutCorrection.legacy(level, cap)(proximal, logp, mask)  # type: ignore[arg-type]
    assert torch.equal(advantages * weights, expected)
    assert stats[P + "ratio_mean"] == old_stats["is/weight_mean"]
    assert stats[P + "truncated_frac"] == old_stats["is/truncated_frac"]


def test_merge_keeps_the_extremes_of_the_step_and_weights_means_by_all_tokens() -> None:
    parts = [{P + "ratio_max": 3.0, P + "ratio_min": 0.5, P + "kl_k1": 0.1, "update/tokens": 30.0,
              "update/active_tokens": 10.0},
             {P + "ratio_max": 5.0, P + "ratio_min": 0.8, P + "kl_k1": 0.4, "update/tokens": 10.0,
              "update/active_tokens": 10.0},
             {P + "ratio_max": 9.0, P + "ratio_min": 0.1, P + "kl_k1": 7.0, "update/tokens": 0.0,  # a stand-in
              "update/active_tokens": 0.0}]
    merged = merge_stats(parts)
    assert merged[P + "ratio_max"] == 5.0 and merged[P + "ratio_min"] == 0.5
    assert merged[P + "kl_k1"] == pytest.approx((0.1 * 30 + 0.4 * 10) / 40, abs=1e-12)  # by all tokens, not active


# ---------------------------------------------------------------------------------------------------------------
# The recipe key
# ---------------------------------------------------------------------------------------------------------------
GOOD = {"model": {"path": "tiny"}, "data": {"task": "arithmetic"}, "algorithm": {"preset": "grpo"},
        "rewards": [{"name": "exact_match", "options": {"extract": "full"}}]}


def _recipe(correction: dict | None = None, **sections: dict):
    data = {**GOOD, **sections}
    if correction is not None:
        data["algorithm"] = {**data["algorithm"], "rollout_correction": correction}
    return recipe_from_dict(data)


def test_the_recipe_names_a_correction_and_its_options() -> None:
    recipe = _recipe({"name": "icepop", "options": {"alpha": 0.4, "beta": 6}})
    assert recipe.algorithm.rollout_correction is not None
    assert recipe.algorithm.rollout_correction.name == "icepop"
    assert _recipe().algorithm.rollout_correction is None
    # a saved run's recipe.yaml writes the runtime defaults out: they do not conflict
    assert _recipe({"name": "tis"}, runtime={"is_level": "token", "is_cap": 2.0}) is not None


@pytest.mark.parametrize(("correction", "sections", "words"), [
    ({"name": "icepo"}, {}, ["'algorithm.rollout_correction.name'", "did you mean 'icepop'", "geo_mask"]),
    ({"name": "icepop", "options": {"gamma": 1}}, {},
     ["'algorithm.rollout_correction.options.gamma'", "no option 'gamma'", "alpha, beta"]),
    ({"name": "icepop", "options": {"alpha": "low"}}, {}, ["'algorithm.rollout_correction.options.alpha'"]),
    ({"name": "tis", "options": {"cap": 0}}, {}, ["'algorithm.rollout_correction.options.cap'", "cap must be > 0"]),
    ({"name": "mis", "options": {"lo": 3}}, {}, ["'algorithm.rollout_correction.options.lo'", "lo must be < hi"]),
    ({"name": "tis"}, {"runtime": {"is_cap": 3.0}}, ["algorithm.rollout_correction", "runtime.is_cap"]),
    ({"name": "tis"}, {"runtime": {"overlap": True, "is_level": "sequence"}},
     ["algorithm.rollout_correction", "runtime.is_level"]),
    ({"name": "tis"}, {"algorithm": {"preset": "dpo"}, "rewards": []}, ["preference algorithm"]),
])
def test_a_bad_rollout_correction_is_one_line(correction: dict, sections: dict, words: list[str]) -> None:
    with pytest.raises(RecipeError) as err:
        _recipe(correction, **sections)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


# ---------------------------------------------------------------------------------------------------------------
# The learner: the named correction on an on-policy step; the legacy path
# ---------------------------------------------------------------------------------------------------------------
SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=3)


def _learner() -> PolicyLearner:
    from align.algorithms import PRESETS

    torch.manual_seed(0)
    model = build_tiny_causal_lm(len(build_char_tokenizer()), SMALL)
    spec = replace(PRESETS.get("grpo"), kl=None, kl_coef=0.0)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999))
    scheduler = build_scheduler(optimizer, kind="constant", warmup_steps=0, total_steps=10)
    return PolicyLearner(spec, TorchStrategy(model, optimizer, scheduler, max_grad_norm=1.0), micro_batch_size=64)


def _batch(learner: PolicyLearner, rho: torch.Tensor) -> PolicyBatch:
    """Rows whose rollout log-probs sit log(rho) below the learner's: pi_learner / pi_rollout = rho on the mask."""
    prompt_ids = torch.tensor([[5, 6], [5, 6], [7, 8], [7, 8]])
    completion_ids = torch.tensor([[11, 2, 0], [12, 13, 2], [14, 2, 0], [15, 16, 17]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
    learner.strategy.model.eval()
    with torch.no_grad():
        logp, _, _ = response_forward(learner.strategy.module, prompt_ids, torch.ones_like(prompt_ids),
                                      completion_ids, mask)
    advantages = torch.tensor([[1.0], [-1.0], [0.5], [-0.5]]).expand(4, 3) * mask
    return PolicyBatch(prompt_ids=prompt_ids, prompt_mask=torch.ones_like(prompt_ids), completion_ids=completion_ids,
                       mask=mask, logp=(logp - rho.log()) * mask, advantages=advantages,
                       group_ids=torch.tensor([0, 0, 1, 1]), normalizer=StepNormalizer.from_masks(mask))


def _captured(monkeypatch: pytest.MonkeyPatch) -> list:
    import align.trainers.learner as learner_module

    seen: list = []
    real = learner_module.policy_step_loss

    def spy(spec, inputs, normalizer, **kwargs):
        seen.append((inputs, normalizer))
        return real(spec, inputs, normalizer, **kwargs)

    monkeypatch.setattr(learner_module, "policy_step_loss", spy)
    return seen


def test_an_on_policy_step_with_icepop_weights_the_advantages_and_takes_the_learner_as_pi_old(monkeypatch) -> None:
    # rho per token: 0.3 (out of [0.5, 5]), 1.2, 6.0 (out), 2.0; the padding's rho never matters
    rho = torch.tensor([[0.3, 1.2, 1.0], [1.2, 6.0, 2.0], [2.0, 0.3, 1.0], [1.0, 1.2, 6.0]])
    learner = _learner()
    batch = replace(_batch(learner, rho), correction=RolloutCorrection("icepop"))
    proximal = learner.logprobs(batch)
    seen = _captured(monkeypatch)
    stats = merge_stats([learner.step(batch)])
    (inputs, normalizer), = seen  # one micro-batch with every row
    inside = ((rho >= 0.5) & (rho <= 5.0)).float() * batch.mask
    torch.testing.assert_close(inputs.advantages, batch.advantages * rho * inside, rtol=1e-5, atol=1e-6)
    assert torch.equal(inputs.old_logp, proximal)  # pi_old is the learner's own pre-update forward
    assert normalizer == batch.normalizer  # masked tokens still count: the driver's step-wide counts
    assert stats[P + "masked_frac"] == pytest.approx(4 / 10)  # 0.3, 6.0, 0.3, 6.0 of the 10 tokens
    assert stats[P + "ratio_max"] == pytest.approx(6.0, rel=1e-5) and stats[P + "ratio_min"] == pytest.approx(0.3,
                                                                                                          rel=1e-5)
    assert stats["is/weight_mean"] == stats[P + "ratio_mean"]


def test_without_a_correction_an_on_policy_step_is_as_before(monkeypatch) -> None:
    learner = _learner()
    batch = _batch(learner, torch.full((4, 3), 1.5))
    seen = _captured(monkeypatch)
    stats = merge_stats([learner.step(batch)])
    (inputs, _), = seen
    assert torch.equal(inputs.advantages, batch.advantages) and torch.equal(inputs.old_logp, batch.logp)
    assert not any(k.startswith((P, "is/")) for k in stats)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_the_learners_legacy_overlap_step_gives_the_old_numbers(monkeypatch, level: str) -> None:
    rho = torch.tensor([[0.3, 1.2, 1.0], [1.2, 6.0, 2.0], [2.0, 0.3, 1.0], [1.0, 1.2, 6.0]])
    learner = _learner()
    batch = _batch(learner, rho)
    batch = replace(batch, correction=PolicyBatch.correction_for(1, None, level, 2.0))  # type: ignore[arg-type]
    expected, old_stats = _legacy(learner.logprobs(batch), batch.logp, batch.mask, batch.advantages, level, 2.0)
    seen = _captured(monkeypatch)
    stats = learner.step(batch)  # this share's own numbers (merging one share may round by an ulp)
    (inputs, _), = seen
    assert torch.equal(inputs.advantages, expected)
    assert stats["is/weight_mean"] == old_stats["is/weight_mean"]
    assert stats["is/truncated_frac"] == old_stats["is/truncated_frac"]


@pytest.mark.parametrize(("algorithm", "runtime", "words"), [
    ({"preset": "gspo", "rollout_correction": {"name": "icepop"}}, {}, "use a sequence-level correction"),
    ({"preset": "gtpo", "rollout_correction": {"name": "tis"}}, {}, "use a sequence-level correction"),
    ({"preset": "gspo"}, {"overlap": True}, "set runtime.is_level: sequence"),
    ({"preset": "gtpo"}, {"max_staleness": 2}, "set runtime.is_level: sequence"),
])
def test_per_token_weights_are_refused_for_losses_with_one_advantage_per_row(algorithm, runtime, words) -> None:
    """GSPO and GTPO read one advantage per row: a per-token weight would stop the run at its first corrected
    step, so validate refuses it and names the sequence-level way."""
    from align.config import RecipeError, recipe_from_dict

    with pytest.raises(RecipeError) as caught:
        recipe_from_dict({"algorithm": algorithm, "runtime": runtime, "rewards": [{"name": "exact_match"}]})
    assert words in str(caught.value) and "\n" not in str(caught.value)
    fixed_runtime = {**runtime, "is_level": "sequence"} if runtime else {}
    fixed_algorithm = ({**algorithm, "rollout_correction": {"name": "geo_tis"}} if "rollout_correction" in algorithm
                       else algorithm)
    recipe_from_dict({"algorithm": fixed_algorithm, "runtime": fixed_runtime, "rewards": [{"name": "exact_match"}]})
