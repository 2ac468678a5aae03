"""The ledger backlog: chat records responses through a ledger outage, and they become ratable after it."""

from __future__ import annotations

import pytest

from serve.ledger import LedgerUnavailable, SqliteLedger
from serve.ledger_backlog import BackloggedLedger
from testkit.waiting import wait_for


class Outage:
    """A real SQLite ledger that can be switched off, as a Redis restart would."""

    def __init__(self, ledger: SqliteLedger) -> None:
        self.ledger, self.down = ledger, False

    def __getattr__(self, name):
        method = getattr(self.ledger, name)
        if name == "close":
            return method

        def call(*args, **kwargs):
            if self.down:
                raise LedgerUnavailable("switched off")
            return method(*args, **kwargs)

        return call


@pytest.fixture
def outage(tmp_path):
    return Outage(SqliteLedger(tmp_path / "ledger.sqlite3"))


def test_responses_recorded_during_an_outage_become_ratable_after_it(outage):
    ledger = BackloggedLedger(outage, retry_s=0.05)
    ledger.record_response("r0", "ann", None)
    outage.down = True
    for i in range(1, 4):
        ledger.record_response(f"r{i}", "ann", "v0001")  # no error: chat goes on
    assert ledger.backlog == 3
    with pytest.raises(LedgerUnavailable):  # "try again", never "unknown response"
        ledger.set_vote("r2", "ann", "desirable", "e1")
    outage.down = False
    wait_for(lambda: ledger.backlog == 0, what="the backlog written", timeout_s=5, interval_s=0.02)
    versions: list[str | None] = []
    for i in range(4):
        entry = ledger.lookup(f"r{i}")
        assert entry is not None
        versions.append(entry.version)
    assert versions == [None, "v0001", "v0001", "v0001"]
    assert ledger.set_vote("r2", "ann", "desirable", "e1") is None
    ledger.close()


def test_the_backlog_is_bounded_and_drops_the_oldest(outage):
    outage.down = True
    ledger = BackloggedLedger(outage, max_entries=2, retry_s=0.05)
    for i in range(3):
        ledger.record_response(f"r{i}", "ann")
    assert ledger.backlog == 2 and ledger.dropped == 1
    outage.down = False
    wait_for(lambda: ledger.backlog == 0, what="the backlog written", timeout_s=5, interval_s=0.02)
    assert ledger.lookup("r0") is None and ledger.lookup("r2") is not None
    ledger.close()


def test_forgetting_a_user_reaches_the_backlog_too(outage):
    ledger = BackloggedLedger(outage, retry_s=0.05)
    ledger.record_response("r0", "ann")
    ledger.record_response("b0", "bob")
    outage.down = True
    ledger.record_response("r1", "ann")
    with pytest.raises(LedgerUnavailable):  # the ledger itself is still away: the caller retries
        ledger.forget_user("ann")
    outage.down = False
    assert ledger.forget_user("ann") == 1 + 1  # one waiting in the backlog, one in the ledger
    wait_for(lambda: ledger.backlog == 0, what="the backlog written", timeout_s=5, interval_s=0.02)
    assert ledger.lookup("r0") is None and ledger.lookup("r1") is None and ledger.lookup("b0") is not None
    ledger.close()
