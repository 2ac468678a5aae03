"""Admin: API keys of one user (`KTO_AUTH=api-key`; serve.credentials keeps them).

`POST /v1/users/{user}/keys` issues a key (201; `key` is in this answer only, never again),
`GET /v1/users/{user}/keys` lists the live ones, `DELETE /v1/users/{user}/keys/{id}` revokes
one (204): every replica refuses it from its next request on. In other modes these answer 409.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Path, Response
from starlette.concurrency import run_in_threadpool

from serve.credentials import KeyStore, UnknownKey, issue
from serve.deps import Admin, ServeState, State
from serve.errors import AUTHENTICATED, Conflict, NotFound, responses
from serve.schemas import IssuedKey, KeyList, KeyRequest

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/users/{user}/keys", tags=["admin"], responses=responses(*AUTHENTICATED, 403, 409))

UserPath = Annotated[str, Path(min_length=1, max_length=256, pattern=r"^[^/]+$", description="the user the key is for")]


def _store(state: ServeState) -> KeyStore:
    if state.keys is None:
        raise Conflict(
            f"API keys are not used: this server runs KTO_AUTH={state.settings.auth} (start it with KTO_AUTH=api-key)",
            code="keys_off",
        )
    return state.keys


@router.post("", status_code=201, response_model=IssuedKey, responses=responses(507))
async def issue_key(user: UserPath, state: State, actor: Admin, body: KeyRequest | None = None) -> IssuedKey:
    body = body or KeyRequest()
    key, secret = await run_in_threadpool(issue, _store(state), user, body.role, name=body.name, created_by=actor)
    logger.info("%s issued key %s (%s) to %s", actor, key.id, key.role, user)
    return IssuedKey(**key.to_json(), key=secret)


@router.get("", response_model=KeyList)
async def list_keys(user: UserPath, state: State, actor: Admin) -> KeyList:
    keys = await run_in_threadpool(_store(state).list, user)
    return KeyList(keys=keys)


@router.delete("/{key_id}", status_code=204, response_class=Response, responses=responses(404, 507))
async def revoke_key(
    user: UserPath, key_id: Annotated[str, Path(max_length=64)], state: State, actor: Admin
) -> Response:
    try:
        await run_in_threadpool(_store(state).revoke, user, key_id)
    except UnknownKey:
        raise NotFound(f"user {user!r} has no key {key_id!r}", param="key_id", code="unknown_key") from None
    logger.info("%s revoked key %s of %s", actor, key_id, user)
    return Response(status_code=204)
