"""Every error the API returns, in one place: domain exceptions mapped to HTTP status codes.

Bodies follow OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so existing
clients show the message. Nothing here matches on message strings. A 503 means that nothing was
recorded and the same request may be sent again: it carries `Retry-After` (seconds). A 507
(`"code": "disk_full"`) means the same, for a server whose disk is full (foundation.disk): any
error caused by a full disk, however it was wrapped, is answered so.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from foundation.disk import is_disk_full
from ingest.bus import BusUnavailable
from ingest.spool import SpoolFull
from registry import (
    CanaryRunning,
    InvalidCanary,
    NoCanary,
    NothingToRollBack,
    RegistryError,
    RegistryUnavailable,
    UnknownVersion,
    VerificationError,
    VersionPruned,
    VersionRejected,
)
from serve.annotation_queue import QueueUnavailable
from serve.credentials import KeysUnavailable
from serve.ledger import LedgerUnavailable, NotResponseOwnerError, UnknownResponseError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with its HTTP status; raise a subclass from the routes."""

    status = 400
    type = "invalid_request_error"
    retry_after_s: int | None = None
    """Seconds to wait before sending the same request again (the Retry-After header)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status, type = 401, "authentication_error"


class Forbidden(ApiError):
    status, type = 403, "permission_error"


class NotFound(ApiError):
    status, type = 404, "not_found_error"


class Conflict(ApiError):
    status, type = 409, "conflict_error"


class Unprocessable(ApiError):
    """Fields each valid alone that do not fit together."""

    status = 422


class PayloadTooLarge(ApiError):
    status = 413


class TooManyRequests(ApiError):
    """A rate limit refused the request; ``retry_after_s`` goes in Retry-After."""

    status, type = 429, "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: int, param: str | None = None):
        super().__init__(message, param=param, code="rate_limit_exceeded")
        self.retry_after_s = retry_after_s

    @classmethod
    def of(cls, exceeded, what: str) -> TooManyRequests:
        return cls(
            f"{what}: {exceeded.limit} per {exceeded.by}; retry in {exceeded.retry_after_s} s",
            retry_after_s=exceeded.retry_after_s,
        )


class Unavailable(ApiError):
    """A backend cannot take the write now; nothing was recorded. ``retry_after_s`` goes in Retry-After."""

    status, type = 503, "service_unavailable"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, retry_after_s: int = 5):
        super().__init__(message, param=param, code=code)
        self.retry_after_s = retry_after_s


class InsufficientStorage(ApiError):
    """The server's disk is full; nothing was recorded. ``retry_after_s`` goes in Retry-After."""

    status, type, retry_after_s = 507, "insufficient_storage", 30

    def __init__(self, message: str = "the server's disk is full; nothing was recorded, try again later") -> None:
        super().__init__(message, code="disk_full")


def unavailable(exc: Exception, fallback: str) -> ApiError:
    """The 503 for a backend failure: what the domain exception says, or ``fallback`` for others;
    the 507 when a full disk caused it."""
    if is_disk_full(exc):
        return InsufficientStorage()
    if isinstance(exc, SpoolFull):
        # The broker has been away long enough to fill the spool: not a matter of seconds.
        return Unavailable(f"{exc}; nothing was recorded, try again later", code="spool_full", retry_after_s=30)
    if isinstance(exc, BusUnavailable):
        return Unavailable("event log unavailable; nothing was recorded, try again", code="bus_unavailable")
    if isinstance(exc, QueueUnavailable):
        return Unavailable("annotation queue unavailable; nothing was recorded, try again", code="queue_unavailable")
    if isinstance(exc, LedgerUnavailable):
        return Unavailable("response ledger unavailable; nothing was recorded, try again", code="ledger_unavailable")
    return Unavailable(fallback)


