"""The playground: one self-contained page (HTML/CSS/JS from the package, no CDN) at ``GET /``.

The page and its two assets are static files shipped in ``service/server/ops/static``; nothing is built
or fetched from elsewhere, so it works on a cluster without internet. The page needs no API key (it
asks for one and sends it with every API call); the Content-Security-Policy keeps it self-contained:
scripts, styles and connections only from this origin, images also from ``data:`` / ``blob:`` URLs
(results arrive as base64, reference images are read locally).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.server.core.errors import APIError

STATIC = Path(__file__).parent / "static"

#: The files the page loads, with their media types; nothing else in ``STATIC`` is served.
ASSETS = {
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
}

_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'self'",
    "X-Content-Type-Options": "nosniff",
    # revalidate on every load (ETag / Last-Modified make that cheap), so an upgraded service is seen at once
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["playground"])


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "playground.html", media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.api_route("/playground/{name}", methods=["GET", "HEAD"], include_in_schema=False)
async def asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise APIError(404, f"no playground file {name!r}", "not_found", "name")
    return FileResponse(STATIC / name, media_type=media_type, headers=_HEADERS)
