"""The server's settings (`KTO_*` environment variables, validated at start-up)."""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field, SecretStr, field_validator

from foundation import urls
from foundation.settings import CommonSettings
from foundation.urls import redis_url


class ServeSettings(CommonSettings):
    host: str = "127.0.0.1"
    """Address to listen on."""

    port: int = Field(8000, ge=0, le=65535)
    """TCP port to listen on."""

    admin_token: SecretStr | None = None
    """Bearer token for the admin API; unset turns the admin API off."""

    served_model_name: str = "kto-loop"
    """Model name that means "whatever version is active now" (listed first in /v1/models)."""

    max_batch: int = Field(16, ge=1, le=256)
    """Most sequences decoded together in one step (sequences)."""

    default_max_tokens: int = Field(128, ge=1)
    """Tokens generated when a request gives no max_tokens (tokens)."""

    max_tokens_limit: int = Field(1024, ge=1)
    """Largest max_tokens a request may ask for (tokens)."""

    max_prompt_tokens: int = Field(2048, ge=1)
    """Longest prompt accepted, after the chat template (tokens)."""

    keep_alive_s: float = Field(75.0, gt=0)
    """How long an idle client connection is kept open (seconds). Longer than clients keep theirs
    (httpx and the openai client: 5 s; load balancers: 60 s), so that the client closes first: a
    server that closes as a client reuses the connection resets that request."""

    max_body_bytes: int = Field(1_000_000, ge=1024)
    """Largest request body accepted (bytes); larger ones get 413."""

    max_lora_rank: int = Field(256, ge=1)
    """Adapters with a larger LoRA rank are refused (rank)."""

    registry_poll_s: float = Field(0.2, gt=0)
    """How often the active-version pointer is read (seconds)."""

    ledger_url: str | None = None
    """Where feedback checks look up responses: `sqlite:///path` or `redis://host:port/db`.
    Default: the registry's Redis server (under the ledger's own `kto:ledger:` keys) when
    `registry_url` is `redis://…` or `rediss://…` (replicas must share the ledger, since a rating
    may reach another replica than the one that answered), else `<data_dir>/ledger.sqlite3`."""

    ledger_ttl_s: float = Field(7 * 24 * 3600, gt=0)
    """How long a response can be rated after it was served (seconds)."""

    bus_timeout_s: float = Field(10.0, gt=0)
    """How long one request to Kafka may take before it counts as failed (seconds). Requests to
    this server never wait for it: they write to the spool, and the spool's forwarder waits."""

    spool_path: Path | None = None
    """With Kafka, the durable local spool of events waiting for the broker (a SQLite file, one per
    server process; default `<data_dir>/spool.sqlite3`). Unused with the embedded bus, which is a
    local durable log itself."""

    spool_max_events: int = Field(100_000, ge=1)
    """Most events the spool holds while Kafka is unreachable (events). When it is full, chat and
    feedback answer 503 rather than lose anything."""

    replica: str = Field(default_factory=socket.gethostname)
    """This replica's name, recorded as the actor of the changes it makes."""

    @field_validator("ledger_url", "spool_path", mode="before")
    @classmethod
    def _blank_is_unset(cls, value):
        return None if value == "" else value

    @property
    def spooled(self) -> bool:
        """Whether events go through the spool: for every bus but the embedded one."""
        return urls.names(self.bus_url) != "sqlite"

    def resolved_spool_path(self) -> Path:
        return self.spool_path or self.data_dir / "spool.sqlite3"

    def resolved_ledger_url(self) -> str:
        if self.ledger_url:
            return self.ledger_url
        if urls.names(self.registry_url) == "redis":
            # The same server, under the ledger's own keys (the registry's prefix= is not for it).
            client_url, _, _ = redis_url(self.registry_url, "unused")
            return client_url
        return f"sqlite:///{self.data_dir / 'ledger.sqlite3'}"
