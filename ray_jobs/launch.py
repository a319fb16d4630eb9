"""The Ray runtime: the local loop with its engine, learner and reward pool behind Ray actors.

One rollout worker (vLLM, or transformers generate), ``runtime.learners`` DeepSpeed ranks (ZeRO-2 by default; gloo
on CPU), ``runtime.reward_workers`` reward workers. The driver samples prompts, merges rewards, computes credit and
advantages (the core's functions), deals whole groups to the learner ranks, then syncs weights to the rollout worker
and verifies the sync with a probe batch (:mod:`ray_jobs.weight_sync`). A rollout or reward worker that dies is
replaced and the step retried; a learner failure stops the run, which continues from its last checkpoint with
``--resume``. ``ray job submit ... -- align train recipe.yaml`` connects to the cluster (``RAY_ADDRESS``); without
an address ``align train`` starts an embedded local Ray.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError

from align.advantages import nonuniform_groups
from align.algorithms import AlgorithmSpec
from align.api import (
    TrainResult,
    _accuracy_entry,
    _greedy,
    _task_verifier,
    apply_lora,
    find_resumable_run,
    load_data,
    load_model,
    new_run_dir,
    prepare_base_model,
)
from align.config import Recipe, RecipeError
from align.errors import AlignError
from align.runs import save_final, with_rendered_prompts
from align.trainers.checkpoint import latest_checkpoint
from align.trainers.metrics import MetricsLogger
from align.trainers.policy import estimate_advantages
from align.trainers.progress import Progress
from align.trainers.protocols import Rollout, SamplingParams
from align.trainers.sampler import PromptSampler
from ray_jobs.actors import LearnerRank, RewardWorker, RolloutWorker
from ray_jobs.learner_deepspeed import SHARD_KEYS, LearnerConfig, shard_rows, take
from ray_jobs.weight_sync import ProbeCheck, bytes_to_state


class LearnerFailure(AlignError, RuntimeError):
    """A learner rank died: the run stops cleanly and continues from its last checkpoint with --resume."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connect(recipe: Recipe) -> None:
    if ray.is_initialized():
        return
    address = recipe.runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=max(4, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
                 _temp_dir=os.environ.get("ALIGN_RAY_TMP", "/tmp/ray-align"))


