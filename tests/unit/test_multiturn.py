"""Multi-turn rollouts (align/envs): token in and token out, observations masked, per-turn credit, the calculator."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest
import torch

from align.advantages import dense_group
from align.config import RecipeError, recipe_from_dict
from align.envs import ENVIRONMENTS, MultiTurnEngine, StepResult
from align.envs.build import EnvironmentRewards, check_environment, with_environment
from align.envs.calculator import Calculator, CalculatorError, evaluate, format_number
from align.envs.rollout import ChatObservations, TextObservations, stop_length
from align.losses import StepNormalizer
from align.models.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm
from align.trainers.batches import PolicyBatch
from align.trainers.learner import PolicyLearner
from align.trainers.optim import build_optimizer, build_scheduler
from align.trainers.protocols import RewardResult, Rollout, SamplingParams, TokenSamples
from align.trainers.rollout_hf import HFRolloutEngine
from align.trainers.sequences import encode, response_forward
from align.trainers.strategy import TorchStrategy
from rewards.credit import CREDIT, CreditInputs

TOKENIZER = build_char_tokenizer()
EOS, BOS = TOKENIZER.eos_token_id, TOKENIZER.bos_token_id
SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=3)


def ids(text: str) -> list[int]:
    return encode(TOKENIZER, [text])[0]


class ScriptedEngine:
    """A token engine that answers from a script and records every input it gets."""

    weight_version = 7

    def __init__(self, script: Callable[[int, int], list[int]]) -> None:
        self.script = script  # (call number from 1, row of the call) -> sampled ids
        self.calls: list[list[list[int]]] = []
        self.params: list[SamplingParams] = []
        self.seeds: list[int | None] = []

    def generate_tokens(self, prompt_ids: Sequence[Sequence[int]], *, params: SamplingParams,
                        seed: int | None = None) -> TokenSamples:
        self.calls.append([list(r) for r in prompt_ids])
        self.params.append(params)
        self.seeds.append(seed)
        out = [self.script(len(self.calls), j)[: params.max_new_tokens] for j in range(len(prompt_ids))]
        return TokenSamples(token_ids=out, logp=[[-0.25 * (k + 1) for k in range(len(o))] for o in out],
                            finished=[bool(o) and o[-1] == EOS for o in out], weight_version=self.weight_version)


class Echo:
    """Answers ``<rN>`` after turn N with reward 0.5 N; done after the row's ``done_at`` turns."""

    def reset(self, prompt: str, columns: Mapping[str, Any]) -> None:
        self.turn, self.done_at, self.actions = 0, int(columns["done_at"]), []

    def step(self, action: str) -> StepResult:
        self.turn += 1
        self.actions.append(action)
        return StepResult(observation=f"<r{self.turn}>", reward=0.5 * self.turn, done=self.turn == self.done_at)


def _engine(script: Callable[[int, int], list[int]], **kw: Any) -> tuple[MultiTurnEngine, ScriptedEngine]:
    inner = ScriptedEngine(script)
    return MultiTurnEngine(inner, Echo, TOKENIZER, **kw), inner


# turn ids that do not survive decode + encode: <bos> mid-turn is dropped by decode(skip_special_tokens=True)
TURNS = {1: [*ids("a"), BOS, *ids("b")], 2: ids("cd"), 3: [*ids("e"), EOS]}


