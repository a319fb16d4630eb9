"""The Ray runtime on this machine: vLLM rollout worker, two DeepSpeed ranks, a reward pool; resume; killed actors
replaced mid-run; and the `ray job submit` round trip against a head started with `ray start --head`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")
pytest.importorskip("vllm")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

from align import api  # noqa: E402
from align.trainers.metrics import read_metrics  # noqa: E402
from ray_jobs.placement import free_port  # noqa: E402


def recipe(tmp_path: Path, **changes: object) -> dict:
    data = {
        "name": "ray_tiny", "seed": 0,
        "model": {"path": "tiny", "sft_warmup": None, "cache_dir": str(tmp_path / "cache"),
                  "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}},
        "data": {"task": "arithmetic", "task_options": {"digits": 1}, "eval_size": 10, "train_size": 90},
        "rollout": {"engine": "vllm", "samples_per_prompt": 4, "prompts_per_step": 4, "max_new_tokens": 4,
                    "engine_options": {"max_model_len": 64, "kv_cache_bytes": 64 * 2**20}},
        "algorithm": {"preset": "grpo"},
        "rewards": [{"name": "exact_match", "options": {"extract": "full"}},
                    {"name": "repetition_penalty", "options": {"ngram": 1}}],
        "learner": {"lr": 1e-3, "steps": 3},
        "runtime": {"backend": "ray", "learners": 2, "reward_workers": 2},
        "logging": {"dir": str(tmp_path / "runs"), "tensorboard": False, "progress": False, "eval_every": 100},
        "checkpoint": {"every": 2},
    }
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


def kill_tagged(variable: str, tag: str) -> None:
    """SIGKILL every process whose environment has ``variable=tag``, until none is left (Ray's agents and
    forkserver children outlive a killed raylet for a while)."""
    import psutil

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        tagged = []
        for proc in psutil.process_iter():
            try:
                if proc.pid != os.getpid() and proc.environ().get(variable) == tag:
                    tagged.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if not tagged:
            return
        for proc in tagged:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(tagged, timeout=5)


@pytest.fixture(scope="module", autouse=True)
def embedded_ray():
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_grpo_on_ray_advances_versions_verifies_sync_and_resumes(tmp_path: Path) -> None:
    result = api.train(recipe(tmp_path), progress=False, log=lambda _: None)
    rows = read_metrics(result.run_dir)
    assert [r.get("weight_version") for r in rows[1:]] == [1.0, 2.0, 3.0]
    assert all(r["weight_sync/probe_max_gap"] < 1e-3 for r in rows[1:])
    assert all(r["logprob_gap/rollout_vs_learner"] < 1e-4 for r in rows[1:])
    assert (result.run_dir / "final" / "config.json").is_file()
    resumed = api.train(recipe(tmp_path, learner={"lr": 1e-3, "steps": 5}), resume=result.run_dir, progress=False,
                        log=lambda _: None)
    rows = read_metrics(resumed.run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r.get("weight_version") for r in rows[4:]] == [4.0, 5.0]


# The tests of failures and of `ray job submit` sample with transformers and, where one rank is enough, run one: what
# they test does not depend on the engine or the rank count, and each vLLM worker or extra rank costs 15-30 s here.
HF_ROLLOUT = {"engine": "hf", "engine_options": {}}


def test_killed_rollout_and_reward_workers_are_replaced(tmp_path: Path) -> None:
    config = recipe(tmp_path, name="ray_kill", learner={"lr": 1e-3, "steps": 4}, checkpoint={"every": 10},
                    rollout=HF_ROLLOUT, runtime={"backend": "ray", "learners": 1, "reward_workers": 2})
    killed: list[str] = []

    def assassin() -> None:
        deadline = time.monotonic() + 600  # a loaded machine can take minutes to step 1
        while time.monotonic() < deadline and not killed:
            runs = list((tmp_path / "runs").glob("ray_kill-*"))
            if runs and len(read_metrics(runs[0])) >= 2:  # step 1 is done
                for actor in ray.util.list_named_actors(all_namespaces=True):
                    name = actor["name"] if isinstance(actor, dict) else actor
                    if name.startswith(("align-rollout-ray_kill", "align-reward-ray_kill")) and not killed:
                        ray.kill(ray.get_actor(name, namespace=actor.get("namespace") if isinstance(actor, dict)
                                               else None), no_restart=True)
                        killed.append(name)
            time.sleep(0.05)

    thread = threading.Thread(target=assassin, daemon=True)
    thread.start()
    result = api.train(config, progress=False, log=lambda _: None)
    thread.join(5)
    assert killed, "no worker was killed: the run ended too fast"
    rows = read_metrics(result.run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[-1]["weight_version"] == 4.0


def test_ray_job_submit_round_trip(tmp_path: Path) -> None:
    if ray.is_initialized():
        ray.shutdown()
    ray_bin = Path(sys.executable).with_name("ray")
    work = tmp_path / "job"
    work.mkdir()
    config = recipe(tmp_path, name="ray_job", rollout=HF_ROLLOUT,
                    runtime={"backend": "ray", "learners": 1, "reward_workers": 1})
    (work / "recipe.yaml").write_text(yaml.safe_dump(config))
    dashboard = free_port()
    # every process of this head (and of the job it runs) inherits the tag, so the cleanup below stops this head
    # alone: `ray stop` would end every Ray process of the machine, another test worker's included
    tag = f"rj{os.getpid()}-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "ALIGN_TEST_RAY_HEAD": tag,
           "PATH": f"{ray_bin.parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = Path("/tmp") / f"rj{os.getpid()}"
    start = subprocess.run([str(ray_bin), "start", "--head", f"--port={free_port()}", "--num-cpus=4",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats",
                            f"--temp-dir={temp_dir}"], env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        deadline = time.monotonic() + 90
        while True:  # the head's job agent needs a few seconds after `ray start` returns
            submit = subprocess.run(
                [str(ray_bin), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir",
                 str(work), "--", sys.executable, "-m", "align.cli", "train", "recipe.yaml", "--no-progress"],
                env=env, capture_output=True, text=True, timeout=400)
            if "No available agent" not in submit.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
        assert "held-out accuracy:" in submit.stdout
    finally:
        kill_tagged("ALIGN_TEST_RAY_HEAD", tag)
        shutil.rmtree(temp_dir, ignore_errors=True)
    runs = list((tmp_path / "runs").glob("ray_job-*"))
    assert len(runs) == 1
    assert [r["step"] for r in read_metrics(runs[0])] == [0, 1, 2, 3]
    assert json.loads((runs[0] / "checkpoints" / "step-00000003" / "state.json").read_text())["step"] == 3


def test_a_dead_learner_stops_cleanly_and_the_run_resumes(tmp_path: Path, monkeypatch) -> None:
    from align.trainers.protocols import LearnerLost
    from ray_jobs.group import LearnerGroup

    config = recipe(tmp_path, name="ray_learner_kill", learner={"lr": 1e-3, "steps": 4}, checkpoint={"every": 2},
                    rollout=HF_ROLLOUT)
    killed: list[str] = []
    save = LearnerGroup.save

    def save_then_kill(self, directory):
        save(self, directory)
        if directory.parent.name.startswith(".step-00000002"):
            ray.kill(self.ranks[1], no_restart=True)  # a learner rank dies right after a checkpoint
            killed.append("rank1")

    monkeypatch.setattr(LearnerGroup, "save", save_then_kill)
    with pytest.raises(LearnerLost, match=r"learner rank died.* at step 3.*--resume-from .*step-00000002"):
        api.train(config, progress=False, log=lambda _: None)
    monkeypatch.undo()
    assert killed == ["rank1"]
    run_dir = next((tmp_path / "runs").glob("ray_learner_kill-*"))
    resumed = api.train(config, resume=run_dir, progress=False, log=lambda _: None)
    assert [r["step"] for r in read_metrics(resumed.run_dir)] == [0, 1, 2, 3, 4]


def test_async_partial_rollouts_with_refill_and_a_named_correction_on_vllm(tmp_path: Path) -> None:
    """Issue 16's parts together on Ray, with vLLM sampling in the rollout worker: generation batches two versions
    ahead, continued chunk by chunk across weight updates through generate_tokens (the worker runs a chunk
    submitted before a sync at the weights before it), DAPO refill, and IcePop on every step; the async counts and
    versions equal the local runtime's (the same schedule, which the workload drives on both)."""
    changes = dict(name="ray_async", algorithm={"preset": "dapo", "max_generation_batches": 2,
                                                "rollout_correction": {"name": "icepop"}},
                   learner={"lr": 1e-3, "steps": 6}, checkpoint={"every": 3},
                   runtime={"backend": "ray", "learners": 2, "reward_workers": 2, "max_staleness": 2,
                            "partial_rollouts": True})
    result = api.train(recipe(tmp_path, **changes), progress=False, log=lambda _: None)
    rows = read_metrics(result.run_dir)[1:]
    trained = [r for r in rows if "loss" in r]
    assert len(trained) >= 4  # dapo may leave a step empty; most train
    assert [r["off_policy_lag"] for r in rows][:3] == [0.0, 1.0, 2.0]
    assert max(r["off_policy_lag"] for r in rows) == 2.0 and rows[-1]["async/in_flight"] == 0
    for r in rows[2:]:
        assert r["async/partial_rows_frac"] > 0  # rows begun at one version and finished at a later one
        assert r["async/token_staleness_mean"] <= r["async/staleness_mean"]
    for r in rows:
        assert r["async/samples_submitted"] == r["async/samples_drawn"] + r["async/in_flight_samples"]
        assert r["dynamic_sampling/generation_batches"] in (1.0, 2.0)
    for r in trained:  # the named correction runs on every step, on-policy ones too
        assert 0 <= r["rollout_correction/masked_frac"] <= 1 and r["rollout_correction/ratio_min"] > 0
        assert r["rollout_correction/kl_k3"] >= 0
    assert all(r["weight_sync/probe_max_gap"] < 1e-3 for r in trained)
    local_config = recipe(tmp_path, **{**changes, "name": "local_async",
                                       "rollout": {"engine": "hf", "engine_options": {}}})
    local_config["runtime"] = {"backend": "local", "max_staleness": 2, "partial_rollouts": True}
    local = api.train(local_config, progress=False, log=lambda _: None)
    local_rows = read_metrics(local.run_dir)[1:]
    assert [r["off_policy_lag"] for r in local_rows] == [r["off_policy_lag"] for r in rows]
    assert [r["async/in_flight"] for r in local_rows] == [r["async/in_flight"] for r in rows]


