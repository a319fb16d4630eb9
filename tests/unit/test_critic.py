"""PPO's critic and RTO: hand-computed value losses, GAE from the critic's values, the RTO token reward, the value
head inside the learner (values at the right positions, micro-batch invariance of the combined gradient, weights that
never leave the learner), and the composition checks."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from align.advantages import gae, gae_returns
from align.algorithms import GRPO, PRESETS, AlgorithmSpec
from align.errors import IncompatibleSpecError, InputError
from align.losses import VALUE_LOSSES, StepNormalizer
from align.models import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm
from align.objective import active_rows, value_step_loss, zero_advantage_is_inert
from align.trainers.batches import PolicyBatch
from align.trainers.critic import ActorCritic, policy_weights
from align.trainers.learner import PolicyLearner, merge_stats
from align.trainers.optim import build_optimizer, build_scheduler
from align.trainers.protocols import Rollout
from align.trainers.sequences import response_forward
from align.trainers.strategy import TorchStrategy
from align.trainers.workload import estimate_advantages, estimator_inputs

SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=3)
PPO = PRESETS.get("ppo")

# -- value loss: spec-free hand computation ----------------------------------------------------------------------
# token (row, t):   V      V_old   R     | clip 0.2: band, clipped V, branch       | loss     dL/dV
# (0, 0)            1.0    0.9     0.5   | [0.7, 1.1] -> 1.0, tie -> unclipped     | 0.125    +0.5
# (0, 1)            0.5    0.0     1.0   | [-0.2, 0.2] -> 0.2, 0.64 > 0.25 clipped | 0.32      0   (clamp saturated)
# (0, 2)            2.0    2.0     2.5   | inside                                  | 0.125    -0.5
# (1, 0)            0.0    0.0     1.0   | inside                                  | 0.5      -1.0
# (1, 1)           -0.3    0.1     0.0   | [-0.1, 0.3] -> -0.1, 0.01 < 0.09 unclip | 0.045    -0.3 (outside, moves)
# (1, 2)  padding (V = NaN): 0, no gradient
VALUES = [[1.0, 0.5, 2.0], [0.0, -0.3, math.nan]]
OLD = [[0.9, 0.0, 2.0], [0.0, 0.1, 0.0]]
RETURNS = [[0.5, 1.0, 2.5], [1.0, 0.0, 0.0]]
MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]


def _value_case(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    values = torch.tensor(VALUES, dtype=dtype, requires_grad=True)
    return values, torch.tensor(OLD, dtype=dtype), torch.tensor(RETURNS, dtype=dtype), torch.tensor(MASK, dtype=dtype)


def test_clipped_value_loss_matches_the_hand_computation() -> None:
    values, old, returns, mask = _value_case()
    loss, stats = VALUE_LOSSES.get("clipped_mse")(values, old, returns, mask, clip=0.2)
    torch.testing.assert_close(loss, torch.tensor([[0.125, 0.32, 0.125], [0.5, 0.045, 0.0]], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    assert float(stats["value/clip_frac"]) == pytest.approx(1 / 5, abs=1e-12)
    loss.sum().backward()
    assert values.grad is not None
    torch.testing.assert_close(values.grad, torch.tensor([[0.5, 0.0, -0.5], [-1.0, -0.3, 0.0]],
                                                         dtype=torch.float64), rtol=0, atol=1e-12)


def test_unclipped_value_loss_is_half_the_squared_error() -> None:
    values, old, returns, mask = _value_case()
    for name, kwargs in (("mse", {}), ("clipped_mse", {"clip": None})):
        loss, stats = VALUE_LOSSES.get(name)(values, old, returns, mask, **kwargs)
        torch.testing.assert_close(loss, torch.tensor([[0.125, 0.125, 0.125], [0.5, 0.045, 0.0]],
                                                      dtype=torch.float64), rtol=0, atol=1e-12)
        assert float(stats["value/clip_frac"]) == 0.0


def test_value_step_loss_is_the_step_token_mean_times_vf_coef() -> None:
    values, old, returns, mask = _value_case()
    spec = PPO.with_options(vf_coef=0.5)
    loss, stats = value_step_loss(spec, values, old, returns, mask, StepNormalizer.from_masks(mask))
    assert float(stats["vf_loss"]) == pytest.approx(1.115 / 5, abs=1e-12)  # (0.125+0.32+0.125+0.5+0.045) / 5 tokens
    assert float(loss.detach()) == pytest.approx(0.5 * 1.115 / 5, abs=1e-12)
    loss.backward()
    assert values.grad is not None
    torch.testing.assert_close(values.grad, 0.5 / 5 * torch.tensor([[0.5, 0.0, -0.5], [-1.0, -0.3, 0.0]],
                                                                   dtype=torch.float64), rtol=0, atol=1e-12)


def test_value_step_loss_adds_up_over_micro_batches() -> None:
    values, old, returns, mask = _value_case()
    norm = StepNormalizer.from_masks(mask)
    whole, _ = value_step_loss(PPO, values, old, returns, mask, norm)
    (grad_whole,) = torch.autograd.grad(whole, values)
    parts = [value_step_loss(PPO, values[i : i + 1, : 3 - i], old[i : i + 1, : 3 - i], returns[i : i + 1, : 3 - i],
                             mask[i : i + 1, : 3 - i], norm)[0] for i in range(2)]  # re-padded to their own width
    (grad_split,) = torch.autograd.grad(sum(parts), values)
    torch.testing.assert_close(sum(parts), whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_split, grad_whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", VALUE_LOSSES.names())
def test_value_loss_contract(name: str) -> None:
    values, old, returns, mask = _value_case(torch.float32)
    loss, stats = VALUE_LOSSES.get(name)(values, old, returns, mask)
    assert loss.shape == mask.shape and loss.dtype == torch.float32
    assert torch.isfinite(loss).all() and loss[mask == 0].abs().sum() == 0
    assert all(not v.requires_grad and v.dim() == 0 and torch.isfinite(v) for v in stats.values())
    loss.sum().backward()
    assert values.grad is not None and torch.isfinite(values.grad).all()
    assert values.grad[mask == 0].abs().sum() == 0 and values.grad[mask != 0].abs().sum() > 0


def test_bad_value_inputs_fail_in_one_line() -> None:
    values, old, returns, mask = _value_case()
    with pytest.raises(InputError, match="value clip must be > 0"):
        VALUE_LOSSES.get("clipped_mse")(values, old, returns, mask, clip=0.0)
    with pytest.raises(InputError, match=r"returns has shape \(2, 2\)"):
        VALUE_LOSSES.get("mse")(values, old, returns[:, :2], mask)
    with pytest.raises(InputError, match="returns holds 1 non-finite"):
        value_step_loss(PPO, values, old, returns.index_put((torch.tensor(0), torch.tensor(1)),
                                                            torch.tensor(math.inf, dtype=torch.float64)),
                        mask, StepNormalizer.from_masks(mask))
    with pytest.raises(InputError, match="trains no critic"):
        value_step_loss(GRPO, values, old, returns, mask, StepNormalizer.from_masks(mask))


# -- GAE from the critic's values, with the KL penalty in the reward ---------------------------------------------
# row 0 (3 tokens, R = 1): k1 = lp_old - lp_ref = [0.5, 0, -0.1] -> reward -0.01 k1 = [-0.005, 0, 0.001] + R at t=2
#   r = [-0.005, 0, 1.001], V_old = [0.5, 0.6, 0.8], gamma 1, lambda 0.95:
#   delta = [-0.005 + 0.6 - 0.5, 0 + 0.8 - 0.6, 1.001 - 0.8] = [0.095, 0.2, 0.201]
#   A = [0.095 + 0.95 * 0.39095, 0.2 + 0.95 * 0.201, 0.201] = [0.4664025, 0.39095, 0.201]; R_t = A + V
# row 1 (2 tokens, R = 0, lp_old = lp_ref): V_old = [0.2, -0.1]; delta = [-0.1 - 0.2, 0 + 0.1] = [-0.3, 0.1]
#   A = [-0.3 + 0.95 * 0.1, 0.1] = [-0.205, 0.1]
RAW_A = [[0.4664025, 0.39095, 0.201], [-0.205, 0.1, 0.0]]
RETURNS_HAND = [[0.9664025, 0.99095, 1.001], [-0.005, 0.0, 0.0]]


def _rollout(logp: list[list[float]], mask: list[list[float]], prompt_width: int = 2) -> Rollout:
    b, t = len(logp), len(logp[0])
    return Rollout(prompts=[""] * b, completions=[""] * b,
                   prompt_ids=torch.full((b, prompt_width), 5), prompt_mask=torch.ones(b, prompt_width),
                   completion_ids=torch.full((b, t), 7), mask=torch.tensor(mask), logp=torch.tensor(logp),
                   group_ids=torch.arange(b), weight_version=0)


def test_gae_advantages_and_returns_from_the_critic_with_kl_in_the_reward() -> None:
    batch = _rollout([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]], [[1.0, 1, 1], [1, 1, 0]])
    ref_logp = torch.tensor([[-1.5, -2.0, -0.4], [-1.0, -1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.8], [0.2, -0.1, 0.0]])
    advantages, metrics, _, returns = estimate_advantages(PPO, batch, torch.tensor([1.0, 0.0]), ref_logp=ref_logp,
                                                          credit_fn=None, values=values)
    assert returns is not None
    torch.testing.assert_close(returns, torch.tensor(RETURNS_HAND), rtol=0, atol=1e-6)
    raw = torch.tensor(RAW_A, dtype=torch.float64)
    valid = raw[batch.mask != 0]  # whitened over the batch's 5 tokens, Bessel variance, eps 1e-8 inside the rsqrt
    whitened = (raw - valid.mean()) / torch.sqrt(valid.var(unbiased=True) + 1e-8) * batch.mask
    torch.testing.assert_close(advantages, whitened.float(), rtol=0, atol=1e-6)
    # the same numbers from the estimator itself, un-whitened, and its returns helper
    rewards = torch.tensor([[-0.005, 0.0, 1.001], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(gae(rewards, batch.mask, batch.group_ids, values=values, whiten=False),
                               raw.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(gae_returns(rewards, batch.mask, batch.group_ids, values=values),
                               torch.tensor(RETURNS_HAND), rtol=0, atol=1e-6)
    r, v = torch.tensor(RETURNS_HAND)[batch.mask != 0].double(), values[batch.mask != 0].double()
    expected_ev = 1 - float((r - v).var(unbiased=False) / r.var(unbiased=False))
    assert metrics["value/explained_variance"] == pytest.approx(expected_ev, abs=1e-6)
    assert metrics["value/old_mean"] == pytest.approx(float(v.mean()), abs=1e-6)


# -- RTO: the token reward, composed from implicit_dpo and the KL-in-reward penalty -------------------------------
class _Table:
    """A stand-in auxiliary model: fixed log-probs for the response positions (B, T), the prompt's positions 0."""

    def __init__(self, response: list[list[float]]) -> None:
        self.response = torch.tensor(response)

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        prompt = torch.zeros(input_ids.shape[0], input_ids.shape[1] - self.response.shape[1])
        return torch.cat([prompt, self.response], 1)