def test_each_turn_continues_the_exact_ids_and_the_completion_is_their_concatenation() -> None:
    def sampled(turn: int, row: int) -> list[int]:
        return TURNS[turn] + ids("x") * row  # rows differ in length (live rows are always rows 0..n-1 here)

    engine, inner = _engine(sampled)
    rollout = engine.generate(["1+1=", "22+3="], {"done_at": [3, 2]}, samples_per_prompt=2,
                              params=SamplingParams(max_new_tokens=8), seed=5)
    assert inner.calls[0] == [ids("1+1=")] * 2 + [ids("22+3=")] * 2
    assert [len(c) for c in inner.calls] == [4, 4, 2]  # rows 2 and 3 were done after 2 turns
    for turn in (2, 3):  # turn k's input = turn k-1's input + its sampled ids + the observation's ids, exactly
        for row, given in enumerate(inner.calls[turn - 1]):
            assert given == inner.calls[turn - 2][row] + sampled(turn - 1, row) + ids(f"<r{turn - 1}>")
    for row in range(4):
        turns = 3 if row < 2 else 2
        pieces: list[tuple[list[int], float]] = []
        for k in range(1, turns + 1):
            pieces.append((sampled(k, row), 1.0))
            if k < turns:
                pieces.append((ids(f"<r{k}>"), 0.0))
        expected = [t for p, _ in pieces for t in p]
        length = len(expected)
        assert rollout.completion_ids[row, :length].tolist() == expected
        assert BOS in rollout.completion_ids[row].tolist()  # kept as sampled, never re-tokenised away
        assert rollout.mask[row, :length].tolist() == [m for p, m in pieces for _ in p]
        assert (rollout.mask[row, length:] == 0).all() and (rollout.completion_ids[row, length:] == 0).all()
        assert (rollout.logp[row][rollout.mask[row] == 0] == 0).all()
        assert rollout.columns["num_turns"][row] == turns and rollout.columns["tool_calls"][row] == turns - 1
        assert rollout.columns["turn_rewards"][row] == [0.5 * k for k in range(1, turns + 1)]
        ends = rollout.columns["turn_ends"][row]
        assert len(ends) == turns and all(rollout.mask[row, e] == 1 for e in ends) and ends[-1] == length - 1
        assert ends[0] == len(sampled(1, row)) - 1
        assert rollout.columns["observation_tokens"][row] == sum(len(ids(f"<r{k}>")) for k in range(1, turns))
    assert rollout.completions[0] == "e" and rollout.columns["transcript"][0] == "ab<r1>cd<r2>e"
    assert rollout.group_ids.tolist() == [0, 0, 1, 1] and rollout.weight_version == 7
    assert rollout.columns["done_at"] == [3, 3, 2, 2] and rollout.prompts[2] == "22+3="
    # the sampled log-probs sit on the model's tokens, in order
    assert rollout.logp[0, : len(TURNS[1])].tolist() == [-0.25, -0.5, -0.75]


def test_completion_transcript_mode_and_the_episode_ends_at_max_turns() -> None:
    engine, inner = _engine(lambda call, row: ids("q"), max_turns=2, completion="transcript")
    rollout = engine.generate(["p"], {"done_at": [5]}, samples_per_prompt=1, params=SamplingParams(max_new_tokens=4))
    assert len(inner.calls) == 2 and rollout.completions == ["q<r1>q"]  # no observation after the last turn
    assert rollout.columns["out_of_turns"] == [True] and rollout.columns["turn_rewards"] == [[0.5, 1.0]]
    assert rollout.columns["tool_calls"] == [2]


def test_max_total_tokens_cuts_the_last_turn_and_drops_an_observation_without_room() -> None:
    engine, inner = _engine(lambda call, row: ids("abcdef"), max_total_tokens=10)
    rollout = engine.generate(["p"], {"done_at": [9]}, samples_per_prompt=1, params=SamplingParams(max_new_tokens=6))
    # turn 1: 6 tokens + "<r1>" (4) = 10 = the cap: no room for another model token, so the observation is dropped
    assert rollout.mask.sum() == 6 and rollout.columns["truncated"] == [True] and len(inner.calls) == 1
    engine, inner = _engine(lambda call, row: ids("abcdef"), max_total_tokens=13)
    rollout = engine.generate(["p"], {"done_at": [9]}, samples_per_prompt=1, params=SamplingParams(max_new_tokens=6))
    # turn 2 may write 13 - 10 = 3 tokens: asked for at most 3, cut there, and the environment never sees it
    assert inner.params[1].max_new_tokens == 3 and rollout.completion_ids.shape[1] == 13
    assert rollout.columns["turn_rewards"] == [[0.5, 0.0]] and rollout.columns["truncated"] == [True]


