"""The reward side of a run, built from a recipe: registered with the core through the entry point
``align.components: rewards`` (:class:`align.components.RewardsProvider`), so the core composes rewards without
importing this package."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from align.algorithms import AlgorithmSpec
from align.components import ScorerLoader
from align.config import OptionValueError, Recipe, RecipeError, RewardEntry, check_option_values, choices
from align.data.tasks import TASKS
from align.errors import InputError
from align.losses import PREFERENCE_LOSSES
from align.losses.preference_token import ALIGNDISTIL_RESPONSES
from align.trainers.evaluate import Verifier
from align.trainers.learner import PairBatch
from align.trainers.protocols import CreditFunction, RewardFunction, Rollout
from align.trainers.samples import Diagnostics
from align.trainers.workload import TokenCredit
from rewards.adapters import (
    MODEL_OPTIONS,
    VERIFIERS,
    ComposerRewardFunction,
    CreditModuleFunction,
    model_option_defaults,
    verifier,
)
from rewards.combine import RewardComposer, RewardTerm
from rewards.credit import CREDIT, CreditInputs, LogitsModel
from rewards.credit.base import response_logits
from rewards.credit.contrastive_prompting import split_template
from rewards.plugins import load_entry_points, load_plugins
from rewards.registry import REWARDS

# credit modules a preference loss reads its token inputs from
PREFERENCE_CREDIT = {"cdpo": "contrastive_critical", "tgdpo": "implicit_dpo", "treg": "contrastive_prompting",
                     "aligndistil": "contrastive_dpo"}
# what each of them provides, and the auxiliary models it reads ("base" unless the recipe names them)
_PROVIDES = {"contrastive_critical": "token weights", "implicit_dpo": "token rewards",
             "contrastive_prompting": "token rewards", "contrastive_dpo": "teacher models"}
_AUX_DEFAULTS = {"contrastive_critical": ("positive_model", "negative_model"),
                 "implicit_dpo": ("dpo_model", "ref_model"), "contrastive_prompting": ("ref_model",),
                 "contrastive_dpo": ("dpo_model", "reverse_dpo_model")}
# losses whose token rewards are scaled by the loss's own beta (one beta in the papers: TGDPO arXiv 2506.14574
# r_t = beta (lp_dpo - lp_ref) inside the loss's beta; AlignDistil arXiv 2503.02832 code's single args.beta)
ONE_BETA = ("tgdpo", "aligndistil")
AUX_MODEL_OPTIONS = (*MODEL_OPTIONS, "reverse_dpo_model")  # credit options naming an auxiliary model
RUN_SUPPLIED = ("tokenizer",)  # credit options the run fills in (the model's own tokenizer)
# policy presets whose token rewards come from a credit module, with that module's defaults for them (the recipe's
# credit.options win): RTO (arXiv 2404.18922, spec §7) clips beta1 (lp_dpo - lp_sft) at c, beta1 = c = 0.05, the SFT
# model being the run's base
POLICY_CREDIT = {"rto": ("implicit_dpo", {"beta": 0.05, "clip": 0.05, "ref_model": "base"})}


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
        _check_policy_credit(recipe)
        if recipe.credit is None:
            return
        if recipe.credit.name not in CREDIT:
            raise RecipeError("recipe key 'credit.name': " + choices("unknown credit module", recipe.credit.name,
                                                                     CREDIT.names()))
        _check_credit_options(recipe.credit.name, recipe.credit.options)
        _check_run_inputs(recipe.credit.name, recipe.credit.options)
        if recipe.credit.name == "turn_rewards" and recipe.rollout.environment is None:
            raise RecipeError("recipe key 'credit.name': turn_rewards places the per-turn rewards of multi-turn "
                              "rollouts; set rollout.environment (e.g. {name: calculator}) or use another module")
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
        return CreditModuleFunction(recipe.credit.name, _with_run_inputs(
            recipe.credit.name, _with_scorers({**model_option_defaults(recipe.credit.name),
                                                  **POLICY_CREDIT.get(recipe.algorithm.preset, ("", {}))[1],
                                                  **recipe.credit.options},
                                              load_scorer), recipe))

    def token_credit(self, recipe: Recipe, spec: AlgorithmSpec, load_scorer: ScorerLoader) -> TokenCredit | None:
        """cDPO's weights on the rejected response (1 - s_t of contrastive_critical, the rejected side being the
        "negative" completion); TGDPO's or T-REG's token rewards on both responses (implicit_dpo /
        contrastive_prompting, without the outcome); AlignDistil's auxiliary logits (contrastive_dpo's models).
        Raised here are the recipe's mistakes ``align validate`` reports (models are checked, not loaded)."""
        wanted = PREFERENCE_CREDIT.get(spec.preference_loss or "")
        if wanted is None:
            return None
        if recipe.credit is None or recipe.credit.name != wanted:
            raise RecipeError(f"recipe key 'credit': {spec.preference_loss} takes its {_PROVIDES[wanted]} from "
                              f"credit module {wanted!r}; add credit: {{name: {wanted}, options: {{...}}}}")
        named = {**{k: "base" for k in _AUX_DEFAULTS[wanted]}, **recipe.credit.options}
        if wanted == "contrastive_dpo" and named["dpo_model"] == named["reverse_dpo_model"]:
            # not an error: the tiny recipe uses it as a wiring check; but a run like this trains towards one model
            warnings.warn(f"aligndistil: dpo_model and reverse_dpo_model are the same model "
                          f"({named['dpo_model']!r}), so the teacher is that model and w_t = eps, which weights the "
                          f"KL by beta/eps (100x at the defaults); point them at a DPO run and a reverse-DPO run",
                          stacklevel=2)
        options = _with_scorers(named, load_scorer)
        if spec.preference_loss in ONE_BETA:
            options["beta"] = _one_beta(recipe, spec)
        if wanted == "contrastive_dpo":
            return _aligndistil_extras(spec, options["dpo_model"], options["reverse_dpo_model"])
        if wanted in ("implicit_dpo", "contrastive_prompting"):
            options["outcome_weight"] = 0.0
        options = _with_run_inputs(wanted, options, recipe)
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


