"""The browser chat page: `GET /` and its three static files under `/static/`.

The page is plain HTML, CSS and JavaScript shipped inside the package (serve/static/), with no
build step; it talks to the server through the public API only (`/v1/chat/completions` with
streaming, `/v1/feedback`), so it needs no admin token and knows nothing the API does not say.
Files are served from a fixed list, so no request path ever reaches the filesystem.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from serve.errors import NotFound

router = APIRouter(tags=["page"])

STATIC = Path(__file__).resolve().parent.parent / "static"
ASSETS = {"chat.js": "text/javascript; charset=utf-8", "chat.css": "text/css; charset=utf-8"}
# Scripts and styles only from this server, and no inline script: the page renders model output,
# which must never run as code (it is inserted as text, and this is the second line of defence).
# The icon is an empty data: URL, so browsers do not ask for a /favicon.ico that is not there.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Revalidate on every load, so that a server upgrade never runs with an old script.
NO_CACHE = {"Cache-Control": "no-cache"}


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(
        STATIC / "index.html",
        media_type="text/html; charset=utf-8",
        headers={**NO_CACHE, "Content-Security-Policy": CSP},
    )


@router.get("/static/{name}", include_in_schema=False)
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise NotFound(f"no static file {name!r}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=NO_CACHE)
