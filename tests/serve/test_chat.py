"""POST /v1/chat/completions and GET /v1/models, plain and streaming, and every bad input."""

from __future__ import annotations

import pytest

from ingest.events import ResponseEvent
from tests.serve.conftest import read_topic, sse_events
from tests.tiny import TINY_MODEL_ID

USER = {"X-User-Id": "alice"}
HELLO = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0}


def test_completion_is_openai_shaped_and_logged(client, state):
    reply = client.post("/v1/chat/completions", json=HELLO, headers=USER)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == TINY_MODEL_ID  # no adapter active: the base answered
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    [event] = [e for e in read_topic(state, state.topics.responses) if e.response_id == body["id"]]
    assert isinstance(event, ResponseEvent)
    assert event.user == "alice" and event.adapter_version is None and event.base_model == TINY_MODEL_ID
    assert event.completion == choice["message"]["content"]
    assert len(event.completion_token_ids) == usage["completion_tokens"]
    assert state.loaded.tokenizer.decode(event.completion_token_ids, skip_special_tokens=True) == event.completion
    assert event.messages[0].content == "Hello" and event.sampling.max_tokens == 6


def test_streaming_chunks_share_one_id_then_usage_then_done(client, state):
    request = {**HELLO, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=request, headers=USER) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        chunks = sse_events(reply.read().decode())
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert chunks[-2]["choices"][0]["finish_reason"] in {"stop", "length"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    [event] = [e for e in read_topic(state, state.topics.responses) if e.response_id == ids.pop()]
    assert event.completion == text


def test_same_seed_same_answer(client):
    request = {**HELLO, "temperature": 1.0, "seed": 11, "max_tokens": 12}
    first = client.post("/v1/chat/completions", json=request).json()["choices"][0]["message"]["content"]
    again = client.post("/v1/chat/completions", json=request).json()["choices"][0]["message"]["content"]
    assert first == again


def test_models_lists_alias_and_base(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids[:2] == ["kto-loop", TINY_MODEL_ID]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": []}, 422, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 422, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, 422, "messages.0.content"),
        ({**HELLO, "max_tokens": 0}, 422, "max_tokens"),
        ({**HELLO, "max_tokens": 10**6}, 400, "max_tokens"),
        ({**HELLO, "temperature": 3}, 422, "temperature"),
        ({**HELLO, "top_p": 0}, 422, "top_p"),
        ({**HELLO, "n": 2}, 422, "n"),
        ({**HELLO, "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
        ({**HELLO, "model": "no-such-model"}, 404, "model"),
        ({**HELLO, "seed": 2**70}, 422, "seed"),
        ({**HELLO, "stream_options": {"include_usage": "maybe"}}, 422, "stream_options.include_usage"),
        ({"messages": [{"role": "user", "content": "word " * 5000}]}, 400, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            422,
            "messages.0.content",
        ),
    ],
)
def test_bad_requests_are_4xx_naming_the_field(client, body, status, param):
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["message"]


@pytest.mark.parametrize("seed", [-1, 0, 2**63 - 1, 2**64 - 1])
def test_any_seed_in_range_works(client, seed):
    assert client.post("/v1/chat/completions", json={**HELLO, "seed": seed, "temperature": 1}).status_code == 200


def test_odd_but_valid_inputs_are_answered(client):
    odd = [
        [{"role": "user", "content": ""}],
        [{"role": "user", "content": "<|end|><|assistant|> \u0000 emoji 😀"}],
        [{"role": "assistant", "content": "I start"}, {"role": "system", "content": "be brief"}],
        [{"role": "user", "content": [{"type": "text", "text": "parts "}, {"type": "text", "text": "joined"}]}],
    ]
    for messages in odd:
        reply = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4, "stop": "\n"})
        assert reply.status_code == 200, (messages, reply.text)
    # JSON escapes for a surrogate pair and for a lone surrogate, as raw bytes
    for raw in (
        rb'{"messages":[{"role":"user","content":"\ud83d\ude00"}],"max_tokens":3}',
        rb'{"messages":[{"role":"user","content":"\ud800 lone"}],"max_tokens":3}',
    ):
        reply = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
        assert reply.status_code < 500, reply.text


def test_not_json_and_wrong_types(client):
    reply = client.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and "JSON" in reply.json()["error"]["message"]
    reply = client.post("/v1/chat/completions", json=["a", "list"])
    assert reply.status_code == 422


def test_oversized_body_is_413(client, settings):
    huge = {"messages": [{"role": "user", "content": "x" * (settings.max_body_bytes + 10)}]}
    assert client.post("/v1/chat/completions", json=huge).status_code == 413

    def chunks():  # no Content-Length: the limit holds on the bytes actually sent
        for _ in range(settings.max_body_bytes // 1000 + 2):
            yield b" " * 1000

    reply = client.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert reply.status_code == 413 and reply.json()["error"]["message"]


def test_unknown_route_and_method(client):
    assert client.get("/v1/nothing").json()["error"]["message"].startswith("no route")
    assert client.get("/v1/chat/completions").status_code == 405