class Cluster:
    """The actors of one run, with replacement of the stateless ones."""

    def __init__(self, recipe: Recipe, spec: AlgorithmSpec, model_dir: Path) -> None:
        self.recipe, self.spec, self.model_dir = recipe, spec, str(model_dir)
        self.tag = f"{recipe.name}-{os.getpid()}-{time.time_ns() % 10**9}"  # actor names: align-<role>-<tag>
        self.restarts = 0
        rt = recipe.runtime
        port = _free_port()
        config = LearnerConfig(lr=recipe.learner.lr, betas=recipe.learner.betas,
                               weight_decay=recipe.learner.weight_decay, max_grad_norm=recipe.learner.max_grad_norm,
                               zero_stage=rt.zero_stage, temperature=recipe.rollout.temperature,
                               backend="nccl" if rt.device.startswith("cuda") else "gloo", seed=recipe.seed)
        gpu = 1 if rt.device.startswith("cuda") else 0
        self.placement = self._place(gpu)
        self.lora = None if not recipe.lora.enabled else {
            "r": recipe.lora.r, "lora_alpha": recipe.lora.alpha, "lora_dropout": recipe.lora.dropout,
            "target_modules": list(recipe.lora.target_modules)}
        self.learners = [LearnerRank.options(num_cpus=0.5, num_gpus=gpu, scheduling_strategy=self._bundle(1 + rank))
                         .remote(self.model_dir, spec, config, rank, rt.learners, port, 1, self.lora)
                         for rank in range(rt.learners)]
        self.rollout = self._new_rollout()
        self.rewards = [self._new_reward(i) for i in range(rt.reward_workers)]
        self.payload: bytes | None = None
        self.version = 0
        self.aux_actors: list[Any] = []
        self.credit = self._credit(recipe, model_dir)
        self.specs: list[Any] | None = None
        if rt.weight_sync == "broadcast":
            self._open_sync()

    def _open_sync(self) -> None:
        """A stateless broadcast group between learner rank 0 and the (current) rollout worker."""
        backend = "nccl" if self.recipe.runtime.device.startswith("cuda") else "gloo"
        host = ray.util.get_node_ip_address() if self.recipe.runtime.address else "127.0.0.1"
        port = _free_port()
        specs, _ = ray.get([self.learners[0].open_sync.remote(host, port, backend),
                            self.rollout.open_sync.remote(host, port, backend)])
        self.specs = specs

    def _credit(self, recipe: Recipe, model_dir: Path) -> Any:
        """The recipe's credit module; auxiliary models it names are served by their own actors."""
        if recipe.credit is None:
            return None
        from ray_jobs.actors import AuxModelWorker, RemoteScorer
        from rewards.adapters import MODEL_OPTIONS, CreditModuleFunction

        options = dict(recipe.credit.options)
        for key in MODEL_OPTIONS:
            if isinstance(options.get(key), str):
                path = str(model_dir) if options[key] == "base" else options[key]
                actor = AuxModelWorker.options(num_cpus=0.25).remote(path)
                self.aux_actors.append(actor)
                options[key] = RemoteScorer(actor)
        return CreditModuleFunction(recipe.credit.name, options)

    def _place(self, gpu: int) -> Any:
        """One placement group for the run: bundle 0 the rollout worker, 1..N the learner ranks (GPU bundles where
        GPUs exist, CPU bundles here), then the reward workers; PACK keeps them on as few nodes as possible."""
        from ray.util.placement_group import placement_group

        rt = self.recipe.runtime
        engine = {"CPU": 0.5, **({"GPU": 1} if gpu else {})}
        bundles = [engine] + [dict(engine) for _ in range(rt.learners)] + [{"CPU": 0.25}] * rt.reward_workers
        group = placement_group(bundles, strategy="PACK")
        try:
            ray.get(group.ready(), timeout=120)
        except Exception:
            ray.util.remove_placement_group(group)
            raise RecipeError(f"recipe key 'runtime': the Ray cluster cannot place {len(bundles)} bundles "
                              f"({rt.learners} learner ranks, 1 rollout worker, {rt.reward_workers} reward workers"
                              f"{', one GPU each for rollout and learners' if gpu else ''}) within 120 s") from None
        return group

    def _bundle(self, index: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(placement_group=self.placement, placement_group_bundle_index=index)

    def _new_rollout(self) -> Any:
        engine = self.recipe.rollout.engine
        if engine == "auto":
            engine = "vllm" if self.recipe.runtime.device.startswith("cuda") else "hf"
        options = dict(self.recipe.rollout.engine_options)
        if engine == "vllm":
            options.setdefault("device", "cuda" if self.recipe.runtime.device.startswith("cuda") else "cpu")
            options.setdefault("seed", self.recipe.seed)
        gpu = 1 if self.recipe.runtime.device.startswith("cuda") else 0
        name = f"align-rollout-{self.tag}-{self.restarts}"
        return RolloutWorker.options(num_cpus=0.5, num_gpus=gpu, name=name, scheduling_strategy=self._bundle(0)) \
            .remote(self.model_dir, engine, options, 1, self.lora)

    def _new_reward(self, slot: int) -> Any:
        terms = [{"name": e.name, "weight": e.weight, "options": e.options, "on_failure": e.on_failure,
                  "fallback": e.fallback, "timeout": e.timeout} for e in self.recipe.rewards]
        self.restarts += 1
        name = f"align-reward-{self.tag}-{self.restarts}"
        bundle = self._bundle(1 + self.recipe.runtime.learners + slot)
        return RewardWorker.options(num_cpus=0.25, name=name, scheduling_strategy=bundle).remote(self.recipe.plugins,
                                                                                                 terms)

    def shutdown(self) -> None:
        """End this run's actors and free its placement group (an embedded Ray may serve further runs)."""
        for actor in [*self.learners, self.rollout, *self.rewards, *self.aux_actors]:
            ray.kill(actor, no_restart=True)
        ray.util.remove_placement_group(self.placement)

    def sync(self, version: int) -> None:
        self.version = version
        if self.specs is not None:  # broadcast: no bytes through the object store
            self.payload = None
            ray.get([self.learners[0].send.remote(version), self.rollout.receive.remote(self.specs, version)])
            return
        self.payload = self.from_rank0("adapter_bytes" if self.lora else "state_bytes")
        method = "sync_adapter" if self.lora else "sync"
        self._with_rollout(lambda w: getattr(w, method).remote(self.payload, version))

    def weights(self) -> bytes:
        """The policy's current weights as bytes (for evaluation and the final model)."""
        if self.payload is None:
            self.payload = self.from_rank0("adapter_bytes" if self.lora else "state_bytes")
        return self.payload

    def from_rank0(self, method: str, *args: Any) -> Any:
        """Rank 0's answer. Under ZeRO-3 parameters are partitioned and gathering them is collective, so every
        rank takes part and rank 0's result is used."""
        ranks = self.learners if self.recipe.runtime.zero_stage == 3 else self.learners[:1]
        return ray.get([getattr(rank, method).remote(*args) for rank in ranks])[0]

    def _with_rollout(self, call: Callable[[Any], Any], retries: int = 2) -> Any:
        for attempt in range(retries + 1):
            try:
                return ray.get(call(self.rollout))
            except RayActorError:
                if attempt == retries:
                    raise
                self.restarts += 1
                self.rollout = self._new_rollout()  # a fresh worker starts from the base weights: resync it
                if self.specs is not None:
                    self._open_sync()
                resync = self.rollout.sync_adapter if self.lora else self.rollout.sync
                ray.get(resync.remote(self.weights(), self.version))
        raise AssertionError("unreachable")

    def generate(self, prompts: list[str], columns: dict[str, list[Any]], params: SamplingParams,
                 seed: int) -> Rollout:
        n = self.recipe.rollout.samples_per_prompt
        rollout: Rollout = self._with_rollout(lambda w: w.generate.remote(prompts, columns, n, params, seed))
        return rollout

    def launch(self, prompts: list[str], columns: dict[str, list[Any]], params: SamplingParams, seed: int) -> Any:
        """Start sampling without waiting (overlap); ``collect`` gets the rollout, re-sampling if the worker died."""
        n = self.recipe.rollout.samples_per_prompt
        return (self.rollout.generate.remote(prompts, columns, n, params, seed), (prompts, columns, params, seed))

    def collect(self, launched: Any) -> Rollout:
        ref, args = launched
        try:
            rollout: Rollout = ray.get(ref)
            return rollout
        except RayActorError:
            return self.generate(*args)

    def score(self, rollout: Rollout, step: int) -> Any:
        from rewards.combine import merge_scores

        ids = rollout.token_lists()
        chunks = torch.arange(len(rollout)).chunk(len(self.rewards))
        for attempt in range(3):
            try:
                futures = [worker.score.remote([rollout.prompts[i] for i in rows.tolist()],
                                                [rollout.completions[i] for i in rows.tolist()],
                                                [ids[i] for i in rows.tolist()],
                                                {k: [v[i] for i in rows.tolist()] for k, v in rollout.columns.items()},
                                                step) for worker, rows in zip(self.rewards, chunks, strict=False)]
                parts = ray.get(futures)
                # the workers run in parallel: the slowest one is the reward compute on the critical path
                compute = max((p.metrics.pop("time/reward_compute", 0.0) for p in parts), default=0.0)
                merged = merge_scores(parts)
                merged.metrics["time/reward_compute"] = compute
                return merged
            except RayActorError:
                if attempt == 2:
                    raise
                self.rewards = [w if _alive(w) else self._new_reward(i) for i, w in enumerate(self.rewards)]
        raise AssertionError("unreachable")


def _alive(worker: Any) -> bool:
    try:
        ray.get(worker.pid.remote(), timeout=30)
        return True
    except Exception:  # any failure means: replace it
        return False


def _batch(rollout: Rollout, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
    fields = {"prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
              "completion_ids": rollout.completion_ids, "mask": rollout.mask, "logp": rollout.logp,
              "advantages": advantages, "group_ids": rollout.group_ids}
    return {k: fields[k] for k in SHARD_KEYS}


def run_on_ray(recipe: Recipe, spec: AlgorithmSpec, *, resume: str | Path | bool, log: Callable[[str], None],
               progress: bool) -> TrainResult:
    if spec.kind != "policy":
        raise RecipeError("recipe key 'runtime.backend': the Ray runtime trains policy algorithms; run preference "
                          "presets with backend: local")
    if recipe.lora.enabled and (recipe.runtime.weight_sync == "broadcast" or recipe.runtime.zero_stage == 3):
        raise RecipeError("recipe key 'lora.enabled': on Ray, LoRA syncs its adapter through the object store with "
                          "ZeRO stage 0-2; set runtime.weight_sync: object_store and zero_stage <= 2")
    if recipe.runtime.weight_sync == "broadcast" and recipe.runtime.zero_stage == 3:
        raise RecipeError("recipe key 'runtime.weight_sync': broadcast sends rank 0's parameters, which ZeRO-3 "
                          "partitions; use object_store with zero_stage 3, or zero_stage 2")
    if recipe.credit is not None and recipe.credit.name == "entropy_weighted":
        raise RecipeError("recipe key 'credit.name': entropy_weighted needs the policy's entropy, which the Ray "
                          "driver does not receive yet; use backend: local")
    connect(recipe)
    base = prepare_base_model(recipe, log)
    eval_model, tokenizer = load_model(base, recipe)
    eval_model = apply_lora(eval_model, recipe)
    train, test = (with_rendered_prompts(d, tokenizer, recipe) for d in load_data(recipe))
    columns = {c: train[c] for c in train.column_names if c != "prompt"}
    prompts = train["prompt"]
    cluster = Cluster(recipe, spec, base)
    sampler = PromptSampler(len(train), recipe.seed)
    params = SamplingParams(max_new_tokens=recipe.rollout.max_new_tokens, temperature=recipe.rollout.temperature,
                            top_p=recipe.rollout.top_p)
    probe = ProbeCheck(list(test["prompt"][:4]), tolerance=recipe.runtime.probe_tolerance,
                       max_new_tokens=recipe.rollout.max_new_tokens, temperature=recipe.rollout.temperature)
    score = _task_verifier(recipe)
    accuracy_entry = _accuracy_entry(recipe)

    def evaluate() -> float:
        load_policy(eval_model, cluster.weights(), recipe)
        return _greedy(eval_model, tokenizer, test, score, recipe.rollout.max_new_tokens)

    random.seed(recipe.seed + 1)
    torch.manual_seed(recipe.seed + 1)
    start_step, before = 0, None
    if resume:
        run_dir = find_resumable_run(recipe, resume)
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        assert checkpoint is not None
        state = json.loads((checkpoint / "state.json").read_text())
        start_step, before = state["step"], state["accuracy_before"]
        for learner in cluster.learners:
            ray.get(learner.load.remote(str(run_dir / "checkpoints" / "deepspeed"), f"step-{start_step:08d}"))
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        log(f"resuming {run_dir} from step {start_step}")
    else:
        run_dir = new_run_dir(recipe)
    cluster.sync(start_step)
    logger = MetricsLogger(run_dir, tensorboard=recipe.logging.tensorboard, backends=recipe.logging.backends,
                           project=recipe.logging.project)
    logger.truncate_after(start_step)
    if before is None:
        before = evaluate()
        logger.log(0, {"eval/accuracy": before})
        log(f"run directory: {run_dir}")
        log(f"held-out accuracy before training: {100 * before:.1f}%")
    bar = Progress(recipe.learner.steps, start_step, progress, log)
    last: dict[str, float] = {}

    def launch_next() -> Any:
        index = sampler.next(recipe.rollout.prompts_per_step)
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
        return cluster.launch([prompts[i] for i in index], {k: [v[i] for i in index] for k, v in columns.items()},
                              params, seed)

    pending = None
    try:
        for step in range(start_step + 1, recipe.learner.steps + 1):
            started = time.perf_counter()
            launched = pending or launch_next()
            # overlap: the next step's rollout starts now, with the weights of before this step's update
            pending = launch_next() if recipe.runtime.overlap and step < recipe.learner.steps else None
            rollout = cluster.collect(launched)
            try:
                last = _step(step, cluster, spec, recipe, rollout, accuracy_entry, started)
            except RayActorError as err:
                saved = latest_checkpoint(run_dir / "checkpoints")
                where = f"its last checkpoint ({saved.name})" if saved else "the start (no checkpoint yet)"
                raise LearnerFailure(f"a learner rank died at step {step} ({type(err).__name__}); the run stopped "
                                     f"cleanly: `align train <recipe> --resume-from {run_dir}` continues from "
                                     f"{where}") from None
            if step % recipe.runtime.probe_every == 0:
                last["weight_sync/probe_max_gap"] = _verify_sync(cluster, probe).max_gap
            if step % recipe.logging.eval_every == 0 or step == recipe.learner.steps:
                last["eval/accuracy"] = evaluate()
            logger.log(step, last)
            bar.update(step, last)
            if step % recipe.checkpoint.every == 0 or step == recipe.learner.steps:
                _checkpoint(run_dir, step, cluster, sampler, before, recipe.checkpoint.keep)
    finally:
        bar.close()
        logger.close()
        payload = cluster.weights()
        cluster.shutdown()
    after = last.get("eval/accuracy", before)
    load_policy(eval_model, payload, recipe)
    save_final(eval_model, tokenizer, run_dir, recipe)
    summary = {**last, "eval/accuracy_before": before, "eval/accuracy_after": after}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    log(f"held-out accuracy: {100 * before:.1f}% -> {100 * after:.1f}%")
    return TrainResult(run_dir=run_dir, metrics=summary)


def load_policy(model: Any, payload: bytes, recipe: Recipe) -> None:
    """The driver's copy of the policy: full weights, or the LoRA adapter on the base."""
    state = bytes_to_state(payload)
    if recipe.lora.enabled:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)
    else:
        model.load_state_dict(state)


def _verify_sync(cluster: Cluster, probe: ProbeCheck) -> Any:
    """The rollout worker samples the probe prompts; learner rank 0 scores the same tokens; a gap is an error."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    rollout: Rollout = cluster._with_rollout(lambda w: w.generate.remote(probe.prompts, {}, 1, probe.params, seed))
    learner = cluster.from_rank0("logprobs", _batch(rollout, torch.zeros_like(rollout.mask)))
    return probe.check(rollout, learner, cluster.version)


def _step(step: int, cluster: Cluster, spec: AlgorithmSpec, recipe: Recipe, rollout: Rollout,
          accuracy_entry: Any, start: float) -> dict[str, float]:
    rollout_time = time.perf_counter() - start
    reward_start = time.perf_counter()
    scores = cluster.score(rollout, step)
    reward_time = time.perf_counter() - reward_start
    metrics: dict[str, float] = dict(scores.metrics)
    lag = cluster.version - rollout.weight_version  # 0 on-policy, 1 with overlap
    metrics["off_policy_lag"] = float(lag)
    if accuracy_entry is not None:
        values = scores.per_reward[accuracy_entry.name]
        metrics["accuracy"] = float((values[torch.isfinite(values)] >= 1 - 1e-9).float().mean())
    keep = scores.valid.clone()
    if spec.drop_uniform_groups and bool(keep.any()):
        informative = nonuniform_groups(scores.total[keep], rollout.mask[keep], rollout.group_ids[keep])
        keep[keep.nonzero().squeeze(-1)[~informative]] = False
    if not bool(keep.any()):
        return metrics
    batch = rollout.select(keep)
    rewards = scores.total[keep].to(torch.float32)
    shards = shard_rows(batch.group_ids, len(cluster.learners))
    plain = _batch(batch, torch.zeros_like(batch.mask))
    ref_logp = None
    reference_time = 0.0
    if spec.kl is not None:  # no round trip to the learners when nothing reads a reference
        reference_start = time.perf_counter()
        ref_parts = ray.get([learner.ref_logprobs.remote(take(plain, rows))
                             for learner, rows in zip(cluster.learners, shards, strict=True)])
        reference_time = time.perf_counter() - reference_start
        ref_logp = torch.zeros_like(batch.mask)
        for rows, part in zip(shards, ref_parts, strict=True):
            ref_logp[rows] = part
    advantages, extra, _ = estimate_advantages(spec, batch, rewards, ref_logp=ref_logp, credit_fn=cluster.credit)
    metrics.update(extra)
    if cluster.credit is not None:
        metrics["credit/aux_model_actors"] = float(len(cluster.aux_actors))
    full = _batch(batch, advantages)
    in_loss = spec.kl is not None and spec.kl_placement == "loss"
    update_start = time.perf_counter()
    correction = recipe.runtime.is_level if lag > 0 else None
    stats = ray.get([learner.step.remote(take(full, rows), ref_logp[rows] if in_loss and ref_logp is not None
                                         else None, correction, recipe.runtime.is_cap)
                     for learner, rows in zip(cluster.learners, shards, strict=True)])
    update_time = time.perf_counter() - update_start
    learner_compute = max(s.pop("time/learner_compute", 0.0) for s in stats)  # ranks run in parallel
    # per-token stats are weighted by the tokens each rank put through the model (skipped groups excluded)
    tokens = [s.pop("update/active_tokens", float(batch.mask[rows].sum())) for s, rows in zip(stats, shards,
                                                                                             strict=True)]
    for key in sorted({k for s in stats for k in s}):
        if key in ("loss", "pg_loss", "kl"):
            metrics[key] = sum(s[key] for s in stats)
        elif key == "update/skipped_rows_frac":  # a share of rows, not of tokens
            metrics[key] = sum(s[key] * len(rows) for s, rows in zip(stats, shards, strict=True)) / len(batch)
        else:
            metrics[key] = sum(s.get(key, 0.0) * t for s, t in zip(stats, tokens, strict=True)) / max(sum(tokens), 1.0)
    sync_start = time.perf_counter()
    cluster.sync(cluster.version + 1)
    sync_time = time.perf_counter() - sync_start
    total = time.perf_counter() - start
    metrics.update({"weight_version": float(cluster.version), "response_length/mean": float(batch.mask.sum(-1).mean()),
        "throughput/tokens_per_s": float(batch.mask.sum()) / total, "filter/kept_frac": float(keep.float().mean())})
    metrics.update(step_timings(total=total, rollout_wait=rollout_time, generate=rollout.timings.get("generate", 0.0),
                                reward=reward_time, reward_compute=float(scores.metrics.get("time/reward_compute", 0)),
                                reference=reference_time, update=update_time, learner_compute=learner_compute,
                                sync=sync_time))
    return metrics


def step_timings(*, total: float, rollout_wait: float, generate: float, reward: float, reward_compute: float,
                 reference: float, update: float, learner_compute: float, sync: float) -> dict[str, float]:
    """Where a Ray step's wall time went. The work is generation (inside the rollout worker), reward compute (the
    slowest reward worker) and the update (the slowest learner rank: forward, backward, all-reduce, optimiser);
    everything else (Ray dispatch and object transfer, serialisation, the driver's advantage estimation, weight
    sync) is overhead. The reference forward (with a KL term) counts as work, measured from the driver (its Ray
    round trip included). With ``runtime.overlap`` generation runs during the previous step, so only the part the
    driver waited for counts (``min(wait, generate)``); the weight sync then also waits for the in-flight
    generation on the same worker, which shows as sync and overhead."""
    visible_generate = min(rollout_wait, generate)
    work = visible_generate + reward_compute + learner_compute + reference
    return {"time/step": total, "time/rollout": rollout_wait, "time/generate": generate, "time/reward": reward,
            "time/reward_compute": reward_compute, "time/reference": reference, "time/update": update,
            "time/learner_compute": learner_compute, "time/weight_sync": sync,
            "time/overhead": max(0.0, total - work), "time/overhead_frac": max(0.0, total - work) / total
            if total > 0 else 0.0}


def _checkpoint(run_dir: Path, step: int, cluster: Cluster, sampler: PromptSampler, before: float,
                keep: int = 2) -> None:
    directory = run_dir / "checkpoints"
    directory.mkdir(parents=True, exist_ok=True)
    tag = f"step-{step:08d}"
    ray.get([learner.save.remote(str(directory / "deepspeed"), tag) for learner in cluster.learners])
    state = {"step": step, "sampler": sampler.state_dict(), "accuracy_before": before,
             "torch_rng": torch.get_rng_state().tolist(), "version": cluster.version}
    # the driver's state appears only after every rank has saved, and `latest` only after that: whole or nothing
    tmp = directory / f".{tag}.tmp-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    (tmp / "state.json").write_text(json.dumps(state))
    if (directory / tag).exists():
        shutil.rmtree(directory / tag)
    os.rename(tmp, directory / tag)
    pointer = directory / f".latest.tmp-{os.getpid()}"
    pointer.write_text(tag + "\n")
    os.replace(pointer, directory / "latest")

    for old in sorted(p for p in directory.glob("step-*") if p.is_dir())[:-keep]:  # keep the newest `keep`
        shutil.rmtree(directory / "deepspeed" / old.name, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
