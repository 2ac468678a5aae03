"""`kto-loop simulate`: simulated people who chat through the HTTP API and rate by rules.

This is the rule-based labeling KTO is made for: a binary verdict per answer, no pairs. A rule
says what a user likes (`prefix:aeiou`, `avoid:WORD`, `shorter-than:N`; with several, an answer
must pass all of them). Raters can be imperfect the way people are: `flip` inverts a share of
their labels (noisy raters), `rate_liked` is the chance that a liked answer gets a thumb at all
(people complain more readily than they praise: 0.25 turns a 0.3 rule into about 1:9 labels).

Or users never press a thumb (`feedback="implicit"`): an answer they dislike they regenerate (the
`regenerate` signal, then the same prompt again as their next turn, as a person does), one they
like they copy (the `copy` signal) with chance `copy_liked`. The server turns each signal into a
label (ingest.signals), so a turn's `desirable` is still the label sent and `signal` says how.

Pace: each user waits `think_time` x U(0.5, 1.5) seconds after rating before the next turn, the
way a person reads and types; 0 sends turns back to back. Every answer is kept (`Turn`), rated
or not, with the version that produced it and the rule's verdict, so a caller can measure what
users actually saw; a poller records what the server serves (active version and canary).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

logger = logging.getLogger(__name__)

PROMPTS = ["hello", "tell me something", "what is new", "say a word", "how are you", "one more"]


# ---- rules ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One thing a simulated user likes or dislikes about an answer."""

    kind: str
    """`prefix` (starts with one of `values`), `avoid` (contains none of `values` as a word),
    `shorter-than` (fewer than `limit` characters)."""
    values: tuple[str, ...] = ()
    limit: int = 0

    def likes(self, answer: str) -> bool:
        if self.kind == "prefix":
            return answer.startswith(self.values)
        if self.kind == "avoid":
            return not any(re.search(rf"\b{re.escape(w)}\b", answer, re.IGNORECASE) for w in self.values)
        return len(answer) < self.limit

    def __str__(self) -> str:
        if self.kind == "shorter-than":
            return f"shorter-than:{self.limit}"
        joined = "".join(self.values) if all(len(v) == 1 for v in self.values) else ",".join(self.values)
        return f"{self.kind}:{joined}"


def parse_rule(text: str) -> Rule:
    """`prefix:aeiou` (any of these characters first; `prefix:Hello,Good` for strings),
    `avoid:WORD[,WORD]` (none of these words, any case), `shorter-than:N` (characters)."""
    kind, _, arg = text.partition(":")
    if not arg:
        raise ValueError(f"a rule is KIND:ARGUMENT (prefix:aeiou, avoid:WORD, shorter-than:N), got {text!r}")
    if kind == "prefix":
        return Rule("prefix", tuple(p for p in arg.split(",") if p) if "," in arg else tuple(arg))
    if kind == "avoid":
        return Rule("avoid", tuple(w.strip() for w in arg.split(",") if w.strip()))
    if kind == "shorter-than":
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"shorter-than takes a positive number of characters, got {arg!r}")
        return Rule("shorter-than", limit=int(arg))
    raise ValueError(f"unknown rule kind {kind!r}: prefix, avoid or shorter-than")


@dataclass(frozen=True)
class Raters:
    """How simulated users turn answers into labels."""

    rules: tuple[Rule, ...] = (Rule("prefix", tuple("aeiou")),)
    flip: float = 0.0
    """Share of labels sent inverted (noisy raters)."""
    rate_liked: float = 1.0
    """Chance that a liked answer is rated at all (a disliked one always is); thumbs only."""
    feedback: str = "thumbs"
    """`thumbs` (a thumb up or down) or `implicit` (no thumb ever: regenerate or copy)."""
    copy_liked: float = 1.0
    """implicit: chance that a liked answer is copied (a disliked one is always regenerated).
    1.0, like `rate_liked`, so that by default the two kinds of feedback send the same labels on
    the same answers and differ only in how (the weights of signals, the re-asked prompts)."""

    def __post_init__(self) -> None:
        if self.feedback not in FEEDBACK:
            raise ValueError(f"feedback is one of {', '.join(FEEDBACK)}, got {self.feedback!r}")

    def likes(self, answer: str) -> bool:
        return all(rule.likes(answer) for rule in self.rules)

    def label(self, liked: bool, rng: random.Random) -> bool | None:
        """The label sent for an answer the rules like (or not): None when it is not rated. A
        flipped implicit label is a curious regenerate, or a copy to quote what is wrong."""
        sent = self.copy_liked if self.feedback == "implicit" else self.rate_liked
        if liked and rng.random() >= sent:
            return None
        return (not liked) if rng.random() < self.flip else liked

    def __str__(self) -> str:
        shy = self.copy_liked if self.feedback == "implicit" else self.rate_liked
        extra = (f", {self.flip:.0%} flipped" if self.flip else "") + (
            f", {shy:.0%} of liked answers {'copied' if self.feedback == 'implicit' else 'rated'}" if shy < 1 else ""
        )
        how = "; no thumbs: regenerate what they dislike, copy what they like" if self.feedback == "implicit" else ""
        return " and ".join(map(str, self.rules)) + extra + how


