"""The annotation queue: served answers waiting for non-expert annotators' 👍 / 👎.

The chat route offers each answer a user received (anonymous ones are nobody's, and the learner
refuses labels on them) to the queue, which keeps it with its conversation for the ledger's TTL.
An annotator asks for the next item and holds it for a lease (`KTO_ANNOTATION_LEASE_S`); while
held, nobody else takes that slot. An item wants one annotator, or two when it was drawn for
overlap (`KTO_ANNOTATION_OVERLAP`), which is what the agreement figure is computed from.

The delivery rules, enforced here (atomically on both backends):
- an annotator gets an item only while it has a free slot: annotations plus others' live leases
  fewer than it wants, and never one they annotated or skipped before;
- an annotation needs the annotator's lease, or their own earlier annotation of that item (a
  repeat: the same label changes nothing, another one replaces it); anything else is
  ``NotAssigned`` (a 403). A lease that ran out still counts while nobody else took its slot
  (an annotator who paused too long loses nothing that was not given away);
- a skip gives the slot back and the item never comes back to that annotator.

Erasing a user removes their items with everything recorded about them here. Which item comes
next is the strategy's choice (serve.annotation_strategies); this module only offers candidates.

Backends, chosen by URL in ``open_annotation_queue`` like the ledger: ``sqlite:///path``
(embedded, serve.sqlite_annotation_queue) and ``redis://…`` (serve.redis_annotation_queue,
shared by replicas).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from foundation.sqlite import path_from_url
from foundation.urls import backend_of

logger = logging.getLogger(__name__)

Label = Literal["desirable", "undesirable"]


@dataclass(frozen=True)
class QueueItem:
    """One served answer, as the queue keeps it."""

    response_id: str
    user: str
    """Whose answer it is: written into the annotator's feedback event, never shown to annotators."""
    version: str | None
    """The adapter version that answered (None: the base model)."""
    created_at: float
    messages: list[dict[str, str]]
    completion: str
    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    required: int = 1
    """Annotators it wants: 2 for an overlap item."""

    def body(self) -> str:
        return json.dumps(
            {
                "messages": self.messages,
                "completion": self.completion,
                "prompt_token_ids": self.prompt_token_ids,
                "completion_token_ids": self.completion_token_ids,
            },
            separators=(",", ":"),
        )

    @classmethod
    def of(cls, response_id: str, user: str, version: str | None, created_at: float, required: int, body: str):
        return cls(response_id, user, version or None, created_at, required=required, **json.loads(body))


@dataclass(frozen=True)
class Candidate:
    """An item an annotator may take now, as a strategy sees it."""

    response_id: str
    version: str | None
    created_at: float
    annotations: int


@dataclass(frozen=True)
class Annotation:
    response_id: str
    annotator: str
    label: Label
    event_id: str
    annotated_at: float


class NotAssigned(PermissionError):
    """The annotator holds no live lease on the item and never annotated it."""


class ItemGone(LookupError):
    """No such item: never queued, expired, or its user was erased."""


class QueueUnavailable(Exception):
    """The queue's store cannot be reached; nothing was changed, the caller may retry."""


class AnnotationQueue(Protocol):
    """Where served answers wait for annotators (the module docstring has the rules)."""

    def add(self, item: QueueItem) -> None:
        """Queue an answer; idempotent."""
        ...

    def item(self, response_id: str) -> QueueItem | None: ...

    def purge(self, now: float) -> int:
        """Drop items older than the TTL, then the oldest nobody annotated past ``max_items``
        (``add`` calls it at most once a minute); returns how many left."""
        ...

    def held(self, annotator: str, now: float) -> tuple[str, float] | None:
        """The item the annotator holds a live lease on, and when the lease ends; None if none."""
        ...

    def candidates(self, annotator: str, now: float, *, newest: bool, limit: int) -> list[Candidate]:
        """Up to ``limit`` items the annotator may take now: the newest, or a random sample."""
        ...

    def assign(self, response_id: str, annotator: str, now: float, lease_s: float) -> bool:
        """Lease the item to the annotator if it still has a free slot for them."""
        ...

    def annotation(self, response_id: str, annotator: str, now: float) -> Annotation | None:
        """The annotator's annotation of the item; ``NotAssigned`` if they have none and no live
        lease, ``ItemGone`` if there is no such item."""
        ...

    def annotate(self, annotation: Annotation) -> Annotation | None:
        """Record it (the lease ends); returns the annotator's previous one. Same errors as ``annotation``."""
        ...

    def skip(self, response_id: str, annotator: str, now: float) -> None:
        """Give the slot back for good; ``NotAssigned`` without a lease."""
        ...

    def annotations(self) -> list[Annotation]:
        """Every annotation of the items in the queue (for agreement)."""
        ...

    def open_items(self) -> int:
        """Items that want more annotations."""
        ...

    def forget_user(self, user: str) -> int:
        """Remove the user's items and all about them; returns how many."""
        ...

    def config(self) -> dict[str, Any]:
        """What an operator set at run time (serve.routes.annotation)."""
        ...

    def set_config(self, values: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def open_annotation_queue(url: str, *, ttl_s: float, max_items: int) -> AnnotationQueue:
    """The queue for ``url``: ``sqlite:///PATH`` or ``redis[s]://host:port/db``."""
    if backend_of(url, allowed=("sqlite", "redis"), what="annotation queue") == "sqlite":
        from serve.sqlite_annotation_queue import SqliteAnnotationQueue

        return SqliteAnnotationQueue(path_from_url(url), ttl_s=ttl_s, max_items=max_items)
    from serve.redis_annotation_queue import RedisAnnotationQueue  # redis-py only when chosen

    return RedisAnnotationQueue(url, ttl_s=ttl_s, max_items=max_items)
