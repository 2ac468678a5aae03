"""The server's settings (`KTO_*` environment variables, validated at start-up)."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Annotated, Literal

from limits import parse_many
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from foundation import urls
from foundation.settings import CommonSettings
from foundation.urls import redis_url
from registry.redis_keys import DEFAULT_PREFIX as DEFAULT_REGISTRY_PREFIX
from serve.annotation_strategies import Strategy

DEFAULT_GUIDELINES = (
    "Would a helpful, honest assistant have given this answer to this conversation? "
    "👍 if yes, 👎 if it is wrong, unhelpful, rude or unsafe. Judge the last answer only. "
    "Skip when you cannot tell."
)


class ServeSettings(CommonSettings):
    host: str = "127.0.0.1"
    """Address to listen on."""

    port: int = Field(8000, ge=0, le=65535)
    """TCP port to listen on."""

    admin_token: SecretStr | None = None
    """The operator's bearer token: an admin credential in every auth mode (its actor in the
    history is "admin"). Unset, only the mode's own admin credentials reach the admin API."""

    # ---- identity (serve.auth says what each mode believes) ----

    auth: Literal["header", "api-key", "jwt"] = "header"
    """How a caller's identity is verified: `header` (X-User-Id from a trusted proxy), `api-key`
    (per-user keys issued by an admin), or `jwt` (bearer tokens signed by your identity provider)."""

    trusted_proxies: Annotated[list[ipaddress.IPv4Network | ipaddress.IPv6Network], NoDecode] = Field(
        default_factory=lambda: [ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128")]
    )
    """Addresses or CIDR ranges (comma-separated) whose identity headers and X-Forwarded-For are
    believed; loopback by default. Callers from anywhere else are anonymous in `header` mode."""

    allow_header_auth_without_proxy: bool = False
    """Let `header` mode listen on a non-loopback address with KTO_TRUSTED_PROXIES unset (every
    remote caller is then anonymous: it may chat but not rate). Refused at start-up otherwise."""

    jwt_secret: SecretStr | None = None
    """`jwt` mode: the shared secret of HMAC-signed tokens (HS256/384/512)."""

    jwt_jwks: str | None = None
    """`jwt` mode: the identity provider's public keys, a JWKS file path or an http(s) URL
    (fetched when a token names a key not seen yet, and every 5 minutes)."""

    jwt_algorithms: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Accepted signing algorithms (comma-separated). Default: HS256 with a secret, RS256 and
    ES256 with a JWKS. `none` is never accepted."""

    jwt_issuer: str | None = None
    """`jwt` mode: the required `iss` claim (required setting)."""

    jwt_audience: str | None = None
    """`jwt` mode: the required `aud` claim (required setting)."""

    jwt_user_claim: str = "sub"
    """The claim that names the user."""

    jwt_role_claim: str = "roles"
    """The claim holding the caller's roles (a string or a list; `admin`, `annotator`; anything
    else is a plain user). A dotted path reaches into objects, e.g. `realm_access.roles`."""

    jwt_leeway_s: float = Field(30.0, ge=0)
    """Clock skew allowed on `exp` and `nbf` (seconds)."""

    keys_url: str | None = None
    """`api-key` mode: where key hashes are kept. Default: the registry's backend (its Redis
    server under `kto:keys:`, or `keys.sqlite3` beside the registry's SQLite file), so every
    replica sees a new or revoked key on its next request."""

    # ---- rate limits (serve.rate_limits): `N/second|minute|hour`, `;` between several, "" for none ----

    rate_limit_chat: str = "120/minute"
    """Chat completions per user."""

    rate_limit_chat_address: str = "600/minute"
    """Chat completions per client address (not applied to KTO_TRUSTED_PROXIES themselves)."""

    rate_limit_feedback: str = "300/minute"
    """Ratings per user."""

    rate_limit_feedback_address: str = "1200/minute"
    """Ratings per client address."""

    rate_limit_admin: str = "300/minute"
    """Admin calls per admin credential."""

    rate_limit_admin_address: str = "300/minute"
    """Admin calls per client address."""

    rate_limit_auth_failures: str = "20/minute"
    """Failed authentications per client address; past it, every credential from there is refused
    with 429 until the window passes (so keys and tokens cannot be guessed)."""

    rate_limit_delay_s: float = Field(1.0, ge=0)
    """How long a request over a limit is held before its 429 (seconds, at most its Retry-After):
    a client that floods back to back is slowed to about one request a second per connection, at
    no CPU cost here. 0 answers at once."""

    rate_limit_url: str | None = None
    """Where the counters live: the registry's Redis server when the registry is on Redis (shared
    by every replica), else this process's memory. `memory://` or `redis://…` to choose."""

    served_model_name: str = "kto-loop"
    """Model name that means "whatever version is active now" (listed first in /v1/models)."""

    engine: Literal["auto", "builtin", "vllm"] = "auto"
    """What generates: `builtin` (continuous batching on the Hugging Face model, CPU or GPU),
    `vllm` (NVIDIA GPUs; installed with `uv sync --extra vllm --no-dev`), or `auto`: vLLM where
    it is installed and a GPU is present, the built-in engine elsewhere (serve.generation)."""

    max_batch: int = Field(16, ge=1, le=256)
    """Most sequences decoded together in one step (sequences)."""

    default_max_tokens: int = Field(128, ge=1)
    """Tokens generated when a request gives no max_tokens (tokens)."""

    max_tokens_limit: int = Field(1024, ge=1)
    """Largest max_tokens a request may ask for (tokens)."""

    max_prompt_tokens: int = Field(2048, ge=1)
    """Longest prompt accepted, after the chat template (tokens). Left unset, it is lowered to the
    model's context where that is shorter (GPT-2: 1024); set above the context, start-up refuses."""

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

    # ---- the annotation queue (serve.annotation_queue) ----

    annotation_url: str | None = None
    """Where answers wait for annotators: `sqlite:///path` or `redis://host:port/db`. Default: the
    registry's Redis server under `kto:annotations:` when the registry is on Redis (replicas share
    one queue), else `<data_dir>/annotations.sqlite3`. Items leave it after `ledger_ttl_s`."""

    annotation_share: float = Field(1.0, ge=0, le=1)
    """Share of the answers users receive that are offered to annotators (0: none, the queue stays empty)."""

    annotation_strategy: Strategy = "canary"
    """Which answer an annotator sees next: `uniform`, `newest`, `canary` (the running canary's arms,
    the one with less evidence first; newest without a canary) or `uncertain` (where the serving
    policy's implicit reward is nearest KTO's reference point); serve.annotation_strategies. An
    admin may change it at run time (`PUT /v1/annotations/config`)."""

    annotation_overlap: float = Field(0.1, ge=0, le=1)
    """Share of answers that go to two annotators, for the agreement figure (fraction)."""

    annotation_lease_s: float = Field(900.0, gt=0)
    """How long an annotator holds the answer they were given before others may take it (seconds)."""

    annotation_max_items: int = Field(10_000, ge=1)
    """Most answers the queue keeps; past it the oldest nobody annotated leave first (answers)."""

    annotation_guidelines: str = Field(DEFAULT_GUIDELINES, max_length=4000)
    """What annotators are told on the page; an admin may change it at run time."""

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

    @field_validator(
        "ledger_url", "annotation_url", "spool_path", "keys_url", "rate_limit_url", "jwt_jwks", mode="before"
    )
    @classmethod
    def _blank_is_unset(cls, value):
        return None if value == "" else value

    @field_validator("jwt_algorithms", mode="before")
    @classmethod
    def _comma_list(cls, value):
        return _split(value) if isinstance(value, str) else value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value):
        # A bare address is its own /32 (/128); strict=False accepts "10.0.0.7/24" as its network.
        value = _split(value) if isinstance(value, str) else value
        return [ipaddress.ip_network(v, strict=False) if isinstance(v, str) else v for v in value]

    @field_validator("jwt_algorithms")
    @classmethod
    def _no_none(cls, value: list[str]) -> list[str]:
        if any(a.lower() == "none" for a in value):
            raise ValueError("'none' is not a signing algorithm: unsigned tokens are never accepted")
        return value

    @field_validator(
        "rate_limit_chat",
        "rate_limit_chat_address",
        "rate_limit_feedback",
        "rate_limit_feedback_address",
        "rate_limit_admin",
        "rate_limit_admin_address",
        "rate_limit_auth_failures",
    )
    @classmethod
    def _rate(cls, value: str) -> str:
        if value.strip():
            parse_many(value)  # ValueError naming the string: e.g. "120/minute" or "5/second;100/hour"
        return value.strip()

    @model_validator(mode="after")
    def _jwt_complete(self) -> ServeSettings:
        if self.auth != "jwt":
            return self
        missing = [f"KTO_{n.upper()}" for n in ("jwt_issuer", "jwt_audience") if not getattr(self, n)]
        if not (self.jwt_secret or self.jwt_jwks):
            missing.append("KTO_JWT_SECRET or KTO_JWT_JWKS")
        if missing:
            raise ValueError(f"KTO_AUTH=jwt needs {', '.join(missing)}")
        return self

    def resolved_keys_url(self) -> str:
        if self.keys_url:
            return self.keys_url
        if urls.names(self.registry_url) == "redis":
            return self._beside_registry("keys")
        return urls.sqlite_url(urls.sqlite_path(self.registry_url).parent / "keys.sqlite3")

    def resolved_rate_limit_url(self) -> str:
        if self.rate_limit_url:
            return self.rate_limit_url
        return self._beside_registry("limits") if urls.names(self.registry_url) == "redis" else "memory://"

    def _beside_registry(self, name: str) -> str:
        """The registry's Redis server, under `kto:<name>:`, or `<prefix><name>:` when the registry
        has its own prefix (deployments sharing one Redis stay apart)."""
        _, prefix, _ = redis_url(self.registry_url, DEFAULT_REGISTRY_PREFIX)
        ours = f"kto:{name}:" if prefix == DEFAULT_REGISTRY_PREFIX else f"{prefix}{name}:"
        return urls.with_prefix(self.registry_url, ours)

    @property
    def spooled(self) -> bool:
        """Whether events go through the spool: for every bus but the embedded one."""
        return urls.names(self.bus_url) != "sqlite"

    def resolved_spool_path(self) -> Path:
        return self.spool_path or self.data_dir / "spool.sqlite3"

    def written_paths(self) -> list[Path]:
        """The common ones, and the embedded ledger and the spool (foundation.disk probes them)."""
        embedded = [
            url for url in (self.resolved_ledger_url(), self.resolved_annotation_url()) if urls.names(url) == "sqlite"
        ]
        return [
            *super().written_paths(),
            *(urls.sqlite_path(url).parent for url in embedded),
            *([self.resolved_spool_path().parent] if self.spooled else []),
        ]

    def resolved_annotation_url(self) -> str:
        if self.annotation_url:
            return self.annotation_url
        if urls.names(self.registry_url) == "redis":
            return self._beside_registry("annotations")
        return f"sqlite:///{self.data_dir / 'annotations.sqlite3'}"

    def resolved_ledger_url(self) -> str:
        if self.ledger_url:
            return self.ledger_url
        if urls.names(self.registry_url) == "redis":
            # The same server, under the ledger's own keys (the registry's prefix= is not for it).
            client_url, _, _ = redis_url(self.registry_url, "unused")
            return client_url
        return f"sqlite:///{self.data_dir / 'ledger.sqlite3'}"


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]
