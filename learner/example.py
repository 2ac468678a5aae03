"""What the replay buffer (learner.buffer) hands out: examples, their light references, dead letters."""

from __future__ import annotations

import json
from dataclasses import dataclass

EXAMPLE_SQL = """
    SELECT e.response_id, r.user, r.prompt_ids, r.completion_ids, e.desirable, e.feedback_event_id,
           e.labeled_at, r.adapter_version, e.seq, e.ref_logp, e.kl_partner, e.kl_ref_logp, e.times_trained,
           p.completion_ids, e.source, e.weight
    FROM examples e JOIN responses r ON r.response_id = e.response_id
    LEFT JOIN responses p ON p.response_id = e.kl_partner"""


@dataclass
class Example:
    """A rated response, ready for KTO once ``ref_logp`` is set."""

    response_id: str
    user: str | None
    prompt_ids: list[int]
    """The prompt token ids exactly as served."""
    completion_ids: list[int]
    """The completion token ids exactly as generated (never a re-tokenisation of the text)."""
    desirable: bool
    feedback_event_id: str
    """The feedback event that set the current label."""
    labeled_at: float
    """That feedback's created_at (unix seconds)."""
    adapter_version: str | None
    """The adapter version that produced the completion; None for the base model."""
    seq: int
    """Stamped anew when labeled, relabeled and referenced; see the module docstring."""
    ref_logp: float | None
    """Reference (base model) log-prob of the completion given the prompt; None until computed."""
    kl_partner: str | None
    """response_id of the fixed mismatched partner; None only while this is the sole example."""
    kl_ref_logp: float | None
    """Reference log-prob of the partner's completion given this prompt."""
    times_trained: int
    kl_partner_completion_ids: list[int] | None = None
    """The partner's completion token ids, for the mismatched pair (this prompt, that completion)."""
    source: str = "human"
    """Who set the current label (ingest.events.SOURCE_PATTERN)."""
    weight: float = 1.0
    """That label's own weight (FeedbackEvent.weight)."""

    def kl_pair(self) -> tuple[list[int], list[int]]:
        """The mismatched pair (this prompt, the partner's completion) that KTO's z0 is measured on."""
        if self.kl_partner_completion_ids is None:
            raise ValueError(f"example {self.response_id} has no KL partner yet")
        return self.prompt_ids, self.kl_partner_completion_ids


@dataclass(frozen=True, slots=True)
class ExampleRef:
    """A referenced example without its tokens: what planning an update needs (``index``)."""

    response_id: str
    user: str | None
    desirable: bool
    seq: int
    source: str = "human"


@dataclass(frozen=True)
class DeadLetter:
    """A queued dead letter: why, and the original record (its bytes and bus position)."""

    id: int
    reason: str
    topic: str
    partition: int
    offset: int
    key: str | None
    raw: bytes


def example_from_row(row: tuple) -> Example:
    """An Example from a row of ``EXAMPLE_SQL``."""
    partner = row[13]
    return Example(
        row[0],
        row[1],
        json.loads(row[2]),
        json.loads(row[3]),
        bool(row[4]),
        row[5],
        row[6],
        row[7],
        row[8],
        row[9],
        row[10],
        row[11],
        row[12],
        kl_partner_completion_ids=None if partner is None else json.loads(partner),
        source=row[14],
        weight=row[15],
    )
