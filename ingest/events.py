"""The events that flow over the bus: their schema, encoding, and topic names.

Every event is one JSON object with a ``type`` discriminator and a ``schema_version``.
Producers and consumers share this module, so a change here is a wire change:

- adding an optional field is compatible (old readers ignore unknown fields);
- anything else (removing, renaming, re-typing a field) bumps ``SCHEMA_VERSION``.

A reader refuses events from a newer schema version than its own, so that an old learner never
trains on fields it misreads; such events go to the dead-letter topic (see ``dead_letter``) and
can be replayed once the reader is upgraded.

Events are keyed by ``response_id`` on the bus, so a response and its feedback share a partition.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from ingest.bus import check_topic_name

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""The version this code writes and the newest it can read."""

_EVENT_TYPES = ("response", "feedback", "erasure")


class _EventModel(BaseModel):
    """Shared config: NaN/inf are refused because JSON cannot carry them faithfully."""

    model_config = ConfigDict(allow_inf_nan=False)


class ChatMessage(_EventModel):
    """One prompt message, as the client sent it."""

    role: Literal["system", "user", "assistant"]
    content: str


class SamplingParams(_EventModel):
    """The sampling parameters a completion was generated with."""

    max_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0.0)
    top_p: float = Field(ge=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None


TokenId = Annotated[int, Field(ge=0)]


def _new_event_id() -> str:
    return uuid.uuid4().hex


class ResponseEvent(_EventModel):
    """A completion the server returned: what the learner needs to score it later.

    ``completion_token_ids`` are the ids exactly as generated (not a re-tokenisation of the
    text), so the learner's log-probs are of the tokens the user actually saw.
    """

    type: Literal["response"] = "response"
    event_id: str = Field(default_factory=_new_event_id, min_length=1)
    schema_version: int = Field(SCHEMA_VERSION, strict=True)
    response_id: str = Field(min_length=1)
    created_at: float = Field(default_factory=time.time)
    """Unix seconds."""
    user: str | None
    """Pseudonymous user id; None for anonymous clients."""
    base_model: str = Field(min_length=1)
    adapter_version: str | None
    """The adapter version that produced the completion; None for the base model."""
    messages: list[ChatMessage]
    prompt_token_ids: list[TokenId]
    completion: str
    completion_token_ids: list[TokenId]
    finish_reason: str
    sampling: SamplingParams


SOURCE_KINDS = ("human", "implicit", "annotator", "rule", "judge")
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
SOURCE_PATTERN = rf"^(human|implicit|annotator|(rule|judge):{_NAME})$"
"""Who labeled: a person's thumb (``human``), an implicit signal, an annotator, or a named rule or
judge (``rule:no-refunds``). What each source weighs is the learner's policy (``KTO_SOURCE_WEIGHTS``)."""
SIGNAL_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
LABELER_PATTERN = rf"^(human|annotator|implicit(:[a-z][a-z0-9_-]{{0,31}})?|(rule|judge):{_NAME})$"
"""A source, or an implicit label's signal (``implicit:regenerate``): what the learner stores,
counts and weighs labels by (``FeedbackEvent.labeler``)."""


def source_kind(source: str) -> str:
    """``rule:no-refunds`` → ``rule``; ``implicit:copy`` → ``implicit``; ``human`` → ``human``."""
    return source.split(":", 1)[0]


class FeedbackEvent(_EventModel):
    """A desirable or undesirable label on one response: a person's thumb, or a labeler's.

    ``user`` is always the user the response was served to (whose answer it is), whatever the
    source. A later event for the same response replaces the earlier one, except that a person's
    label is never replaced by an automated one (``learner.join``).
    """

    type: Literal["feedback"] = "feedback"
    event_id: str = Field(default_factory=_new_event_id, min_length=1)
    schema_version: int = Field(SCHEMA_VERSION, strict=True)
    response_id: str = Field(min_length=1)
    user: str = Field(min_length=1)
    label: Literal["desirable", "undesirable"]
    created_at: float = Field(default_factory=time.time)
    """Unix seconds."""
    comment: str | None = None
    source: str = Field("human", pattern=SOURCE_PATTERN)
    """Events written before the field existed are ``human``."""
    weight: float = Field(1.0, gt=0, le=100)
    """How much this one label counts, as its labeler says (a rule's ``weight``); the learner
    multiplies it by its source's weight (``KTO_SOURCE_WEIGHTS``). A person's thumb is 1."""
    signal: str | None = Field(None, pattern=SIGNAL_PATTERN)
    """What the user did, for an ``implicit`` label (``ingest.signals``: ``regenerate``, ``copy``…);
    None for every other source. A reader keeps a signal it does not know: the label says what it means."""
    rater: str | None = Field(None, min_length=1, max_length=256)
    """Who gave the label when it was not ``user``: the annotator's name. None otherwise."""

    @model_validator(mode="after")
    def _signal_only_when_implicit(self) -> FeedbackEvent:
        if (self.source == "implicit") != (self.signal is not None):
            raise ValueError("an implicit label names its signal, and no other label has one")
        return self

    @property
    def labeler(self) -> str:
        """The source, with an implicit label's signal: ``implicit:copy``, ``rule:no-refunds``, ``human``."""
        return f"implicit:{self.signal}" if self.signal is not None else self.source


class ErasureEvent(_EventModel):
    """An operator's request to erase one user's data (admin ``DELETE /v1/users/{user}``).

    The learner removes the user's responses and ratings created up to ``created_at`` from its
    buffer, keeps refusing such events if they arrive later (a replay), and flags the versions
    that were trained on them (``learner.erasure``). ``event_id`` is the request id operators see.
    """

    type: Literal["erasure"] = "erasure"
    event_id: str = Field(default_factory=_new_event_id, min_length=1)
    schema_version: int = Field(SCHEMA_VERSION, strict=True)
    user: str = Field(min_length=1)
    created_at: float = Field(default_factory=time.time)
    """Unix seconds: events of the user created up to here are erased; later ones are new data."""
    actor: str = Field(min_length=1)
    """Who asked (the admin caller)."""
    reason: str = ""


AnyEvent = ResponseEvent | FeedbackEvent | ErasureEvent

Event = Annotated[ResponseEvent | FeedbackEvent | ErasureEvent, Field(discriminator="type")]
"""Any event; pydantic picks the class from ``type``."""

_event_adapter: TypeAdapter[AnyEvent] = TypeAdapter(Event)


class EventDecodeError(Exception):
    """Bytes from the bus that are not a valid event; ``reason`` says why, for the dead letter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode_event(event: AnyEvent) -> bytes:
    """Serialise an event to compact UTF-8 JSON, the bus's value format."""
    return event.model_dump_json().encode("utf-8")


def decode_event(data: bytes) -> AnyEvent:
    """Parse bus bytes into an event, or raise ``EventDecodeError`` saying what is wrong."""
    # Fast path: pydantic parses and validates the bytes in one go (half the time of json.loads
    # and then validation). It accepts what the careful path below accepts (``schema_version`` is
    # a strict int in both, and must be present); anything it refuses, or a version this reader
    # cannot read, goes the careful path, which says precisely what is wrong.
    try:
        event = _event_adapter.validate_json(data)
    except ValidationError:
        pass
    else:
        if "schema_version" in event.model_fields_set and 1 <= event.schema_version <= SCHEMA_VERSION:
            return event
    return _decode_carefully(data)


def _decode_carefully(data: bytes) -> AnyEvent:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EventDecodeError(f"not UTF-8: {exc}") from exc
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EventDecodeError(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise EventDecodeError(f"not a JSON object but {type(obj).__name__}")

    # Checked before validation so that the reason is specific, not a union error.
    event_type = obj.get("type")
    if event_type not in _EVENT_TYPES:
        raise EventDecodeError(f"unknown event type {event_type!r}; expected one of {list(_EVENT_TYPES)}")
    version = obj.get("schema_version")
    if type(version) is not int:
        raise EventDecodeError(f"schema_version must be an integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise EventDecodeError(f"schema_version {version} is newer than this reader's {SCHEMA_VERSION}")
    if version < 1:
        raise EventDecodeError(f"unknown schema_version {version}")

    try:
        return _event_adapter.validate_python(obj)
    except ValidationError as exc:
        raise EventDecodeError(_describe(exc)) from exc


def _describe(exc: ValidationError) -> str:
    """One line per invalid field, e.g. ``sampling.top_p: Input should be less than or equal to 1``."""
    parts = []
    for err in exc.errors():
        # The first loc element is the union tag (e.g. "response"); the field path follows it.
        loc = [str(p) for p in err["loc"][1:]] or [str(p) for p in err["loc"]]
        parts.append(f"{'.'.join(loc) or '<event>'}: {err['msg']}")
    return "invalid event: " + "; ".join(parts)


@dataclass(frozen=True)
class Topics:
    """Topic names, all sharing one prefix so that several deployments can share one broker."""

    prefix: str = "kto"

    def __post_init__(self) -> None:
        # Checked here so that a bad prefix fails at start-up, not at the first publish.
        if not self.prefix:
            raise ValueError("the topic prefix must not be empty")
        for name in self.all:
            check_topic_name(name)

    @property
    def responses(self) -> str:
        return f"{self.prefix}.responses"

    @property
    def feedback(self) -> str:
        return f"{self.prefix}.feedback"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}.dead-letters"

    @property
    def erasures(self) -> str:
        return f"{self.prefix}.erasures"

    @property
    def all(self) -> list[str]:
        return [self.responses, self.feedback, self.dead_letters, self.erasures]


def dead_letter(reason: str, source_topic: str, partition: int, offset: int, raw: bytes) -> bytes:
    """The dead-letter envelope for a record that could not be processed.

    It keeps the original bytes (as text when they are UTF-8, else base64) and where they came
    from, so an operator can inspect, fix and replay them.
    """
    try:
        value, encoding = raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        value, encoding = base64.b64encode(raw).decode("ascii"), "base64"
    envelope = {
        "reason": reason,
        "source_topic": source_topic,
        "partition": partition,
        "offset": offset,
        "dead_lettered_at": time.time(),
        "value_encoding": encoding,
        "value": value,
    }
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