def error_body(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        status_code=status,
        headers=headers,
    )


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else {}
        if exc.status == 401:  # RFC 6750: say which scheme would be accepted
            headers["WWW-Authenticate"] = 'Bearer realm="kto-loop"'
        return error_body(exc.status, exc.message, exc.type, exc.param, exc.code, headers or None)

    def or_disk_full(handler):
        """``handler``, unless a full disk caused the error: then the 507, whoever wrapped it."""

        async def handle(request: Request, exc: Exception):
            if is_disk_full(exc):
                logger.error("%s %s: the disk is full: %s", request.method, request.url.path, exc)
                return await _api(request, InsufficientStorage())
            return await handler(request, exc)

        return handle

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_body(400, "request body is not valid JSON", "invalid_request_error", "body", "invalid_json")
        first = errors[0]
        field = _field(tuple(first.get("loc", ())))
        details = "; ".join(f"{_field(tuple(e.get('loc', ())))}: {e.get('msg')}" for e in errors[:5])
        return error_body(422, details, "invalid_request_error", field, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        return error_body(exc.status_code, message, "invalid_request_error")

    @app.exception_handler(UnknownVersion)
    async def _unknown(request: Request, exc: UnknownVersion):
        if isinstance(exc, VersionPruned):
            return error_body(404, str(exc), "not_found_error", "version", "version_pruned")
        return error_body(404, f"unknown adapter version {exc.version!r}", "not_found_error", "version")

    @app.exception_handler(VersionRejected)
    async def _rejected(request: Request, exc: VersionRejected):
        return error_body(409, f"version {exc.version} was rejected: {exc.reason}", "conflict_error", "version")

    @app.exception_handler(VerificationError)
    async def _unverified(request: Request, exc: VerificationError):
        return error_body(409, f"version {exc.version} failed verification: {exc.reason}", "conflict_error", "version")

    @app.exception_handler(NoCanary)
    async def _no_canary(request: Request, exc: NoCanary):
        return error_body(409, str(exc), "conflict_error", "version", "no_canary")

    @app.exception_handler(CanaryRunning)
    async def _canary_running(request: Request, exc: CanaryRunning):
        return error_body(
            409,
            f"a canary of {exc.version} runs already; promote or roll it back first",
            "conflict_error",
            "version",
            "canary_running",
        )

    @app.exception_handler(InvalidCanary)
    async def _invalid_canary(request: Request, exc: InvalidCanary):
        return error_body(409, f"no canary of {exc.version}: {exc.reason}", "conflict_error", "version")

    @app.exception_handler(NothingToRollBack)
    async def _nothing_to_roll_back(request: Request, exc: NothingToRollBack):
        # The registry's state, not its health: retrying will not help, so not a 503.
        return error_body(409, str(exc), "conflict_error", code="nothing_to_roll_back")

    @app.exception_handler(RegistryUnavailable)
    @or_disk_full
    async def _registry_down(request: Request, exc: RegistryUnavailable):
        logger.error("registry unavailable: %s", exc)
        return error_body(
            503, f"adapter registry unavailable: {exc}", "service_unavailable", headers={"Retry-After": "5"}
        )

    @app.exception_handler(RegistryError)
    @or_disk_full
    async def _registry(request: Request, exc: RegistryError):
        # Every other refusal the registry raises on purpose is about the state it is in.
        logger.warning("registry refused %s %s: %s", request.method, request.url.path, exc)
        return error_body(409, str(exc), "conflict_error")

    @app.exception_handler(BusUnavailable)
    @app.exception_handler(LedgerUnavailable)
    @app.exception_handler(QueueUnavailable)
    async def _backend(request: Request, exc: Exception):
        logger.error("%s %s: %s", request.method, request.url.path, exc)
        return await _api(request, unavailable(exc, "a backend is unavailable; try again"))

    @app.exception_handler(OSError)
    @app.exception_handler(sqlite3.Error)
    @app.exception_handler(KeysUnavailable)
    @or_disk_full
    async def _io(request: Request, exc: Exception):
        # Not a full disk: an unexpected error (the 500 below), with its traceback in the log.
        raise exc

    @app.exception_handler(UnknownResponseError)
    async def _unknown_response(request: Request, exc: UnknownResponseError):
        return error_body(
            404, f"no response {str(exc)!r} (unknown, or too old to rate)", "not_found_error", "response_id"
        )

    @app.exception_handler(NotResponseOwnerError)
    async def _not_owner(request: Request, exc: NotResponseOwnerError):
        return error_body(403, "only the user who received a response may rate it", "permission_error", "response_id")

    @app.exception_handler(Exception)
    @or_disk_full  # the handlers above see most full disks; this one whatever other error one caused
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_body(500, "internal error", "internal_error")


# ---- the contract: what the OpenAPI document says each operation may answer ----


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error's body, as OpenAI shapes it."""

    error: ErrorDetail


_MEANING = {
    400: "Malformed: the body is not JSON, or asks for more than the server allows (prompt, max_tokens).",
    401: "No valid credential: missing, unknown, revoked, expired or badly signed (KTO_AUTH decides which count).",
    403: "The credential is valid but not allowed this: not an admin, or not the user who received the response.",
    404: "No such thing: model, adapter version, response (or too old to rate), or key.",
    409: "Not in this state: a rejected or unloadable version, no canary or one running already, nothing to roll back.",
    413: "The request body is over KTO_MAX_BODY_BYTES.",
    422: "A field is missing or invalid; `param` names it.",
    429: "A rate limit (per user, per address, or of failed authentications) was reached; retry after Retry-After.",
    503: "A backend cannot take this now and nothing was recorded; send the same request again after Retry-After.",
    507: "The server's disk is full (code disk_full) and nothing was recorded; send it again after Retry-After.",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer", "minimum": 1}}}
AUTHENTICATED = (401, 429, 503)
"""What identifying the caller may answer: every operation but health, metrics and the page."""


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route or router: these error statuses, each with its meaning and body."""
    documented: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        documented[code] = {"model": ErrorBody, "description": _MEANING[code]}
        if code in (429, 503, 507):
            documented[code]["headers"] = _RETRY_AFTER
    return documented


def document(app: FastAPI) -> None:
    """Make the OpenAPI document tell the statuses FastAPI cannot see: 422 with our error body
    (not FastAPI's `detail` list), 400 wherever a JSON body is read, 413 everywhere (the body
    limit is a middleware)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            error = {"$ref": "#/components/schemas/ErrorBody"}
            for operations in spec["paths"].values():
                for operation in operations.values():
                    answers = operation["responses"]
                    needs = [422] if "422" in answers else []
                    needs += [400] if "requestBody" in operation else []
                    for code in [*needs, 413]:
                        answers[str(code)] = {
                            "description": _MEANING[code],
                            "content": {"application/json": {"schema": error}},
                        }
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            body = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in {**body.pop("$defs", {}), "ErrorBody": body}.items():
                schemas.setdefault(name, sub)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