def test_an_episode_never_outgrows_the_engines_context() -> None:
    """vLLM refuses an input longer than max_model_len: the episode is cut at the context, prompt included, and
    marked truncated, as at max_total_tokens, instead of failing mid-run at the next turn."""
    engine, inner = _engine(lambda call, row: ids("abcdef"), max_context=len(ids("p")) + 13)
    rollout = engine.generate(["p"], {"done_at": [9]}, samples_per_prompt=1, params=SamplingParams(max_new_tokens=6))
    assert inner.params[1].max_new_tokens == 3 and rollout.completion_ids.shape[1] == 13
    limit = len(ids("p")) + 13
    assert all(len(call[0]) + p.max_new_tokens <= limit for call, p in zip(inner.calls, inner.params, strict=True))
    assert rollout.columns["truncated"] == [True]


def test_a_stop_string_ends_the_turn_where_it_completes() -> None:
    class Tool(Echo):
        stop = ("</c>",)

    inner = ScriptedEngine(lambda call, row: ids("1</c>99") if call == 1 else [*ids("7"), EOS])
    engine = MultiTurnEngine(inner, Tool, TOKENIZER)
    rollout = engine.generate(["p"], {"done_at": [2]}, samples_per_prompt=1, params=SamplingParams(max_new_tokens=9))
    assert inner.calls[1][0] == ids("p1</c><r1>")  # "99" sampled after the stop string is dropped
    assert rollout.columns["transcript"] == ["1</c><r1>7"] and rollout.logp[0, :5].tolist() == [
        -0.25, -0.5, -0.75, -1.0, -1.25]
    assert stop_length(ids("ab</c>x"), TOKENIZER, ("</c>",)) == 6
    assert stop_length(ids("ab</c>"), TOKENIZER, ("</c>",)) == 6
    assert stop_length(ids("ab"), TOKENIZER, ("</c>",)) is None


def test_turn_seeds_are_derived_from_the_rollout_seed() -> None:
    seeds = []
    for seed in (3, 3, 4):
        engine, inner = _engine(lambda call, row: ids("q"), max_turns=3)
        engine.generate(["p"], {"done_at": [9]}, samples_per_prompt=1, params=SamplingParams(max_new_tokens=2),
                        seed=seed)
        seeds.append(inner.seeds)
    assert seeds[0] == seeds[1] and seeds[0] != seeds[2] and len(set(seeds[0])) == 3


def test_environment_failures_are_one_line_errors() -> None:
    class Broken(Echo):
        def step(self, action: str) -> StepResult:
            raise KeyError("no such tool")

    engine = MultiTurnEngine(ScriptedEngine(lambda c, r: ids("a")), Broken, TOKENIZER, name="broken")
    with pytest.raises(RuntimeError, match=r"environment 'broken' failed in step \(turn 1 of row 0\): KeyError"):
        engine.generate(["p"], {"done_at": [2]}, samples_per_prompt=1, params=SamplingParams(max_new_tokens=2))

    class NaNReward(Echo):
        def step(self, action: str) -> StepResult:
            return StepResult("", reward=math.nan)

    engine = MultiTurnEngine(ScriptedEngine(lambda c, r: ids("a")), NaNReward, TOKENIZER)
    with pytest.raises(RuntimeError, match="must be finite"):
        engine.generate(["p"], {"done_at": [2]}, samples_per_prompt=1, params=SamplingParams(max_new_tokens=2))


# ---------------------------------------------------------------------------------------------------------------
# The real engine and the learner: log-probs on the sampled tokens, nothing learnt from observation tokens
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_rollout() -> tuple[Any, Rollout]:
    model = build_tiny_causal_lm(len(TOKENIZER), SMALL)
    engine = MultiTurnEngine(HFRolloutEngine(model, TOKENIZER), Echo, TOKENIZER, max_turns=3)
    rollout = engine.generate(["12+3=", "7+45="], {"done_at": [3, 2]}, samples_per_prompt=3,
                              params=SamplingParams(max_new_tokens=4, temperature=0.8), seed=11)
    return model, rollout


def test_rollout_log_probs_are_the_learners_on_the_whole_transcript(hf_rollout) -> None:
    """Token in, token out with the transformers engine: the learner's forward over prompt + every turn and
    observation gives the log-probs the engine sampled with, at every model token."""
    model, rollout = hf_rollout
    assert (rollout.mask == 0).any(-1).all()  # every row has observation tokens (holes) ...
    assert (rollout.mask[:, 0] == 1).all()  # ... after its first turn
    with torch.no_grad():
        logp, _, _ = response_forward(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                      rollout.mask, temperature=0.8)
    gap = ((logp - rollout.logp).abs() * rollout.mask).max()
    assert gap < 1e-4, gap


