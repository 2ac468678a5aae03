"""`GET /v1/me`: who the server takes the caller for, and how it tells (the chat page asks it
first, to know whether to ask for a key)."""

from __future__ import annotations

from fastapi import APIRouter

from serve.deps import Identified, State
from serve.errors import AUTHENTICATED, responses
from serve.schemas import Me

router = APIRouter(tags=["identity"], responses=responses(*AUTHENTICATED))


@router.get("/v1/me", response_model=Me)
async def me(state: State, caller: Identified) -> Me:
    return Me(user=caller.user, role=caller.role, name=caller.name, auth=state.settings.auth)