def test_rto_token_reward_matches_the_hand_computation() -> None:
    """r_t = clip_c(beta1 (lp_dpo - lp_sft)) - beta2 (lp_old - lp_sft) + 1[t = last] R, with the preset's defaults
    beta1 = c = 0.05 (filled in by the reward side), beta2 = 0.01 (the spec's KL coefficient).

    row 0, R = 1: lp_dpo - lp_sft = [2, 0, -2] -> 0.05 x = [0.1, 0, -0.1] -> clipped [0.05, 0, -0.05];
      lp_old - lp_sft = [1.8, 0.1, -0.5] -> -0.01 x = [-0.018, -0.001, 0.005]; r = [0.032, -0.001, 0.955]
    row 1, R = 0, 2 tokens: [0.5, 0.2] -> [0.025, 0.01]; [0.4, 0.2] -> [-0.004, -0.002]; r = [0.021, 0.008, 0]
    """
    from align.config import recipe_from_dict
    from rewards.provider import RecipeRewards

    dpo = _Table([[-1.0, -0.2, -4.0], [-2.0, -1.0, 0.0]])
    sft = _Table([[-3.0, -0.2, -2.0], [-2.5, -1.2, 0.0]])
    provider = RecipeRewards()
    recipe = recipe_from_dict({"algorithm": {"preset": "rto"}, "rewards": [{"name": "exact_match"}],
                               "credit": {"name": "implicit_dpo", "options": {"dpo_model": "dpo_dir"}}})
    provider.check(recipe)
    loaded: list[str] = []

    def load_scorer(path: str) -> _Table:
        loaded.append(path)
        return {"dpo_dir": dpo, "base": sft}[path]

    credit_fn = provider.credit_function(recipe, load_scorer)
    assert sorted(loaded) == ["base", "dpo_dir"]  # the SFT reference is the run's base unless the recipe says
    spec = recipe.algorithm_spec()
    assert (spec.kl, spec.kl_coef, spec.kl_placement, spec.credit) == ("k1", 0.01, "reward", "implicit_dpo")
    batch = _rollout([[-1.2, -0.1, -2.5], [-2.1, -1.0, 0.0]], [[1.0, 1, 1], [1, 1, 0]])
    token_rewards, weights, _, credit = estimator_inputs(spec, batch, torch.tensor([1.0, 0.0]),
                                                         ref_logp=sft.response, credit_fn=credit_fn)
    assert weights is None
    torch.testing.assert_close(token_rewards, torch.tensor([[0.032, -0.001, 0.955], [0.021, 0.008, 0.0]]),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(credit["implicit_dpo"], torch.tensor([[0.05, 0.0, 0.95], [0.025, 0.01, 0.0]]),
                               rtol=0, atol=1e-6)


def test_rto_recipes_must_name_the_dpo_model() -> None:
    from align.config import RecipeError, recipe_from_dict
    from rewards.provider import RecipeRewards

    base = {"algorithm": {"preset": "rto"}, "rewards": [{"name": "exact_match"}]}
    with pytest.raises(RecipeError, match="rto takes its token rewards from credit module 'implicit_dpo'"):
        RecipeRewards().check(recipe_from_dict(base))
    with pytest.raises(RecipeError, match="rto needs dpo_model"):
        RecipeRewards().check(recipe_from_dict({**base, "credit": {"name": "implicit_dpo", "options": {}}}))


# -- the composition checks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("build", "reason", "fix"), [
    (lambda: replace(GRPO, advantage="gae"), "trains no critic", "value_loss='clipped_mse'"),
    (lambda: replace(PPO, advantage="reinforce_pp", advantage_kwargs={}), "never reads", "advantage='gae'"),
    (lambda: replace(PPO, vf_coef=0.0), "leaves the critic untrained", "vf_coef > 0"),
    (lambda: replace(PPO, value_loss=None), "trains no critic", "critic-free estimator"),
    (lambda: replace(PPO, value_loss=None, advantage="reinforce_pp", advantage_kwargs={}), "need a value loss",
     "clipped_mse, mse"),
    (lambda: replace(PPO, value_kwargs={"eps": 0.2}), "no option 'eps'", "valid options: clip"),
    (lambda: replace(PPO, value_loss="huber"), "unknown value loss 'huber'", "clipped_mse"),
    (lambda: replace(PRESETS.get("dpo"), value_loss="mse"), "takes no value_loss", "kind='policy'"),
])
def test_incoherent_critics_are_refused_in_one_line(build, reason: str, fix: str) -> None:
    with pytest.raises(IncompatibleSpecError) as err:
        build()
    assert "\n" not in str(err.value) and reason in str(err.value) and fix in str(err.value)


