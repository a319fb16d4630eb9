"""The registry type: register, get, names, info; unknown and duplicate names fail with the known names."""

from __future__ import annotations

import pytest

from align.errors import DuplicateNameError, UnknownNameError
from align.registry import Registry


def test_register_get_names_and_info() -> None:
    reg: Registry[int] = Registry("widget")

    @reg.register("b_thing", colour="red")
    def b_thing() -> int:
        return 2

    reg.register("a_thing", 1)
    assert reg.names() == ("a_thing", "b_thing")
    assert reg.get("a_thing") == 1
    assert reg.get("b_thing") is b_thing
    assert reg.info("b_thing")["colour"] == "red"
    assert "a_thing" in reg and len(reg) == 2 and list(reg) == ["a_thing", "b_thing"]


def test_unknown_name_lists_known_names_and_a_suggestion() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("token_mean", 1)
    reg.register("seq_mean_token_mean", 2)
    with pytest.raises(UnknownNameError) as err:
        reg.get("token_maen")
    assert str(err.value) == ("unknown widget 'token_maen'; did you mean 'token_mean'? known: seq_mean_token_mean, "
                              "token_mean")
    with pytest.raises(KeyError):  # still a KeyError for callers that catch that
        reg.get("nope")


def test_duplicate_and_invalid_names_fail() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("x", 1)
    with pytest.raises(DuplicateNameError, match="'x' is already registered"):
        reg.register("x", 2)
    with pytest.raises(ValueError, match="non-empty strings"):
        reg.register("", 3)
    assert reg.get("x") == 1


def test_empty_registry_says_so() -> None:
    with pytest.raises(UnknownNameError, match=r"\(none registered\)"):
        Registry[int]("widget").get("x")
