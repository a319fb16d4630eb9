"""Multi-turn rollouts, token in and token out: :class:`MultiTurnEngine` is a
:class:`~align.trainers.protocols.RolloutEngine` over any :class:`~align.trainers.protocols.TokenEngine` and an
environment (:mod:`align.envs.protocol`).

Per sampled row, turn 1 continues the prompt's ids (encoded as the single-turn engines encode them). Each turn's
sampled ids are appended exactly as sampled, with mask 1 and their log-probs; the environment's answer is formatted
(:class:`TextObservations` or :class:`ChatObservations`), tokenised once on its own and appended with mask 0 and
log-prob 0; the next turn continues from the whole id list. Nothing is ever decoded and encoded again, so the
learner scores exactly the tokens that were sampled, in the context they were sampled in. All live rows of a turn
go to the token engine in one call, seeded by a stream derived from the rollout's seed.

An episode ends when the environment says done, after ``max_turns`` model turns, or when the completion (model and
observation tokens) would pass ``max_total_tokens``: the last turn is cut to fit, and an observation that leaves no
room for another model token is not appended (both marked ``truncated``). A turn ends at EOS, at the first token
that completes one of the environment's ``stop`` strings (the tokens sampled after it are dropped: stopping at a
point decided by the prefix alone leaves the kept tokens' distribution as it was), or at ``max_new_tokens``.

The rollout: ``completion_ids`` hold every turn and observation; ``mask`` is 1 on model tokens only (holes where
observations are); ``completions`` is the final turn's text (``completion="final_turn"``, what the recipe's rewards
score as the answer) or the whole transcript (``"transcript"``); the columns of :mod:`align.envs.protocol` are added
to each row (``turn_rewards``, ``turn_ends``, ``transcript``, ...).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from align.envs.protocol import (
    NUM_TURNS,
    OBSERVATION_TOKENS,
    OUT_OF_TURNS,
    TOOL_CALLS,
    TRANSCRIPT,
    TRUNCATED,
    TURN_ENDS,
    TURN_REWARDS,
    Environment,
)
from align.errors import AlignError, InputError
from align.trainers.protocols import Rollout, SamplingParams, TokenEngine
from align.trainers.sequences import encode, pad_left, pad_right

CompletionText = Literal["final_turn", "transcript"]


class EnvironmentFailure(AlignError, RuntimeError):
    """An environment raised or returned something unusable; one line naming it, the row and the turn."""


class TextObservations:
    """The observation's text as is, tokenised alone (no special tokens): for base and character-level models."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, observation: str, after_eos: bool) -> list[int]:
        return encode(self.tokenizer, [observation])[0] if observation else []


class ChatObservations:
    """The observation as a chat message of ``role`` (e.g. ``tool`` or ``user``) rendered by the tokenizer's chat
    template, followed by the assistant prefix of the next turn, tokenised once.

    The text is what the template puts between the end of an assistant turn and the start of the next one: found
    by rendering a short conversation with and without the message. When the model's turn did not end with EOS (a
    stop string or the token budget ended it), the template's end-of-turn text (its EOS included) comes first, as
    observation tokens."""

    PLACEHOLDER = "\x00OBSERVATION\x00"
    CONTENT = "\x00ASSISTANT\x00"

    def __init__(self, tokenizer: Any, role: str = "tool") -> None:
        self.tokenizer, self.role = tokenizer, role
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("observation_format 'chat' needs a tokenizer with a chat template; use 'text'")
        turn = [{"role": "user", "content": "U"}, {"role": "assistant", "content": self.CONTENT}]
        try:
            before: str = tokenizer.apply_chat_template(turn, tokenize=False)
            after: str = tokenizer.apply_chat_template([*turn, {"role": role, "content": self.PLACEHOLDER}],
                                                       tokenize=False, add_generation_prompt=True)
        except Exception as err:  # a template that refuses the role (strict user/assistant alternation)
            raise InputError(f"the chat template cannot render an observation with role {role!r} "
                             f"({' '.join(str(err).split())[:120]}); set observation_role (e.g. user) or "
                             "observation_format: text") from None
        if not after.startswith(before) or self.PLACEHOLDER not in after[len(before) :]:
            raise InputError("the chat template renders earlier turns differently once a message follows them, so "
                             "an observation cannot be appended token by token; use observation_format: text")
        if self.CONTENT not in before:
            raise InputError("the chat template changes the assistant's text, so its end of turn cannot be found; "
                             "use observation_format: text")
        end_of_turn = before[before.rindex(self.CONTENT) + len(self.CONTENT) :]  # e.g. its EOS and a newline
        eos = tokenizer.eos_token or ""
        self.after_eos = end_of_turn[len(eos) :] if eos and end_of_turn.startswith(eos) else end_of_turn
        self.end_of_turn = end_of_turn
        self.head, self.tail = after[len(before) :].split(self.PLACEHOLDER)

    def text(self, observation: str, after_eos: bool) -> str:
        """The text between the model's turn and its next one (``after_eos``: the turn ended with EOS)."""
        lead = self.after_eos if after_eos else self.end_of_turn
        return lead + self.head + observation + self.tail

    def __call__(self, observation: str, after_eos: bool) -> list[int]:
        return encode(self.tokenizer, [self.text(observation, after_eos)])[0]


