"""Every registry fails the same way on a wrong name: known names and the closest one."""

from __future__ import annotations

import pytest

from medssl.core.registry import Registry, UnknownNameError, look_up


def test_registry_is_a_mapping_filled_by_decorator() -> None:
    optimisers: Registry[type] = Registry("optimizer")

    @optimisers.register("lars")
    class Lars:
        pass

    optimisers.add("sgd", object)
    assert optimisers["lars"] is Lars
    assert "sgd" in optimisers and "adam" not in optimisers
    assert optimisers.names() == ["lars", "sgd"] == sorted(optimisers)
    assert len(optimisers) == 2


def test_unknown_name_names_the_kind_the_known_names_and_a_close_match() -> None:
    optimisers = Registry("optimizer", {"lars": 1, "lamb": 2, "sgd": 3})
    with pytest.raises(UnknownNameError) as caught:
        optimisers["lasr"]
    message = str(caught.value)
    assert message == "unknown optimizer 'lasr'; did you mean 'lars'?; known: lamb, lars, sgd"
    # Callers that catch KeyError or ValueError keep working.
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, ValueError)


def test_no_close_match_lists_the_names_only() -> None:
    with pytest.raises(UnknownNameError, match=r"^unknown test 'anova'; known: paired, welch$"):
        look_up("test", "anova", ["welch", "paired"])


def test_look_up_returns_the_entry_or_the_name() -> None:
    assert look_up("policy", "hu", {"hu": 1, "window": 2}) == 1
    assert look_up("policy", "window", ("hu", "window")) == "window"
    with pytest.raises(UnknownNameError, match="unknown policy None"):
        look_up("policy", None, ("hu",))


def test_registering_a_name_twice_is_refused() -> None:
    kinds = Registry("kind", {"a": 1})
    with pytest.raises(ValueError, match="kind 'a' is registered twice"):
        kinds.add("a", 2)
