"""Planning and checking ``align sweep``: recipes × combinations of ``--set`` values × seeds.

Planning (:func:`plan_sweep`) names every run after its recipe, the swept values and the seed
(``<recipe name>[-<key=value>...]-seed<k>``); the run lands in ``<out>/<id>-<time>/`` as ``align train`` would put
it (the sweep trains with ``name=<id>`` and ``logging.dir=<out>``). Checking (:func:`check_sweep`) validates every
(recipe, combination) as ``align validate`` does and refuses the whole sweep, before anything runs, at the first
problem; it also finds what an earlier invocation left in ``<out>`` (finished runs, checkpoints to resume) and
refuses a run directory that was trained from another recipe than the one planned under its name.

Imports only the standard library and torch-free parts of ``align`` at import time; the recipe machinery is
imported where it is used.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.errors import AlignError, InputError
from align.manifest import load_manifest, read_json_mapping, run_dirs_of

if TYPE_CHECKING:
    from align.config import Recipe

MAX_SEED = 2**32 - 2  # as align.config.MAX_SEED (imported lazily there: align.config imports torch)
RESERVED = {"seed": "give seeds with --seeds", "name": "runs are named after the recipe, the swept values and the seed",
            "logging.dir": "runs land in --out"}
_SAFE = re.compile(r"[^A-Za-z0-9._=+-]")
_MAX_ID = 150  # the run directory appends -YYYYMMDD-HHMMSS; a recipe name may hold 200 characters


# ---------------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedRun:
    """One run of the sweep: a recipe, the overrides for it, a seed."""

    id: str
    recipe: Path  # absolute
    recipe_name: str
    method: str  # the recipe name and the swept values: what the report pools seeds by
    overrides: tuple[str, ...]  # the --set values for this run (single-valued ones too), without seed, name, dir
    seed: int

    def train_overrides(self, out: Path) -> tuple[str, ...]:
        """Everything ``align train`` gets besides the recipe file (values as JSON: paths are never YAML-parsed)."""
        return (*self.overrides, f"seed={self.seed}", f"name={json.dumps(self.id)}",
                f"logging.dir={json.dumps(str(out))}", "logging.progress=false")


def parse_seeds(text: str) -> list[int]:
    """``0-4`` -> [0, 1, 2, 3, 4]; ``0,2,7`` and ``0-2,9`` too. One-line InputError otherwise."""
    seeds: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None or (match.group(2) is not None and int(match.group(2)) < int(match.group(1))):
            raise InputError(f"--seeds {text!r}: {part.strip()!r} is not a seed or a range of seeds; write whole "
                             "numbers like 0-4, 0,2,7 or 0-2,9")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if high > MAX_SEED:
            raise InputError(f"--seeds {text!r}: {high} is past the largest seed, {MAX_SEED}")
        seeds.extend(s for s in range(low, high + 1) if s not in seeds)
    return seeds


def parse_set(text: str) -> tuple[str, list[str]]:
    """``learner.lr=1e-4,3e-4`` -> ("learner.lr", ["1e-4", "3e-4"]). Commas inside brackets, braces or quotes
    belong to the value (``x=[1,2],[3,4]`` is two values)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InputError(f"--set {text!r} must look like key.path=value1,value2 (e.g. learner.lr=1e-4,3e-4)")
    if key in RESERVED:
        raise InputError(f"--set {key}: the sweep sets {key} itself ({RESERVED[key]})")
    values = _split_top_level(raw)
    empty = [i for i, v in enumerate(values) if not v.strip()]
    if empty:
        raise InputError(f"--set {text!r}: value {empty[0] + 1} is empty; separate values with single commas")
    if len(set(values)) < len(values):
        raise InputError(f"--set {text!r}: a value is given twice; give each value once")
    return key, values


def _split_top_level(raw: str) -> list[str]:
    values, depth, quote, current = [], 0, "", ""
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += ch
    values.append(current)
    return values


def plan_sweep(recipes: Sequence[Path], seeds: Sequence[int] | None, sets: Sequence[str]) -> list[PlannedRun]:
    """Every run of the sweep, recipes outermost and seeds innermost. ``seeds=None``: each recipe's own seed.

    A ``--set`` with several values is a sweep axis (every combination of the axes is run, and the values name the
    run); one with one value applies to every run and stays out of the names."""
    from align.api import resolve_recipe

    if not recipes:
        raise InputError("align sweep needs at least one recipe file")
    parsed = [parse_set(s) for s in sets]
    keys = [k for k, _ in parsed]
    twice = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if twice is not None:
        raise InputError(f"--set {twice}: given twice; give all its values in one --set, separated by commas")
    fixed = tuple(f"{k}={v[0]}" for k, v in parsed if len(v) == 1)
    axes = [[f"{k}={value}" for value in v] for k, v in parsed if len(v) > 1]
    runs: list[PlannedRun] = []
    names: dict[str, Path] = {}
    for path in recipes:
        recipe = resolve_recipe(Path(path), fixed)
        file = Path(path).resolve()
        if recipe.name in names:
            same = names[recipe.name] == file
            raise InputError(f"recipe {str(path)!r}: " + ("given twice" if same else
                             f"has the name {recipe.name!r}, as {str(names[recipe.name])!r} does; runs are named "
                             "after their recipe: give one of them another name"))
        names[recipe.name] = file
        for combo in itertools.product(*axes):
            method = " ".join((recipe.name, *combo))
            for seed in (recipe.seed,) if seeds is None else seeds:
                runs.append(PlannedRun(_run_id(recipe.name, combo, seed), file, recipe.name, method,
                                       fixed + combo, seed))
    return runs


