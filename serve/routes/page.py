"""The browser pages: the chat page `GET /`, the annotators' page `GET /annotate`, and their
static files under `/static/`.

The pages are plain HTML, CSS and JavaScript shipped inside the package (serve/static/), with no
build step; they talk to the server through the public API only (`/v1/chat/completions` with
streaming, `/v1/feedback`; `/v1/annotations/…`), so they need no admin token and know nothing the
API does not say. Files are served from a fixed list, so no request path ever reaches the filesystem.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from serve.errors import NotFound

router = APIRouter(tags=["page"])

STATIC = Path(__file__).resolve().parent.parent / "static"
ASSETS = {
    "chat.js": "text/javascript; charset=utf-8",
    "chat.css": "text/css; charset=utf-8",
    "annotate.js": "text/javascript; charset=utf-8",
    "annotate.css": "text/css; charset=utf-8",
}
# Scripts and styles only from this server, and no inline script: the pages render model output,
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
    return _html("index.html")


@router.get("/annotate", include_in_schema=False)
async def annotate_page() -> FileResponse:
    return _html("annotate.html")


def _html(name: str) -> FileResponse:
    return FileResponse(
        STATIC / name, media_type="text/html; charset=utf-8", headers={**NO_CACHE, "Content-Security-Policy": CSP}
    )


@router.get("/static/{name}", include_in_schema=False)
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise NotFound(f"no static file {name!r}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=NO_CACHE)
