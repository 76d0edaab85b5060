"""The documentation site at ``/guide/``, offline like ``/docs``: the MkDocs site ``make docs`` builds
from ``docs/`` into ``service/server/ops/guide/`` (a built file, not in git), served as static files.

The site's theme is configured to load nothing from elsewhere (no web fonts, no CDN), so it works on a
cluster without internet. It needs no API key: it documents the service and holds no data. A service
whose guide was not built answers ``/guide/`` with 404 ``guide_not_built`` and says how to build it.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from service.server.core.errors import APIError

#: Where ``make docs`` writes the site (``mkdocs build --site-dir``).
SITE = Path(__file__).parent / "guide"
PREFIX = "/guide"
_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


def site_file(site: Path, rel: str) -> Path | None:
    """The built file a ``/guide/<rel>`` URL names (a folder's ``index.html``), or None: no such file, or a
    path that leaves the site (``..``, an absolute path, a link out)."""
    root = site.resolve()
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        return None
    if target.is_dir():
        target = target / "index.html"
    return target if target.is_file() else None


@router.api_route(PREFIX, methods=["GET", "HEAD"])
async def guide_root() -> RedirectResponse:
    return RedirectResponse(PREFIX + "/", status_code=308)  # the site's relative links need the slash


@router.api_route(PREFIX + "/{rel:path}", methods=["GET", "HEAD"])
async def guide_file(rel: str) -> FileResponse:
    if not (SITE / "index.html").is_file():
        raise APIError(404, "the guide is not built in this installation: run `make docs` in the checkout",
                       "guide_not_built")
    path = site_file(SITE, rel)
    if path is None:
        raise APIError(404, f"no guide page {rel!r}", "not_found", "path")
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if media_type.startswith("text/") or media_type in ("application/javascript", "application/json"):
        media_type += "; charset=utf-8"
    return FileResponse(path, media_type=media_type, headers=_HEADERS)
