"""What the core composes but does not own, as protocols, found through entry points.

- The reward side (:class:`RewardsProvider`): reward functions, credit modules, verifiers. The ``rewards``
  package registers one under the entry-point group ``align.components`` (name ``rewards``), so the core never
  imports ``rewards``: the layers stay ``ray_jobs -> rewards -> align`` with no exception.
- Runtimes (:class:`Runtime`) through the group ``align.runtimes``: ``local`` (:mod:`align.local`, in-process) and
  ``ray`` (``ray_jobs.runtime``, the only package allowed to import ray).

A runtime *places* the parts of a run (:class:`Parts`): in this process, or behind Ray actors. The controller loop
(:mod:`align.trainers.controller`) drives them through the core's protocols and cannot tell the difference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

from align.algorithms import AlgorithmSpec
from align.config import Recipe, RecipeError
from align.trainers.evaluate import Verifier
from align.trainers.protocols import CreditFunction, Learner, RewardFunction, RolloutEngine, WeightSync
from align.trainers.samples import Diagnostics
from align.trainers.workload import TokenCredit

Scorer = Any  # anything with token_logprobs(input_ids, attention_mask) (and logits): an auxiliary model
ScorerLoader = Callable[[str], Scorer]  # a model directory -> a scorer (in-process, or served by an actor)


class RewardsProvider(Protocol):
    """The reward side of a run, built from a recipe."""

    def check(self, recipe: Recipe) -> None:
        """Load the recipe's plugins and check every reward and credit name and option; one-line RecipeError."""
        ...

    def reward_function(self, recipe: Recipe) -> RewardFunction: ...

    def credit_function(self, recipe: Recipe, load_scorer: ScorerLoader) -> CreditFunction | None:
        """The recipe's credit module for policy training (None without one); models it names are loaded by
        ``load_scorer`` (``"base"`` resolved by the caller)."""
        ...

    def token_credit(self, recipe: Recipe, spec: AlgorithmSpec, load_scorer: ScorerLoader) -> TokenCredit | None:
        """cDPO token weights / TGDPO token rewards for preference pairs, from the recipe's credit module."""
        ...

    def scorer(self, model: Any) -> Scorer:
        """An auxiliary causal LM (in this process) as the credit modules' scorer."""
        ...

    def verifier(self, recipe: Recipe) -> Verifier:
        """The held-out check: the recipe's first verifier reward, else the task's own."""
        ...

    def accuracy_reward(self, recipe: Recipe) -> str | None:
        """The name of a 0/1 verifier among the recipe's rewards (reported as ``accuracy``)."""
        ...

    def diagnostics(self, names: list[str]) -> Diagnostics | None:
        """Per-token credit of the named modules on recorded samples (``logging.credit_diagnostics``)."""
        ...

    def registries(self) -> dict[str, list[str]]:
        """Registry name -> registered names, for ``align list``."""
        ...


@dataclass
class RunPlan:
    """What a runtime needs to place a run's parts."""

    recipe: Recipe
    spec: AlgorithmSpec
    base: Path  # the base model directory
    tokenizer: Any
    rewards: RewardsProvider
    log: Callable[[str], None] = print


@dataclass
class Parts:
    """A run's parts, placed. ``policy()`` is a model holding the learner's current weights (for evaluation and the
    final save); ``close()`` frees what the runtime started."""

    learner: Learner
    policy: Callable[[], Any]
    engine: RolloutEngine | None = None
    sync: WeightSync | None = None
    rewards: RewardFunction | None = None
    credit: CreditFunction | None = None
    token_credit: TokenCredit | None = None
    close: Callable[[], None] = field(default=lambda: None)


class Runtime(Protocol):
    """Places a run's parts. ``refused`` maps recipe keys this runtime does not honour to the reason, shown when a
    recipe sets them; ``check`` adds refusals that depend on several keys."""

    refused: Mapping[str, str]

    def check(self, recipe: Recipe) -> None: ...

    def place(self, plan: RunPlan) -> Parts: ...


COMPONENTS_GROUP = "align.components"
RUNTIMES_GROUP = "align.runtimes"


@cache
def rewards_provider() -> RewardsProvider:
    """The reward side, registered by the ``rewards`` package (entry point ``align.components: rewards``)."""
    for ep in entry_points(group=COMPONENTS_GROUP):
        if ep.name == "rewards":
            provider: RewardsProvider = ep.load()()
            return provider
    raise RecipeError("no reward provider is installed (entry point group align.components, name rewards); "
                      "reinstall the package with `pip install -e .`")


def get_runtime(name: str) -> Runtime:
    """A runtime registered under the entry-point group ``align.runtimes``: ``local`` (:mod:`align.local`) and
    ``ray`` (``ray_jobs.runtime``) ship with the package."""
    for ep in entry_points(group=RUNTIMES_GROUP):
        if ep.name == name:
            try:
                factory = ep.load()
            except ImportError as err:
                raise RecipeError(f"recipe key 'runtime.backend': the {name} runtime cannot load ({err})") from None
            runtime: Runtime = factory()
            return runtime
    raise RecipeError(f"recipe key 'runtime.backend': no {name!r} runtime is installed (entry point group "
                      f"{RUNTIMES_GROUP}); reinstall the package with `pip install -e .`")


def check_runtime(recipe: Recipe, runtime: Runtime) -> None:
    """Refuse, in one line naming the key, a recipe key the runtime would otherwise ignore."""
    for key, reason in runtime.refused.items():
        if _is_set(recipe, key):
            raise RecipeError(f"recipe key {key!r}: {reason}")
    runtime.check(recipe)


def _is_set(recipe: Recipe, key: str) -> bool:
    """Whether the recipe sets ``key`` (a dotted path) explicitly, rather than leaving the default."""
    node: Any = recipe
    *sections, last = key.split(".")
    for part in sections:
        if part not in node.model_fields_set:
            return False
        node = getattr(node, part)
        if node is None:
            return False
    return last in node.model_fields_set
