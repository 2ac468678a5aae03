"""The model a user brings, family by family (testkit.model_families): Llama 3, Qwen 2.5 and 3,
Mistral, Gemma 2 and 3, Phi-3, and GPT-2 as a base model without a chat template.

For each: chat plain and streaming, every end-of-turn id stops an answer, a system message is
taken or refused with a 400 as the family's template says, the logged tokens are the served
text; then ratings reach the learner, it trains LoRA on the family's layers, the server
hot-swaps to the new version, and the published adapter loads with PEFT and passes vLLM's checks.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from foundation.models import render_prompt
from registry import open_registry
from registry.vllm_checks import vllm_reasons
from serve.app import create_app
from serve.settings import ServeSettings
from testkit.model_families import FAMILIES, Family, build_family_model
from testkit.waiting import wait_for
from tests.learner.conftest import quick_learner
from tests.serve.conftest import ADMIN_TOKEN, LOCAL, read_topic, sse_events, state_of

USER = {"X-User-Id": "alice"}
HELLO = [{"role": "user", "content": "Hello there"}]
SYSTEM = [{"role": "system", "content": "Answer briefly."}, *HELLO]
WAIT_S = 120.0


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> tuple[Family, Path]:
    chosen = FAMILIES[request.param]
    return chosen, build_family_model(chosen, tmp_path_factory.mktemp(chosen.name) / "model")


@pytest.fixture
def client(family, tmp_path):
    chosen, model_dir = family
    settings = ServeSettings(
        data_dir=tmp_path / "data",
        model=str(model_dir),
        model_id=chosen.name,
        admin_token=ADMIN_TOKEN,
        registry_poll_s=0.05,
        default_max_tokens=6,
    )
    with TestClient(create_app(settings), client=LOCAL) as client:
        yield client


def chat(client, messages=HELLO, **extra) -> dict:
    reply = client.post("/v1/chat/completions", json={"messages": messages, **extra}, headers=USER)
    assert reply.status_code == 200, reply.text
    return reply.json()


def logged(client, response_id: str):
    state = state_of(client)
    [event] = [e for e in read_topic(state, state.topics.responses) if e.response_id == response_id]
    return event


def test_chats_and_logs_exactly_what_it_served(family, client):
    chosen, _ = family
    tokenizer = state_of(client).loaded.tokenizer
    body = chat(client, temperature=1.0, seed=3)
    event = logged(client, body["id"])
    assert event.prompt_token_ids == render_prompt(tokenizer, HELLO)
    served = body["choices"][0]["message"]["content"]
    assert tokenizer.decode(event.completion_token_ids, skip_special_tokens=True) == served == event.completion
    assert body["usage"]["completion_tokens"] == len(event.completion_token_ids)

    request = {"messages": HELLO, "stream": True, "temperature": 1.0, "seed": 4}
    with client.stream("POST", "/v1/chat/completions", json=request, headers=USER) as reply:
        assert reply.status_code == 200
        chunks = sse_events(reply.read().decode())
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    event = logged(client, chunks[0]["id"])
    assert text == event.completion == tokenizer.decode(event.completion_token_ids, skip_special_tokens=True)

    reply = client.post("/v1/chat/completions", json={"messages": SYSTEM}, headers=USER)
    if chosen.takes_system:
        assert reply.status_code == 200, reply.text
        prompt = logged(client, reply.json()["id"]).prompt_token_ids
        assert tokenizer.encode("Answer briefly.", add_special_tokens=False)[0] in prompt
    else:
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert error["code"] == "chat_template_refused" and error["param"] == "messages", error


def prefer(token_id: int):
    """A forward hook on the output head that makes `token_id` the likeliest next token, as a
    model that has finished its turn would."""

    def hook(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., token_id] += 1e4
        return logits

    return hook


def test_every_end_of_turn_token_stops_the_answer(family, client):
    chosen, _ = family
    state = state_of(client)
    head = state.loaded.model.get_output_embeddings()  # the model every engine step runs
    for token in chosen.end_of_turn:
        token_id = state.loaded.tokenizer.get_vocab()[token]
        hook = head.register_forward_hook(prefer(token_id))
        try:
            body = chat(client, temperature=0, max_tokens=8)
        finally:
            hook.remove()
        choice = body["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["message"]["content"] == "", (token, body)
        assert logged(client, body["id"]).completion_token_ids == [token_id]


def test_learns_from_ratings_hot_swaps_and_publishes_an_adapter_others_load(family, client, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from learner.loop import main

    chosen, model_dir = family
    for i in range(24):
        rid = chat(client, temperature=1.0, seed=i, max_tokens=4)["id"]
        label = "up" if i % 2 else "down"
        assert client.post("/v1/feedback", json={"response_id": rid, "label": label}, headers=USER).status_code == 202
    # The gate is not under test here (tests/learner/test_gate.py): wide bounds let the first update through.
    settings = quick_learner(
        tmp_path / "data", model_dir, model_id=chosen.name, canary_share=0.0, max_kl=100.0, accuracy_tolerance=1.0
    )
    stop = threading.Event()
    learner = threading.Thread(target=main, args=(settings, stop), daemon=True)
    learner.start()
    try:
        registry = open_registry(settings.registry_url)
        version = wait_for(registry.active, what=f"{chosen.name}: a first version, live", timeout_s=WAIT_S)
    finally:
        stop.set()
        learner.join(timeout=WAIT_S)
    state = state_of(client)
    wait_for(lambda: state.hotswap.serving == version, what="the server to hot-swap", timeout_s=WAIT_S)
    body = chat(client)
    assert body["model"] == version and logged(client, body["id"]).adapter_version == version

    assert version is not None  # wait_for returned it: truthy
    path = registry.adapter_path(version)
    assert vllm_reasons(path) == []
    assert sorted(json.loads((path / "adapter_config.json").read_text())["target_modules"]) == sorted(
        chosen.lora_modules
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([render_prompt(state.loaded.tokenizer, HELLO)])
    before = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, str(path))
    assert not torch.allclose(tuned(input_ids=ids).logits, before)  # its weights were loaded, not ignored
