"""`kto-loop simulate`: the rules and raters, the users against a live server (pace, the served
timeline, the CLI's output and curve), and the curve's reading of canary decisions."""

from __future__ import annotations

import random

import pytest

from kto_loop.cli import main
from kto_loop.curve import Event, events, rolling
from kto_loop.simulate import PROMPTS, Raters, Rule, Simulation, Turn, feedback_body, next_prompt, parse_rule, simulate
from testkit.background_server import BackgroundServer
from tests.tiny import TINY_MODEL_ID

# ---- rules and raters (pure) -----------------------------------------------------------------


def test_rules_parse_and_judge():
    vowel = parse_rule("prefix:aeiou")
    assert vowel == Rule("prefix", tuple("aeiou")) and str(vowel) == "prefix:aeiou"
    assert vowel.likes("apple") and not vowel.likes("Apple") and not vowel.likes(" apple") and not vowel.likes("")
    words = parse_rule("prefix:Hi,Yes")
    assert words.likes("Yes please") and not words.likes("Y") and str(words) == "prefix:Hi,Yes"
    avoid = parse_rule("avoid:good,me")
    assert not avoid.likes("Good morning") and not avoid.likes("tell me.") and avoid.likes("goodness, meat")
    short = parse_rule("shorter-than:5")
    assert short.likes("four") and not short.likes("fives") and str(short) == "shorter-than:5"
    for bad in ("prefix", "prefix:", "longer-than:3", "shorter-than:x", "shorter-than:0"):
        with pytest.raises(ValueError):
            parse_rule(bad)


def test_raters_need_every_rule_and_flip_and_skip_as_asked():
    both = Raters((parse_rule("prefix:a"), parse_rule("shorter-than:4")))
    assert both.likes("abc") and not both.likes("abcd") and not both.likes("bc")
    rng = random.Random(0)
    noisy = Raters((parse_rule("prefix:a"),), flip=0.2)
    labels = [noisy.label(True, rng) for _ in range(4000)]
    assert 0.17 < labels.count(False) / 4000 < 0.23  # a fifth of the liked ones sent as disliked
    shy = Raters((parse_rule("prefix:a"),), rate_liked=0.25)
    liked = [shy.label(True, rng) for _ in range(4000)]
    assert 0.22 < sum(x is True for x in liked) / 4000 < 0.28 and set(liked) == {True, None}
    assert {shy.label(False, rng) for _ in range(200)} == {False}  # a disliked answer is always rated
    assert Raters((parse_rule("prefix:a"),), flip=1.0).label(True, rng) is False  # every label inverted


def test_implicit_users_regenerate_what_they_dislike_and_copy_what_they_like():
    assert feedback_body("r1", False, "implicit") == {"response_id": "r1", "source": "implicit", "signal": "regenerate"}
    assert feedback_body("r2", True, "implicit") == {"response_id": "r2", "source": "implicit", "signal": "copy"}
    assert feedback_body("r3", True, "thumbs") == {"response_id": "r3", "label": "up"}  # never both
    assert feedback_body("r4", False, "thumbs") == {"response_id": "r4", "label": "down"}
    rng = random.Random(0)
    implicit = Raters((parse_rule("prefix:a"),), feedback="implicit", copy_liked=0.4, rate_liked=0.0)
    liked = [implicit.label(True, rng) for _ in range(4000)]
    assert 0.37 < liked.count(True) / 4000 < 0.43 and set(liked) == {True, None}  # copy_liked, not rate_liked
    assert {implicit.label(False, rng) for _ in range(200)} == {False}  # a disliked answer: always regenerated
    assert "no thumbs" in str(implicit) and "40% of liked answers copied" in str(implicit)
    with pytest.raises(ValueError, match="feedback"):
        Raters(feedback="stars")


def test_a_regenerated_prompt_is_asked_again_then_the_order_goes_on():
    assert [next_prompt(2, turn, None) for turn in range(3)] == [PROMPTS[2], PROMPTS[3], PROMPTS[4]]
    assert next_prompt(2, 1, "say a word") == "say a word"  # whatever turn it is


# ---- the curve's events ----------------------------------------------------------------------


def _rated(at: float, index: int, version: str = "base") -> Turn:
    return Turn(index, at, "u", version, "a", True, True, rated_at=at)


def test_events_tell_promotions_rollbacks_advances_and_activations_apart():
    result = Simulation(turns=[_rated(float(t), i) for i, t in enumerate(range(1, 11))])
    result.serving = [
        (0.5, "base", None),
        (1.5, "base", "v1"),
        (2.5, "base", "v2"),
        (3.5, "v2", None),
        (4.5, "v2", "v3"),
        (5.5, "v2", None),
        (6.5, "v4", None),
        (7.5, "v4", "v5"),
        (8.5, "v5", "v6"),
    ]
    assert events(result) == [
        Event(1, "canary", "v1"),
        Event(2, "advance", "v2"),
        Event(3, "promote", "v2"),
        Event(4, "canary", "v3"),
        Event(5, "rollback", "v3"),
        Event(6, "active", "v4"),
        Event(7, "canary", "v5"),
        Event(8, "promote", "v5"),
        Event(8, "canary", "v6"),
    ]  # promoted and the next one started between polls