def test_presets_and_the_value_lr_key() -> None:
    from align.config import RecipeError, recipe_from_dict

    rto = PRESETS.get("rto")
    assert (PPO.advantage, dict(PPO.advantage_kwargs), PPO.reducer, PPO.kl, PPO.kl_coef, PPO.kl_placement) == (
        "gae", {"gamma": 1.0, "lam": 0.95}, "token_mean", "k1", 0.01, "reward")
    assert (PPO.value_loss, dict(PPO.value_kwargs), PPO.vf_coef) == ("clipped_mse", {"clip": 0.2}, 0.1)
    assert replace(rto, name="ppo") == PPO  # RTO is PPO on implicit_dpo's token rewards (the reward side adds them)
    assert not zero_advantage_is_inert(PPO)  # the value loss moves at A = 0: no row is ever skipped
    assert active_rows(PPO, torch.zeros(2, 2), torch.ones(2, 2), torch.arange(2)).all()
    recipe = recipe_from_dict({"algorithm": {"preset": "ppo"}, "rewards": [{"name": "exact_match"}],
                               "learner": {"value_lr": 1e-3}})
    assert recipe.learner.value_lr == 1e-3
    with pytest.raises(RecipeError, match=r"learner\.value_lr.*trains no critic"):
        recipe_from_dict({"algorithm": {"preset": "grpo"}, "rewards": [{"name": "exact_match"}],
                          "learner": {"value_lr": 1e-3}})


