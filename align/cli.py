"""The ``align`` command line: train, validate, eval, list, sft, sweep, report.

Recipe and input errors print one line and exit with code 2; nothing prints a traceback for a user mistake.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from align.errors import AlignError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="RL alignment with token- and sequence-level objectives.")


def _quiet_libraries() -> None:
    """Library chatter (progress bars, advice, multi-line warnings) would bury the one line a mistake prints."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import shutil

    if shutil.which("nvidia-smi") is None:  # DeepSpeed's CPU accelerator, without its probe's warning; GPUs: cuda
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        # its errors (a torn JSON file) also reach the caller as exceptions, which print as the one line
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    except ImportError:
        pass
    import warnings

    warnings.filterwarnings("ignore", message=".*tensor.detach.*")
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    return f"warning: {' '.join(str(message).split())}\n"


def _fail(err: BaseException) -> NoReturn:
    # one line whatever the message holds: a newline from a library's text would read as a second error
    typer.secho(f"error: {' '.join(str(err).split())}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.path=value overrides")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the newest run of this recipe")] = False,
    resume_from: Annotated[Path | None, typer.Option(help="continue this run directory")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="plain log lines instead of a bar")] = False,
) -> None:
    """Train from a recipe; the run lands in runs/<name>-<time>/."""
    _quiet_libraries()
    from align import api

    try:
        api.train(recipe, *(overrides or []), resume=resume_from or resume, progress=False if no_progress else None)
    except AlignError as err:
        _fail(err)


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.path=value overrides")] = None,
) -> None:
    """Check everything `align train` checks before its first step (keys, types, names, options, plugins, the
    device, directories, the model's configuration and tokenizer, LoRA targets, the data) without training."""
    _quiet_libraries()
    from align import api

    try:
        config = api.resolve_recipe(recipe, tuple(overrides or []))
        api.load_plugins_and_check(config)
        spec = config.algorithm_spec()
    except AlignError as err:
        _fail(err)
    else:
        typer.echo(f"ok: {config.name} ({spec.name}: {spec.kind}, "
                   f"{spec.policy_loss or spec.preference_loss}, {spec.reducer or 'pairwise'})")


@app.command("list")
def list_registries() -> None:
    """Every registry and its names."""
    from align.components import rewards_provider

    try:
        reward_registries = rewards_provider().registries()
    except AlignError as err:
        _fail(err)
    _print_registries(reward_registries)


def _print_registries(reward_registries: dict[str, list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    from align.advantages import ADVANTAGES
    from align.algorithms import PRESETS
    from align.data.tasks import TASKS
    from align.losses import (
        KL_ESTIMATORS,
        POLICY_LOSSES,
        PREFERENCE_LOSSES,
        REDUCERS,
        ROLLOUT_CORRECTIONS,
        VALUE_LOSSES,
    )

    table = Table(title="align registries")
    table.add_column("registry")
    table.add_column("names")
    for label, registry in (("algorithm presets", PRESETS), ("policy losses", POLICY_LOSSES),
                            ("reducers", REDUCERS), ("KL estimators", KL_ESTIMATORS),
                            ("advantage estimators", ADVANTAGES), ("value losses", VALUE_LOSSES),
                            ("preference losses", PREFERENCE_LOSSES),
                            ("rollout corrections", ROLLOUT_CORRECTIONS),
                            ("tasks", TASKS)):
        table.add_row(label, ", ".join(registry.names()))
    for label, names in reward_registries.items():
        table.add_row(label, ", ".join(names))
    from align.envs import ENVIRONMENTS

    table.add_row("environments (rollout.environment)", ", ".join(ENVIRONMENTS.names()))
    # sampling schemes are recipe keys, not registered parts; listed so that every method has its line here
    table.add_row("sampling (rollout.*)", "temperature (per token), top_p, long_horizon_temperature (sequence level: "
                  "p(y|x)^(1/T), long-horizon temperature scaling)")
    table.add_row("dynamic sampling (algorithm.*)", "max_generation_batches (DAPO refill: draw generation batches "
                  "until a step holds prompts_per_step informative groups)")
    table.add_row("asynchrony (runtime.*)", "overlap (one step ahead), max_staleness (rollouts up to k weight versions "
                  "ahead, older rows dropped), partial_rollouts + partial_chunk_tokens (generations continue across "
                  "weight updates, each token tagged with its version)")
    Console().print(table)

    from align.models.named import NAMED_MODELS

    models = Table(title="named offline models (model.path)")
    models.add_column("name", no_wrap=True)
    for column in ("source", "license", "model"):
        models.add_column(column)
    models.add_row("tiny", "built for data.task, SFT warm start", "-", "character-level Llama, about 1M parameters")
    for m in NAMED_MODELS.values():
        models.add_row(m.name, f"{m.package}=={m.version} (PyPI)", m.license, m.description)
    Console().print(models)


@app.command(name="eval")
def evaluate(
    target: Annotated[str, typer.Argument(help="a run directory or a model directory")],
    data: Annotated[str, typer.Option("--data", help="a task name (arithmetic, countdown, sorting) or a dataset")],
    reward: Annotated[str, typer.Option(help="verifier reward")] = "exact_match",
    size: Annotated[int, typer.Option(help="number of held-out prompts")] = 500,
    max_new_tokens: Annotated[int, typer.Option()] = 8,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Greedy held-out accuracy of a trained run or any model directory."""
    _quiet_libraries()
    from align import evaluation

    try:
        accuracy = evaluation.evaluate(target, data=data, reward=reward, size=size, max_new_tokens=max_new_tokens,
                                seed=seed)
    except AlignError as err:
        _fail(err)
    else:
        typer.echo(f"held-out accuracy: {100 * accuracy:.1f}%")


@app.command()
def sft(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML (its model and data sections)")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.path=value overrides")] = None,
) -> None:
    """Supervised warm start: build (or reuse) the recipe's base model and print where it is."""
    _quiet_libraries()
    from align import api

    try:
        config = api.resolve_recipe(recipe, tuple(overrides or []))
        path = api.prepare_base_model(config, log=typer.echo)
    except AlignError as err:
        _fail(err)
    else:
        typer.echo(f"model: {path}")


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="run directories and/or sweep directories (align sweep --out)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="HTML file to write; an existing directory gets "
                                         "report.html inside it")] = Path("report.html"),
    metrics: Annotated[list[str] | None, typer.Option("--metric", help="another metric to compare at the final step "
                                                      "(repeatable), e.g. response_length/mean, entropy")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the per-method numbers to this JSON "
                                                   "file")] = None,
) -> None:
    """A self-contained HTML report: each method's final held-out accuracy (and each --metric) as a mean with a 95%
    interval over its seeds (Student t), learning curves side by side (per method: mean and 95% band, where a
    method pools several seeds), and per-token credit heatmaps. A method is a recipe with its overrides: a sweep's
    runs carry theirs; other runs pool when their recipes differ only in seed, logging and checkpoint settings. A
    torn last line of metrics.jsonl or samples.jsonl (a killed run) is left out with a warning."""
    from align.report import make_report, write_numbers, write_page

    try:
        built = make_report(runs, metrics or ())
        path = write_page(built.page, output)
        numbers = None if json_path is None else write_numbers(built, json_path)
    except AlignError as err:
        _fail(err)
    for line in built.table():
        typer.echo(line)
    typer.echo(f"report: {path}")
    if numbers is not None:
        typer.echo(f"numbers: {numbers}")


