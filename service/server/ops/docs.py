"""API documentation that works without internet: Swagger UI at ``/docs``.

FastAPI's own page loads its JavaScript and CSS from a CDN, so on an air-gapped cluster it stays blank.
This page is FastAPI's, pointed at assets the service serves itself from the ``fastapi-offline``
package (Swagger UI 5, which reads the OpenAPI 3.1 schema FastAPI writes; Swagger UI 4, as in the
``swagger-ui-bundle`` package, cannot). Like ``/`` and ``/openapi.json`` it needs no API key: it shows
the schema, never data; calls made from it carry the key the user enters ("Authorize").

ReDoc is not offered: even its standalone bundle fetches its logo from redoc.ly.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from service.server.core.errors import APIError

#: Where the pages' assets are served.
ASSET_PREFIX = "/docs/assets"
#: The files the pages load, with their media types; nothing else of the package is served.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon.png": "image/png",
}
_CACHE = {"Cache-Control": "public, max-age=86400"}

router = APIRouter(include_in_schema=False)


@cache
def assets_dir() -> Path:
    """The packaged assets' folder (``fastapi_offline/static``)."""
    return Path(str(files("fastapi_offline") / "static"))


def _title(request: Request) -> str:
    return f"{request.app.title} — API"


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url=request.app.openapi_url, title=_title(request),
                               swagger_js_url=f"{ASSET_PREFIX}/swagger-ui-bundle.js",
                               swagger_css_url=f"{ASSET_PREFIX}/swagger-ui.css",
                               swagger_favicon_url=f"{ASSET_PREFIX}/favicon.png",
                               swagger_ui_parameters={"validatorUrl": None})  # no call to swagger.io


@router.api_route(ASSET_PREFIX + "/{name}", methods=["GET", "HEAD"])
async def asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise APIError(404, f"no docs asset {name!r}", "not_found", "name")
    return FileResponse(assets_dir() / name, media_type=media_type, headers=_CACHE)
