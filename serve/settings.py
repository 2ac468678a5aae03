"""The server's settings (`KTO_*` environment variables, validated at start-up)."""

from __future__ import annotations

import socket

from pydantic import Field, SecretStr

from kto_loop.settings import CommonSettings


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

    max_body_bytes: int = Field(1_000_000, ge=1024)
    """Largest request body accepted (bytes); larger ones get 413."""

    max_lora_rank: int = Field(256, ge=1)
    """Adapters with a larger LoRA rank are refused (rank)."""

    registry_poll_s: float = Field(0.2, gt=0)
    """How often the active-version pointer is read (seconds)."""

    ledger_url: str | None = None
    """Where feedback checks look up responses: `sqlite:///path` (default `<data_dir>/ledger.sqlite3`)."""

    ledger_ttl_s: float = Field(7 * 24 * 3600, gt=0)
    """How long a response can be rated after it was served (seconds)."""

    replica: str = Field(default_factory=socket.gethostname)
    """This replica's name, recorded as the actor of the changes it makes."""

    def resolved_ledger_url(self) -> str:
        return self.ledger_url or f"sqlite:///{self.data_dir / 'ledger.sqlite3'}"
