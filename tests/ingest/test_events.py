"""The event schema: round trips, decode errors with useful reasons, topics, dead letters."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from ingest.events import (
    SCHEMA_VERSION,
    AnyEvent,
    ChatMessage,
    ErasureEvent,
    EventDecodeError,
    FeedbackEvent,
    ResponseEvent,
    SamplingParams,
    Topics,
    dead_letter,
    decode_event,
    encode_event,
)


def make_response(**overrides: object) -> ResponseEvent:
    fields: dict[str, Any] = dict(
        response_id="resp-1",
        user="u-42",
        base_model="tiny-llama",
        adapter_version="v0003",
        messages=[ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="Grüß dich 👋")],
        prompt_token_ids=[1, 17, 5],
        completion="Hallo!",
        completion_token_ids=[9, 3, 2],
        finish_reason="stop",
        sampling=SamplingParams(max_tokens=16, temperature=0.7, top_p=0.9, stop=["\n"], seed=7),
    )
    fields.update(overrides)
    return ResponseEvent(**fields)


def make_feedback(**overrides: object) -> FeedbackEvent:
    fields: dict[str, Any] = dict(response_id="resp-1", user="u-42", label="desirable")
    fields.update(overrides)
    return FeedbackEvent(**fields)


def test_response_round_trip_keeps_every_field() -> None:
    event = make_response()
    decoded = decode_event(encode_event(event))
    assert isinstance(decoded, ResponseEvent)
    assert decoded == event
    assert decoded.messages[1].content == "Grüß dich 👋"
    assert decoded.sampling.stop == ["\n"]


def test_feedback_round_trip_with_and_without_comment() -> None:
    for event in (make_feedback(), make_feedback(label="undesirable", comment="wrong answer")):
        decoded = decode_event(encode_event(event))
        assert isinstance(decoded, FeedbackEvent)
        assert decoded == event


def test_erasure_round_trip_and_its_user_is_required() -> None:
    event = ErasureEvent(user="u-42", actor="admin", reason="GDPR request #7")
    decoded = decode_event(encode_event(event))
    assert isinstance(decoded, ErasureEvent) and decoded == event
    assert "user" in _reason(_mutated(event, user=""))


def test_base_model_response_has_null_adapter_and_anonymous_user() -> None:
    event = make_response(adapter_version=None, user=None)
    decoded = decode_event(encode_event(event))
    assert isinstance(decoded, ResponseEvent)
    assert decoded.adapter_version is None and decoded.user is None


def test_defaults_are_filled_in() -> None:
    a, b = make_feedback(), make_feedback()
    assert a.type == "feedback" and a.schema_version == SCHEMA_VERSION == 1
    assert a.event_id != b.event_id and len(a.event_id) == 32
    int(a.event_id, 16)  # hex
    assert a.created_at > 1.6e9
    assert SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0).seed is None


def test_encoding_is_compact_utf8_json() -> None:
    data = encode_event(make_response())
    text = data.decode("utf-8")
    assert "Grüß dich 👋" in text  # not \u-escaped
    assert ", " not in text.replace("Grüß dich 👋", "") and '": ' not in text
    assert json.loads(text)["type"] == "response"


def test_unknown_extra_fields_are_ignored_for_forward_compatibility() -> None:
    obj = json.loads(encode_event(make_feedback()))
    obj["added_in_a_later_minor_change"] = 1
    assert isinstance(decode_event(json.dumps(obj).encode()), FeedbackEvent)


def _reason(data: bytes) -> str:
    with pytest.raises(EventDecodeError) as info:
        decode_event(data)
    assert info.value.reason == str(info.value)
    return info.value.reason


def _mutated(event: AnyEvent, **changes: object) -> bytes:
    obj = json.loads(encode_event(event))
    for key, value in changes.items():
        if value is ...:
            del obj[key]
        else:
            obj[key] = value
    return json.dumps(obj).encode()


def test_decode_rejects_bad_utf8() -> None:
    assert "UTF-8" in _reason(b'{"type": "feedback", "user": "\xff"}')


def test_decode_rejects_bad_json() -> None:
    assert "JSON" in _reason(b'{"type": "feedback",')


def test_decode_rejects_non_object() -> None:
    assert "object" in _reason(b"[1, 2]")


def test_decode_rejects_unknown_or_missing_type() -> None:
    assert "unknown event type 'comment'" in _reason(_mutated(make_feedback(), type="comment"))
    assert "unknown event type None" in _reason(_mutated(make_feedback(), type=...))


def test_decode_rejects_newer_schema_version() -> None:
    reason = _reason(_mutated(make_response(), schema_version=SCHEMA_VERSION + 1))
    assert "newer" in reason and str(SCHEMA_VERSION + 1) in reason


def test_decode_rejects_missing_zero_or_non_integer_schema_version() -> None:
    assert "schema_version" in _reason(_mutated(make_feedback(), schema_version=...))
    assert "schema_version" in _reason(_mutated(make_feedback(), schema_version="1"))
    assert "schema_version" in _reason(_mutated(make_feedback(), schema_version=0))


def test_decode_takes_schema_version_only_as_a_json_integer() -> None:
    # The fast path (pydantic on the bytes) must refuse what the careful path refuses.
    for version in (1.0, True, "1", None):
        assert "schema_version must be an integer" in _reason(_mutated(make_feedback(), schema_version=version))


def test_decode_gives_the_same_event_by_either_path() -> None:
    from ingest.events import _decode_carefully

    for event in (make_response(), make_feedback()):
        data = encode_event(event)
        assert decode_event(data) == _decode_carefully(data) == event


def test_decode_names_the_missing_field() -> None:
    reason = _reason(_mutated(make_response(), completion_token_ids=...))
    assert "completion_token_ids" in reason and "required" in reason.lower()


def test_decode_names_the_invalid_field() -> None:
    assert "label" in _reason(_mutated(make_feedback(), label="meh"))
    assert "user" in _reason(_mutated(make_feedback(), user=None))
    assert "created_at" in _reason(
        b'{"type":"feedback","schema_version":1,"response_id":"r","user":"u","label":"desirable","created_at":NaN}'
    )


def test_decode_names_nested_fields() -> None:
    obj = json.loads(encode_event(make_response()))
    obj["sampling"]["top_p"] = 3
    obj["messages"][1]["role"] = "robot"
    obj["completion_token_ids"] = [4, -1]
    reason = _reason(json.dumps(obj).encode())
    assert "sampling.top_p" in reason
    assert "messages.1.role" in reason
    assert "completion_token_ids.1" in reason


def test_topics_default_and_custom_prefix() -> None:
    topics = Topics()
    assert topics.responses == "kto.responses"
    assert topics.feedback == "kto.feedback"
    assert topics.dead_letters == "kto.dead-letters"
    assert topics.all == ["kto.responses", "kto.feedback", "kto.dead-letters", "kto.erasures"]
    assert Topics("staging").all == [
        "staging.responses",
        "staging.feedback",
        "staging.dead-letters",
        "staging.erasures",
    ]


@pytest.mark.parametrize("prefix", ["", "has space", "slash/y", "x" * 240])
def test_topics_reject_illegal_prefix(prefix: str) -> None:
    with pytest.raises(ValueError):
        Topics(prefix)


def test_dead_letter_keeps_utf8_value_as_text() -> None:
    raw = b'{"type":"bogus","msg":"\xc3\xa9"}'
    envelope = json.loads(dead_letter("unknown event type 'bogus'", "kto.feedback", 0, 41, raw))
    assert envelope["reason"] == "unknown event type 'bogus'"
    assert (envelope["source_topic"], envelope["partition"], envelope["offset"]) == ("kto.feedback", 0, 41)
    assert envelope["value_encoding"] == "utf-8"
    assert envelope["value"].encode("utf-8") == raw
    assert envelope["dead_lettered_at"] > 1.6e9


def test_dead_letter_keeps_binary_value_as_base64() -> None:
    raw = bytes(range(256))
    envelope = json.loads(dead_letter("not UTF-8", "kto.responses", 2, 7, raw))
    assert envelope["value_encoding"] == "base64"
    assert base64.b64decode(envelope["value"]) == raw


def test_a_feedback_names_its_source_and_older_events_are_a_persons() -> None:
    assert make_feedback().source == "human"
    for source in ("human", "annotator", "rule:no-refunds", "judge:polite.v2"):
        decoded = decode_event(encode_event(make_feedback(source=source)))
        assert isinstance(decoded, FeedbackEvent) and decoded.source == source and decoded.labeler == source
    written_before = json.loads(encode_event(make_feedback()))
    del written_before["source"]
    decoded = decode_event(json.dumps(written_before).encode())
    assert isinstance(decoded, FeedbackEvent) and decoded.source == "human"


def test_an_implicit_label_names_its_signal_and_only_it_does() -> None:
    decoded = decode_event(encode_event(make_feedback(source="implicit", signal="regenerate")))
    assert isinstance(decoded, FeedbackEvent) and (decoded.signal, decoded.labeler) == (
        "regenerate",
        "implicit:regenerate",
    )
    # A signal this reader does not know is kept: the label says what it means.
    unknown = decode_event(_mutated(make_feedback(source="implicit", signal="copy"), signal="share"))
    assert isinstance(unknown, FeedbackEvent) and unknown.labeler == "implicit:share"
    annotated = decode_event(encode_event(make_feedback(source="annotator", rater="ann-7")))
    assert isinstance(annotated, FeedbackEvent) and (annotated.rater, annotated.labeler) == ("ann-7", "annotator")
    for broken in (
        _mutated(make_feedback(source="implicit", signal="copy"), signal=None),  # implicit without a signal
        _mutated(make_feedback(), signal="copy"),  # a thumb with one
        _mutated(make_feedback(source="implicit", signal="copy"), signal="Copy Paste"),  # not a signal name
    ):
        with pytest.raises(EventDecodeError) as info:
            decode_event(broken)
        assert "signal" in info.value.reason


@pytest.mark.parametrize("source", ["", "rule", "rule:", "robot", "judge: x", "rule:" + "x" * 65, "HUMAN"])
def test_an_unknown_source_is_refused_by_name(source: str) -> None:
    with pytest.raises(EventDecodeError) as info:
        decode_event(_mutated(make_feedback(), source=source))
    assert "source" in info.value.reason