def _learner(model: Any) -> PolicyLearner:
    from align.algorithms import PRESETS

    spec = replace(PRESETS.get("grpo"), kl=None, kl_coef=0.0)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999))
    scheduler = build_scheduler(optimizer, kind="constant", warmup_steps=0, total_steps=10)
    return PolicyLearner(spec, TorchStrategy(model, optimizer, scheduler, max_grad_norm=1.0), micro_batch_size=4,
                         temperature=0.8)


def test_observation_tokens_contribute_nothing_to_the_update(hf_rollout) -> None:
    """Advantages at observation positions (garbage, even NaN-free huge values) leave the step unchanged: the loss
    never sees those positions, and the learner's gradient equals the one with zeros there."""
    _, rollout = hf_rollout
    adv = torch.linspace(-1, 1, rollout.mask.numel()).view_as(rollout.mask) * rollout.mask
    junk = adv + 1e3 * (1 - rollout.mask)
    params = []
    for advantages in (adv, junk):
        model = build_tiny_causal_lm(len(TOKENIZER), SMALL)
        learner = _learner(model)
        learner.step(PolicyBatch(prompt_ids=rollout.prompt_ids, prompt_mask=rollout.prompt_mask,
                                 completion_ids=rollout.completion_ids, mask=rollout.mask, logp=rollout.logp,
                                 advantages=advantages, group_ids=rollout.group_ids,
                                 normalizer=StepNormalizer.from_masks(rollout.mask)))
        params.append([p.detach().clone() for p in model.parameters()])
    changed = any(not torch.equal(a, b) for a, b in zip(params[0], [p.detach() for p in
                                                                    build_tiny_causal_lm(len(TOKENIZER), SMALL)
                                                                    .parameters()], strict=True))
    assert changed  # the step did move the weights
    for a, b in zip(*params, strict=True):
        assert torch.equal(a, b)


def test_the_loss_gradient_at_observation_logits_is_zero(hf_rollout) -> None:
    from align.algorithms import PRESETS
    from align.losses import PolicyInputs
    from align.objective import policy_step_loss

    model, rollout = hf_rollout
    _, _, logits = response_forward(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                    rollout.mask, temperature=0.8, return_logits=True)
    logits.retain_grad()
    logp = torch.log_softmax(logits, -1).gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    adv = torch.ones_like(rollout.mask) + 5.0 * (1 - rollout.mask)
    inputs = PolicyInputs(logp=logp, old_logp=rollout.logp, advantages=adv, mask=rollout.mask)
    spec = replace(PRESETS.get("grpo"), kl=None, kl_coef=0.0)
    loss, _ = policy_step_loss(spec, inputs, StepNormalizer.from_masks(rollout.mask))
    loss.backward()
    grad = logits.grad.abs().sum(-1)  # (B, T)
    assert (grad[rollout.mask == 0] == 0).all() and (grad[rollout.mask == 1] > 0).all()


# ---------------------------------------------------------------------------------------------------------------
# Observations in a chat template
# ---------------------------------------------------------------------------------------------------------------
def test_text_observations_are_the_text_alone_and_chat_observations_follow_the_template() -> None:
    assert TextObservations(TOKENIZER)("<r>", True) == ids("<r>")
    # the tiny tokenizer's template: assistant turns end with <eos>, other messages are their content
    chat = ChatObservations(TOKENIZER, "tool")
    assert chat.text("<r>", True) == "<r>" and chat.text("<r>", False) == "<eos><r>"
    assert chat("<r>", False) == [EOS, *ids("<r>")]


def test_chat_observations_in_a_chatml_template() -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=TOKENIZER.backend_tokenizer, eos_token="<eos>",
                                        pad_token="<pad>")
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == "
                               "'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    chat = ChatObservations(tokenizer, "tool")
    assert chat.text("5", True) == "\n<tool>5\n<assistant>"  # after the model's EOS: the template's newline first
    assert chat.text("5", False) == "<eos>\n<tool>5\n<assistant>"  # a turn cut by a stop string gets its EOS here
    with pytest.raises(Exception, match="chat template"):
        ChatObservations(PreTrainedTokenizerFast(tokenizer_object=TOKENIZER.backend_tokenizer), "tool")


