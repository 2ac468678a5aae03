"""A judge model: a yes/no question about an answer, asked of any OpenAI-compatible chat endpoint.

A `judge` rule (labelers.rules) names the question, in the operator's words ("Does the answer
promise a refund?"). The judge is asked it with the conversation and the answer, and must reply
with one word; the reply is parsed strictly (`yes` or `no`, any case, one optional full stop or
exclamation mark, nothing else): yes labels the answer with the rule's `label`, no with its
`otherwise` (when set), anything else abstains. A judge is a model: it is wrong sometimes, and
an abstention is safer than a guess at what a rambling reply meant.

Its failures never reach serving or the learner (the labeler is a process of its own) and delay
the labeler a bounded time: each request has `timeout_s`, a failed one (a connection error, a
timeout, a 429 or a 5xx) is retried `retries` times with exponential backoff, at most
`concurrency` requests are in flight, and a verdict still missing after that is skipped and
counted, never retried later (the answer keeps its rule labels, if any).
"""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import httpx

from ingest.events import ResponseEvent
from labelers.rules import Label, Rule

logger = logging.getLogger(__name__)

INSTRUCTION = "You judge answers. Reply with exactly one word: yes or no."
_VERDICT = re.compile(r"\s*(yes|no)[.!]?\s*", re.IGNORECASE)


def parse_verdict(text: str) -> bool | None:
    """True for yes, False for no, None for anything else (see the module docstring)."""
    match = _VERDICT.fullmatch(text)
    return None if match is None else match.group(1).lower() == "yes"


def judge_messages(question: str, response: ResponseEvent) -> list[dict[str, str]]:
    """What the judge is sent: the instruction, then the conversation, the answer and the question."""
    conversation = "\n".join(f"{m.role}: {m.content}" for m in response.messages)
    body = f"Conversation:\n{conversation}\n\nAnswer:\n{response.completion}\n\nQuestion: {question}"
    return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": body}]


@dataclass(frozen=True)
class Verdict:
    outcome: Literal["label", "abstain", "failed"]
    label: Label | None = None
    reply: str | None = None
    """The judge's reply as it came (None when no reply came)."""
    error: str | None = None


class Judge:
    """One OpenAI-compatible endpoint (`base_url` ends before `/chat/completions`, e.g.
    `http://judge:8000/v1`), asked with bounded time and concurrency."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 10.0,
        retries: int = 2,
        backoff_s: float = 0.5,
        concurrency: int = 4,
        max_tokens: int = 4,
    ) -> None:
        self.model, self.retries, self.backoff_s, self.max_tokens = model, retries, backoff_s, max_tokens
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="judge")

    def verdicts(self, asks: list[tuple[Rule, ResponseEvent]]) -> list[Verdict]:
        """One verdict per (judge rule, answer), asked `concurrency` at a time, in order."""
        return list(self._pool.map(lambda ask: self.verdict(*ask), asks))

    def verdict(self, rule: Rule, response: ResponseEvent) -> Verdict:
        body: dict = {
            "messages": judge_messages(rule.question or "", response),
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
        }
        if self.model:
            body["model"] = self.model
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                reply = self._client.post("/chat/completions", json=body)
            except httpx.HTTPError as e:
                error = f"{type(e).__name__}: {e}"
                continue
            if reply.status_code == 429 or reply.status_code >= 500:
                error = f"HTTP {reply.status_code}"
                continue
            try:
                reply.raise_for_status()
                text = reply.json()["choices"][0]["message"]["content"] or ""
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
                return Verdict(
                    "failed", error=f"unusable reply: {e}"
                )  # a 4xx or a malformed body: retrying will not help
            said = parse_verdict(text)
            if said is None:
                return Verdict("abstain", reply=text)
            label = rule.label if said else rule.otherwise
            return Verdict("label" if label else "abstain", label=label, reply=text)
        return Verdict("failed", error=error)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
