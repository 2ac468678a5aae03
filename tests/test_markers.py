"""The `stochastic` mark (tests/conftest.py): collection fails unless it says how often and why."""

from __future__ import annotations

import pytest

from tests.conftest import pytest_collection_modifyitems


class Item:
    def __init__(self, *decorators: pytest.MarkDecorator) -> None:
        self.nodeid = "tests/test_x.py::test_x"
        self.marks = [d.mark for d in decorators]

    def iter_markers(self, name: str):
        return [m for m in self.marks if m.name == name]


def test_a_stochastic_mark_with_both_keywords_is_accepted():
    items = [Item(pytest.mark.stochastic(failure_rate="about 1 in 50", why="random users")), Item(pytest.mark.slow)]
    pytest_collection_modifyitems(None, items)


@pytest.mark.parametrize(
    "mark",
    [
        pytest.mark.stochastic,
        pytest.mark.stochastic(failure_rate="about 1 in 50"),
        pytest.mark.stochastic(why="random users"),
        pytest.mark.stochastic(failure_rate="", why="random users"),
        pytest.mark.stochastic("about 1 in 50", why="random users"),
        pytest.mark.stochastic(failure_rate="about 1 in 50", why="random users", seed=3),
    ],
)
def test_a_stochastic_mark_without_both_keywords_fails_collection(mark):
    with pytest.raises(pytest.UsageError, match="failure_rate and why"):
        pytest_collection_modifyitems(None, [Item(pytest.mark.slow), Item(mark)])