# ---------------------------------------------------------------------------------------------------------------
# The calculator
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("expression", "value"), [
    ("1+2*3", 7), ("(1+2)*3", 9), ("2**10", 1024), ("7/2", 3.5), ("-3 - -4", 1), ("2**-1", 0.5), (" 12*12 ", 144),
    ("1.5*4", 6.0), ("(-8)**2", 64), ("0**0", 1),
])
def test_calculator_evaluates_arithmetic(expression: str, value: float) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize("expression", [
    "__import__('os').system('echo hi')", "os.getcwd()", "x+1", "abs(-1)", "(1).__class__", "[1][0]", "'a'*3",
    "1 if 1 else 2", "lambda: 1", "1 < 2", "True+1", "1j*1j", "1 // 2", "5 % 3", "1 << 200", "", "1+", "2**0.5**x",
    "(-8)**0.5", "1/0", "0**-1", "9**9**9", "2**100000", "10**13", "1e308*10", "9" * 14, "(" * 300 + "1" + ")" * 300,
])
def test_calculator_refuses_everything_else_quickly(expression: str) -> None:
    start = time.perf_counter()
    with pytest.raises(CalculatorError):
        evaluate(expression)
    assert time.perf_counter() - start < 0.5


def test_calculator_numbers_are_printed_plainly() -> None:
    assert [format_number(v) for v in (12, 12.0, 0.5, 1 / 3, -4)] == ["12", "12", "0.5", "0.333333333333", "-4"]


def test_calculator_steps_and_rewards() -> None:
    env = Calculator(call_reward=0.05, error_reward=-0.2)
    env.reset("12*13=", {"answer": "156"})
    assert env.stop == ("</calc>",)
    assert env.step("<calc>12*13</calc>") == StepResult("<result>156</result>", 0.05, False)
    assert env.step("so <calc>12*</calc>") == StepResult("<error>not an arithmetic expression</error>", -0.2, False)
    assert env.step("<calc>open('x')</calc>").observation.startswith("<error>only numbers")
    assert env.step("156") == StepResult("", 0.0, True)  # no call: the answer, scored by the recipe's rewards
    assert env.step("<calc>12*13") == StepResult("", -0.2, True)  # a call never closed
    with pytest.raises(ValueError, match="result_template"):
        Calculator(result_template="no slot")


def test_calculator_episode_through_the_engine() -> None:
    script = {1: ids("<calc>3*4</calc>tail"), 2: [*ids("12"), EOS]}
    inner = ScriptedEngine(lambda call, row: script[call])
    engine = MultiTurnEngine(inner, Calculator, TOKENIZER)
    rollout = engine.generate(["3*4="], {}, samples_per_prompt=1, params=SamplingParams(max_new_tokens=30))
    assert rollout.columns["transcript"] == ["<calc>3*4</calc><result>12</result>12"]
    assert rollout.completions == ["12"] and rollout.columns["turn_rewards"] == [[0.0, 0.0]]
    assert inner.calls[1][0] == ids("3*4=<calc>3*4</calc><result>12</result>")


# ---------------------------------------------------------------------------------------------------------------
# Per-turn credit and the return
# ---------------------------------------------------------------------------------------------------------------
def _turn_inputs() -> CreditInputs:
    # row 0: turn 1 = positions 0-1, observation 2-3, turn 2 = 4-6; row 1: one turn, positions 0-2
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    return CreditInputs(rewards=torch.tensor([0.9, 0.0]), mask=mask, token_ids=torch.zeros(2, 8, dtype=torch.long),
                        group_ids=torch.tensor([0, 0]), turn_rewards=[[-0.1, 0.0], [0.0]], turn_ends=[[1, 6], [2]])


