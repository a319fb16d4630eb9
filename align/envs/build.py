"""``rollout.environment`` in a run: checked by ``align validate``, then wired in front of either runtime's engine.

The runtimes place a token engine as usual (the in-process transformers or vLLM engine, or on Ray the
``RolloutService`` proxy on the driver, whose ``generate_tokens`` is one Ray call per turn); :func:`with_environment`
wraps it in a :class:`~align.envs.rollout.MultiTurnEngine`, so the environment always runs here, in the driver, and
the workload cannot tell a multi-turn rollout from a single-turn one. The reward side is wrapped too
(:class:`EnvironmentRewards`): each row's sequence reward becomes the episode's return, the recipe's rewards plus
the sum of its per-turn environment rewards, and the step's metrics gain ``multiturn/*``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from align.config import OptionValueError, Recipe, RecipeError, check_option_values, choices
from align.envs.protocol import (
    ENVIRONMENTS,
    NUM_TURNS,
    OBSERVATION_TOKENS,
    OUT_OF_TURNS,
    TOOL_CALLS,
    TRUNCATED,
    TURN_REWARDS,
)
from align.envs.rollout import ChatObservations, MultiTurnEngine, Observations, TextObservations
from align.errors import AlignError
from align.trainers.protocols import RewardFunction, RewardResult, Rollout, RolloutEngine

ENVIRONMENT_REWARD = "environment"  # the per-row sum of turn rewards, as a reward term (reward/environment/mean)


def environment_options(name: str) -> list[str]:
    """The options an environment takes: its factory's keyword arguments."""
    params = inspect.signature(ENVIRONMENTS.get(name)).parameters.values()
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def check_environment(recipe: Recipe) -> None:
    """``rollout.environment``: a registered name (plugins loaded first), known options of the annotated types, an
    environment that builds with them, and a policy algorithm. One-line :class:`RecipeError` naming the key."""
    env = recipe.rollout.environment
    if env is None:
        return
    if recipe.algorithm_spec().kind != "policy":
        raise RecipeError("recipe key 'rollout.environment': multi-turn rollouts sample completions, which "
                          f"preference algorithm {recipe.algorithm.preset!r} does not; remove rollout.environment")
    for i, entry in enumerate(recipe.rewards):
        if entry.name == ENVIRONMENT_REWARD:
            raise RecipeError(f"recipe key 'rewards.{i}.name': with rollout.environment the environment's turn rewards "
                              f"are logged as reward {ENVIRONMENT_REWARD!r}; register the reward under another name")
    if env.name not in ENVIRONMENTS:
        raise RecipeError("recipe key 'rollout.environment.name': " + choices("unknown environment", env.name,
                                                                                ENVIRONMENTS.names()))
    valid = environment_options(env.name)
    unknown = sorted(set(env.options) - set(valid))
    if unknown:
        raise RecipeError(f"recipe key 'rollout.environment.options.{unknown[0]}': " + choices(
            f"environment {env.name!r} has no option", unknown[0], valid or ["(none)"]))
    factory = ENVIRONMENTS.get(env.name)
    try:
        check_option_values("rollout.environment.options", factory, env.options)
    except OptionValueError as err:
        raise err.recipe_error() from None
    try:
        factory(**env.options)
    except Exception as err:  # the environment's own check of its options
        raise RecipeError(f"recipe key 'rollout.environment.options': {env.name}: "
                          f"{' '.join(str(err).split())[:200]}") from None


def observations_for(recipe: Recipe, tokenizer: Any) -> Observations:
    """How ``rollout.environment``'s observations become tokens with this tokenizer (building it checks that its
    chat template can render them: ``align validate`` calls this once the tokenizer loads)."""
    env = recipe.rollout.environment
    assert env is not None
    style = env.observation_format
    if style == "auto":  # prompts rendered with the chat template: observations are chat messages too
        style = "chat" if recipe.data.chat_template else "text"
    observations: Observations
    try:
        observations = (ChatObservations(tokenizer, env.observation_role) if style == "chat"
                        else TextObservations(tokenizer))
    except AlignError as err:
        raise RecipeError(f"recipe key 'rollout.environment.observation_format': {err}") from None
    return observations


