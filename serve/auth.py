"""Who is calling: the identity the server verified, by the mode in `KTO_AUTH`.

- `header` (the default, for a trusted front end): `X-User-Id` (or Open WebUI's
  `X-OpenWebUI-User-Id`) names the user and `X-User-Role: annotator` grants that role, believed
  only when the connection comes from `KTO_TRUSTED_PROXIES` (loopback by default, so `make run`
  and a proxy on the same host work). From anywhere else those headers are ignored and the caller
  is anonymous: it may chat, and nobody may rate an anonymous answer.
- `api-key`: `Authorization: Bearer <key>`, a key an admin issued to a user with a role
  (serve.credentials). Every API call needs one.
- `jwt`: `Authorization: Bearer <token>` signed by your identity provider, checked with PyJWT
  against `KTO_JWT_SECRET` or the JWKS at `KTO_JWT_JWKS`; signature, `exp`, `iss` and `aud` must
  hold. The user is the `KTO_JWT_USER_CLAIM` claim, roles come from `KTO_JWT_ROLE_CLAIM`.
  Every API call needs one.

In every mode `Authorization: Bearer <KTO_ADMIN_TOKEN>` is the operator's admin credential,
named "admin". Admin rights never come from a header a proxy sets.

The client address (for per-address limits) is the connection's peer, or, when that peer is a
trusted proxy, the nearest address in `X-Forwarded-For` that is not one.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from serve.credentials import KeyStore, Role, digest
from serve.settings import ServeSettings

logger = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
USER_HEADERS = ("x-user-id", "x-openwebui-user-id")
ROLE_HEADER = "x-user-role"
HEADER_ROLES: tuple[Role, ...] = ("user", "annotator")  # a proxy header never makes an admin
ADMIN_NAME = "admin"
MAX_USER_CHARS = 256


@dataclass(frozen=True)
class Caller:
    """One request's verified caller."""

    user: str | None
    """The user every per-user rule keys on; None is anonymous (may chat, may not rate)."""
    role: Role
    name: str
    """The credential's name: the actor recorded for what it changes, the key of its rate limits."""
    address: str
    """The client's address (see the module docstring)."""
    proxy: bool = False
    """The address is a trusted proxy's own (it forwarded no client): exempt from per-address limits."""


class BadCredential(Exception):
    """A credential was presented and is not valid; the message says why (never the credential)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason
        """A metric label: bad_admin_token, bad_key, bad_token, bad_header."""


class MissingCredential(Exception):
    """The mode needs a credential and none was presented."""


class Authenticator:
    """Turns a request's peer and headers into a `Caller`; one per app, thread-safe."""

    def __init__(self, settings: ServeSettings, keys: KeyStore | None = None):
        self.mode = settings.auth
        self.trusted: tuple[Network, ...] = tuple(settings.trusted_proxies)
        self._admin = settings.admin_token.get_secret_value().encode() if settings.admin_token else None
        self._keys = keys
        self._jwt = JwtVerifier(settings) if settings.auth == "jwt" else None

    def is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def client_address(self, peer: str, forwarded_for: str | None) -> tuple[str, bool]:
        """(client address, whether it is a trusted proxy's own)."""
        if not self.is_trusted(peer):
            return peer, False
        hops = [h.strip() for h in (forwarded_for or "").split(",") if h.strip()]
        for hop in reversed(hops):  # the rightmost hops were added by our own proxies
            if not self.is_trusted(hop):
                return hop, False
        return peer, True

    def identify(self, peer: str, headers: Mapping[str, str], address: str, proxy: bool) -> Caller:
        """The caller, given its `client_address`; BadCredential or MissingCredential when the
        mode refuses it. May block (a key lookup, a JWKS fetch): run it in a thread."""
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        credential = credential.strip() if scheme.lower() == "bearer" else ""
        if credential and self._admin and hmac.compare_digest(credential.encode(), self._admin):
            return Caller(None, "admin", ADMIN_NAME, address, proxy)
        if self.mode == "header":
            return self._from_headers(peer, headers, address, proxy)
        if not credential:
            raise MissingCredential(f"KTO_AUTH={self.mode}: send 'Authorization: Bearer <{_what(self.mode)}>'")
        if self.mode == "api-key":
            assert self._keys is not None, "api-key mode opens a key store"
            found = self._keys.find(digest(credential))
            if found is None:
                raise BadCredential("unknown or revoked API key", "bad_key")
            return Caller(found.user, found.role, found.user, address, proxy)
        assert self._jwt is not None
        user, role = self._jwt.verify(credential)
        return Caller(user, role, user, address, proxy)

    def _from_headers(self, peer: str, headers: Mapping[str, str], address: str, proxy: bool) -> Caller:
        if not self.is_trusted(peer):
            return Caller(None, "user", "anonymous", address, proxy)
        user = next((headers[h] for h in USER_HEADERS if headers.get(h)), None)
        if user is not None and len(user) > MAX_USER_CHARS:
            raise BadCredential(f"X-User-Id is over {MAX_USER_CHARS} characters", "bad_header")
        role = headers.get(ROLE_HEADER, "user").strip().lower() or "user"
        if role not in HEADER_ROLES:
            raise BadCredential(f"X-User-Role must be one of {', '.join(HEADER_ROLES)}, not {role!r}", "bad_header")
        return Caller(user, role if user else "user", user or "anonymous", address, proxy)


