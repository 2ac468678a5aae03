"""End to end: the learner publishes a worse version; its canary rolls it back on its own.

`kto-loop up` (server and learner as processes, the embedded default, no admin token, so no
operator can act) on the tiny character-level model of loop_processes.py. Simulated users first
rate by an inverted rule (a burst of bad ratings: they like answers starting with a vowel),
until the learner has published a version trained on them, which starts a canary for half of
the users. Then the loop is restarted (the canary, the ratings and the learner's state are kept
on disk) with a learner that no longer trains, and honest users come back (they dislike a vowel
first): the canary compares its version with the active one (the base model) on their ratings.

Why the learner stops training for the honest phase: with the lineage canary the learner goes on
training from the candidate on the honest labels, and at this test's pace the lineage often
recovers and is (rightly) promoted before the bad version alone could be judged. That case is
the canary's unit tests' and the learning benchmark's (its poisoned row); this test is about the
rollback, and about a canary surviving a restart of the loop.

The learner's update is stochastic: about one run in seven the burst trains a version that is not
clearly worse (see NOT_WORSE); the scenario is then set up again, at most ATTEMPTS times (a
worse version the canary promoted fails at once). A clearly worse one must be rolled back.

Asserted: that canary is rolled back by the canary controller, with its evidence in the
history, resting on at most BOUND_RATINGS counted ratings and within MAX_HONEST_RATINGS of the
honest phase; no operator action (every history entry is the learner's or its canary
controller's); its candidate is rejected and no version of the canary ever became active; and no
user whom the hash put outside the canary ever got an answer from any of its versions.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from kto_loop.simulate import Simulation, simulate
from registry import HistoryEntry, in_canary, open_registry
from testkit.ports import free_port
from testkit.processes import log_tail, start, stop, wait_ready
from testkit.waiting import wait_for
from tests.learner.loop_processes import ALPHABET, LEARNER_ENV, MODEL_ID, VOWELS, build_char_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.stochastic(
        failure_rate="about 1 in 100 at most (from simulation, not counted over real runs)",
        why="the burst's version is worse by a random amount: about 1 run in 7 it is not clearly worse and the "
        "scenario is set up again, at most 4 times (all 4: about 1 in 2,400); a clearly worse one (a drop of "
        "0.15) is rolled back within BOUND_RATINGS in about 99% of simulated runs",
    ),
]

INVERTED = VOWELS  # the bad burst likes what honest users dislike
HONEST = tuple(c for c in ALPHABET if c not in VOWELS)  # honest users dislike a vowel first (and empty answers)
SHARE = 0.5
USERS = 12  # a share of 0.5 puts 6 of sim-0 … sim-11 inside for v0001 and for v0002
BOUND_RATINGS = 2700
"""Most ratings (both sides, as the controller counted them) the rollback may rest on. The
version this run's learner publishes is worse for honest users by a random amount: about
0.75 → 0.22–0.60 desirable, differences of −0.14 to −0.54 over 19 runs of this set-up (most
−0.2 to −0.4; the bad update's strength hardly changes the spread: 256 labels or 160 steps gave
the same). The test at α 0.05 with the default settings, share 0.5, tells a drop of 0.15
(0.75 → 0.60) within 2,163 counted ratings in 99% of simulated runs, and one of 0.13 within
2,650 (median 1,200); one of 0.20 has a median of about 475 (simulated as in
tests/learner/test_canary.py). A bound of 1,200 failed one CI run in about twenty, on a −0.14
version that needed 1,320."""
MAX_HONEST_RATINGS = 3200
"""The honest phase stops here whatever happened (the controller's counts lag the ratings sent
by up to one learner update)."""
NOT_WORSE = 0.15
"""The scenario needs a candidate at least this much worse for honest users (their desirable rate,
over the honest phase) than the base model: BOUND_RATINGS holds for such a drop. The burst gives
one in most runs (19 of 22: −0.21 to −0.54), not in all (−0.14, −0.11, +0.01 seen)."""
ATTEMPTS = 4
PHASE_TIMEOUT_S = 400
"""A safety net only: at about 13 ratings a second on two busy cores, the rating caps bind first."""


def watch(until, stop_event: threading.Event, timeout_s: float) -> threading.Thread:
    """Set `stop_event` once `until()` is true (or after timeout_s), polling on a thread."""

    def run() -> None:
        try:
            wait_for(
                lambda: stop_event.is_set() or until(), what="the phase's end", timeout_s=timeout_s, interval_s=0.2
            )
        except AssertionError:
            pass  # timeout_s passed: that ends the phase too
        stop_event.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def phase(url: str, prefixes: tuple[str, ...], ratings: int, until, timeout_s: float) -> Simulation:
    """Users rating by `prefixes` until `until()` holds, `ratings` were made, or timeout_s passed."""
    done = threading.Event()
    watcher = watch(until, done, timeout_s)
    result = simulate(url, ratings=ratings, users=USERS, prefixes=prefixes, max_tokens=4, stop=done)
    done.set()
    watcher.join()
    return result


@dataclass
class Scenario:
    """One run: the bad burst, the canary of the version it trained, the honest phase."""

    candidate: str
    """The version the burst trained, the canary's first candidate."""
    bad: Simulation
    honest: Simulation
    history: list[HistoryEntry]
    versions: list
    log_tail: str

    def honest_drop(self) -> float:
        """How much worse the canary's versions did than the base model with honest users."""
        lineage = set(canary_steps(self.history, self.candidate)[0])
        ours = [bool(t.desirable) for t in self.honest.ratings if t.version in lineage]  # rated: never None
        base = [bool(t.desirable) for t in self.honest.ratings if t.version == MODEL_ID]
        if not ours or not base:
            return float("nan")  # compares as "not clearly worse"
        return sum(ours) / len(ours) - sum(base) / len(base)


