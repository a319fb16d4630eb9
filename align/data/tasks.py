"""Synthetic verifiable tasks with held-out splits, generated offline and deterministically from a seed.

Each task returns a ``datasets.DatasetDict`` with ``train`` and ``test`` splits and columns ``prompt`` and
``answer``; test prompts never occur in train. Prompts are bare strings for a character-level model
(``"12+35="`` -> ``"47"``); a chat model would wrap them in its template.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from typing import Any

from align.errors import InputError
from align.registry import Registry

TaskBuilder = Callable[..., Any]
TASKS: Registry[TaskBuilder] = Registry("task")


def _split(pairs: list[tuple[str, str]], train_size: int, eval_size: int, seed: int) -> Any:
    from datasets import Dataset, DatasetDict

    unique = list(dict.fromkeys(pairs))  # a prompt appears once, so the splits are disjoint
    random.Random(seed).shuffle(unique)
    if len(unique) <= eval_size:
        raise InputError(f"the task has only {len(unique)} distinct problems, not more than data.eval_size "
                         f"({eval_size}); lower data.eval_size or make the task larger (data.task_options)")
    test, train = unique[:eval_size], unique[eval_size : eval_size + train_size]

    def to_dataset(rows: list[tuple[str, str]]) -> Any:
        return Dataset.from_dict({"prompt": [p for p, _ in rows], "answer": [a for _, a in rows]})

    return DatasetDict(train=to_dataset(train), test=to_dataset(test))


def _whole_number(task: str, option: str, value: Any, low: int, high: int, why: str) -> int:
    """``value`` as an int in [low, high], or a one-line InputError naming the option, its range and ``why``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"task {task!r}: option {option!r} must be a whole number from {low} to {high} ({why}); "
                         f"got {value!r}")
    return value


def _sampled(make: Callable[[random.Random], tuple[str, str]], count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    seen: dict[str, str] = {}
    attempts = 0
    while len(seen) < count and attempts < 50 * count:
        prompt, answer = make(rng)
        seen.setdefault(prompt, answer)
        attempts += 1
    return list(seen.items())


@TASKS.register("arithmetic", reward="exact_match")
def arithmetic(*, train_size: int, eval_size: int, seed: int, digits: int = 2, ops: str = "+") -> Any:
    """``a<op>b=`` -> the result, with operands of up to ``digits`` digits and ops from ``+-*``."""
    _whole_number("arithmetic", "digits", digits, 1, 9, "beyond 9 the answers outgrow any sensible max_new_tokens")
    if not isinstance(ops, str) or not ops or set(ops) - set("+-*"):
        raise InputError(f"task 'arithmetic': option 'ops' must be a string of operators from '+-*' (e.g. '+-'); "
                         f"got {ops!r}")
    top = 10**digits
    results = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

    def every() -> Iterator[tuple[str, str]]:
        for op in ops:
            for a, b in itertools.product(range(top), repeat=2):
                yield f"{a}{op}{b}=", str(results[op](a, b))

    total = len(ops) * top * top
    if total <= 4 * (train_size + eval_size):
        pairs = list(every())
    else:
        pairs = _sampled(lambda rng: (lambda op, a, b: (f"{a}{op}{b}=", str(results[op](a, b))))(
            rng.choice(ops), rng.randrange(top), rng.randrange(top)), train_size + eval_size, seed)
    return _split(pairs, train_size, eval_size, seed)


@TASKS.register("sorting", reward="exact_match")
def sorting(*, train_size: int, eval_size: int, seed: int, length: int = 4) -> Any:
    """``sort:5291=`` -> ``1259``: the digits in ascending order."""
    _whole_number("sorting", "length", length, 2, 32, "a list of 2 to 32 digits")

    def make(rng: random.Random) -> tuple[str, str]:
        digits = [rng.randrange(10) for _ in range(length)]
        return f"sort:{''.join(map(str, digits))}=", "".join(map(str, sorted(digits)))

    return _split(_sampled(make, train_size + eval_size, seed), train_size, eval_size, seed)


@TASKS.register("countdown", reward="countdown")
def countdown(*, train_size: int, eval_size: int, seed: int, numbers: int = 3, max_number: int = 9) -> Any:
    """``3,5,7->22=`` -> an expression over the given numbers (each at most once, + - *) that equals the target;
    the ``answer`` column holds one such expression (for supervised warm starts); the ``countdown`` reward accepts
    any correct one."""
    _whole_number("countdown", "numbers", numbers, 2, 8, "expressions over more numbers outgrow the prompts")
    _whole_number("countdown", "max_number", max_number, 2, 1000, "targets stay printable in a few tokens")

    def make(rng: random.Random) -> tuple[str, str]:
        values = [rng.randint(1, max_number) for _ in range(numbers)]
        expression = str(values[0])
        for value in values[1:]:
            expression += rng.choice("+-*") + str(value)
        target = eval(expression, {"__builtins__": {}})
        return f"{','.join(map(str, values))}->{target}=", expression

    return _split(_sampled(make, train_size + eval_size, seed), train_size, eval_size, seed)


_NAMES = ["Ava", "Ben", "Chloe", "Dan", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jack", "Kim", "Leo", "Maya",
          "Noah", "Olive", "Paul", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will", "Yara", "Zoe"]
_ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells", "stamps", "cookies"]
_GAIN = ["buys {n} more {item}", "finds {n} more {item}", "is given {n} {item}", "wins {n} {item}"]
_LOSS = ["gives {n} {item} to a friend", "loses {n} {item}", "sells {n} {item}", "uses {n} {item}"]


@TASKS.register("word_problems", reward="math_equivalence")
def word_problems(*, train_size: int, eval_size: int, seed: int, steps: int = 2, max_number: int = 30) -> Any:
    """Arithmetic word problems in English for a chat model: a starting count, then ``steps`` gains or losses, then
    the question (``"Ava has 12 apples. Then Ava buys 7 more apples, then gives 5 apples to a friend. How many apples
    does Ava have now?"`` -> ``"14"``). Counts never go negative; every number is at most ``max_number``. The
    default verifier is ``math_equivalence`` (a recipe picks how the answer is extracted)."""
    _whole_number("word_problems", "steps", steps, 1, 10, "longer stories outgrow the prompts")
    _whole_number("word_problems", "max_number", max_number, 2, 10_000, "counts stay a few tokens long")

    def make(rng: random.Random) -> tuple[str, str]:
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        start = count = rng.randint(2, max_number)
        events = []
        for _ in range(steps):
            n = rng.randint(1, max_number)
            if n <= count and rng.random() < 0.5:
                count -= n
                events.append(rng.choice(_LOSS).format(n=n, item=item))
            else:
                count += n
                events.append(rng.choice(_GAIN).format(n=n, item=item))
        story = ", then ".join(events)
        return f"{name} has {start} {item}. Then {name} {story}. How many {item} does {name} have now?", str(count)

    return _split(_sampled(make, train_size + eval_size, seed), train_size, eval_size, seed)


def build_task(name: str, *, train_size: int, eval_size: int, seed: int, **options: Any) -> Any:
    """The task's DatasetDict; unknown task options fail in one line with the valid ones."""
    builder = TASKS.get(name)
    import inspect

    valid = [p for p in inspect.signature(builder).parameters if p not in ("train_size", "eval_size", "seed")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise InputError(f"task {name!r} has no option {unknown[0]!r}; valid options: {', '.join(valid)}")
    return builder(train_size=train_size, eval_size=eval_size, seed=seed, **options)
