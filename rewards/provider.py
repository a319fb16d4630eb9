"""The reward side of a run, built from a recipe: registered with the core through the entry point
``align.components: rewards`` (:class:`align.components.RewardsProvider`), so the core composes rewards without
importing this package."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from align.algorithms import AlgorithmSpec
from align.components import ScorerLoader
from align.config import OptionValueError, Recipe, RecipeError, RewardEntry, check_option_values, choices
from align.data.tasks import TASKS
from align.errors import InputError
from align.trainers.evaluate import Verifier
from align.trainers.learner import PairBatch
from align.trainers.protocols import CreditFunction, RewardFunction, Rollout
from align.trainers.samples import Diagnostics
from align.trainers.workload import TokenCredit
from rewards.adapters import MODEL_OPTIONS, VERIFIERS, ComposerRewardFunction, CreditModuleFunction, verifier
from rewards.combine import RewardComposer, RewardTerm
from rewards.credit import CREDIT, CreditInputs
from rewards.plugins import load_entry_points, load_plugins
from rewards.registry import REWARDS

# credit modules a preference loss reads its token inputs from
PREFERENCE_CREDIT = {"cdpo": "contrastive_critical", "tgdpo": "implicit_dpo"}


def composer(entries: list[RewardEntry]) -> RewardComposer:
    return RewardComposer([RewardTerm(e.name, weight=e.weight, options=e.options, on_failure=e.on_failure,
                                      fallback=e.fallback, timeout=e.timeout) for e in entries])


class RecipeRewards:
    """:class:`align.components.RewardsProvider` over the reward and credit registries."""

    def check(self, recipe: Recipe) -> None:
        try:
            load_plugins(recipe.plugins)
            load_entry_points()
        except Exception as err:
            raise RecipeError(f"recipe key 'plugins': {err}") from None
        for i, entry in enumerate(recipe.rewards):
            if entry.name not in REWARDS:
                raise RecipeError(f"recipe key 'rewards.{i}.name': " + choices("unknown reward", entry.name,
                                                                               REWARDS.names()))
            _check_options(i, entry)
        for i, name in enumerate(recipe.logging.credit_diagnostics):
            if name not in CREDIT:
                raise RecipeError(f"recipe key 'logging.credit_diagnostics.{i}': " + choices(
                    "unknown credit module", name, CREDIT.names()))
        if recipe.credit is None:
            return
        if recipe.credit.name not in CREDIT:
            raise RecipeError("recipe key 'credit.name': " + choices("unknown credit module", recipe.credit.name,
                                                                     CREDIT.names()))
        _check_credit_options(recipe.credit.name, recipe.credit.options)
        if recipe.credit.name in ("prm_steps", "thr") and recipe.algorithm.spec().kind == "policy":
            needs = ("step scores from a process reward model" if recipe.credit.name == "prm_steps"
                     else "the policy's logits and hidden states")
            raise RecipeError(f"recipe key 'credit.name': {recipe.credit.name} needs {needs}, which the trainer "
                              "does not collect yet; use it through rewards.credit from Python")

    def reward_function(self, recipe: Recipe) -> RewardFunction:
        return ComposerRewardFunction(composer(list(recipe.rewards)))

    def credit_function(self, recipe: Recipe, load_scorer: ScorerLoader) -> CreditFunction | None:
        if recipe.credit is None:
            return None
        return CreditModuleFunction(recipe.credit.name, _with_scorers(recipe.credit.options, load_scorer))

    def token_credit(self, recipe: Recipe, spec: AlgorithmSpec, load_scorer: ScorerLoader) -> TokenCredit | None:
        """cDPO's weights on the rejected response (1 - s_t of contrastive_critical, the rejected side being the
        "negative" completion) or TGDPO's token rewards on both responses (implicit_dpo without the outcome)."""
        wanted = PREFERENCE_CREDIT.get(spec.preference_loss or "")
        if wanted is None:
            return None
        if recipe.credit is None or recipe.credit.name != wanted:
            raise RecipeError(f"recipe key 'credit': {spec.preference_loss} takes its token "
                              f"{'weights' if wanted == 'contrastive_critical' else 'rewards'} from credit module "
                              f"{wanted!r}; add credit: {{name: {wanted}, options: {{...}}}}")
        needed = ("dpo_model", "ref_model") if wanted == "implicit_dpo" else ("positive_model", "negative_model")
        options = _with_scorers({**{k: "base" for k in needed}, **recipe.credit.options}, load_scorer)
        if wanted == "implicit_dpo":
            options["outcome_weight"] = 0.0
        module = CREDIT.get(wanted)

        def run(ids: Tensor, mask: Tensor, prompt_ids: Tensor, prompt_mask: Tensor, rewards: Tensor,
                group_ids: Tensor) -> Tensor:
            return module(CreditInputs(rewards=rewards, mask=mask, token_ids=ids, group_ids=group_ids,
                                       prompt_ids=prompt_ids, prompt_mask=prompt_mask), **options)

        def extras(pairs: PairBatch) -> dict[str, Tensor]:
            p, pm, n = pairs.prompt_ids, pairs.prompt_mask, len(pairs)
            if wanted == "contrastive_critical":
                ids, mask = pairs.rejected_ids, pairs.rejected_mask
                weights = run(torch.cat([ids, ids]), torch.cat([mask, mask]), torch.cat([p, p]), torch.cat([pm, pm]),
                              torch.cat([torch.ones(n), torch.zeros(n)]), torch.arange(n).repeat(2))
                return {"rejected_weights": weights[n:]}
            group = torch.arange(n)
            return {"chosen_token_rewards": run(pairs.chosen_ids, pairs.chosen_mask, p, pm, torch.ones(n), group),
                    "rejected_token_rewards": run(pairs.rejected_ids, pairs.rejected_mask, p, pm, torch.zeros(n),
                                                  group)}

        return extras

    def scorer(self, model: Any) -> Any:
        from rewards.credit import CausalLMScorer

        return CausalLMScorer(model)

    def accuracy_reward(self, recipe: Recipe) -> str | None:
        return next((e.name for e in recipe.rewards if e.name in VERIFIERS), None)

    def verifier(self, recipe: Recipe) -> Verifier:
        entry = next((e for e in recipe.rewards if e.name in VERIFIERS), None)
        if entry is None:
            default = TASKS.info(recipe.data.task)["reward"] if recipe.data.task else "exact_match"
            entry = RewardEntry(name=default)
        return verifier(composer([entry]))  # type: ignore[no-any-return]

    def diagnostics(self, names: list[str]) -> Diagnostics | None:
        """Modules that need inputs a rollout lacks (auxiliary models, entropy) are skipped."""
        if not names:
            return None

        def diagnose(rollout: Rollout, rewards: Tensor) -> dict[str, Tensor]:
            x = CreditInputs(rewards=rewards.to(torch.float32), mask=rollout.mask, token_ids=rollout.completion_ids,
                             group_ids=rollout.group_ids, prompt_ids=rollout.prompt_ids,
                             prompt_mask=rollout.prompt_mask, logp=rollout.logp)
            out = {}
            for name in names:
                try:
                    out[name] = CREDIT.get(name)(x)
                except (InputError, TypeError):
                    continue
            return out

        return diagnose

    def registries(self) -> dict[str, list[str]]:
        return {"rewards": list(REWARDS.names()), "credit modules": list(CREDIT.names())}


