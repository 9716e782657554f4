"""/docs: Swagger UI from files shipped in a Python package (fastapi-swagger's Swagger UI 5 bundle), so the page
works without internet access; no CDN, no validator badge. ReDoc (a CDN page in FastAPI) is off.

Why not swagger-ui-bundle: its newest release (1.1.0) carries Swagger UI 4.15, which cannot render the OpenAPI 3.1
documents FastAPI writes (Swagger UI reads 3.1 from version 5 on).
"""

from __future__ import annotations

from pathlib import Path

import fastapi_swagger
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(fastapi_swagger.__file__).parent / "resources"
ASSETS_PATH = "/docs/assets"

router = APIRouter()


def assets() -> StaticFiles:
    """The Swagger UI files, which create_app mounts at ASSETS_PATH (a router cannot carry a mount)."""
    return StaticFiles(directory=ASSETS)


@router.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    """GET /docs (Swagger UI; its Authorize button takes the API key), its assets under /docs/assets."""
    app = request.app
    root = request.scope.get("root_path", "").rstrip("/")  # behind a path-prefix proxy
    return get_swagger_ui_html(
        openapi_url=root + (app.openapi_url or "/openapi.json"),
        title=f"{app.title} - API",
        swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon-32x32.png",
        swagger_ui_parameters={"persistAuthorization": True, "validatorUrl": None},
    )