Observations = Callable[[str, bool], list[int]]  # (observation text, the turn ended with EOS) -> token ids


def stop_length(ids: Sequence[int], tokenizer: Any, stops: Sequence[str]) -> int | None:
    """The number of leading ids up to and including the first token whose text completes one of ``stops``; None
    when none does."""
    if not stops or not ids:
        return None
    full = tokenizer.decode(list(ids), skip_special_tokens=True)
    if not any(s in full for s in stops):
        return None
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(list(ids[:n]), skip_special_tokens=True)
        if any(s in text for s in stops):
            return n
    return None  # only the whole decodes to it (a tokenizer whose prefixes decode differently): no cut


def _stop_strings(env: Environment, name: str) -> tuple[str, ...]:
    """The environment's ``stop`` strings; a bare string would split into characters, so it is refused."""
    stop = getattr(env, "stop", ())
    if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
        raise InputError(f"environment {name!r}: stop must be a tuple of non-empty strings (e.g. stop = "
                         f"(\"</calc>\",)), got {stop!r}")
    return tuple(stop)


@dataclass
class _Row:
    """One episode as it grows."""

    prompt_ids: list[int]
    env: Environment
    ids: list[int] = field(default_factory=list)
    mask: list[float] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)
    turn_ends: list[int] = field(default_factory=list)
    final_turn: list[int] = field(default_factory=list)
    tool_calls: int = 0
    observation_tokens: int = 0
    done: bool = False
    truncated: bool = False
    out_of_turns: bool = False

    def add(self, ids: Sequence[int], logp: Sequence[float], trainable: bool) -> None:
        self.ids += list(ids)
        self.mask += [1.0 if trainable else 0.0] * len(ids)
        self.logp += list(logp) if trainable else [0.0] * len(ids)