def _run_id(name: str, combo: Sequence[str], seed: int) -> str:
    swept = "-".join(_SAFE.sub("_", c) for c in combo)
    lossy = any(_SAFE.search(c) for c in combo)  # two values could read alike once made safe: tell them apart
    run_id = "-".join(p for p in (name, swept, f"seed{seed}") if p)
    if lossy or len(run_id) > _MAX_ID:
        digest = hashlib.sha256("\0".join(combo).encode()).hexdigest()[:8]
        head = "-".join(p for p in (name, swept) if p)[: _MAX_ID - 24]
        run_id = f"{head}-{digest}-seed{seed}"
    return run_id


def default_out(recipes: Sequence[Path], sets: Sequence[str]) -> Path:
    """``<logging.dir of the first recipe>/sweep-<recipe names>``: the same command finds the same directory."""
    from align.api import resolve_recipe

    fixed = tuple(f"{k}={v[0]}" for k, v in map(parse_set, sets) if len(v) == 1)
    configs = [resolve_recipe(Path(p), fixed) for p in recipes]
    label = "+".join(c.name for c in configs)
    if len(label) > 100:
        label = f"{label[:90]}-{hashlib.sha256(label.encode()).hexdigest()[:8]}"
    return Path(configs[0].logging.dir) / f"sweep-{label}"


# ---------------------------------------------------------------------------------------------------------------
# Checking, before anything runs
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Resolved:
    """A planned run with the recipe it trains and what is on disk for it."""

    run: PlannedRun
    recipe: Recipe
    finished: Path | None  # a run directory that trained every step and wrote its summary
    resume: Path | None  # else the newest run directory with a checkpoint


def check_sweep(runs: Sequence[PlannedRun], out: Path, log: Callable[[str], None] = print) -> list[Resolved]:
    """What ``align validate`` checks, for each (recipe, combination) once (seeds only change the seed), plus: the
    local runtime (each run trains in a Ray task of its own), and runs already in ``out`` trained the recipe this
    sweep would train. One-line AlignError naming the run otherwise; nothing is written."""
    from align.api import load_plugins_and_check, resolve_recipe

    load_manifest(out)  # a damaged manifest is refused before anything runs
    resolved, checked = [], set()
    for run in runs:
        try:
            recipe = resolve_recipe(run.recipe, run.train_overrides(out))
            if recipe.runtime.backend != "local":
                raise InputError(f"recipe key 'runtime.backend': {recipe.runtime.backend!r}; align sweep trains "
                                 "each run with the local runtime in a Ray task of its own: set "
                                 "runtime.backend=local (e.g. --set runtime.backend=local)")
            if run.method not in checked:
                log(f"checking {run.method}")
                load_plugins_and_check(recipe)
                checked.add(run.method)
        except AlignError as err:
            raise type(err)(f"{_where(run)}: {err}") from None
        resolved.append(_on_disk(run, recipe, out))
    return resolved


def _where(run: PlannedRun) -> str:
    return f"sweep run {run.id} (recipe {run.recipe.name})"


def _on_disk(run: PlannedRun, recipe: Recipe, out: Path) -> Resolved:
    from align.trainers.checkpoint import latest_checkpoint

    dirs = run_dirs_of(out, run.id)
    for existing in dirs:
        difference = recipe_difference(recipe.model_dump(mode="json"), _saved_recipe(existing))
        if difference is not None:
            raise InputError(f"{existing} was trained from another recipe than this sweep's run {run.id} "
                             f"({difference}); use another --out, or move that run directory away")
    finished = resume = None
    for existing in reversed(dirs):
        checkpoint = latest_checkpoint(existing / "checkpoints")
        steps = 0 if checkpoint is None else int(checkpoint.name.removeprefix("step-"))
        if steps >= recipe.learner.steps and read_json_mapping(existing / "summary.json") is not None:
            finished = existing
            break
        if checkpoint is not None and resume is None:
            resume = existing
    return Resolved(run, recipe, finished, None if finished else resume)


def _saved_recipe(run_dir: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load((run_dir / "recipe.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None


def recipe_difference(planned: Any, saved: Any, path: str = "") -> str | None:
    """The first key where two recipe mappings differ (``logging.dir`` and ``logging.progress`` aside: where and
    how a run logs does not change what it trains), or None."""
    if path in ("logging.dir", "logging.progress"):
        return None
    if isinstance(planned, dict) and isinstance(saved, dict):
        for key in list(planned) + [k for k in saved if k not in planned]:
            sub = f"{path}.{key}" if path else str(key)
            found = recipe_difference(planned.get(key), saved.get(key), sub)
            if found is not None:
                return found
        return None
    if isinstance(planned, list) and isinstance(saved, list) and len(planned) == len(saved):
        for i, (a, b) in enumerate(zip(planned, saved, strict=True)):
            found = recipe_difference(a, b, f"{path}.{i}")
            if found is not None:
                return found
        return None
    if planned == saved:
        return None
    return f"{path or 'recipe'}: {json.dumps(saved)} there, {json.dumps(planned)} here"
