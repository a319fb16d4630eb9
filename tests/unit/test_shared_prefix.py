"""The shared-prefix forward (each distinct prompt run once, its KV cache expanded to the group's rows) equals the
unshared forward of ``response_outputs``: log-probs, entropy, logits, values and every trainable parameter's gradient,
on ragged batches, and it falls back to the unshared forward where it cannot share."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from align.models import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm
from align.trainers.critic import ActorCritic
from align.trainers.sequences import encode, pad_left, pad_right, response_outputs
from align.trainers.shared_prefix import prompt_runs, shared_prefix_outputs

SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=3)
# fp32: the two forwards differ only in summation order (see the module docstring). Gradients are compared relative
# to each parameter's largest gradient entry when that exceeds 1 (a gradient of 1e3 carries rounding of ~1e-4).
ATOL = 1e-5
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _lora(model: Any, r: int = 4, seed: int = 0, scale: float = 0.1) -> Any:
    """A PEFT model as align.build.apply_lora makes it, with B != 0 so the adapter changes the outputs (seeded)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # LoRA's A matrices are drawn from the global generator
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                             task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    return model


def _tiny() -> Any:
    return build_tiny_causal_lm(len(build_char_tokenizer()), SMALL).eval()


# groups: 3 rows, then 2 + 2 rows with the same prompt (two groups that share it), one row alone, 4 rows; prompt
# lengths 5, 9, 2 and 7 (left padding differs between groups), completions of 1..6 tokens (right padding)
GROUPS = [("12+3=", ["15<eos>", "1", "105<eos>"]), ("7+45+11=", ["63<eos>", "6"]),
          ("7+45+11=", ["2", "64<eos>"]), ("9=", ["9<eos>"]), ("100-1=", ["99<eos>", "9", "98<eos>", "1000<e"])]


def _batch(tokenizer: Any, groups: list[tuple[str, list[str]]] = GROUPS) -> dict[str, torch.Tensor]:
    prompts = [p for p, answers in groups for _ in answers]
    answers = [a.replace("<eos>", "\x00") for _, answers in groups for a in answers]
    eos = tokenizer.eos_token_id
    completion_rows = [[eos if c == "\x00" else tokenizer.convert_tokens_to_ids(c) for c in a] for a in answers]
    prompt_ids, prompt_mask = pad_left(encode(tokenizer, prompts), tokenizer.pad_token_id)
    completion_ids, mask = pad_right(completion_rows, tokenizer.pad_token_id)
    group_ids = torch.tensor([g for g, (_, answers) in enumerate(groups) for _ in answers])
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids, mask=mask,
                group_ids=group_ids)


def _run(fn: Any, model: Any, batch: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, Any]:
    """One forward + backward of a loss that weighs every token differently; outputs and trainable gradients."""
    model.zero_grad(set_to_none=True)
    out = fn(model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["mask"], **kwargs)
    weights = torch.linspace(-1.0, 2.0, out.logp.numel()).reshape(out.logp.shape) * batch["mask"]
    loss = (out.logp * weights).sum()
    if out.values is not None:
        loss = loss + ((out.values - 0.5) ** 2 * batch["mask"]).sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return {"logp": out.logp.detach(), "entropy": out.entropy, "values": None if out.values is None else
            out.values.detach(), "logits": None if out.logits is None else out.logits.detach(), "grads": grads}


def _max_gaps(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    gaps = {k: float((a[k] - b[k]).abs().max()) for k in ("logp", "entropy", "values", "logits")
            if a[k] is not None}
    gaps["grads"] = max(float((a["grads"][n] - b["grads"][n]).abs().max() / a["grads"][n].abs().max().clamp(min=1))
                        for n in a["grads"])
    return gaps


def _prompt_rows_seen(model: Any) -> tuple[list[tuple[int, ...]], Any]:
    """The (rows, columns) of every forward's input ids, recorded at the input embedding."""
    shapes: list[tuple[int, ...]] = []
    handle = model.get_input_embeddings().register_forward_pre_hook(
        lambda module, args: shapes.append(tuple(args[0].shape)))
    return shapes, handle


# -- finding the runs ---------------------------------------------------------------------------------------------
def test_prompt_runs_split_where_ids_or_mask_change_and_join_equal_neighbours() -> None:
    ids = torch.tensor([[0, 5, 6], [0, 5, 6], [0, 5, 6], [7, 5, 6], [0, 5, 6], [0, 5, 6], [8, 8, 8]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 1, 1], [1, 1, 1]])
    runs = prompt_runs(ids, mask)  # row 2 has the ids of row 1 but not its mask; rows 4-5 repeat rows 0-1
    assert runs.firsts.tolist() == [0, 2, 3, 4, 6]
    assert runs.row_run.tolist() == [0, 0, 1, 2, 3, 3, 4]
    one = prompt_runs(ids[:1], mask[:1])
    assert one.firsts.tolist() == [0] and one.row_run.tolist() == [0]
    none = prompt_runs(ids[:0], mask[:0])
    assert none.count == 0 and none.row_run.tolist() == []


