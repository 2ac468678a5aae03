"""testkit.waiting.wait_for: the value it returns, what a failure says, and what it does not catch."""

from __future__ import annotations

import itertools
import time

import pytest

from testkit.waiting import wait_for


class Pending:
    """Falsy, with a long repr (as a status object that is not done yet might be)."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "Pending(" + "x" * 2000 + ")"


def test_returns_the_first_truthy_value():
    calls = itertools.count()
    assert wait_for(lambda: [n] if (n := next(calls)) >= 3 else [], what="three calls", interval_s=0) == [3]


def test_fails_after_the_timeout_naming_what_and_the_last_value():
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"^the answer: not within 0.2 s; last seen: \[\]$"):
        wait_for(lambda: [], what="the answer", timeout_s=0.2, interval_s=0.01)
    assert 0.2 <= time.monotonic() - started < 2


@pytest.mark.parametrize("last", [None, False])
def test_a_last_value_of_none_or_false_is_not_shown(last):
    with pytest.raises(AssertionError, match=r"^the flag: not within 0 s$"):
        wait_for(lambda: last, what="the flag", timeout_s=0)


def test_a_long_last_value_is_cut():
    with pytest.raises(AssertionError) as failed:
        wait_for(Pending, what="the status", timeout_s=0)
    assert str(failed.value).startswith("the status: not within 0 s; last seen: Pending(xxx")
    assert str(failed.value).endswith("… (2009 characters)") and len(str(failed.value)) < 600


def test_an_exception_from_the_condition_fails_at_once():
    def died() -> bool:
        raise AssertionError("the child exited")

    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"^the child exited$"):
        wait_for(died, what="the child ready", timeout_s=30)
    assert time.monotonic() - started < 1