# -- the value head inside the learner ----------------------------------------------------------------------------
def _actor_critic(seed: int = 0, head_seed: int | None = 1) -> ActorCritic:
    torch.manual_seed(seed)
    model = ActorCritic(build_tiny_causal_lm(len(build_char_tokenizer()), SMALL))
    if head_seed is not None:  # a head away from its zero start, so the value gradient reaches the trunk too
        gen = torch.Generator().manual_seed(head_seed)
        with torch.no_grad():
            model.value_head.weight.copy_(torch.randn(model.value_head.weight.shape, generator=gen))
            model.value_head.bias.fill_(0.1)
    return model


class _RecordingStrategy(TorchStrategy):
    """Keeps each optimiser step's gradients."""

    grads: list[torch.Tensor]

    def optimizer_step(self) -> float:
        self.grads = [p.grad.detach().clone() for p in self.params if p.grad is not None]
        return super().optimizer_step()


def _learner(model: ActorCritic, micro_batch_size: int, spec: AlgorithmSpec = PPO) -> PolicyLearner:
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999))
    scheduler = build_scheduler(optimizer, kind="constant", warmup_steps=0, total_steps=10)
    return PolicyLearner(spec, _RecordingStrategy(model, optimizer, scheduler, max_grad_norm=None),
                         micro_batch_size=micro_batch_size)