FEEDBACK = ("thumbs", "implicit")


def feedback_body(response_id: str, label: bool, feedback: str) -> dict[str, str]:
    """What a user POSTs to /v1/feedback to send `label`: a thumb, or the implicit signal that
    means it (copy: desirable; regenerate: undesirable)."""
    if feedback == "implicit":
        return {"response_id": response_id, "source": "implicit", "signal": "copy" if label else "regenerate"}
    return {"response_id": response_id, "label": "up" if label else "down"}


def next_prompt(number: int, turn: int, regenerate: str | None) -> str:
    """User `number`'s message on `turn`: the prompt they just regenerated, asked again, else the
    next one in their order."""
    return regenerate if regenerate is not None else PROMPTS[(number + turn) % len(PROMPTS)]


# ---- what happened -------------------------------------------------------------------------------


@dataclass
class Turn:
    """One answer a simulated user got, and what they did with it."""

    index: int
    """Order of arrival among all answers."""
    at: float
    """Unix time the answer arrived."""
    user: str
    version: str
    """The `model` that answered: an adapter version or the base model's id."""
    answer: str
    liked: bool
    """The rules' verdict: what the user really thinks."""
    desirable: bool | None
    """The label sent (None: not rated); differs from `liked` when the rater flipped it."""
    response_id: str = ""
    feedback_id: str | None = None
    rated_at: float | None = None
    prompt: str = ""
    signal: str | None = None
    """The implicit signal that sent `desirable` (`regenerate`, `copy`); None for a thumb or none."""


@dataclass
class Simulation:
    turns: list[Turn] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rate_limited: int = 0
    """Requests the server refused with 429; the user waited Retry-After and went on."""
    serving: list[tuple[float, str, str | None]] = field(default_factory=list)
    """(unix time, active version, canary candidate or None), whenever it changed."""

    @property
    def ratings(self) -> list[Turn]:
        """The rated turns, in arrival order."""
        return [t for t in self.turns if t.desirable is not None]

    def rate_by_version(self) -> dict[str, tuple[int, float]]:
        """For each version: (ratings, share of them desirable)."""
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in self.ratings:
            counts[r.version][0] += 1
            if r.desirable:
                counts[r.version][1] += 1
        return {v: (n, d / n) for v, (n, d) in counts.items()}

    def window(self, start: int, stop: int) -> tuple[int, int]:
        """(desirable, total) among ratings[start:stop] in arrival order."""
        part = self.ratings[start:stop]
        return sum(1 for r in part if r.desirable), len(part)


def two_proportion_p(d1: int, n1: int, d2: int, n2: int) -> float:
    """One-sided p-value that the second proportion exceeds the first (pooled z-test)."""
    p = (d1 + d2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2)) if 0 < p < 1 else 0.0
    if se == 0:
        return 1.0 if d2 / n2 <= d1 / n1 else 0.0
    z = (d2 / n2 - d1 / n1) / se
    return 0.5 * math.erfc(z / math.sqrt(2))


# ---- the users -----------------------------------------------------------------------------------