def _check_policy_credit(recipe: Recipe) -> None:
    """A preset built on a credit module (rto) has it in the recipe, with the DPO model it reads."""
    if recipe.algorithm.preset not in POLICY_CREDIT:
        return
    preset, (module, _) = recipe.algorithm.preset, POLICY_CREDIT[recipe.algorithm.preset]
    if recipe.credit is None or recipe.credit.name != module:
        raise RecipeError(f"recipe key 'credit': {preset} takes its token rewards from credit module {module!r} "
                          f"(arXiv 2404.18922); add credit: {{name: {module}, options: {{dpo_model: <a DPO-trained "
                          "model directory>}}")
    if "dpo_model" not in recipe.credit.options:
        raise RecipeError(f"recipe key 'credit.options': {preset} needs dpo_model, the DPO-trained model whose "
                          "log-ratio to the SFT base is the token reward (e.g. the final/ directory of a dpo run; "
                          "base gives a zero implicit reward)")


def _check_credit_options(name: str, options: dict[str, Any]) -> None:
    """The module's keyword-only arguments, with values of their annotated types (auxiliary models are paths)."""
    module = CREDIT.get(name)
    valid = [p.name for p in inspect.signature(module).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise RecipeError(f"recipe key 'credit.options.{unknown[0]}': " + choices(
            f"credit module {name!r} has no option", unknown[0], valid or ["(none)"]))
    try:
        check_option_values("credit.options", module, {k: v for k, v in options.items()
                                                        if k not in AUX_MODEL_OPTIONS})
    except OptionValueError as err:
        raise err.recipe_error() from None


def _with_scorers(options: dict[str, Any], load_scorer: Callable[[str], Any]) -> dict[str, Any]:
    """Credit options naming auxiliary models by path become scorers (``"base"`` is resolved by the loader)."""
    return {k: load_scorer(str(v)) if k in AUX_MODEL_OPTIONS and isinstance(v, str) else v for k, v in options.items()}


def _check_run_inputs(name: str, options: dict[str, Any]) -> None:
    """Options the run fills in are not the recipe's; instruction templates hold their {prompt} once."""
    supplied = sorted(set(options) & set(RUN_SUPPLIED))
    if supplied:
        raise RecipeError(f"recipe key 'credit.options.{supplied[0]}': the run passes the model's own "
                          f"{supplied[0]}; remove it (set model.tokenizer to use another tokenizer)")
    for key in ("better_template", "worse_template"):
        if key in options and name == "contrastive_prompting":
            try:
                split_template(key, options[key])
            except InputError as err:
                raise RecipeError(f"recipe key 'credit.options.{key}': {err}") from None


def _with_run_inputs(name: str, options: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    """The module's run-supplied options: the run's tokenizer (loaded on first use) for modules that encode text."""
    if "tokenizer" in inspect.signature(CREDIT.get(name)).parameters:
        options = {**options, "tokenizer": _RunTokenizer(recipe)}
    return options


class _RunTokenizer:
    """The run's tokenizer (``model.tokenizer``, else the base model's), loaded when first used: at train time,
    after the base model is prepared; ``align validate`` builds the parts without loading it."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe: Recipe = recipe
        self.loaded: Any = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("recipe", "loaded"):
            raise AttributeError(name)
        if self.loaded is None:
            from align.build import load_tokenizer, prepare_base_model

            self.loaded = load_tokenizer(prepare_base_model(self.recipe, log=lambda _: None), self.recipe)
        return getattr(self.loaded, name)


def _loss_option(spec: AlgorithmSpec, name: str) -> Any:
    """A preference loss's hyperparameter: the recipe's value, else the loss's default."""
    if name in spec.preference_kwargs:
        return spec.preference_kwargs[name]
    assert spec.preference_loss is not None
    return inspect.signature(PREFERENCE_LOSSES.get(spec.preference_loss)).parameters[name].default


def _one_beta(recipe: Recipe, spec: AlgorithmSpec) -> float:
    """The credit module's beta is the loss's (TGDPO and AlignDistil have one beta); a different explicit value is a
    recipe mistake, refused rather than silently overridden."""
    assert recipe.credit is not None
    beta = float(_loss_option(spec, "beta"))
    given = recipe.credit.options.get("beta")
    if given is not None and float(given) != beta:
        raise RecipeError(f"recipe key 'credit.options.beta': {spec.preference_loss} has one beta for its token "
                          f"rewards and its loss, but credit.options.beta = {given} differs from the loss beta {beta} "
                          "(learner.beta or algorithm.overrides.preference_kwargs.beta); remove credit.options.beta "
                          "(it follows the loss beta) or set the two equal")
    return beta


def _aligndistil_extras(spec: AlgorithmSpec, dpo: Any, reverse: Any) -> TokenCredit:
    """The DPO and reverse-DPO models' next-token logits (B, T, V) on the responses the loss distils on."""
    responses = _loss_option(spec, "responses")
    if responses not in ALIGNDISTIL_RESPONSES:
        raise RecipeError(f"recipe key 'algorithm.overrides.preference_kwargs.responses': aligndistil distils on "
                          f"{' or '.join(map(repr, ALIGNDISTIL_RESPONSES))} responses, got {responses!r}")
    sides = ("chosen", "rejected") if responses == "both" else ("chosen",)

    def logits(model: Any, x: CreditInputs) -> Tensor:
        if not isinstance(model, LogitsModel):
            raise InputError(f"aligndistil needs full next-token logits of its auxiliary models; "
                             f"{type(model).__name__} gives token log-probs only")
        with torch.no_grad():
            return response_logits(model, x).float()

    def extras(pairs: PairBatch) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for side in sides:
            ids, mask = getattr(pairs, f"{side}_ids"), getattr(pairs, f"{side}_mask")
            x = CreditInputs(rewards=torch.zeros(len(pairs)), mask=mask, token_ids=ids, group_ids=torch.arange(
                len(pairs)), prompt_ids=pairs.prompt_ids, prompt_mask=pairs.prompt_mask)
            out[f"{side}_dpo_logits"] = logits(dpo, x)
            out[f"{side}_reverse_logits"] = logits(reverse, x)
        return out

    return extras
