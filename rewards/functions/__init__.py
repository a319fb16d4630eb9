"""Built-in rewards; importing this package registers them."""

from rewards.functions import code, length, matching, repetition, reward_model, tasks  # noqa: F401
