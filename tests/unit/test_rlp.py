"""RLP's information-gain credit (arXiv 2510.01265 eq. 3-5) on hand-computed inputs, the learner as a scorer
(``policy``), and the reference answer's path from the data to the credit module."""

from __future__ import annotations

import itertools

import pytest
import torch

from align.errors import InputError
from align.trainers.policy_scorer import LearnerScorer
from align.trainers.protocols import ANSWER_IDS, Rollout
from rewards.adapters import CreditModuleFunction, model_option_defaults, target_tensors
from rewards.credit import CREDIT, CausalLMScorer, CreditInputs
from rewards.credit.rlp import information_gain


class CountNines:
    """A fake scorer: log p(token at s | real tokens before s) = base + bonus * (# real 9s before s) - per_id * id.

    It honours ``attention_mask`` (padding is not context), so a context built wrongly changes the count."""

    def __init__(self, base: float, bonus: float, per_id: float) -> None:
        self.base, self.bonus, self.per_id = base, bonus, per_id
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.calls.append((input_ids, attention_mask))
        nines = ((input_ids == 9) & (attention_mask != 0)).double()
        before = nines.cumsum(-1) - nines  # (B, S) real 9s strictly before s
        return self.base + self.bonus * before - self.per_id * input_ids.double()


# row 0: prompt [pad=9 | 1 2]; completion 9 (trainable), 9 (hole: context, not trained), 3 (trainable), pad.
# row 1: prompt [4 5 6]; completion 5 (trainable), then a 9 *after* the last trainable token: padding, not context.
PROMPT = torch.tensor([[9, 1, 2], [4, 5, 6]])
PROMPT_MASK = torch.tensor([[0, 1, 1], [1, 1, 1]])
IDS = torch.tensor([[9, 9, 3, 0], [5, 9, 0, 0]])
MASK = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.float64)
TARGET = torch.tensor([[8, 7], [8, 0]])
TARGET_MASK = torch.tensor([[1, 1], [1, 0]])


def rlp_inputs(**changes) -> CreditInputs:
    fields = {"rewards": torch.tensor([1.0, 0.0], dtype=torch.float64), "mask": MASK, "token_ids": IDS,
              "group_ids": torch.tensor([0, 0]), "prompt_ids": PROMPT, "prompt_mask": PROMPT_MASK,
              "target_ids": TARGET, "target_mask": TARGET_MASK}
    return CreditInputs(**{**fields, **changes})


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=0, atol=1e-9)


def test_information_gain_by_hand() -> None:
    """Policy: -2 + 0.5 n9 - 0.1 id; baseline: -1.5 + 0.25 n9 - 0.2 id (n9 = real 9s before the scored token).

    Row 0, with the thought the context is 1 2 9 9 3 (n9 = 2; the prompt's padding 9 is not context): targets 8, 7
    score (-1 - 0.8) + (-1 - 0.7) = -3.5; the baseline sees 1 2 (n9 = 0): (-1.5 - 1.6) + (-1.5 - 1.4) = -6.0.
    r_0 = -3.5 - (-6.0) = 2.5; per target token (mean) 1.25.
    Row 1, context 4 5 6 5 (the 9 after the last trainable token is padding): -2 - 0.8 = -2.8 against -1.5 - 1.6
    = -3.1: r_1 = 0.3 (one target token, so mean = sum).
    """
    policy, baseline = CountNines(-2.0, 0.5, 0.1), CountNines(-1.5, 0.25, 0.2)
    close(information_gain(rlp_inputs(), policy, baseline), [2.5, 0.3])
    close(information_gain(rlp_inputs(), policy, baseline, reduce="mean"), [1.25, 0.3])
    # each scorer saw its context followed directly by the target, which it scored
    (ids, mask), = policy.calls[:1]
    assert ids[0, -2:].tolist() == [8, 7] and ids[0, mask[0] != 0].tolist() == [1, 2, 9, 9, 3, 8, 7]
    assert ids[1, mask[1] != 0].tolist() == [4, 5, 6, 5, 8, 0]  # the target's right padding: causally invisible
    ids, mask = baseline.calls[0]
    assert ids[0, mask[0] != 0].tolist() == [1, 2, 8, 7]