def with_environment(recipe: Recipe, engine: RolloutEngine, rewards: RewardFunction, tokenizer: Any, *,
                     max_context: int | None = None) -> tuple[RolloutEngine, RewardFunction]:
    """The engine and rewards the workload drives: as placed, or wrapped for ``rollout.environment``.
    ``max_context``: the engine's context length (vLLM's max_model_len), which no episode may outgrow."""
    env = recipe.rollout.environment
    if env is None:
        return engine, rewards
    if not callable(getattr(engine, "generate_tokens", None)):
        raise RecipeError(f"recipe key 'rollout.environment': the rollout engine ({type(engine).__name__}) has no "
                          "generate_tokens (token in, token out), which multi-turn rollouts drive; use engine hf or "
                          "vllm")
    observations = observations_for(recipe, tokenizer)
    factory, options = ENVIRONMENTS.get(env.name), dict(env.options)
    multi_turn = MultiTurnEngine(engine, lambda: factory(**options), tokenizer,  # type: ignore[arg-type]
                                 max_turns=env.max_turns, max_total_tokens=env.max_total_tokens,
                                 max_observation_tokens=env.max_observation_tokens, observations=observations,
                                 completion=env.completion, name=env.name, max_context=max_context)
    return multi_turn, EnvironmentRewards(rewards)


class EnvironmentRewards:
    """The recipe's rewards plus each row's environment rewards: R_i = (recipe's rewards)_i + sum_k r_{i,k}, the
    episode's return, so that every estimator counts the per-turn rewards once (a sequence estimator through R, the
    ``turn_rewards`` credit module by placing r_{i,k} at turn k's end and the rest on the last token). Adds
    ``environment`` to the per-reward values (``reward/environment/mean``) and the ``multiturn/*`` metrics."""

    def __init__(self, rewards: RewardFunction) -> None:
        self.rewards = rewards

    def __call__(self, rollout: Rollout, step: int) -> RewardResult:
        result = self.rewards(rollout, step)
        turns = torch.tensor([float(sum(r)) for r in rollout.columns[TURN_REWARDS]], dtype=torch.float64)
        metrics = {**result.metrics, **multiturn_metrics(rollout)}
        metrics[f"reward/{ENVIRONMENT_REWARD}/mean"] = float(turns.mean()) if len(turns) else 0.0
        return RewardResult(rewards=result.rewards.to(torch.float64) + turns, valid=result.valid,
                            per_reward={**result.per_reward, ENVIRONMENT_REWARD: turns}, metrics=metrics,
                            failures=result.failures)


def multiturn_metrics(rollout: Rollout) -> dict[str, float]:
    """Per step: model turns per episode (mean, max), tool calls (turns the environment answered and continued),
    the share of completion tokens that are observations, and the share of episodes cut by ``max_total_tokens``
    or ``max_turns`` before the environment ended them."""
    c = rollout.columns
    if not len(rollout):
        return {}

    def mean(key: str) -> float:
        return float(torch.tensor([float(v) for v in c[key]]).mean())

    observed, generated = float(sum(c[OBSERVATION_TOKENS])), float(rollout.mask.sum())
    return {"multiturn/turns_mean": mean(NUM_TURNS), "multiturn/turns_max": float(max(c[NUM_TURNS])),
            "multiturn/tool_calls_mean": mean(TOOL_CALLS),
            "multiturn/observation_tokens_frac": observed / max(observed + generated, 1.0),
            "multiturn/truncated_frac": mean(TRUNCATED), "multiturn/out_of_turns_frac": mean(OUT_OF_TURNS)}
