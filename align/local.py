"""The local runtime: every part of a run in this process.

The learner is the core's (:func:`align.build.make_learner`) with a plain torch strategy; the engine samples from
the learner's own model (``hf``) or keeps its own copy (``vllm``, verified by the probe after each sync); rewards
and credit run here. The Ray runtime (``ray_jobs.runtime``) places the same parts behind actors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from align.build import engine_name, engine_options, make_learner, policy_model
from align.components import Parts, RunPlan
from align.config import Recipe, RecipeError
from align.trainers.engines import get_engine_factory
from align.trainers.learner import InProcessLearner
from align.trainers.policy_scorer import POLICY, LearnerScorer
from align.trainers.strategy import TorchStrategy

_RAY_ONLY = "applies to backend: ray (the local runtime runs one learner, its engine and rewards in this process)"


class LocalSync:
    """In-process weight sync: the engine samples from the learner's model (a version bump), or loads its weights
    (vLLM: merged with the LoRA adapter where there is one)."""

    def __init__(self, engine: Any, model: Any) -> None:
        self.engine, self.model = engine, model
        self.shares_module = bool(getattr(engine, "shares_module", False))

    def push(self, version: int) -> None:
        self.engine.sync_weights(self.model, version)


class LocalRuntime:
    refused: Mapping[str, str] = {
        "runtime.address": _RAY_ONLY,
        "runtime.learners": _RAY_ONLY + "; data-parallel ranks need backend: ray",
        "runtime.zero_stage": _RAY_ONLY + "; ZeRO partitions state over DeepSpeed ranks",
        "runtime.reward_workers": _RAY_ONLY,
        "runtime.weight_sync": _RAY_ONLY + "; in-process engines read the learner's weights directly",
    }

    def check(self, recipe: Recipe) -> None:
        return None

    def place(self, plan: RunPlan) -> Parts:
        recipe = plan.recipe
        model, _ = policy_model(plan.base, recipe)
        learner = InProcessLearner(make_learner(
            recipe, plan.spec, model,
            lambda m, optimizer, scheduler: TorchStrategy(m, optimizer, scheduler, recipe.learner.max_grad_norm)))
        parts = Parts(learner=learner, policy=lambda: model)
        rewards = plan.rewards

        def load_scorer(path: str) -> Any:
            from transformers import AutoModelForCausalLM

            if path == POLICY:  # the weights being trained, as the learner scores them
                return LearnerScorer(learner)
            return rewards.scorer(AutoModelForCausalLM.from_pretrained(str(plan.base) if path == "base" else path)
                                  .eval())

        if plan.spec.kind == "preference":
            parts.token_credit = rewards.token_credit(recipe, plan.spec, load_scorer)
            return parts
        try:
            engine = get_engine_factory(engine_name(recipe))(model, plan.tokenizer, plan.base, engine_options(recipe))
        except TypeError as err:
            raise RecipeError(f"recipe key 'rollout.engine_options': {err}") from None
        parts.engine, parts.sync = engine, LocalSync(engine, model)
        parts.rewards = rewards.reward_function(recipe)
        parts.credit = rewards.credit_function(recipe, load_scorer)
        parts.close = getattr(engine, "close", lambda: None)
        return parts
