"""Request and response bodies of the HTTP API (OpenAI's chat completions shape)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from ingest.signals import SIGNALS, signal_of
from serve.credentials import ApiKey, Role


class TextPart(BaseModel):
    """OpenAI's content part; only text parts mean anything to a text model (so the schema says)."""

    type: Literal["text"]
    text: str


def _flatten(value: object) -> object:
    # Content parts are joined into one text; anything else is left for the str check to refuse.
    if not isinstance(value, list):
        return value
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
        raise ValueError('only text content parts are supported: [{"type": "text", "text": "…"}]')
    return "".join(p["text"] for p in value)


class ChatMessageIn(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, BeforeValidator(_flatten, json_schema_input_type=str | list[TextPart])]

    @field_validator("content")
    @classmethod
    def _valid_unicode(cls, value: str) -> str:
        return _utf8(value)


def _utf8(text: str) -> str:
    # JSON can carry lone surrogates ("\\ud800"); no tokenizer can encode them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]


def _stop_list(value):
    # OpenAI's `stop` is one string, a list of them, or null; it is kept as a list.
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


# Accepted as OpenAI's `stop` (and so documented in the API schema), held as a list.
Stops = Annotated[list[Text], BeforeValidator(_stop_list, json_schema_input_type=Text | list[Text] | None)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Unknown OpenAI fields (logprobs, tools, …) are ignored rather than refused, as most servers do.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Stops = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = Field(
        None, max_length=256, description="accepted for OpenAI compatibility; the user is who the credential says"
    )
    n: int = Field(1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: list[str]) -> list[str]:
        if len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return [s for s in value if s]


class FeedbackRequest(BaseModel):
    """A thumb (`label`), or an implicit signal (`source: implicit` and `signal`, no label: the
    signal implies it, ingest.signals)."""

    response_id: Text = Field(min_length=1, max_length=128)
    source: Literal["human", "implicit"] = "human"
    label: Literal["up", "down"] | None = None
    signal: Annotated[str, Field(json_schema_extra={"enum": sorted(SIGNALS)})] | None = None
    comment: Text | None = Field(None, max_length=2000)

    @field_validator("signal")
    @classmethod
    def _known_signal(cls, value: str | None) -> str | None:
        if value is not None:
            signal_of(value)  # ValueError naming it
        return value

    def mismatch(self) -> tuple[str, str] | None:
        """(field, why) when the fields do not make a thumb or a signal; None when they do."""
        if self.source == "human":
            if self.label is None:
                return "label", 'a thumb needs "label": "up" or "down" (or send "source": "implicit" with a signal)'
            if self.signal is not None:
                return "signal", 'a signal needs "source": "implicit"'
        elif self.signal is None:
            return "signal", f"an implicit signal names its signal: one of {', '.join(sorted(SIGNALS))}"
        elif self.label is not None:
            return "label", "an implicit signal has no label: the signal implies it"
        return None


class FeedbackAccepted(BaseModel):
    id: str
    response_id: str
    label: Literal["up", "down"]
    status: Literal["recorded", "changed", "unchanged"]
    """For a signal: always `recorded` (each act is an event; a thumb on the same answer wins)."""
    source: Literal["human", "implicit"] = "human"
    signal: str | None = None


class RollbackRequest(BaseModel):
    to: str | None = None
    reason: Text = Field("", max_length=500)


class ActivateRequest(BaseModel):
    reason: Text = Field("", max_length=500)


class PinRequest(BaseModel):
    reason: Text = Field("", max_length=500)


class PruneRequest(BaseModel):
    dry_run: bool = False
    """Only say which versions would lose their files."""
    reason: Text = Field("", max_length=500)


class CanaryStartRequest(BaseModel):
    version: Text = Field(min_length=1, max_length=128)
    share: float = Field(gt=0, le=1)
    """Fraction of users routed to the candidate."""
    reason: Text = Field("", max_length=500)


class CanaryRequest(BaseModel):
    version: Text | None = Field(None, max_length=128)
    """The candidate the caller means; default: whatever canary runs. A canary of another
    version is left alone (409), so that a decision never lands on the wrong one."""
    reason: Text = Field("", max_length=500)


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role = "user"
    name: str = Field("", max_length=200, description="a label for the key, shown in lists")


@dataclass(frozen=True)
class IssuedKey(ApiKey):
    """A new key's record with the key itself, which is in this answer only."""

    key: str


class KeyList(BaseModel):
    keys: list[ApiKey]


class Me(BaseModel):
    user: str | None = Field(description="the user per-user rules key on; null: anonymous (may chat, not rate)")
    role: Role
    name: str = Field(description="the credential's name, recorded as the actor of what it changes")
    auth: Literal["header", "api-key", "jwt"]


# ---- the annotation queue (serve.routes.annotation) ----


class AnnotationItem(BaseModel):
    """One answer to annotate, with its conversation; never whose it is."""

    response_id: str
    messages: list[dict[str, str]] = Field(description="the conversation the answer replied to")
    completion: str = Field(description="the answer to judge")
    lease_expires_at: float = Field(description="unix seconds: after this another annotator may take it")


class AnnotationTask(BaseModel):
    item: AnnotationItem | None = Field(description="null: nothing waits for this annotator now")
    guidelines: str


class AnnotationRequest(BaseModel):
    response_id: Text = Field(min_length=1, max_length=128)
    label: Literal["up", "down"]


class AnnotationAccepted(BaseModel):
    id: str = Field(description="the feedback event's id")
    response_id: str
    label: Literal["up", "down"]
    status: Literal["recorded", "changed", "unchanged"]


class SkipRequest(BaseModel):
    response_id: Text = Field(min_length=1, max_length=128)


class AnnotationConfig(BaseModel):
    """What an admin may change at run time; omitted fields keep their value."""

    strategy: Literal["uniform", "newest", "canary", "uncertain"] | None = None
    guidelines: Text | None = Field(None, min_length=1, max_length=4000)
