"""`create_app(settings)`: the FastAPI app; all state is built in `lifespan`, none at import."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import uvicorn
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from foundation.disk import DiskProbe
from foundation.models import ModelRefused, ensure_demo_model, load_shape, prompt_limit, set_torch_threads
from ingest.bus import Bus, open_bus
from ingest.events import Topics
from ingest.spool import Spool
from ingest.spooled_bus import SpooledBus
from registry import open_registry
from serve import errors
from serve.annotation_queue import open_annotation_queue
from serve.auth import Authenticator, refuse_unsafe_exposure
from serve.credentials import open_key_store
from serve.deps import ServeState
from serve.generation import check_engine, open_engine
from serve.hotswap import HotSwap
from serve.ledger import open_ledger
from serve.ledger_backlog import BackloggedLedger
from serve.metrics import ServeMetrics
from serve.processes import ProcessReport
from serve.rate_limits import RateLimits
from serve.routes import admin, annotation, audit, chat, feedback, health, keys, me, page, retention, rules, users
from serve.scoring import Scorer
from serve.settings import ServeSettings

logger = logging.getLogger(__name__)


def create_app(settings: ServeSettings, *, processes: ProcessReport | None = None) -> FastAPI:
    """``processes``: the status of the processes run beside the server (`kto-loop up` passes its
    supervisor's), reported in /readyz and /metrics; None reports none."""
    refuse_unsafe_exposure(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state = await run_in_threadpool(_build_state, settings)
        state.processes = state.metrics.processes.report = processes
        app.state.serve = state
        state.engine.start()
        await state.hotswap.sync()  # serve the active version from the first request on
        follower = asyncio.create_task(state.hotswap.run(), name="hotswap")
        if settings.admin_token is None and settings.auth == "header":
            logger.warning("admin API is OFF: set KTO_ADMIN_TOKEN to list, activate and roll back versions")
        logger.info(
            "identity: KTO_AUTH=%s, trusted proxies %s", settings.auth, [str(n) for n in settings.trusted_proxies]
        )
        logger.info("serving %s (adapter %s)", settings.base_model_id, state.hotswap.serving or "none")
        try:
            yield
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            state.engine.stop()
            await state.limits.close()
            for closeable in (state.bus, state.ledger, state.annotations, state.registry, state.keys):
                if closeable is not None:
                    closeable.close()

    app = FastAPI(title="kto-loop", version="0.1.0", lifespan=lifespan)
    errors.install(app)
    errors.document(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    # keys before users: DELETE /v1/users/{user:path} would take a key's URL too
    for module in (chat, feedback, annotation, me, admin, retention, audit, health, page, keys, users, rules):
        app.include_router(module.router)
    return app


def check_servable(settings: ServeSettings) -> None:
    """What start-up would refuse (ModelRefused), found from the model's shape alone (its config
    and tokenizer, no weights) before the server starts, so that `kto-loop serve` answers it in
    one line rather than after a failed start-up's traceback. Start-up checks it all again: the
    demo model, and a model not readable here, are checked only there."""
    check_engine(settings.engine)
    if not settings.model:
        return
    try:
        loaded = load_shape(settings.model, model_id=settings.base_model_id)
    except ModelRefused:
        raise
    except Exception:  # e.g. a hub id while offline: start-up reports it as it loads the model
        return
    prompt_limit(loaded, settings.max_prompt_tokens, explicit="max_prompt_tokens" in settings.model_fields_set)


def _build_state(settings: ServeSettings) -> ServeState:
    """Blocking set-up: model, engine, backends. Runs in a thread at start-up."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    set_torch_threads(settings.torch_threads)
    model_path = settings.model or ensure_demo_model(settings.data_dir)
    loaded, engine = open_engine(
        settings.engine,
        str(model_path),
        model_id=settings.base_model_id,
        max_batch=settings.max_batch,
        max_lora_rank=settings.max_lora_rank,
    )
    explicit = "max_prompt_tokens" in settings.model_fields_set
    # In place, not a copy: the routes and the admin API share this one settings object.
    settings.max_prompt_tokens = prompt_limit(loaded, settings.max_prompt_tokens, explicit=explicit)
    topics = Topics(settings.topic_prefix)
    metrics = ServeMetrics()
    disk = metrics.disk.probe = DiskProbe(settings.written_paths(), int(settings.disk_reserve_mb * 2**20))
    registry = open_registry(settings.registry_url, settings.adapter_dir)
    metrics.set_active(None, settings.base_model_id)
    hotswap = HotSwap(
        engine,
        registry,
        metrics,
        base_model=settings.base_model_id,
        max_rank=settings.max_lora_rank,
        poll_s=settings.registry_poll_s,
        replica=settings.replica,
    )
    ledger = BackloggedLedger(open_ledger(settings.resolved_ledger_url(), ttl_s=settings.ledger_ttl_s))
    metrics.watch_ledger(lambda: ledger.backlog)
    queue = open_annotation_queue(
        settings.resolved_annotation_url(), ttl_s=settings.ledger_ttl_s, max_items=settings.annotation_max_items
    )
    metrics.watch_annotations(queue)
    metrics.watch_registry(registry.disk_usage)
    keys = open_key_store(settings.resolved_keys_url()) if settings.auth == "api-key" else None
    auth, limits = Authenticator(settings, keys), RateLimits(settings, metrics)
    # Last, so that no later failure leaves the spool's lock and forwarder thread behind.
    bus, spool = open_event_bus(settings, metrics)
    bus.create_topics(topics.all, settings.topic_partitions)  # the spool defers it until the broker answers
    return ServeState(
        settings,
        loaded,
        engine,
        bus,
        topics,
        ledger,
        registry,
        hotswap,
        metrics,
        auth,
        limits,
        keys,
        spool,
        disk,
        annotations=queue,
        scorer=Scorer(engine),
    )


def open_event_bus(settings: ServeSettings, metrics: ServeMetrics) -> tuple[Bus, SpooledBus | None]:
    """Where events go: Kafka behind the durable local spool (chat and feedback outlive the broker),
    or the embedded bus directly (it is a local durable log already); see ingest.spooled_bus."""
    bus = open_bus(settings.bus_url, timeout_s=settings.bus_timeout_s if settings.spooled else None)
    if not settings.spooled:
        return bus, None
    try:
        spool = Spool(settings.resolved_spool_path(), max_events=settings.spool_max_events)
    except BaseException:
        bus.close()
        raise
    spooled = SpooledBus(bus, spool)
    metrics.watch_spool(spooled.status)
    return spooled, spooled


class BodyLimit:
    """ASGI middleware: 413 for bodies over `limit` bytes, whether or not Content-Length is honest."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            response = errors.error_body(413, f"request body over {self.limit} bytes", "invalid_request_error", "body")
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # an HTTPException, so FastAPI's body parsing passes it on
                raise StarletteHTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


def server_config(
    settings: ServeSettings, app: FastAPI | None = None, *, log_level: str = "info", port: int | None = None
) -> uvicorn.Config:
    """The uvicorn configuration `kto-loop serve` runs `app` (default: a new one) with; tests and
    benchmarks use it too."""
    return uvicorn.Config(
        app if app is not None else create_app(settings),
        host=settings.host,
        port=settings.port if port is None else port,
        log_level=log_level,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=int(settings.keep_alive_s),
    )