def run_scenario(tmp_path: Path, model: Path) -> Scenario:
    data_dir = tmp_path / "data"
    data_dir.mkdir(parents=True)
    port = free_port()
    env = {
        "KTO_MODEL": str(model),
        "KTO_MODEL_ID": MODEL_ID,
        "KTO_DATA_DIR": str(data_dir),
        "KTO_PORT": str(port),
        **LEARNER_ENV,
        "KTO_CANARY_SHARE": str(SHARE),
        # one strong update on the burst, so that the version it makes is clearly worse
        "KTO_MIN_NEW_LABELS": "128",
        "KTO_STEPS_PER_UPDATE": "96",
        "KTO_LEARNING_RATE": "2e-2",
    }
    # the learner no longer trains: it only runs the canary controller
    judging = {**env, "KTO_MIN_NEW_LABELS": "1000000000", "KTO_MAX_WAIT_S": "1000000000"}
    log = data_dir / "up.log"
    url = f"http://127.0.0.1:{port}"
    process = start("up", env, log, log_level="info")
    try:
        wait_ready(process, url, log)
    except BaseException:
        stop(process)
        raise
    registry = open_registry(f"sqlite:///{data_dir / 'registry' / 'registry.sqlite3'}")
    try:
        # ---- the burst of bad ratings, until the learner publishes a version and canaries it ----
        try:
            bad = phase(url, INVERTED, 2000, lambda: registry.canary() is not None, timeout_s=PHASE_TIMEOUT_S)
        finally:
            stop(process)
        canary = registry.canary()
        assert canary is not None, f"no canary started after {len(bad.ratings)} bad ratings:\n{log_tail(log)}"
        candidate = canary.cohort  # its first candidate: the learner may have advanced it already
        assert (canary.actor, canary.baseline, canary.share) == ("learner", None, SHARE)

        # ---- the loop restarted, honest users again, until the canary is decided ----
        def decided() -> bool:
            running = registry.canary()
            return running is None or running.cohort != candidate

        process = start("up", judging, log, log_level="info")
        try:
            wait_ready(process, url, log)
            honest = phase(url, HONEST, MAX_HONEST_RATINGS, decided, timeout_s=PHASE_TIMEOUT_S)
        finally:
            stop(process)
        history = registry.history()
        versions = registry.list_versions()
    finally:
        registry.close()
    return Scenario(candidate, bad, honest, history, versions, log_tail(log))


