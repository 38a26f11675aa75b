"""PG_DOORMAN_TEST_SEEDS: how many seeds the random parity tests run."""

from __future__ import annotations

import pytest

from helpers.seeds import ENV, seeds


def test_the_default_range_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert seeds(40) == range(40)


def test_a_factor_multiplies_the_range_and_keeps_the_default_seeds_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV, "25")
    assert seeds(40) == range(1000)
    assert list(seeds(40))[:40] == list(range(40))


@pytest.mark.parametrize(("value", "message"), [("ten", "whole number"), ("0", "at least 1")])
def test_a_bad_factor_is_named(monkeypatch: pytest.MonkeyPatch, value: str, message: str) -> None:
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=message):
        seeds(40)