class _EchoOk:
    """Answers every turn with "=ok" until the third, so episodes hold observations whatever the model writes."""

    def reset(self, prompt: str, columns: dict) -> None:
        self.turns = 0

    def step(self, action: str) -> object:
        from align.envs import StepResult

        self.turns += 1
        return StepResult(observation="=ok", reward=0.1 if any(c.isdigit() for c in action) else -0.1,
                          done=self.turns == 3)


def test_multi_turn_episodes_on_ray_with_vllm_are_scored_token_for_token(tmp_path: Path) -> None:
    """Each turn is one generate_tokens call to the vLLM rollout worker, the environment runs on the driver; the
    learner ranks, over prompt + turns + observations, give vLLM's log-probs at every model token (no
    re-tokenisation, observations masked), with one step of overlap."""
    from align.envs import ENVIRONMENTS, environment

    if "ray_echo_ok" not in ENVIRONMENTS:
        environment("ray_echo_ok")(_EchoOk)
    config = recipe(tmp_path, name="ray_multiturn",
                    rollout={"max_new_tokens": 3, "environment": {"name": "ray_echo_ok", "max_turns": 3}},
                    algorithm={"preset": "grpo", "overrides": {"advantage": "dense_group", "kl": None,
                                                               "kl_coef": 0.0}},
                    credit={"name": "turn_rewards"}, learner={"lr": 1e-3, "steps": 3},
                    runtime={"backend": "ray", "learners": 2, "reward_workers": 1, "overlap": True})
    result = api.train(config, progress=False, log=lambda _: None)
    rows = read_metrics(result.run_dir)[1:]
    assert [r["off_policy_lag"] for r in rows] == [0.0, 1.0, 1.0]
    for r in rows:
        assert r["multiturn/turns_mean"] == 3.0 and 0.2 < r["multiturn/observation_tokens_frac"] < 0.8
        assert r["weight_sync/probe_max_gap"] < 1e-3
    assert rows[0]["logprob_gap/rollout_vs_learner"] < 1e-4  # on-policy: engine and ranks agree token for token