def canary_steps(history: list[HistoryEntry], candidate: str) -> tuple[list[str | None], HistoryEntry | None]:
    """The versions of the canary that started with `candidate` (its lineage, in order) and the
    entry that ended it (None: still running). Every step is the learner's, but the end."""
    start = next(i for i, e in enumerate(history) if e.action == "canary_start" and e.version == candidate)
    lineage: list[str | None] = [candidate]
    ending: HistoryEntry | None = None
    for e in history[start + 1 :]:
        if e.action == "canary_advance":
            assert e.actor == "learner"
            lineage.append(e.version)
        elif e.action in ("canary_rollback", "canary_promote"):
            ending = e
            break
    return lineage, ending


def test_a_worse_version_is_rolled_back_by_its_canary(tmp_path: Path):
    model = build_char_model(tmp_path / "model")
    for attempt in range(1, ATTEMPTS + 1):
        run = run_scenario(tmp_path / f"attempt-{attempt}", model)
        bad, honest, history, versions, candidate = run.bad, run.honest, run.history, run.versions, run.candidate
        phases = (
            f"attempt {attempt}: bad phase: {len(bad.ratings)} ratings, (n, desirable rate) by version "
            f"{bad.rate_by_version()}; honest phase: {len(honest.ratings)} ratings, {honest.rate_by_version()}"
        )
        print(phases)
        drop = run.honest_drop()
        if drop <= -NOT_WORSE:
            break
        _, ending = canary_steps(history, candidate)
        promoted = ending is not None and ending.action == "canary_promote"
        assert not (promoted and drop < -0.05), f"{candidate}'s canary was promoted, {drop:+.2f} worse for honest users"
        # The learner's update is stochastic: now and then the burst trains a version that is not
        # clearly worse. What the canary did with it says nothing about the bound below (it was
        # not promoted if it was worse): the scenario is set up again.
        print(f"attempt {attempt}: {candidate} was not clearly worse ({drop:+.2f}); trying again")
    else:
        pytest.fail(f"in {ATTEMPTS} attempts the bad burst never trained a clearly worse version")

    # ---- rolled back by the controller, with its evidence, within the bound, by nobody else ----
    lineage, rollback = canary_steps(history, candidate)
    assert rollback is not None and (rollback.action, rollback.actor) == ("canary_rollback", "canary-controller"), (
        phases,
        [e.to_json() for e in history],
        run.log_tail,
    )
    evidence = rollback.evidence
    assert evidence is not None  # a canary's decision always carries its evidence
    print("lineage:", lineage, "evidence:", evidence)
    counted = evidence["candidate"]["n"] + evidence["baseline"]["n"]
    assert rollback.version == lineage[-1] and evidence["versions"] == lineage
    assert evidence["suffix_upper"] < 0 and evidence["alpha"] == 0.05 and evidence["worse_from"] >= 1
    assert counted <= BOUND_RATINGS
    assert {e.actor for e in history} <= {"learner", "canary-controller"}  # no operator action
    assert not any(e.action in ("activate", "canary_promote") and e.version in lineage for e in history)
    assert next(v for v in versions if v.version == lineage[-1]).status == "rejected"

    # ---- users outside the canary never saw it; users inside did ----
    ratings = bad.ratings + honest.ratings
    inside = {f"sim-{i}" for i in range(USERS) if in_canary(f"sim-{i}", candidate, SHARE)}
    assert inside and len(inside) < USERS, f"a share of {SHARE} of {USERS} users put {len(inside)} inside"
    saw = {r.user for r in ratings if r.version in lineage}
    assert saw <= inside, f"users outside the canary got a version of it: {saw - inside}"
    assert saw, f"nobody got {candidate}"