def _what(mode: str) -> str:
    return "API key" if mode == "api-key" else "token"


class JwtVerifier:
    """Bearer JWTs: signature by a shared secret or a JWKS key, then `exp`, `iss`, `aud` (PyJWT)."""

    def __init__(self, settings: ServeSettings):
        self.issuer, self.audience = settings.jwt_issuer, settings.jwt_audience
        self.user_claim, self.role_path = settings.jwt_user_claim, settings.jwt_role_claim.split(".")
        self.leeway = settings.jwt_leeway_s
        self._secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
        self.algorithms = settings.jwt_algorithms or (["HS256"] if self._secret else ["RS256", "ES256"])
        self._jwks: jwt.PyJWKSet | None = None
        self._client: jwt.PyJWKClient | None = None
        source = settings.jwt_jwks
        if self._secret is None and source:
            if source.startswith(("http://", "https://")):
                self._client = jwt.PyJWKClient(source, cache_keys=True, lifespan=300, timeout=5)
            else:
                self._jwks = jwt.PyJWKSet.from_json(Path(source).read_text())

    def _key(self, token: str) -> Any:
        if self._secret is not None:
            return self._secret
        if self._client is not None:
            return self._client.get_signing_key_from_jwt(token)
        assert self._jwks is not None
        kid = jwt.get_unverified_header(token).get("kid")
        matching = [k for k in self._jwks.keys if kid is None or k.key_id == kid]
        if not matching:
            raise jwt.InvalidTokenError(f"no key {kid!r} in the JWKS")
        return matching[0]

    def verify(self, token: str) -> tuple[str, Role]:
        try:
            claims = jwt.decode(
                token,
                self._key(token),
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud", self.user_claim]},
            )
        except jwt.PyJWKClientConnectionError as exc:
            raise KeysUnreachable(f"the JWKS cannot be fetched: {exc}") from exc
        except (jwt.InvalidTokenError, jwt.PyJWKClientError) as exc:
            raise BadCredential(f"invalid token: {exc}", "bad_token") from exc
        user = claims[self.user_claim]
        if not isinstance(user, str) or not user or len(user) > MAX_USER_CHARS:
            raise BadCredential(f"invalid token: claim {self.user_claim!r} is not a user id", "bad_token")
        return user, self._role(claims)

    def _role(self, claims: dict) -> Role:
        value: Any = claims
        for part in self.role_path:
            value = value.get(part) if isinstance(value, dict) else None
        roles = {value} if isinstance(value, str) else set(value) if isinstance(value, list) else set()
        return "admin" if "admin" in roles else "annotator" if "annotator" in roles else "user"


def refuse_unsafe_exposure(settings: ServeSettings) -> None:
    """Refuse `header` mode on a non-loopback address unless KTO_TRUSTED_PROXIES names the proxy
    that sets the headers (or the operator allowed it explicitly): nobody outside could rate."""
    if settings.auth != "header" or _loopback(settings.host):
        return
    if "trusted_proxies" in settings.model_fields_set or settings.allow_header_auth_without_proxy:
        return
    raise UnsafeExposure(
        f"KTO_AUTH=header on {settings.host} with no KTO_TRUSTED_PROXIES: every remote caller would be "
        "anonymous. Name your proxy (KTO_TRUSTED_PROXIES=10.0.0.5), use KTO_AUTH=api-key or jwt, or set "
        "KTO_ALLOW_HEADER_AUTH_WITHOUT_PROXY=true if anonymous chat without ratings is what you want."
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class UnsafeExposure(ValueError):
    """The server would listen where its identity checks mean nothing."""


class KeysUnreachable(Exception):
    """The JWKS could not be fetched: a 503, never a pass."""