def test_credit_modules_run_on_ray_with_auxiliary_models_in_their_own_actors(tmp_path: Path, monkeypatch) -> None:
    from ray_jobs import runtime
    from ray_jobs.actors import RemoteScorer

    served: list[object] = []

    class Counted(RemoteScorer):
        def __init__(self, actor: object) -> None:
            super().__init__(actor)
            served.append(actor)

    monkeypatch.setattr(runtime, "RemoteScorer", Counted)
    config = recipe(tmp_path, name="ray_credit", algorithm={"preset": "grpo", "overrides": {"advantage":
                                                                                             "dense_group"}},
                    credit={"name": "implicit_dpo", "options": {"dpo_model": "base", "ref_model": "base"}},
                    checkpoint={"every": 1, "keep": 2})
    result = api.train(config, progress=False, log=lambda _: None)
    rows = read_metrics(result.run_dir)
    assert [r.get("weight_version") for r in rows[1:]] == [1.0, 2.0, 3.0]
    assert len(served) == 2  # the DPO model and its reference, each served by its own actor
    from align.trainers.samples import read_samples

    assert all("implicit_dpo" in s["credit"] for s in read_samples(result.run_dir))
    kept = sorted(p.name for p in (result.run_dir / "checkpoints").glob("step-*"))
    assert kept == ["step-00000002", "step-00000003"]  # checkpoint.keep applies on Ray too
    for name in kept:  # one checkpoint: the ranks' DeepSpeed shards inside it, beside the loop's state and RNG
        assert {p.name for p in (result.run_dir / "checkpoints" / name).iterdir()} == {"learner", "rng.pt",
                                                                                      "state.json"}
        assert (result.run_dir / "checkpoints" / name / "learner" / "zero").is_dir()