def test_turn_rewards_by_hand() -> None:
    """Row 0: return 0.9 = outcome 1 + turn rewards (-0.1, 0): -0.1 on turn 1's last token (1), the outcome 1.0 on
    the last token (6), plus turn 2's 0. Row 1: return 0 on its only turn's end."""
    out = CREDIT.get("turn_rewards")(_turn_inputs())
    expected = torch.zeros(2, 8)
    expected[0, 1], expected[0, 6] = -0.1, 1.0
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)
    assert out[0].sum().item() == pytest.approx(0.9)  # the row sums to its return
    half = CREDIT.get("turn_rewards")(_turn_inputs(), turn_weight=0.5, outcome_weight=2.0)
    assert half[0, 1].item() == pytest.approx(-0.05) and half[0, 6].item() == pytest.approx(2.0)


def test_turn_rewards_through_dense_group_by_hand() -> None:
    """gamma 1, no std scaling: returns G_t = sum of later token rewards; row 0: turn-1 tokens see -0.1 + 1.0 = 0.9,
    turn-2 tokens 1.0; row 1 sees 0; group mean of the returns (0.9, 0) is 0.45."""
    x = _turn_inputs()
    adv = dense_group(CREDIT.get("turn_rewards")(x), x.mask, x.group_ids, scale_by_std=False)
    expected = torch.tensor([[0.45, 0.45, 0, 0, 0.55, 0.55, 0.55, 0], [-0.45, -0.45, -0.45, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)


def test_turn_rewards_refuse_turn_ends_off_the_model_tokens() -> None:
    x = replace(_turn_inputs(), turn_ends=[[2, 6], [2]])  # position 2 of row 0 is an observation token
    with pytest.raises(ValueError, match="turn end 2 is not a trainable position"):
        CREDIT.get("turn_rewards")(x)
    with pytest.raises(ValueError, match="needs turn_rewards"):
        CREDIT.get("turn_rewards")(replace(_turn_inputs(), turn_rewards=None))


def test_the_sequence_reward_is_the_episodes_return_with_multiturn_metrics() -> None:
    def outcome(r: Rollout, step: int) -> RewardResult:
        return RewardResult(rewards=torch.tensor([1.0, 0.0], dtype=torch.float64), valid=torch.tensor([True, True]),
                            per_reward={"exact_match": torch.tensor([1.0, 0.0])}, metrics={"reward/x": 1.0})

    two = MultiTurnEngine(ScriptedEngine(lambda c, r: ids("q")), Echo, TOKENIZER, max_turns=3)
    rollout = two.generate(["p", "p"], {"done_at": [1, 3]}, samples_per_prompt=1,
                           params=SamplingParams(max_new_tokens=2))
    result = EnvironmentRewards(outcome)(rollout, 1)
    assert result.rewards.tolist() == [1.0 + 0.5, 0.0 + 0.5 + 1.0 + 1.5]
    assert result.per_reward["environment"].tolist() == [0.5, 3.0] and result.metrics["reward/x"] == 1.0
    m = result.metrics
    assert m["multiturn/turns_mean"] == 2.0 and m["multiturn/turns_max"] == 3.0
    assert m["multiturn/tool_calls_mean"] == 1.0 and m["reward/environment/mean"] == 1.75
    observed = len(ids("<r1>")) + len(ids("<r2>"))
    assert m["multiturn/observation_tokens_frac"] == pytest.approx(observed / (observed + 4))
    assert m["multiturn/truncated_frac"] == 0.0 and m["multiturn/out_of_turns_frac"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# The recipe key
# ---------------------------------------------------------------------------------------------------------------
def _recipe(**environment: Any) -> Any:
    return recipe_from_dict({"rewards": [{"name": "exact_match"}],
                             "rollout": {"environment": {"name": "calculator", **environment}}})


def test_the_recipe_key_is_checked_in_one_line() -> None:
    check_environment(_recipe(options={"error_reward": -0.5}))
    for bad, words in (({"name": "calculater"}, ["'rollout.environment.name'", "did you mean 'calculator'"]),
                       ({"options": {"eror_reward": 1}}, ["'rollout.environment.options.eror_reward'",
                                                         "error_reward"]),
                       ({"options": {"max_chars": "many"}}, ["'rollout.environment.options.max_chars'"]),
                       ({"options": {"max_abs": -1}}, ["'rollout.environment.options'", "max_abs"])):
        with pytest.raises(RecipeError) as err:
            check_environment(_recipe(**bad))
        assert all(w in str(err.value) for w in words) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(RecipeError, match=r"'rollout\.environment'.*long_horizon_temperature"):
        recipe_from_dict({"rewards": [{"name": "exact_match"}], "rollout": {
            "long_horizon_temperature": 0.5, "environment": {"name": "calculator"}}})
    with pytest.raises(RecipeError, match=r"'rollout\.environment\.max_turns'"):
        _recipe(max_turns=0)
    with pytest.raises(RecipeError, match=r"'rewards\.0\.name'.*'environment'"):
        check_environment(recipe_from_dict({"rewards": [{"name": "environment"}],
                                            "rollout": {"environment": {"name": "calculator"}}}))
    with pytest.raises(RecipeError, match=r"'rollout\.environment'.*preference"):
        check_environment(recipe_from_dict({"algorithm": {"preset": "dpo"},
                                            "rollout": {"environment": {"name": "calculator"}}}))


def test_with_environment_wraps_a_token_engine_and_refuses_one_without_generate_tokens() -> None:
    recipe = _recipe(max_turns=2, observation_format="text")
    engine, rewards = with_environment(recipe, ScriptedEngine(lambda c, r: ids("1")), lambda r, s: None, TOKENIZER)
    assert isinstance(engine, MultiTurnEngine) and isinstance(rewards, EnvironmentRewards)
    assert engine.max_turns == 2 and isinstance(engine.observations, TextObservations)

    class GenerateOnly:
        def generate(self, *args: Any, **kw: Any) -> None: ...

    with pytest.raises(RecipeError, match="generate_tokens"):
        with_environment(recipe, GenerateOnly(), lambda r, s: None, TOKENIZER)  # type: ignore[arg-type]
    plain = recipe_from_dict({"rewards": [{"name": "exact_match"}]})
    inner = ScriptedEngine(lambda c, r: [])
    assert with_environment(plain, inner, outcome_fn := (lambda r, s: None), TOKENIZER) == (inner, outcome_fn)


def test_plugins_register_environments_by_name() -> None:
    assert "calculator" in ENVIRONMENTS
    from align.envs import environment

    @environment("test_multiturn_echo")
    class Registered(Echo):
        pass

    assert ENVIRONMENTS.get("test_multiturn_echo") is Registered
    check_environment(_recipe(name="test_multiturn_echo"))


def test_every_token_engine_takes_the_call_the_multi_turn_engine_makes() -> None:
    """The Ray path by construction: on Ray the engine wrapped is the driver's RolloutService (one Ray call per
    turn to the rollout worker's engine); locally the transformers or vLLM engine. All take
    ``generate_tokens(prompt_ids, *, params, seed)`` and return TokenSamples (the Ray path itself runs in the
    combined Ray test)."""
    import inspect

    pytest.importorskip("ray")  # imported, not started
    from ray_jobs.rollout_service import RolloutService
    from ray_jobs.rollout_vllm import VLLMRolloutEngine

    for engine in (HFRolloutEngine, VLLMRolloutEngine, RolloutService):
        params = inspect.signature(engine.generate_tokens).parameters
        assert list(params)[:2] == ["self", "prompt_ids"], engine
        assert params["params"].kind is params["seed"].kind is inspect.Parameter.KEYWORD_ONLY, engine
        assert inspect.signature(engine.generate_tokens).return_annotation in ("TokenSamples", TokenSamples)


def test_a_calculator_template_with_another_field_is_refused_when_built() -> None:
    with pytest.raises(ValueError, match="must hold only the"):
        Calculator(result_template="<r>{}</r> {unit}")


def test_a_bare_stop_string_is_refused_not_split_into_characters() -> None:
    class BareStop(Echo):
        stop = "</calc>"

    engine = MultiTurnEngine(ScriptedEngine(lambda call, row: ids("ab")), BareStop, TOKENIZER)
    from align.errors import InputError

    with pytest.raises(InputError, match="stop must be a tuple of non-empty strings"):
        engine.generate(["p"], {"done_at": [2]}, samples_per_prompt=1, params=SamplingParams(max_new_tokens=4))
