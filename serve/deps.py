"""Typed dependencies: the app state, the verified caller, rate limits, the admin check."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Annotated, NoReturn

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from foundation.disk import DiskProbe
from foundation.models import LoadedModel
from ingest.bus import Bus
from ingest.events import Topics
from ingest.spooled_bus import SpooledBus
from registry import Registry
from serve.annotation_queue import AnnotationQueue
from serve.auth import Authenticator, BadCredential, Caller, KeysUnreachable, MissingCredential
from serve.credentials import KeyStore, KeysUnavailable
from serve.errors import Forbidden, TooManyRequests, Unauthorized, Unavailable
from serve.generation import GenerationEngine
from serve.hotswap import HotSwap
from serve.ledger import ResponseLedger
from serve.metrics import ServeMetrics
from serve.processes import ProcessReport
from serve.rate_limits import Exceeded, RateLimits
from serve.scoring import Scorer
from serve.settings import ServeSettings

logger = logging.getLogger(__name__)


@dataclass
class ServeState:
    """Everything the routes use, built in the app's lifespan."""

    settings: ServeSettings
    loaded: LoadedModel
    engine: GenerationEngine
    bus: Bus
    """Where routes publish: the embedded bus, or Kafka behind the spool (then ``spool`` is it too)."""
    topics: Topics
    ledger: ResponseLedger
    registry: Registry
    hotswap: HotSwap
    metrics: ServeMetrics
    auth: Authenticator
    limits: RateLimits
    keys: KeyStore | None = None
    """The API key store, in `KTO_AUTH=api-key` mode only."""
    spool: SpooledBus | None = None
    """The spooled bus when events go through the local spool (Kafka), else None."""
    disk: DiskProbe = field(default_factory=lambda: DiskProbe([], 0))
    """Free space where this server writes (`create_app` sets it; the default probes nothing)."""
    processes: ProcessReport | None = None
    """The processes run beside this server (`kto-loop up`), None under plain `serve`."""
    annotations: AnnotationQueue | None = None
    """Where answers wait for annotators (`create_app` sets it)."""
    scorer: Scorer | None = None
    """Log-ratios of served answers, for the `uncertain` annotation strategy."""
    queue_paused_until: float = 0.0
    """Monotonic seconds until which answers are not offered to the queue (it just failed)."""


async def get_state(request: Request) -> ServeState:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a hop per request for nothing
    return request.app.state.serve


State = Annotated[ServeState, Depends(get_state)]


async def identify(request: Request, state: State) -> Caller:
    """The verified caller (serve.auth); 401 for a missing or bad credential, 429 once the
    client's address used up its failed authentications, 503 when keys cannot be checked."""
    auth, limits, metrics = state.auth, state.limits, state.metrics
    headers = request.headers
    peer = request.client.host if request.client else ""
    address, proxy = auth.client_address(peer, headers.get("x-forwarded-for"))
    if auth.mode != "header" or "authorization" in headers:
        exceeded = await limits.failures_exceeded(address)
        if exceeded:
            await refuse(state, exceeded, "too many failed authentications from this address")
    try:
        if auth.mode == "header":
            return auth.identify(peer, headers, address, proxy)
        return await run_in_threadpool(auth.identify, peer, headers, address, proxy)
    except MissingCredential as exc:
        metrics.auth_failures.labels(reason="missing").inc()
        raise Unauthorized(str(exc), code="missing_credential") from None
    except BadCredential as exc:
        metrics.auth_failures.labels(reason=exc.reason).inc()
        await limits.failed(address)
        raise Unauthorized(str(exc), code=exc.reason) from None
    except (KeysUnavailable, KeysUnreachable) as exc:
        logger.error("cannot check a credential: %s", exc)
        raise Unavailable("credentials cannot be checked now; try again", code="auth_unavailable") from None


Identified = Annotated[Caller, Depends(identify)]


async def refuse(state: ServeState, exceeded: Exceeded, what: str) -> NoReturn:
    """The 429, after holding the request for KTO_RATE_LIMIT_DELAY_S (at most its Retry-After):
    a client that sends again as soon as it is answered (most floods do) then sends about one
    request a second per connection instead of thousands, and waiting costs this server nothing,
    where refusing costs it a millisecond of CPU each time."""
    await asyncio.sleep(min(state.settings.rate_limit_delay_s, exceeded.retry_after_s))
    raise TooManyRequests.of(exceeded, what)


def limited(scope: str):
    """A dependency: the verified caller, counted against `scope`'s limits (429 past them)."""

    async def dependency(state: State, caller: Identified) -> Caller:
        exceeded = await state.limits.hit(scope, caller)
        if exceeded:
            await refuse(state, exceeded, f"{scope} rate limit reached")
        return caller

    return dependency


ChatCaller = Annotated[Caller, Depends(limited("chat"))]
FeedbackCaller = Annotated[Caller, Depends(limited("feedback"))]


async def require_annotator(caller: Annotated[Caller, Depends(limited("feedback"))]) -> str:
    """A caller with the annotator role (not admin: an annotator's rights are separate), within
    the feedback limits; returns the annotator's name, as recorded with their labels."""
    if caller.role != "annotator" or caller.user is None:
        raise Forbidden(f"{caller.name!r} is not an annotator: this needs a credential with the annotator role")
    return caller.user


Annotator = Annotated[str, Depends(require_annotator)]


async def require_admin(request: Request, state: State, caller: Identified) -> str:
    """An admin credential, within the admin limits; returns the actor recorded in the history."""
    if caller.role != "admin":
        if state.auth.mode != "header":
            state.metrics.auth_failures.labels(reason="forbidden").inc()
            raise Forbidden(f"{caller.name!r} is not an admin: this needs a credential with the admin role")
        if state.settings.admin_token is None:
            raise Forbidden("the admin API is off: start the server with KTO_ADMIN_TOKEN set")
        if "authorization" not in request.headers:
            state.metrics.auth_failures.labels(reason="missing").inc()
            raise Unauthorized(
                "admin endpoints need 'Authorization: Bearer <KTO_ADMIN_TOKEN>'", code="missing_credential"
            )
        state.metrics.auth_failures.labels(reason="bad_admin_token").inc()
        await state.limits.failed(caller.address)
        raise Unauthorized("wrong admin token", code="bad_admin_token")
    exceeded = await state.limits.hit("admin", caller)
    if exceeded:
        await refuse(state, exceeded, "admin rate limit reached")
    return caller.name


Admin = Annotated[str, Depends(require_admin)]
