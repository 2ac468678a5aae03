"""The API contract, checked by a schema-driven fuzzer: schemathesis generates requests for every
operation in the server's own OpenAPI document and sends them to a live server, as an admin and
as a user, in the default `header` mode and in `api-key` mode, and as an annotator. No answer may be a server error,
and each must have a documented status, a documented content type and a body that fits the
documented schema.

The server runs with the product's defaults but one: the admin rate limit is raised, since one
admin credential sends ~40 requests per operation within seconds here, and past the default
300/minute every later operation would only be seen answering 429 (a documented answer; the
limits themselves are tested in test_rate_limits).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import checks
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode

from serve.settings import ServeSettings
from testkit.background_server import BackgroundServer
from tests.serve.conftest import ADMIN, ADMIN_TOKEN
from tests.tiny import TINY_MODEL_ID

EXAMPLES = 20
SEED = 20261205
"""Examples per operation, caller and mode (valid, invalid): ~150 requests per operation in all."""
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]
CALLERS = ["header-admin", "header-user", "header-annotator", "api-key-admin", "api-key-user"]
ANNOTATORS_ONLY = {"GET /v1/annotations/next", "POST /v1/annotations", "POST /v1/annotations/skip"}
"""What an annotator may do and an admin may not (their rights are separate)."""


@pytest.fixture(scope="module", params=CALLERS)
def caller(request, tiny_model_dir, tmp_path_factory) -> Iterator[tuple[str, dict[str, str], str]]:
    mode, role = request.param.rsplit("-", 1)
    live = ServeSettings(
        data_dir=tmp_path_factory.mktemp(f"fuzz-{request.param}"),
        model=str(tiny_model_dir),
        model_id=TINY_MODEL_ID,
        admin_token=ADMIN_TOKEN,
        auth=mode,
        rate_limit_admin="10000/minute",
    )
    with BackgroundServer(live) as server:
        if mode == "header":
            headers = {
                "admin": ADMIN,
                "user": {"X-User-Id": "fuzz-user"},
                "annotator": {"X-User-Id": "fuzz-annotator", "X-User-Role": "annotator"},
            }[role]
        else:
            issued = httpx.post(f"{server.url}/v1/users/fuzz-{role}/keys", json={"role": role}, headers=ADMIN)
            assert issued.status_code == 201, issued.text
            headers = {"Authorization": f"Bearer {issued.json()['key']}"}
        yield server.url, headers, role


def test_every_operation_keeps_the_contract(caller):
    """Each operation fuzzed with valid and invalid inputs; every failure of every operation is
    reported (schemathesis drives hypothesis per operation; its pytest plugin does not run on
    pytest 9, so the loop is written here)."""
    url, headers, role = caller
    spec = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failures: dict[str, str] = {}
    seen: dict[str, set[tuple[int, str]]] = defaultdict(set)
    results = list(spec.get_all_operations())
    assert all(isinstance(r, Ok) for r in results), results  # the document itself is valid
    operations = [r.ok() for r in results if isinstance(r, Ok)]
    assert len(operations) >= 20
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                seen[operation.label] |= fuzz(operation, mode, url, headers)
            except Unsatisfiable:  # nothing in this operation can be made invalid (no parameters)
                continue
            except Exception as exc:  # a failed check, with the request that reproduces it
                failures[f"{operation.label} ({mode.value})"] = str(exc)[:2000]
        if operation.label == "POST /v1/chat/completions":  # both kinds of answer, whatever the draw
            for stream in (False, True):
                case = operation.Case(body={"messages": [{"role": "user", "content": "hi"}], "stream": stream})
                reply = case.call_and_validate(base_url=url, headers=headers, checks=CHECKS, timeout=120)
                seen[operation.label].add((reply.status_code, reply.headers["content-type"][0].split(";")[0]))
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
    # Both kinds of answer to a chat were seen, so both were held to their schemas.
    assert {(200, "application/json"), (200, "text/event-stream")} <= seen["POST /v1/chat/completions"]
    if role in ("admin", "annotator"):  # the fuzzer got past the door of every operation of the role
        ours = [label for label in seen if (label in ANNOTATORS_ONLY) == (role == "annotator")]
        stuck = [label for label in ours if {status for status, _ in seen[label]} <= {401, 403, 429}]
        assert not stuck, stuck


def fuzz(operation, mode: GenerationMode, url: str, headers: dict[str, str]) -> set[tuple[int, str]]:
    """Run EXAMPLES generated requests of `operation` through the checks; the (status, media
    type) pairs seen. A fixed seed: the same requests in every checkout (derandomize would seed
    from the test function, whose hash includes the path of the file)."""
    answers: set[tuple[int, str]] = set()

    @seed(SEED)
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case):
        response = case.call_and_validate(base_url=url, headers=headers, checks=CHECKS, timeout=120)
        answers.add((response.status_code, response.headers.get("content-type", [""])[0].split(";")[0]))

    run()
    return answers


def test_the_document_names_every_status_each_operation_can_return(caller):
    url, _, _ = caller
    spec = httpx.get(f"{url}/openapi.json").json()
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert set(chat) >= {"200", "400", "401", "404", "413", "422", "429", "503"}
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    rollback = spec["paths"]["/v1/adapters/rollback"]["post"]["responses"]
    assert {"401", "403", "409", "429"} <= set(rollback)
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                if status.startswith(("4", "5")) and path not in ("/readyz",):
                    schema_ref = answer["content"]["application/json"]["schema"]["$ref"]
                    assert schema_ref.endswith("/ErrorBody"), (method, path, status)


def test_nothing_to_roll_back_is_a_conflict_not_an_outage(client):
    reply = client.post("/v1/adapters/rollback", json={}, headers=ADMIN)
    assert reply.status_code == 409 and reply.json()["error"]["code"] == "nothing_to_roll_back"
    assert "Retry-After" not in reply.headers