def _policy_batch(learner: PolicyLearner) -> PolicyBatch:
    prompt_ids = torch.tensor([[5, 6], [5, 6], [7, 8], [7, 8], [9, 10], [9, 10]])
    completion_ids = torch.tensor([[11, 2, 0], [12, 13, 2], [14, 2, 0], [15, 16, 17], [18, 2, 0], [19, 20, 2]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
    rollout = Rollout(prompts=[""] * 6, completions=[""] * 6, prompt_ids=prompt_ids,
                      prompt_mask=torch.ones_like(prompt_ids), completion_ids=completion_ids, mask=mask,
                      logp=torch.zeros(6, 3),
                      group_ids=torch.tensor([0, 0, 1, 1, 2, 2]), weight_version=0)
    rollout.logp = learner.logprobs(rollout) * mask
    old_values = learner.values(rollout)
    ref_logp = rollout.logp - 0.1 * mask
    advantages, _, _, returns = estimate_advantages(learner.spec, rollout, torch.tensor([1.0, 0, 0, 1, 1, 0]),
                                                    ref_logp=ref_logp, credit_fn=None, values=old_values)
    return PolicyBatch(prompt_ids=prompt_ids, prompt_mask=rollout.prompt_mask, completion_ids=completion_ids,
                       mask=mask, logp=rollout.logp, advantages=advantages, group_ids=rollout.group_ids,
                       normalizer=StepNormalizer.from_masks(mask), old_values=old_values,
                       returns=returns - 0.3 * mask)  # targets away from V_old: a value gradient on the first step


def test_values_are_the_head_on_the_hidden_state_that_chooses_each_token() -> None:
    model = _actor_critic()
    learner = _learner(model, 6)
    batch = _policy_batch(learner)
    values = learner.values(batch)  # (B, T)
    with torch.no_grad():
        ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
        hidden = model.policy(input_ids=ids, output_hidden_states=True).hidden_states[-1]  # (B, P + T, D)
        # position P - 1 + t holds prompt + y_<t: the state in which token t is chosen
        expected = model.value_head(hidden[:, 1:4]).squeeze(-1) * batch.mask
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-6)
    assert values[batch.mask == 0].abs().sum() == 0 and values[batch.mask != 0].abs().sum() > 0
    logp, _, _ = response_forward(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.mask)
    plain, _, _ = response_forward(model.policy, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.mask)
    torch.testing.assert_close(logp, plain, rtol=0, atol=0)  # the wrapper changes nothing of the policy


def test_combined_gradient_does_not_depend_on_the_micro_batches() -> None:
    grads, stats = [], []
    for micro in (6, 2):  # one micro-batch, or one group per micro-batch
        learner = _learner(_actor_critic(), micro)
        batch = _policy_batch(learner)
        stats.append(merge_stats([learner.step(batch)]))
        grads.append(learner.strategy.grads)  # type: ignore[attr-defined]
    for whole, split in zip(*grads, strict=True):  # float rounding only (the shared prompt, trimmed padding)
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=5e-6)
    head = grads[0][-2:]  # value_head.weight, value_head.bias: the last parameters
    assert all(g.abs().sum() > 0 for g in head)
    assert stats[0]["vf_loss"] > 0 and stats[0]["loss"] == pytest.approx(stats[0]["pg_loss"] + 0.1 * stats[0][
        "vf_loss"], abs=1e-6)
    for key in ("loss", "pg_loss", "vf_loss", "value/clip_frac", "value/mean"):
        assert stats[1][key] == pytest.approx(stats[0][key], rel=1e-6, abs=1e-6), key