def simulate(
    url: str | Sequence[str],
    *,
    ratings: int,
    users: int = 8,
    raters: Raters | None = None,
    prefixes: tuple[str, ...] | None = None,
    max_tokens: int = 8,
    temperature: float = 1.0,
    think_time: float = 0.0,
    seed: int | None = None,
    rate: bool = True,
    report_every: int = 100,
    stop: threading.Event | None = None,
    on_turn: Callable[[Turn], None] | None = None,
) -> Simulation:
    """Chat (and rate) until `ratings` answers were rated (with `rate=False`: answered, none
    rated); returns every turn in arrival order. A signal of implicit raters counts as a rating.

    `prefixes` is shorthand for one prefix rule. With `seed`, each request carries a seed drawn
    from it, so a run's answers repeat given the same versions. With several server URLs
    (replicas of one deployment) each user takes turns over them and rates each answer on the next
    replica, not the one that answered, as a load balancer may."""
    raters = raters or (Raters((Rule("prefix", tuple(prefixes)),)) if prefixes else Raters())
    urls = [url] if isinstance(url, str) else list(url)
    result = Simulation()
    lock = threading.Lock()
    stop = stop or threading.Event()
    done = threading.Event()  # this call's own end (the caller's `stop` may outlive it)
    counted = [0]

    def user_loop(number: int) -> None:
        name = f"sim-{number}"
        rng = random.Random(f"{seed}/{name}") if seed is not None else random.Random()
        with contextlib.ExitStack() as stack:
            replicas = [
                stack.enter_context(httpx.Client(base_url=u, timeout=120, headers={"X-User-Id": name})) for u in urls
            ]
            turn, regenerate = 0, None
            while not (stop.is_set() or done.is_set()):
                turn += 1
                client, rater = replicas[(number + turn) % len(urls)], replicas[(number + turn + 1) % len(urls)]
                prompt = next_prompt(number, turn, regenerate)
                request = {
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens,
                    "temperature": temperature,
                }
                if seed is not None:
                    request["seed"] = rng.randrange(2**31)
                try:
                    reply = client.post("/v1/chat/completions", json=request)
                    if reply.status_code == 429:  # as a well-behaved client: wait as told, then go on
                        with lock:
                            result.rate_limited += 1
                        stop.wait(float(reply.headers.get("Retry-After", "1")))
                        continue
                    reply.raise_for_status()
                    body = reply.json()
                    arrived = time.time()
                    answer = body["choices"][0]["message"]["content"]
                    liked = raters.likes(answer)
                    label = raters.label(liked, rng) if rate else None
                    feedback_id, sent = None, None
                    if label is not None:
                        sent = feedback_body(body["id"], label, raters.feedback)
                        vote = rater.post("/v1/feedback", json=sent)
                        vote.raise_for_status()
                        feedback_id = vote.json()["id"]
                except httpx.HTTPError as exc:
                    with lock:
                        result.errors.append(repr(exc))
                    stop.wait(0.2)
                    continue
                with lock:
                    if counted[0] >= ratings:
                        done.set()
                        return
                    item = Turn(
                        len(result.turns),
                        arrived,
                        name,
                        body["model"],
                        answer,
                        liked,
                        label,
                        body["id"],
                        feedback_id,
                        time.time() if label is not None else None,
                        prompt,
                        sent.get("signal") if sent else None,
                    )
                    result.turns.append(item)
                    counted[0] += label is not None if rate else 1
                    if counted[0] % report_every == 0 and (label is not None or not rate):
                        _progress(result, counted[0], ratings)
                    if counted[0] >= ratings:
                        done.set()
                # a regenerated prompt is asked again next, after the same pause (they read the answer)
                regenerate = prompt if item.signal == "regenerate" else None
                if on_turn is not None:
                    on_turn(item)
                if think_time > 0:
                    stop.wait(think_time * rng.uniform(0.5, 1.5))

    poller = threading.Thread(target=_watch_serving, args=(urls[0], result, lock, done, stop), daemon=True)
    poller.start()
    threads = [threading.Thread(target=user_loop, args=(i,), daemon=True) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    poller.join(timeout=5)
    return result


def _watch_serving(
    url: str,
    result: Simulation,
    lock: threading.Lock,
    done: threading.Event,
    stop: threading.Event,
    every_s: float = 0.5,
) -> None:
    """Record what the server serves (GET /v1/models) whenever it changes, for the plot."""
    with httpx.Client(base_url=url, timeout=10) as client:
        while not (done.is_set() or stop.is_set()):
            with contextlib.suppress(httpx.HTTPError, KeyError, IndexError, ValueError):
                alias = client.get("/v1/models").json()["data"][0]
                now = (alias.get("active") or alias.get("serving"), alias.get("canary"))
                with lock:
                    if not result.serving or result.serving[-1][1:] != now:
                        result.serving.append((time.time(), *now))
            done.wait(every_s)


def _progress(result: Simulation, counted: int, target: int) -> None:
    recent = result.turns[-100:]
    serving = result.serving[-1] if result.serving else None
    logger.info(
        "%d/%d; liked in the last %d answers: %.2f; serving %s%s",
        counted,
        target,
        len(recent),
        sum(t.liked for t in recent) / len(recent),
        serving[1] if serving else "?",
        f" (canary {serving[2]})" if serving and serving[2] else "",
    )