def test_weights_sync_by_broadcast_in_a_stateless_group(tmp_path: Path) -> None:
    config = recipe(tmp_path, name="ray_broadcast", runtime={"backend": "ray", "learners": 2, "reward_workers": 1,
                                                             "weight_sync": "broadcast"})
    result = api.train(config, progress=False, log=lambda _: None)
    rows = read_metrics(result.run_dir)
    assert [r.get("weight_version") for r in rows[1:]] == [1.0, 2.0, 3.0]
    assert all(r["weight_sync/probe_max_gap"] < 1e-3 for r in rows[1:])  # the probe confirms every sync


def test_zero3_learners_gather_for_sync_and_probe(tmp_path: Path) -> None:
    config = recipe(tmp_path, name="ray_zero3", runtime={"backend": "ray", "learners": 2, "reward_workers": 1,
                                                         "zero_stage": 3}, learner={"lr": 1e-3, "steps": 2})
    result = api.train(config, progress=False, log=lambda _: None)
    rows = read_metrics(result.run_dir)
    assert [r.get("weight_version") for r in rows[1:]] == [1.0, 2.0]
    assert all(r["weight_sync/probe_max_gap"] < 1e-3 for r in rows[1:])


def test_lora_on_ray_syncs_only_the_adapter(tmp_path: Path) -> None:
    config = recipe(tmp_path, name="ray_lora", lora={"enabled": True, "r": 4, "alpha": 8,
                                                     "target_modules": ["q_proj", "v_proj"]},
                    runtime={"backend": "ray", "learners": 2, "reward_workers": 1})
    result = api.train(config, progress=False, log=lambda _: None)
    rows = read_metrics(result.run_dir)
    assert [r.get("weight_version") for r in rows[1:]] == [1.0, 2.0, 3.0]
    assert all(r["weight_sync/probe_max_gap"] < 1e-3 for r in rows[1:])  # the engine samples base + adapter
    assert rows[-1]["kl"] > 0  # grpo's KL is measured against the base with adapters disabled
    assert (result.run_dir / "final" / "adapter_config.json").is_file()