def test_value_loss_gradient_reaches_the_trunk_scaled_by_vf_coef() -> None:
    """grad(total) = grad(policy loss) + vf_coef grad(value loss): doubling vf_coef adds the value part again."""
    grads = []
    for coef in (0.1, 0.2):
        learner = _learner(_actor_critic(), 6, PPO.with_options(vf_coef=coef))
        learner.step(_policy_batch(learner))
        grads.append(learner.strategy.grads)  # type: ignore[attr-defined]
    learner = _learner(_actor_critic(), 6, PPO.with_options(vf_coef=1e-12))
    learner.step(_policy_batch(learner))
    base = learner.strategy.grads  # type: ignore[attr-defined]
    trunk_moved = False
    for g1, g2, g0 in zip(grads[0], grads[1], base, strict=True):
        torch.testing.assert_close(g2 - g0, 2 * (g1 - g0), rtol=1e-3, atol=1e-7)
        trunk_moved |= bool((g1 - g0).abs().sum() > 1e-6)
    assert trunk_moved


def test_the_critic_never_leaves_the_learner() -> None:
    model = _actor_critic()
    learner = _learner(model, 6)
    state = learner.policy_state()
    assert set(state) == set(model.policy.state_dict())  # the policy's own names, no value head
    assert set(policy_weights(model.state_dict())) == set(model.policy.state_dict())
    with pytest.raises(ValueError, match="trains no critic but the learner's model has a value head"):
        _learner(model, 6, replace(GRPO, kl=None, kl_coef=0.0))
    plain = build_tiny_causal_lm(len(build_char_tokenizer()), SMALL)
    with pytest.raises(ValueError, match="trains a critic but the learner's model has no value head"):
        PolicyLearner(PPO, TorchStrategy(plain, build_optimizer(plain, lr=1e-3, weight_decay=0.0,
                                                                betas=(0.9, 0.999)), None, None))


def test_value_lr_puts_the_head_in_its_own_parameter_group() -> None:
    model = _actor_critic(head_seed=None)
    assert model.value_head.weight.abs().sum() == 0 and model.value_head.bias.abs().sum() == 0  # starts at zero
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), value_lr=3e-3)
    first, second = optimizer.param_groups
    assert first["lr"] == 1e-4 and second["lr"] == 3e-3
    assert {id(p) for p in second["params"]} == {id(p) for p in model.value_head.parameters()}
    assert len(first["params"]) == len(list(model.policy.parameters()))


def test_the_critic_fits_returns_that_depend_on_the_prompt() -> None:
    """With the policy's advantages at 0, the step trains the critic alone: re-estimating V_old each step (as the
    workload does), it learns targets 1 for one prompt and 0 for the others, from its zero start."""
    model = _actor_critic(head_seed=None)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), value_lr=3e-2)
    scheduler = build_scheduler(optimizer, kind="constant", warmup_steps=0, total_steps=100)
    learner = PolicyLearner(PPO, TorchStrategy(model, optimizer, scheduler, max_grad_norm=None), micro_batch_size=6)
    batch = _policy_batch(learner)
    targets = (batch.group_ids == 1).float()[:, None] * batch.mask  # (B, T): prompt [7, 8] is worth 1
    losses = []
    for _ in range(40):
        step = replace(batch, advantages=torch.zeros_like(batch.advantages), old_values=learner.values(batch),
                       returns=targets)
        losses.append(merge_stats([learner.step(step)])["vf_loss"])
    assert losses[0] == pytest.approx(0.5 * float(targets.sum() / batch.mask.sum()), abs=1e-6)  # V = 0 at first
    assert losses[-1] < 0.05 * losses[0], losses
    values = learner.values(batch)
    assert float((values - targets).abs().max()) < 0.15