# -- exactness on the tiny model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_shared_prefix_equals_the_unshared_forward_with_its_gradients(lora: bool) -> None:
    tokenizer = build_char_tokenizer()
    model = _lora(_tiny()) if lora else _tiny()
    batch = _batch(tokenizer)
    assert batch["prompt_mask"].sum(-1).unique().numel() == 4 and batch["mask"].sum(-1).unique().numel() == 5
    kwargs = dict(temperature=0.7, with_entropy=True)
    unshared = _run(response_outputs, model, batch, **kwargs)
    shapes, handle = _prompt_rows_seen(model)
    shared = _run(shared_prefix_outputs, model, batch, **kwargs)
    handle.remove()
    b, p = batch["prompt_ids"].shape
    t = batch["completion_ids"].shape[1]
    # 4 prompts run (the two consecutive groups with one prompt share it), then the completions without their last
    # column on top of the expanded cache
    assert shapes == [(4, p), (b, t - 1)]
    gaps = _max_gaps(unshared, shared)
    assert all(g < ATOL for g in gaps.values()), gaps
    assert min(float(g.abs().max()) for g in shared["grads"].values()) > 1e-3  # every gradient is a real test
    if lora:
        assert all("lora_" in n for n in shared["grads"]) and len(shared["grads"]) == 4 * 2 * SMALL.num_layers


def test_shared_prefix_matches_with_returned_logits_sampling_temperature_entropy_and_one_token() -> None:
    tokenizer = build_char_tokenizer()
    model = _lora(_tiny(), seed=1)
    batch = _batch(tokenizer)
    kwargs = dict(temperature=1.3, with_entropy=True, return_logits=True, entropy_temperature=None)
    gaps = _max_gaps(_run(response_outputs, model, batch, **kwargs), _run(shared_prefix_outputs, model, batch,
                                                                         **kwargs))
    assert set(gaps) == {"logp", "entropy", "logits", "grads"} and max(gaps.values()) < ATOL, gaps
    # every completion one token long: only the prompts run (their last position predicts it)
    single = _batch(tokenizer, [("12+3=", ["1", "2", "3"]), ("4=", ["4", "5"])])
    assert single["completion_ids"].shape[1] == 1
    shapes, handle = _prompt_rows_seen(model)
    shared = _run(shared_prefix_outputs, model, single, with_entropy=True)
    handle.remove()
    assert shapes == [(2, single["prompt_ids"].shape[1])]
    gaps = _max_gaps(_run(response_outputs, model, single, with_entropy=True), shared)
    assert max(gaps.values()) < ATOL, gaps


def test_actor_critic_values_and_value_head_gradients_match() -> None:
    tokenizer = build_char_tokenizer()
    model = ActorCritic(_lora(_tiny(), seed=2))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a head away from its zero start, so the value loss reaches the trunk
        model.value_head.weight.copy_(torch.randn(model.value_head.weight.shape, generator=gen))
        model.value_head.bias.fill_(0.1)
    batch = _batch(tokenizer)
    shapes, handle = _prompt_rows_seen(model.policy)
    shared = _run(shared_prefix_outputs, model, batch, with_entropy=True)
    handle.remove()
    assert shapes[0] == (4, batch["prompt_ids"].shape[1])  # shared, not fallen back
    unshared = _run(response_outputs, model, batch, with_entropy=True)
    gaps = _max_gaps(unshared, shared)
    assert "values" in gaps and max(gaps.values()) < ATOL, gaps
    assert {"value_head.weight", "value_head.bias"} <= set(shared["grads"])


