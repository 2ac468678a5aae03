"""Settings every process shares: where data lives, which model, which backends.

Each process has one settings class (`serve.settings.ServeSettings`,
`learner.settings.LearnerSettings`) built on this base; all read `KTO_*` environment variables,
are validated at start-up, and nothing else reads the environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from foundation import urls


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KTO_", extra="ignore", validate_default=True)

    data_dir: Path = Path("./data")
    """Directory for every embedded file: event log, registry, adapters, demo model."""

    model: str | None = None
    """Base model: a local directory or a hub id. None builds the offline demo model in data_dir."""

    model_id: str | None = None
    """Name the base model is served and recorded under. Default: `model`, or `kto-loop-demo`."""

    bus_url: str = ""
    """Event bus: `sqlite:///path` (embedded, default `<data_dir>/bus.sqlite3`) or `kafka://host:port`."""

    registry_url: str = ""
    """Adapter registry: `sqlite:///path` (embedded, default `<data_dir>/registry/registry.sqlite3`)
    or `redis://host:port/db[?prefix=kto:registry:]` (keys under the prefix; see registry.redis_keys)."""

    adapter_dir: Path | None = None
    """Where adapter files live (a path all replicas share). Default: beside the registry database
    for sqlite://; `<data_dir>/adapters` for redis://, which is right only when data_dir is shared."""

    torch_threads: int | None = Field(None, ge=1)
    """Intra-op CPU threads for torch; unset keeps torch's default (one per core). On a small CPU
    model shared with other processes, 1 is often fastest: thread hand-offs cost more than the math."""

    topic_prefix: str = Field("kto", pattern=r"^[A-Za-z0-9._-]+$")
    """Prefix of the bus topics: `<prefix>.responses`, `<prefix>.feedback`, `<prefix>.dead-letters`."""

    topic_partitions: int = Field(1, ge=1)
    """Partitions of each topic when this process creates it (topics that exist are left as they
    are). More partitions spread a large Kafka deployment's events over brokers; one learner reads
    them all, and a response and its ratings share a partition (keyed by response_id)."""

    disk_reserve_mb: float = Field(64.0, ge=0)
    """Free space kept back on each disk this process writes (MiB; at most 5% of a small disk):
    below it chat and feedback answer 507, /readyz 503, and the learner waits (foundation.disk)."""

    rollback_depth: int = Field(3, ge=0)
    """Retention: how many steps of the rollback stack keep their adapter files, so that this
    many plain rollbacks in a row still land on a loadable version (registry.retention)."""

    retention_grace_s: float = Field(60.0, ge=0)
    """Retention: a ready version newer than what serves, that no other rule keeps (active,
    canary, pinned, the stack's depth, the newest), keeps its files this long after its publish."""

    @field_validator("model", "model_id", "adapter_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        # `KTO_MODEL=` (as compose files write an unset variable) means "not set", not "".
        return None if value == "" else value

    @field_validator("bus_url", "registry_url", mode="before")
    @classmethod
    def _none_is_unset(cls, value):
        # A URL's "not set" is "", filled from data_dir below, so a validated URL is always a str.
        return "" if value is None else value

    @model_validator(mode="after")
    def _fill_defaults(self):
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.bus_url:
            self.bus_url = f"sqlite:///{self.data_dir / 'bus.sqlite3'}"
        if not self.registry_url:
            self.registry_url = f"sqlite:///{self.data_dir / 'registry' / 'registry.sqlite3'}"
        if self.adapter_dir is None and urls.names(self.registry_url) == "redis":
            self.adapter_dir = self.data_dir / "adapters"  # Redis holds no files
        for name in ("bus_url", "registry_url"):
            url = getattr(self, name)
            if "://" not in url:
                raise ValueError(f"{name} must be a URL like sqlite:///path, got {url!r}")
        return self

    def written_paths(self) -> list[Path]:
        """Where this process writes: the data directory, the embedded bus and registry, the adapters."""
        paths = [self.data_dir]
        for url in (self.bus_url, self.registry_url):
            if urls.names(url) == "sqlite":
                paths.append(urls.sqlite_path(url).parent)
        return paths + ([self.adapter_dir] if self.adapter_dir is not None else [])

    @property
    def base_model_id(self) -> str:
        from foundation.models import DEMO_MODEL_ID

        return self.model_id or self.model or DEMO_MODEL_ID
