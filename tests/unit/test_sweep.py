"""`align sweep` without Ray: the plan (seeds, --set axes, run names), refusal before anything runs, and the
bookkeeping (manifest, a failed run leaving the others going, finished runs skipped on a re-run, checkpoints
resumed) with an executor that writes what `align train` writes instead of training."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align import api
from align.build import new_run_dir
from align.cli import app
from align.errors import InputError
from align.manifest import load_manifest, run_dirs_of
from align.sweep import (
    JobOutcome,
    SweepJob,
    check_sweep,
    default_out,
    parse_seeds,
    parse_set,
    plan_sweep,
    run_sweep,
    train_job,
)

RECIPE = Path(__file__).resolve().parents[1] / "e2e" / "tiny_recipe.json"


def test_seeds_read_as_ranges_and_lists() -> None:
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0,2,7") == [0, 2, 7]
    assert parse_seeds("0-2, 9,1") == [0, 1, 2, 9]
    for bad in ("4-0", "a", "1-", "-1", "", "99999999999"):
        with pytest.raises(InputError, match="--seeds") as err:
            parse_seeds(bad)
        assert "\n" not in str(err.value)


def test_set_values_split_on_top_level_commas() -> None:
    assert parse_set("learner.lr=1e-4,3e-4") == ("learner.lr", ["1e-4", "3e-4"])
    assert parse_set("learner.betas=[0.9,0.99],[0.8,0.9]") == ("learner.betas", ["[0.9,0.99]", "[0.8,0.9]"])
    assert parse_set("data.task_options={digits: 1, ops: '+,-'}") == ("data.task_options",
                                                                     ["{digits: 1, ops: '+,-'}"])
    assert parse_set("learner.steps=2") == ("learner.steps", ["2"])
    for bad, message in (("learner.lr", "must look like key.path=value1,value2"), ("seed=1,2", "--seeds"),
                         ("logging.dir=x", "--out"), ("learner.lr=1,,2", "value 2 is empty"),
                         ("learner.lr=1,1", "given twice")):
        with pytest.raises(InputError, match=message):
            parse_set(bad)


def test_plan_crosses_recipes_axes_and_seeds_and_names_each_run(tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(RECIPE.read_text()), "name": "other", "seed": 7}))
    runs = plan_sweep([RECIPE, other], [0, 1], ["learner.steps=2", "learner.lr=1e-3,2e-3",
                                                "rollout.temperature=1.0,0.5"])
    assert len(runs) == 2 * 2 * 2 * 2
    assert [r.id for r in runs[:4]] == ["tiny-learner.lr=1e-3-rollout.temperature=1.0-seed0",
                                        "tiny-learner.lr=1e-3-rollout.temperature=1.0-seed1",
                                        "tiny-learner.lr=1e-3-rollout.temperature=0.5-seed0",
                                        "tiny-learner.lr=1e-3-rollout.temperature=0.5-seed1"]
    assert runs[0].method == "tiny learner.lr=1e-3 rollout.temperature=1.0"
    assert runs[0].overrides == ("learner.steps=2", "learner.lr=1e-3", "rollout.temperature=1.0")
    assert runs[-1].id == "other-learner.lr=2e-3-rollout.temperature=0.5-seed1" and runs[-1].recipe == other
    assert len({r.id for r in runs}) == len(runs)
    own_seed = plan_sweep([other], None, [])  # without --seeds: the recipe's own seed
    assert [(r.id, r.method, r.seed) for r in own_seed] == [("other-seed7", "other", 7)]
    # values that are not safe in a directory name are replaced, and a digest keeps them apart
    odd = plan_sweep([RECIPE], [0], ["learner.betas=[0.9,0.99],[0.9,0.999]"])
    assert odd[0].id != odd[1].id and all("[" not in r.id and "," not in r.id for r in odd)
    assert odd[0].method == "tiny learner.betas=[0.9,0.99]"


def test_the_default_sweep_directory_is_the_same_for_the_same_command(tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(RECIPE.read_text()), "name": "other"}))
    assert default_out([RECIPE], ["learner.steps=2"]) == Path("runs") / "sweep-tiny"
    assert default_out([RECIPE, other], ["learner.lr=1e-3,2e-3"]) == Path("runs") / "sweep-tiny+other"


def test_recipes_sharing_a_name_are_refused(tmp_path: Path) -> None:
    twin = tmp_path / "twin.json"
    twin.write_text(RECIPE.read_text())
    with pytest.raises(InputError, match="has the name 'tiny'"):
        plan_sweep([RECIPE, twin], [0], [])
    with pytest.raises(InputError, match="given twice"):
        plan_sweep([RECIPE, RECIPE], [0], [])


@pytest.mark.parametrize(("sets", "message"), [
    (["learner.stepz=1,2"], "learner.stepz': unknown key"),
    (["learner.lr=1e-3,-1"], "sweep run tiny-learner.lr=-1-seed0 (recipe tiny_recipe.json): recipe key 'learner.lr'"),
    (["rewards.0.name=exact_match,no_such_reward"], "no_such_reward"),
    (["runtime.backend=ray"], "align sweep trains each run with the local runtime"),
])
def test_an_invalid_combination_stops_the_sweep_before_anything_runs(tmp_path: Path, sets: list[str],
                                                                    message: str) -> None:
    out = tmp_path / "sweep"
    args = ["sweep", str(RECIPE), "--seeds", "0-1", "--out", str(out), "--set", f"model.cache_dir={tmp_path}"]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not out.exists()  # no manifest, no run directory


def test_bad_seeds_are_refused_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["sweep", str(RECIPE), "--seeds", "3-1", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and result.output.count("error:") == 1 and "--seeds '3-1'" in result.output


class WritesRuns:
    """An executor that does what a training leaves on disk (run directory, checkpoint, summary) without training;
    runs whose id contains ``fail`` fail after creating their directory, as a run stopped at step 1 does."""

    def __init__(self, fail: str = "") -> None:
        self.jobs: list[SweepJob] = []
        self.fail = fail

    def run(self, jobs: Sequence[SweepJob], *, address: str | None, parallel: int | None,
            on_outcome: Callable[[JobOutcome], None]) -> None:
        for job in jobs:
            self.jobs.append(job)
            recipe = api.resolve_recipe(job.recipe, job.overrides)
            run_dir = Path(job.resume) if job.resume else new_run_dir(recipe)
            if self.fail and self.fail in job.id:
                on_outcome(JobOutcome(job.id, "reward 'x' failed at step 1", 0.1))
                continue
            step = run_dir / "checkpoints" / f"step-{recipe.learner.steps:08d}"
            step.mkdir(parents=True, exist_ok=True)
            (step / "state.json").write_text("{}")
            (run_dir / "checkpoints" / "latest").write_text(step.name + "\n")
            (run_dir / "summary.json").write_text(json.dumps({"eval/accuracy_before": 0.1,
                                                              "eval/accuracy_after": 0.25 + recipe.seed / 100}))
            on_outcome(JobOutcome(job.id, None, 0.1))


def sweep(tmp_path: Path, executor: WritesRuns, seeds: list[int], sets: Sequence[str] = ()) -> list:
    out = tmp_path / "sweep"
    plan = plan_sweep([RECIPE], seeds, ["learner.steps=2", f"model.cache_dir={tmp_path / 'cache'}", *sets])
    return run_sweep(check_sweep(plan, out, log=lambda _: None), out, executor=executor, log=lambda _: None)


def test_manifest_failures_and_skipping_finished_runs_on_a_rerun(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    first = WritesRuns(fail="lr=2e-3-seed1")
    records = sweep(tmp_path, first, [0, 1], ["learner.lr=1e-3,2e-3"])
    assert [(r.id, r.status) for r in records] == [
        ("tiny-learner.lr=1e-3-seed0", "done"), ("tiny-learner.lr=1e-3-seed1", "done"),
        ("tiny-learner.lr=2e-3-seed0", "done"), ("tiny-learner.lr=2e-3-seed1", "failed")]
    assert len(first.jobs) == 4  # the failure stopped nothing
    manifest = load_manifest(out)
    failed = manifest.runs["tiny-learner.lr=2e-3-seed1"]
    assert failed.error == "reward 'x' failed at step 1" and failed.final == {}
    assert failed.dir is not None and (out / failed.dir / "recipe.yaml").is_file()
    done = manifest.runs["tiny-learner.lr=1e-3-seed1"]
    assert done.final == {"eval/accuracy_before": 0.1, "eval/accuracy_after": 0.26}
    assert done.method == "tiny learner.lr=1e-3" and done.overrides[-1] == "learner.lr=1e-3"
    job = first.jobs[0]
    assert job.overrides[-4:] == ("seed=0", 'name="tiny-learner.lr=1e-3-seed0"', f'logging.dir="{out}"',
                                  "logging.progress=false")
    assert job.cpus == 1 and job.gpus == 0 and job.log_file == str(out / "logs" / "tiny-learner.lr=1e-3-seed0.log")

    again = WritesRuns()
    records = sweep(tmp_path, again, [0, 1], ["learner.lr=1e-3,2e-3"])
    assert [j.id for j in again.jobs] == ["tiny-learner.lr=2e-3-seed1"]  # only the failed one runs again
    assert again.jobs[0].resume is None  # it had no checkpoint: a fresh run directory
    assert [r.status for r in records] == ["skipped", "skipped", "skipped", "done"]
    assert records[1].dir == done.dir and records[1].final == done.final  # skipped: as the first sweep left it
    assert len(run_dirs_of(out, "tiny-learner.lr=2e-3-seed1")) == 2  # the failed attempt's directory is kept


def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    sweep(tmp_path, WritesRuns(), [0])
    (run_dir,) = run_dirs_of(out, "tiny-seed0")
    (run_dir / "summary.json").unlink()  # killed after its last checkpoint, before its summary
    again = WritesRuns()
    (record,) = sweep(tmp_path, again, [0])
    assert again.jobs[0].resume == str(run_dir) and record.dir == run_dir.name


def test_a_run_directory_of_another_recipe_is_refused(tmp_path: Path) -> None:
    sweep(tmp_path, WritesRuns(), [0])
    plan = plan_sweep([RECIPE], [0], ["learner.steps=2", f"model.cache_dir={tmp_path / 'cache'}",
                                      "learner.lr=0.5"])  # one value: not in the run's name
    with pytest.raises(InputError, match=r"\(learner.lr: 0.001 there, 0.5 here\); use another --out") as err:
        check_sweep(plan, tmp_path / "sweep", log=lambda _: None)
    assert "\n" not in str(err.value)


def test_a_failing_training_comes_back_as_one_line_with_its_log(tmp_path: Path) -> None:
    job = SweepJob(id="x", recipe=str(tmp_path / "missing.yaml"), overrides=(), resume=None, cpus=1, gpus=0,
                   log_file=str(tmp_path / "logs" / "x.log"), cwd=str(Path.cwd()))
    outcome = train_job(job)
    assert outcome.error is not None and "\n" not in outcome.error
    assert "does not exist" in outcome.error and str(tmp_path / "logs" / "x.log") in outcome.error
    assert "missing.yaml" in (tmp_path / "logs" / "x.log").read_text()
