"""The official `openai` client against a live server, plain and streaming."""

from __future__ import annotations

import httpx
import openai
import pytest


@pytest.fixture
def oai(live_server):
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", default_headers={"X-User-Id": "dana"})


def test_openai_client_plain(oai, live_server):
    completion = oai.chat.completions.create(
        model="kto-loop", messages=[{"role": "user", "content": "Hello"}], max_tokens=5, temperature=0
    )
    assert completion.id.startswith("chatcmpl-")
    assert completion.usage.completion_tokens >= 1
    assert completion.choices[0].finish_reason in {"stop", "length"}
    models = [m.id for m in oai.models.list()]
    assert completion.model in models

    # the id it returned is the one to rate
    reply = httpx.post(
        f"{live_server.url}/v1/feedback",
        json={"response_id": completion.id, "label": "up"},
        headers={"X-User-Id": "dana"},
    )
    assert reply.status_code == 202


def test_openai_client_streaming(oai):
    stream = oai.chat.completions.create(
        model="kto-loop",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish and finish[0] in {"stop", "length"}


def test_openai_client_sees_api_errors(oai):
    with pytest.raises(openai.NotFoundError) as error:
        oai.chat.completions.create(model="missing", messages=[{"role": "user", "content": "Hi"}])
    assert "missing" in str(error.value)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="kto-loop", messages=[{"role": "user", "content": "Hi"}], max_tokens=10**6)
