"""Typed dependencies: the app state, the caller's identity, the admin check."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from foundation.models import LoadedModel
from ingest.bus import Bus
from ingest.events import Topics
from ingest.spooled_bus import SpooledBus
from registry import Registry
from serve.engine import Engine
from serve.errors import Forbidden, Unauthorized
from serve.hotswap import HotSwap
from serve.ledger import ResponseLedger
from serve.metrics import ServeMetrics
from serve.settings import ServeSettings


@dataclass
class ServeState:
    """Everything the routes use, built in the app's lifespan."""

    settings: ServeSettings
    loaded: LoadedModel
    engine: Engine
    bus: Bus
    """Where routes publish: the embedded bus, or Kafka behind the spool (then ``spool`` is it too)."""
    topics: Topics
    ledger: ResponseLedger
    registry: Registry
    hotswap: HotSwap
    metrics: ServeMetrics
    spool: SpooledBus | None = None
    """The spooled bus when events go through the local spool (Kafka), else None."""


def get_state(request: Request) -> ServeState:
    return request.app.state.serve


State = Annotated[ServeState, Depends(get_state)]


def user_id(
    x_user_id: Annotated[str | None, Header(max_length=256)] = None,
    x_openwebui_user_id: Annotated[str | None, Header(max_length=256)] = None,
) -> str | None:
    """The pseudonymous user: `X-User-Id`, or Open WebUI's forwarded header; None = anonymous."""
    return x_user_id or x_openwebui_user_id or None


UserId = Annotated[str | None, Depends(user_id)]


def require_admin(state: State, authorization: Annotated[str | None, Header()] = None) -> str:
    """Check the bearer token; returns the actor name recorded in the history."""
    token = state.settings.admin_token
    if token is None:
        raise Forbidden("the admin API is off: start the server with KTO_ADMIN_TOKEN set")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("admin endpoints need 'Authorization: Bearer <KTO_ADMIN_TOKEN>'")
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise Unauthorized("wrong admin token")
    return "admin"


Admin = Annotated[str, Depends(require_admin)]