def _check_options(index: int, entry: RewardEntry) -> None:
    """An unknown option names the options section (the key is what is wrong); a refused value names its key, so
    that a bad ``extract: nosuch_mode`` fails validate instead of every sample of every step."""
    fn = REWARDS.get(entry.name)
    for key, value in entry.options.items():
        try:
            fn.check_name(key)
        except Exception as err:
            raise RecipeError(f"recipe key 'rewards.{index}.options': {err}") from None
        try:
            fn.check_value(key, value)
        except Exception as err:
            raise RecipeError(f"recipe key 'rewards.{index}.options.{key}': {err}") from None
    if fn.preflight is not None:
        try:
            fn.preflight({**fn.options, **entry.options})
        except Exception as err:
            raise RecipeError(f"recipe key 'rewards.{index}': {entry.name}: {err}") from None


def _check_credit_options(name: str, options: dict[str, Any]) -> None:
    """The module's keyword-only arguments, with values of their annotated types (auxiliary models are paths)."""
    module = CREDIT.get(name)
    valid = [p.name for p in inspect.signature(module).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise RecipeError(f"recipe key 'credit.options.{unknown[0]}': " + choices(
            f"credit module {name!r} has no option", unknown[0], valid or ["(none)"]))
    try:
        check_option_values("credit.options", module, {k: v for k, v in options.items() if k not in MODEL_OPTIONS})
    except OptionValueError as err:
        raise err.recipe_error() from None


def _with_scorers(options: dict[str, Any], load_scorer: Callable[[str], Any]) -> dict[str, Any]:
    """Credit options naming auxiliary models by path become scorers (``"base"`` is resolved by the loader)."""
    return {k: load_scorer(str(v)) if k in MODEL_OPTIONS and isinstance(v, str) else v for k, v in options.items()}