def test_reward_is_spread_uniformly_over_the_thought_with_the_outcome_weighted() -> None:
    """Row 0 trains 2 tokens, row 1 one. outcome_weight 0: (2.5 / 2) on each of row 0's, 0.3 on row 1's; with
    outcome_weight 0.5 and R = (1, 0): row 0 totals 3.0 -> 1.5 each."""
    models = {"policy_model": CountNines(-2.0, 0.5, 0.1), "baseline_model": CountNines(-1.5, 0.25, 0.2)}
    module = CREDIT.get("rlp_information_gain")
    close(module(rlp_inputs(), **models), [[1.25, 0, 1.25, 0], [0.3, 0, 0, 0]])
    close(module(rlp_inputs(), **models, outcome_weight=0.5), [[1.5, 0, 1.5, 0], [0.3, 0, 0, 0]])
    close(module(rlp_inputs(), **models, reduce="mean"), [[0.625, 0, 0.625, 0], [0.3, 0, 0, 0]])
    assert CREDIT.info("rlp_information_gain")["output"] == "rewards"


def test_a_real_causal_lm_scores_what_it_scores_unpadded() -> None:
    """With a transformers model, the gain equals log p(target | prompt + thought) - log p(target | prompt) computed
    row by row on the unpadded token lists (positions and padding handled as generate does)."""
    from align.models import TinyModelConfig, build_tiny_causal_lm

    torch.manual_seed(0)
    policy = build_tiny_causal_lm(10, TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2,
                                                      intermediate_size=32)).eval()
    base = build_tiny_causal_lm(10, TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2,
                                                    intermediate_size=32)).eval()

    def direct(model, context: list[int], target: list[int]) -> float:
        seq = torch.tensor([context + target])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=seq).logits[0, :-1].double(), -1)
        return sum(float(logp[len(context) + k - 1, tok]) for k, tok in enumerate(target))

    expected = [direct(policy, [1, 2, 9, 9, 3], [8, 7]) - direct(base, [1, 2], [8, 7]),
                direct(policy, [4, 5, 6, 5], [8]) - direct(base, [4, 5, 6], [8])]
    got = information_gain(rlp_inputs(), CausalLMScorer(policy), CausalLMScorer(base))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=got.dtype), rtol=0, atol=1e-5)


def test_bad_inputs_fail_in_one_line() -> None:
    models = {"policy_model": CountNines(0, 0, 0), "baseline_model": CountNines(0, 0, 0)}
    module = CREDIT.get("rlp_information_gain")
    with pytest.raises(InputError, match="needs target_ids"):
        module(rlp_inputs(target_ids=None, target_mask=None), **models)
    with pytest.raises(InputError, match="row 1 has none"):
        module(rlp_inputs(target_mask=torch.tensor([[1, 1], [0, 0]])), **models)
    with pytest.raises(InputError, match="token_logprobs"):
        module(rlp_inputs(), policy_model="policy", baseline_model=models["baseline_model"])
    with pytest.raises(InputError, match="reduce must be 'sum'"):
        module(rlp_inputs(), **models, reduce="max")
    with pytest.raises(InputError, match="target_ids and target_mask must be given together"):
        rlp_inputs(target_mask=None)


class BigramLearner:
    """A fake learner: ``logprobs(rows)`` = log-softmax(table[previous token])[token] over the completion, the
    previous token of the first completion token being the prompt's last."""

    def __init__(self) -> None:
        self.table = torch.randn(10, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def logprobs(self, batch) -> torch.Tensor:
        seq = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
        logp = torch.log_softmax(self.table[seq[:, :-1]], -1).gather(-1, seq[:, 1:, None]).squeeze(-1)
        return logp[:, batch.prompt_ids.shape[1] - 1 :]


def test_learner_scorer_puts_log_probs_back_at_their_positions() -> None:
    """Any padding (left, inside, right): each real token after a row's first gets log p(token | previous real
    token); the first real token and the padding get 0 (a loop over the real tokens gives the expectation)."""
    learner = BigramLearner()
    ids = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 0, 3, 0], [6, 7, 8, 9, 1]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 1, 0], [1, 1, 1, 1, 1]])
    expected = torch.zeros(3, 5, dtype=torch.float64)
    for i in range(3):
        real = [s for s in range(5) if mask[i, s]]
        for prev, s in itertools.pairwise(real):
            expected[i, s] = torch.log_softmax(learner.table[ids[i, prev]], -1)[ids[i, s]]
    out = LearnerScorer(learner).token_logprobs(ids, mask)  # type: ignore[arg-type]
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)
    with pytest.raises(InputError, match="at least one real token"):
        LearnerScorer(learner).token_logprobs(ids, torch.zeros_like(mask))  # type: ignore[arg-type]