@app.command()
def sweep(
    recipes: Annotated[list[Path], typer.Argument(help="recipe YAML files")],
    seeds: Annotated[str | None, typer.Option("--seeds", help="seeds for every combination: 0-4, 0,2,7 or 0-2,9 "
                                              "(default: each recipe's own seed)")] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", help="key.path=v1,v2,...: a sweep axis (repeatable; "
                                                   "every combination of the axes runs). One value: applied to "
                                                   "every run")] = None,
    address: Annotated[str | None, typer.Option("--address", help="a Ray cluster: ray://<head>:10001, or auto "
                                                "(started with `ray start` here); default: $RAY_ADDRESS, else an "
                                                "embedded local Ray")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="the sweep directory (default: <logging.dir>/sweep-"
                                             "<recipe names>)")] = None,
    parallel: Annotated[int | None, typer.Option("--parallel", min=1, help="at most this many runs at once "
                                                 "(default: as many as the CPUs fit)")] = None,
) -> None:
    """Train recipes x --set combinations x seeds, each run a Ray task with the local runtime in a process of its
    own, each an ordinary run directory <out>/<recipe name>[-<key=value>...]-seed<k>-<time>/. Every combination is
    validated first (as align validate does); one that is not valid stops the sweep before anything runs.
    <out>/sweep.json lists every run, its status and its directory. A run that fails leaves the others running;
    the same command again skips finished runs and resumes interrupted ones from their last checkpoint. Then:
    align report <out>."""
    _quiet_libraries()
    from align import sweep as sweeping

    try:
        seed_list = None if seeds is None else sweeping.parse_seeds(seeds)
        plan = sweeping.plan_sweep(recipes, seed_list, sets or [])
        root = (out or sweeping.default_out(recipes, sets or [])).resolve()
        resolved = sweeping.check_sweep(plan, root, log=typer.echo)
        typer.echo(f"sweep: {len(plan)} runs in {root}")
        records = sweeping.run_sweep(resolved, root, address=address or os.environ.get("RAY_ADDRESS"),
                                     parallel=parallel, log=typer.echo)
    except AlignError as err:
        _fail(err)
    except KeyboardInterrupt:
        typer.secho(f"interrupted: finished runs are kept and listed in {root / 'sweep.json'}; the same command "
                    "continues the sweep", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=130) from None
    for line in sweeping.summary_lines(records):
        typer.echo(line)
    typer.echo(f"manifest: {root / 'sweep.json'}; compare the methods with: align report {root}")
    failures = sweeping.failure_lines(records)
    for line in failures:
        typer.secho(line, fg=typer.colors.RED, err=True)
    if failures or sweeping.unfinished(records):
        raise typer.Exit(code=1)


def main(argv: list[str] | None = None) -> Any:
    return app(args=argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