def test_response_outputs_share_prompt_switch_delegates_and_defaults_off() -> None:
    tokenizer = build_char_tokenizer()
    model = _lora(_tiny())
    batch = _batch(tokenizer)
    shapes, handle = _prompt_rows_seen(model)
    default = _run(response_outputs, model, batch, with_entropy=True)
    assert len(shapes) == 1  # off by default: one forward over prompt + completion
    shapes.clear()
    switched = _run(response_outputs, model, batch, with_entropy=True, share_prompt=True)
    handle.remove()
    b, t = batch["completion_ids"].shape
    assert shapes == [(4, batch["prompt_ids"].shape[1]), (b, t - 1)]
    assert max(_max_gaps(default, switched).values()) < ATOL


# -- falling back -------------------------------------------------------------------------------------------------
def test_distinct_rows_and_a_group_whose_prompts_differ_are_not_trusted_to_group_ids() -> None:
    tokenizer = build_char_tokenizer()
    model = _lora(_tiny())
    distinct = _batch(tokenizer, [("1=", ["1"]), ("2=", ["2<eos>"]), ("3=", ["33"])])
    shapes, handle = _prompt_rows_seen(model)
    out = _run(shared_prefix_outputs, model, distinct)
    assert shapes == [(3, distinct["prompt_ids"].shape[1] + distinct["completion_ids"].shape[1])]  # unshared
    assert max(_max_gaps(_run(response_outputs, model, distinct), out).values()) < ATOL
    # group_ids say one group of 4, but its last row has another prompt: it gets its own prefix
    mixed = _batch(tokenizer, [("12+3=", ["15", "1", "105"]), ("12+4=", ["16"])])
    mixed["group_ids"] = torch.zeros(4, dtype=torch.long)
    shapes.clear()
    out = _run(shared_prefix_outputs, model, mixed)
    handle.remove()
    assert shapes[0] == (2, mixed["prompt_ids"].shape[1])
    assert max(_max_gaps(_run(response_outputs, model, mixed), out).values()) < ATOL


def test_a_forward_without_a_cache_falls_back_with_a_warning() -> None:
    inner = _tiny()

    class NoCache(torch.nn.Module):  # neither logits_to_keep nor past_key_values
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    batch, model = _batch(build_char_tokenizer()), NoCache()
    with pytest.warns(RuntimeWarning, match="refused or ignored the KV cache"):
        out = _run(shared_prefix_outputs, model, batch)
    assert max(_max_gaps(_run(response_outputs, model, batch), out).values()) < ATOL