def test_learner_scorer_matches_the_model_scored_directly() -> None:
    """The in-process learner (transformers model, ``Learner.logprobs``) as ``"policy"`` gives what
    :class:`CausalLMScorer` gives on the same weights, for left-padded rows."""
    from align.algorithms import PRESETS
    from align.models import TinyModelConfig, build_tiny_causal_lm
    from align.trainers.learner import InProcessLearner, PolicyLearner
    from align.trainers.optim import build_optimizer, build_scheduler
    from align.trainers.strategy import TorchStrategy

    torch.manual_seed(1)
    model = build_tiny_causal_lm(10, TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999))
    learner = InProcessLearner(PolicyLearner(PRESETS.get("dr_grpo"), TorchStrategy(
        model, optimizer, build_scheduler(optimizer, kind="constant", warmup_steps=0, total_steps=1),
        max_grad_norm=None)))
    ids = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    got = LearnerScorer(learner).token_logprobs(ids, mask)
    want = CausalLMScorer(model.eval()).token_logprobs(ids, mask)
    real_after_first = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]]) != 0
    torch.testing.assert_close(got[real_after_first], want[real_after_first].float(), rtol=0, atol=1e-5)
    assert bool((got[~real_after_first] == 0).all())


def test_the_reference_answer_reaches_the_module_and_models_default_to_policy_and_base() -> None:
    assert model_option_defaults("rlp_information_gain") == {"policy_model": "policy", "baseline_model": "base"}
    rollout = Rollout(prompts=["p", "p"], completions=["a", "b"], prompt_ids=PROMPT, prompt_mask=PROMPT_MASK,
                      completion_ids=IDS, mask=MASK.float(), logp=torch.zeros(2, 4), group_ids=torch.tensor([0, 0]),
                      weight_version=0, columns={"answer": ["87", "8"], ANSWER_IDS: [[8, 7], [8]]})
    ids, mask = target_tensors(rollout)
    assert ids.tolist() == [[8, 7], [8, 0]] and mask.tolist() == [[1, 1], [1, 0]]
    assert target_tensors(Rollout(**{**rollout.__dict__, "columns": {}})) == (None, None)
    credit = CreditModuleFunction("rlp_information_gain", {"policy_model": CountNines(-2.0, 0.5, 0.1),
                                                           "baseline_model": CountNines(-1.5, 0.25, 0.2)})
    out = credit(rollout, torch.tensor([1.0, 0.0]), logp=None, entropy=None, token_rewards=None)
    assert out.output == "rewards"
    torch.testing.assert_close(out.values, torch.tensor([[1.25, 0, 1.25, 0], [0.3, 0, 0, 0]]), rtol=0, atol=1e-6)


def test_the_provider_loads_policy_and_base_when_the_recipe_names_neither() -> None:
    from align.config import recipe_from_dict
    from rewards.provider import RecipeRewards

    recipe = recipe_from_dict({"name": "r", "algorithm": {"preset": "rloo", "overrides": {"kl": None, "kl_coef": 0}},
                               "rewards": [{"name": "exact_match"}], "credit": {"name": "rlp_information_gain"}})
    loaded: list[str] = []
    RecipeRewards().credit_function(recipe, lambda path: loaded.append(path) or CountNines(0, 0, 0))
    assert sorted(loaded) == ["base", "policy"]
    named = recipe_from_dict({**recipe.model_dump(), "credit": {"name": "rlp_information_gain",
                                                                 "options": {"baseline_model": "/some/dir"}}})
    loaded.clear()
    RecipeRewards().credit_function(named, lambda path: loaded.append(path) or CountNines(0, 0, 0))
    assert sorted(loaded) == ["/some/dir", "policy"]