class MultiTurnEngine:
    """:class:`~align.trainers.protocols.RolloutEngine` that runs each sampled row as an episode of ``make_env()``
    over ``engine``'s :meth:`generate_tokens` (module docstring: what ends a turn and an episode, what the rollout
    holds). ``max_total_tokens``: the most completion tokens (model and observation) of a row; None: no cap beyond
    ``max_turns`` turns. ``max_observation_tokens``: an observation's text is cut to this many tokens.
    ``max_context``: the engine's context length; a row never outgrows it (prompt included)."""

    def __init__(self, engine: TokenEngine, make_env: Callable[[], Environment], tokenizer: Any, *,
                 max_turns: int = 4, max_total_tokens: int | None = None, max_observation_tokens: int | None = 256,
                 observations: Observations | None = None, completion: CompletionText = "final_turn",
                 name: str = "environment", max_context: int | None = None) -> None:
        if max_turns < 1 or (max_total_tokens is not None and max_total_tokens < 1):
            raise InputError(f"max_turns and max_total_tokens must be >= 1, got {max_turns} and {max_total_tokens}")
        if completion not in ("final_turn", "transcript"):
            raise InputError(f"completion must be 'final_turn' or 'transcript', got {completion!r}")
        self.engine, self.make_env, self.tokenizer = engine, make_env, tokenizer
        self.max_turns, self.max_total_tokens = max_turns, max_total_tokens
        self.max_observation_tokens = max_observation_tokens
        self.observations: Observations = observations or TextObservations(tokenizer)
        self.completion, self.name = completion, name
        self.max_context = max_context  # prompt + episode tokens the engine can hold (vLLM's max_model_len)
        self.pad_id = tokenizer.pad_token_id

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], columns: Mapping[str, Sequence[Any]], *, samples_per_prompt: int,
                 params: SamplingParams, seed: int | None = None) -> Rollout:
        repeated = [p for p in prompts for _ in range(samples_per_prompt)]
        cols = {k: [v[i] for i in range(len(prompts)) for _ in range(samples_per_prompt)] for k, v in columns.items()}
        prompt_ids = encode(self.tokenizer, repeated)
        rows = [self._start(ids, prompt, {k: v[i] for k, v in cols.items()}, i)
                for i, (ids, prompt) in enumerate(zip(prompt_ids, repeated, strict=True))]
        stops = _stop_strings(rows[0].env, self.name) if rows else ()
        seed = int(torch.randint(0, 2**31 - 1, (1,))) if seed is None else seed
        seeds = torch.Generator().manual_seed(seed)  # one seed per turn, the same for the same rollout seed
        versions: list[int] = []
        generate = 0.0
        for turn in range(1, self.max_turns + 1):
            live = [i for i, row in enumerate(rows) if not row.done]
            if not live:
                break
            room = min(params.max_new_tokens, max(self._room(rows[i]) for i in live))
            turn_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=seeds))
            start = time.perf_counter()
            out = self.engine.generate_tokens([rows[i].prompt_ids + rows[i].ids for i in live],
                                              params=replace(params, max_new_tokens=room), seed=turn_seed)
            generate += out.timings.get("generate", time.perf_counter() - start)
            versions.append(out.weight_version)
            for j, i in enumerate(live):
                self._turn(rows[i], i, turn, out.token_ids[j], out.logp[j], out.finished[j], stops,
                           params.max_new_tokens)
        return self._rollout(repeated, cols, prompt_ids, rows, samples_per_prompt, versions, generate)

    def _start(self, prompt_ids: list[int], prompt: str, columns: dict[str, Any], index: int) -> _Row:
        env = self.make_env()
        try:
            env.reset(prompt, columns)
        except Exception as err:
            raise self._failed("reset", index, 0, err) from err
        return _Row(prompt_ids=list(prompt_ids), env=env)

    def _room(self, row: _Row) -> int:
        """Tokens the row may still add: under max_total_tokens, and within the engine's context (an episode cut
        there is marked truncated, as at max_total_tokens, instead of failing in the engine at the next turn)."""
        room = 2**31 if self.max_total_tokens is None else self.max_total_tokens - len(row.ids)
        if self.max_context is not None:
            room = min(room, self.max_context - len(row.prompt_ids) - len(row.ids))
        return max(room, 0)

    def _turn(self, row: _Row, index: int, turn: int, ids: Sequence[int], logp: Sequence[float], eos: bool,
              stops: tuple[str, ...], max_new_tokens: int) -> None:
        """Append one sampled turn to ``row``, step its environment, append the observation (or end the episode)."""
        keep = stop_length(ids, self.tokenizer, stops)
        if keep is not None:  # the turn ends with its stop string; what was sampled after it is dropped
            ids, logp, eos = ids[:keep], logp[:keep], False
        room = self._room(row)
        # cut by max_total_tokens: longer than the room left, or stopped at a room smaller than max_new_tokens
        # before ending by itself (EOS or a stop string)
        if len(ids) > room or (len(ids) == room < max_new_tokens and not eos and keep is None):
            ids, logp, eos, row.truncated = ids[:room], logp[:room], False, True
        if not ids:  # nothing sampled (an engine with no budget left): the episode ends without a turn
            row.done = True
            return
        row.add(ids, logp, trainable=True)
        row.turn_ends.append(len(row.ids) - 1)
        row.final_turn = list(ids)
        if row.truncated:  # cut mid-turn by max_total_tokens: the environment never sees half an action
            row.turn_rewards.append(0.0)
            row.done = True
            return
        action = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        try:
            result = row.env.step(action)
            reward = float(result.reward)
        except Exception as err:
            raise self._failed("step", index, turn, err) from err
        if reward != reward or reward in (float("inf"), float("-inf")):
            raise EnvironmentFailure(f"environment {self.name!r} returned reward {reward} at turn {turn} of row "
                                    f"{index}; rewards must be finite numbers")
        row.turn_rewards.append(reward)
        if result.done:
            row.done = True
            return
        row.tool_calls += 1
        if turn == self.max_turns:
            row.done = row.out_of_turns = True
            return
        observation = self.observations(self._cut(str(result.observation)), eos)
        if len(observation) >= self._room(row):  # no room left for the model's next turn after it
            row.done = row.truncated = True
            return
        row.add(observation, [], trainable=False)
        row.observation_tokens += len(observation)

    def _cut(self, observation: str) -> str:
        limit = self.max_observation_tokens
        if limit is None or not observation:
            return observation
        ids = encode(self.tokenizer, [observation])[0]
        return observation if len(ids) <= limit else self.tokenizer.decode(ids[:limit], skip_special_tokens=True)

    def _failed(self, what: str, index: int, turn: int, err: Exception) -> EnvironmentFailure:
        where = f"row {index}" if what == "reset" else f"turn {turn} of row {index}"
        message = " ".join(str(err).split())[:200]
        return EnvironmentFailure(f"environment {self.name!r} failed in {what} ({where}): {type(err).__name__}: "
                                 f"{message}")

    def _rollout(self, repeated: list[str], cols: dict[str, list[Any]], prompt_lists: list[list[int]],
                 rows: list[_Row], samples_per_prompt: int, versions: list[int], generate: float) -> Rollout:
        prompt_ids, prompt_mask = pad_left(prompt_lists, self.pad_id)
        completion_ids, _ = pad_right([r.ids for r in rows], self.pad_id)
        width = completion_ids.shape[1]
        mask = torch.tensor([r.mask + [0.0] * (width - len(r.mask)) for r in rows], dtype=torch.float32)
        logp = torch.tensor([r.logp + [0.0] * (width - len(r.logp)) for r in rows], dtype=torch.float32)
        transcripts = self.tokenizer.batch_decode([r.ids for r in rows], skip_special_tokens=True)
        finals = self.tokenizer.batch_decode([r.final_turn for r in rows], skip_special_tokens=True)
        cols = {**cols, TURN_REWARDS: [r.turn_rewards for r in rows], TURN_ENDS: [r.turn_ends for r in rows],
                NUM_TURNS: [len(r.turn_ends) for r in rows], TOOL_CALLS: [r.tool_calls for r in rows],
                OBSERVATION_TOKENS: [r.observation_tokens for r in rows], TRUNCATED: [r.truncated for r in rows],
                OUT_OF_TURNS: [r.out_of_turns for r in rows], TRANSCRIPT: transcripts}
        # every turn of a synchronous rollout samples one version; the oldest is the honest tag if one ever differs
        version = min(versions) if versions else int(getattr(self.engine, "weight_version", 0))
        return Rollout(prompts=repeated, completions=finals if self.completion == "final_turn" else transcripts,
                       prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids, mask=mask,
                       logp=logp * mask, group_ids=torch.arange(len(rows) // samples_per_prompt)
                       .repeat_interleave(samples_per_prompt), weight_version=version, columns=cols,
                       timings={"generate": generate})