def test_rolling_counts_every_answer_and_ratings_on_x():
    turns = [
        Turn(i, float(i), "u", "v", "x", liked=i % 2 == 0, desirable=None if i % 3 == 2 else True) for i in range(6)
    ]
    xs, ys = rolling(Simulation(turns=turns), window=2)
    assert xs == [1, 2, 2, 3, 4, 4] and ys == [1.0, 0.5, 0.5, 0.5, 0.5, 0.5]


# ---- against a live server -------------------------------------------------------------------


@pytest.fixture
def server(tmp_path, tiny_model_dir):
    from serve.settings import ServeSettings

    settings = ServeSettings(data_dir=tmp_path, model=str(tiny_model_dir), model_id=TINY_MODEL_ID, registry_poll_s=0.05)
    with BackgroundServer(settings) as running:
        yield running


def test_users_rate_by_the_rules_at_their_pace(server):
    raters = Raters((parse_rule("shorter-than:4"),), rate_liked=0.5)
    result = simulate(server.url, ratings=12, users=3, raters=raters, max_tokens=2, think_time=0.3, seed=1)
    assert len(result.ratings) == 12 and not result.errors
    assert all(t.liked == (len(t.answer) < 4) for t in result.turns)
    assert all(t.desirable in (t.liked, None) for t in result.turns)  # no flips asked for
    assert all((t.feedback_id is None) == (t.desirable is None) for t in result.turns)
    assert [t.index for t in result.turns] == list(range(len(result.turns)))
    assert all(t.version == TINY_MODEL_ID and t.prompt for t in result.turns)
    for user in {t.user for t in result.turns}:  # each one thought 0.15-0.45 s between turns
        times = [t.at for t in result.turns if t.user == user]
        assert all(b - a >= 0.15 for a, b in zip(times, times[1:])), times
    assert result.serving and result.serving[0][1:] == (TINY_MODEL_ID, None)  # what was served, no canary


def test_implicit_users_send_signals_and_ask_again_after_regenerating(server):
    from ingest.events import FeedbackEvent, decode_event

    raters = Raters((parse_rule("shorter-than:12"),), feedback="implicit")
    result = simulate(server.url, ratings=16, users=2, raters=raters, max_tokens=3, seed=5)
    assert len(result.ratings) == 16 and not result.errors
    assert all(t.signal == {True: "copy", False: "regenerate", None: None}[t.desirable] for t in result.turns)
    assert {t.signal for t in result.ratings} == {"copy", "regenerate"}  # both seen (seeded)
    state = server.state
    consumer = state.bus.consumer("test-simulate-reader", [state.topics.feedback])
    try:
        events = [decode_event(r.value) for r in consumer.poll(timeout_s=0.5)]
    finally:
        consumer.close()
    assert all(isinstance(e, FeedbackEvent) and e.source == "implicit" for e in events)  # never a thumb
    assert all(t.feedback_id for t in result.ratings)
    sent = {str(t.feedback_id): (t.response_id, t.user, t.signal) for t in result.ratings}
    got = {e.event_id: (e.response_id, e.user, e.signal) for e in events if isinstance(e, FeedbackEvent)}
    assert {k: got.get(k) for k in sent} == sent  # each answer's own signal, by the user who got it
    for user in {t.user for t in result.turns}:  # the answer after a regenerate is to the same prompt
        mine = [t for t in result.turns if t.user == user]
        assert all(b.prompt == a.prompt for a, b in zip(mine, mine[1:]) if a.signal == "regenerate")
        assert all(b.prompt != a.prompt for a, b in zip(mine, mine[1:]) if a.signal == "copy")


def test_answers_only_rates_nothing(server):
    result = simulate(server.url, ratings=5, users=2, rate=False, max_tokens=2)
    assert len(result.turns) == 5 and result.ratings == []


def test_the_command_is_quiet_and_saves_its_curve(server, tmp_path, capsys, caplog):
    plot = tmp_path / "curve.png"
    code = main(
        [
            "simulate",
            "--port",
            str(server.port),
            "--ratings",
            "20",
            "--users",
            "2",
            "--think-time",
            "0",
            "--max-tokens",
            "2",
            "--rule",
            "prefix:a",
            "--rule",
            "shorter-than:30",
            "--flip",
            "0.1",
            "--seed",
            "3",
            "--plot",
            str(plot),
            "--log-level",
            "info",
        ]
    )
    assert code == 0 and plot.stat().st_size > 1000
    out = capsys.readouterr().out
    assert f"{TINY_MODEL_ID}" in out and "liked: first" in out and f"learning curve: {plot}" in out
    assert not [r for r in caplog.records if r.name.startswith(("httpx", "httpcore"))]  # no line per request
    assert main(["simulate", "--port", str(server.port), "--rule", "nonsense:1"]) == 2