def test_dropout_in_training_mode_and_gradient_checkpointing_run_unshared() -> None:
    tokenizer = build_char_tokenizer()
    batch = _batch(tokenizer)
    unshared_width = batch["prompt_ids"].shape[1] + batch["completion_ids"].shape[1]
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny(), LoraConfig(r=4, lora_dropout=0.1, target_modules=LORA_TARGETS,
                                               task_type="CAUSAL_LM"))
    model.train()
    shapes, handle = _prompt_rows_seen(model)
    shared_prefix_outputs(model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["mask"])
    handle.remove()
    assert [s[1] for s in shapes] == [unshared_width]
    model.eval()  # the learner's mode: dropout off, shared
    shapes, handle = _prompt_rows_seen(model)
    shared_prefix_outputs(model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["mask"])
    handle.remove()
    assert len(shapes) == 2

    plain = _tiny()
    plain.gradient_checkpointing_enable()
    plain.train()
    shapes, handle = _prompt_rows_seen(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # found before any forward: no wasted prefill, no warning
        shared_prefix_outputs(plain, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                              batch["mask"])
    handle.remove()
    assert [s[1] for s in shapes] == [unshared_width]


# -- several ranks: the agreed path, and a wrapper that hides the model's config -------------------------------------
def _other_rank(proposes: int, seen: list[list[int]]) -> Any:
    """``Strategy.agree_min`` over this process and a rank that proposes the path ``proposes``; records the calls."""
    def agree(values: Any) -> list[int]:
        seen.append(list(values))
        return [min(values[0], proposes), min(values[1], -proposes)]
    return agree


def test_ranks_share_only_on_a_path_every_rank_proposes() -> None:
    tokenizer = build_char_tokenizer()
    model = _lora(_tiny())
    batch = _batch(tokenizer)
    b, p = batch["prompt_ids"].shape
    t = batch["completion_ids"].shape[1]
    unshared = _run(response_outputs, model, batch)
    seen: list[list[int]] = []
    for other, calls in ((2, [(4, p), (b, t - 1)]), (0, [(b, p + t)]), (1, [(b, p + t)])):
        shapes, handle = _prompt_rows_seen(model)  # (1: the other rank's completions are one token wide)
        out = _run(shared_prefix_outputs, model, batch, agree=_other_rank(other, seen))
        handle.remove()
        assert shapes == calls, other
        assert max(_max_gaps(unshared, out).values()) < ATOL
    assert seen == [[2, -2]] * 3  # one agreement per call: this rank proposes the two-call shared path
    # a rank that cannot share still takes part in the agreement (the others wait for it), proposing path 0
    distinct = _batch(tokenizer, [("1=", ["1"]), ("2=", ["2<eos>"]), ("3=", ["33"])])
    seen.clear()
    _run(response_outputs, model, distinct, share_prompt=True, agree=_other_rank(2, seen))
    assert seen == [[0, 0]]
    one_token = _batch(tokenizer, [("12+3=", ["1", "2", "3"])])
    seen.clear()
    _run(shared_prefix_outputs, model, one_token, agree=_other_rank(1, seen))
    assert seen == [[1, -1]]


def test_a_wrapper_runs_the_prompts_and_its_module_the_completions() -> None:
    """As the DeepSpeed engine: a ``config`` of its own (not the model's), the model as ``module``."""
    inner = _lora(_tiny())

    class Engine(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = inner
            self.config = {"train_micro_batch_size_per_gpu": 1}

        def forward(self, **kwargs: Any) -> Any:
            return self.module(**kwargs)

    engine, batch = Engine(), _batch(build_char_tokenizer())
    calls: list[str] = []
    handles = [engine.register_forward_pre_hook(lambda module, args: calls.append("engine")),
               inner.register_forward_pre_hook(lambda module, args: calls.append("module"))]
    unshared = _run(response_outputs, engine, batch)
    assert calls == ["engine", "module"]
    calls.clear()
    out = _run(response_outputs, engine, batch, share_prompt=True, unwrapped=inner)
    assert calls == ["engine", "module", "module"]  # one engine forward per micro-batch, as unshared
    assert max(_max_gaps(unshared, out).values()) < ATOL
    calls.clear()
    _run(response_outputs, engine, batch, share_prompt=True)  # the engine's config is no model's: unshared
    for handle in handles:
        handle.remove()
    assert calls == ["engine", "module"]


# -- a real model ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_shared_prefix_matches_logp_and_the_lora_gradient() -> None:
    """SmolLM2-135M-Instruct (30 layers, grouped-query attention, BPE, chat template), fp32, LoRA r8 on q,k,v,o.

    Thirty fp32 layers round more than the tiny model: the LoRA gradient is compared by its relative norm. (In fp64
    the two forwards' log-probs agree to ~5e-14; the gradients to ~4e-7, the float32 casts inside RMSNorm.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.errors import InputError
    from align.models.named import prepare_named_model

    start = time.perf_counter()
    root = Path(os.environ.get("ALIGN_CACHE") or Path.home() / ".cache" / "align")
    try:
        path = prepare_named_model("smollm2-135m-instruct", root, log=lambda _: None)
    except InputError as err:
        pytest.skip(str(err))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = _lora(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), r=8, scale=0.02)
    questions = ["Ava has 3 books and buys 4 more. How many books does she have?", "What is 7 + 5?"]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in questions]
    prompt_rows = [r for r in encode(tokenizer, texts) for _ in range(2)]  # two groups of 2
    answers = ["She has 7 books.", "7 books", "12", "7 + 5 = 12."]
    completion_rows = [[*r, tokenizer.eos_token_id] for r in encode(tokenizer, answers)]
    prompt_ids, prompt_mask = pad_left(prompt_rows, tokenizer.pad_token_id)
    completion_ids, mask = pad_right(completion_rows, tokenizer.pad_token_id)
    batch = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids, mask=mask)
    assert prompt_mask.sum(-1).unique().numel() == 2 and mask.sum(-1).unique().numel() > 1
    unshared = _run(response_outputs, model, batch)
    shapes, handle = _prompt_rows_seen(model)
    shared = _run(shared_prefix_outputs, model, batch)
    handle.remove()
    assert shapes == [(2, prompt_ids.shape[1]), (4, completion_ids.shape[1] - 1)]
    assert float((unshared["logp"] - shared["logp"]).abs().max()) < 1e-4
    a, b = (torch.cat([g.flatten() for g in out["grads"].values()]) for out in (unshared, shared))
    assert float((a - b).norm() / a.norm()) < 1e-4  # measured ~4e-5
    assert time.perf_counter() - start < 40