def test_what_the_local_runtime_has_runs_on_ray_too(tmp_path: Path) -> None:
    """entropy_weighted credit (the ranks compute the entropy), bf16 mixed precision (ranks and the rollout worker
    under autocast), micro-batches and updates_per_batch, samples.jsonl with credit heatmaps, and the probe."""
    config = recipe(tmp_path, name="ray_parts", rollout={"engine": "hf", "samples_per_prompt": 4,
                                                         "prompts_per_step": 4, "max_new_tokens": 4,
                                                         "engine_options": {}},
                    algorithm={"preset": "grpo", "overrides": {"kl": None, "kl_coef": 0.0}},
                    credit={"name": "entropy_weighted"},
                    learner={"lr": 1e-3, "steps": 2, "micro_batch_size": 4, "updates_per_batch": 2,
                             "mixed_precision": "bf16"},
                    logging={"dir": str(tmp_path / "runs"), "tensorboard": False, "progress": False,
                             "eval_every": 1})
    result = api.train(config, progress=False, log=lambda _: None)
    rows = read_metrics(result.run_dir)
    assert [r.get("weight_version") for r in rows[1:]] == [1.0, 2.0]
    assert all(r["weight_sync/probe_max_gap"] < 5e-2 for r in rows[1:])  # the bf16 default tolerance, passed
    from align.trainers.samples import read_samples

    samples = read_samples(result.run_dir)
    assert samples and "entropy_weighted" in samples[0]["credit"] and "advantage" in samples[0]["credit"]


def test_kill_9_of_the_driver_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """The one checkpoint writer on Ray: the driver (and with it the embedded Ray) is killed with SIGKILL mid-run;
    --resume-from continues from the last whole checkpoint and every later step equals an uninterrupted run."""
    from ..resume import assert_resumed_equals_reference, kill_9_then_resume

    config = recipe(tmp_path, name="ray_resume", learner={"lr": 1e-3, "steps": 10}, checkpoint={"every": 2},
                    runtime={"backend": "ray", "learners": 1, "reward_workers": 1},
                    rollout={"engine": "hf", "samples_per_prompt": 4, "prompts_per_step": 4, "max_new_tokens": 4,
                             "engine_options": {}})
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(config))
    reference = api.train(path, progress=False, log=lambda _: None)
    ray_tmp = Path("/tmp") / f"rk{os.getpid()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGN_RAY_TMP": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)

    def stop_orphans() -> None:  # the killed driver's embedded Ray (head, raylet, actors) has no one to stop it
        kill_tagged("ALIGN_RAY_TMP", str(ray_tmp))

    killed_at, run_dir = kill_9_then_resume(path, reference.run_dir, kill_after=4, env=env, timeout=300,
                                            cleanup=stop_orphans)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert_resumed_equals_reference(run_dir, reference.run_dir, killed_at, 10)
