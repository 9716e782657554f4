"""Optional API key. When the service was started with --api-key-env NAME, protected routes need
`Authorization: Bearer <key>` or `X-API-Key: <key>`; without it they answer 401.

Use as route dependencies, `@app.get(..., dependencies=PROTECTED)`: they check the key and declare it in the OpenAPI
document (security schemes ApiKey and Bearer, so that /docs's Authorize button sends it). A route that calls
`require_api_key(request)` itself (cheaper per request) declares it with `openapi_extra={"security": SECURITY}`.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Depends, FastAPI, Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer

from .dependencies import runtime_of
from .errors import unauthorized

API_KEY_HEADER = APIKeyHeader(
    name="X-API-Key", scheme_name="ApiKey", auto_error=False, description="the service's API key (when it has one)"
)
BEARER = HTTPBearer(scheme_name="Bearer", auto_error=False, description="`Authorization: Bearer <API key>`")
SECURITY: list[dict[str, list[str]]] = [{"ApiKey": []}, {"Bearer": []}]  # either scheme


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key")


async def require_api_key(request: Request) -> None:
    """Raise 401 unless the service has no key or the request carries the right one."""
    expected = runtime_of(request).api_key
    if expected is None:
        return
    given = presented_key(request)
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise unauthorized(request.query_params.get("model"))


# The security dependencies only read headers (auto_error=False): require_api_key decides, with the service's errors.
PROTECTED: list[Any] = [Security(API_KEY_HEADER), Security(BEARER), Depends(require_api_key)]


def document_api_key(app: FastAPI, keyed: bool) -> None:
    """Keep the OpenAPI document true to this server: with no key configured, no operation needs one, so the
    security schemes and requirements are left out (Swagger UI then shows no locks)."""
    if keyed:
        return
    original = app.openapi

    def openapi() -> dict[str, Any]:
        schema = original()
        schema.get("components", {}).pop("securitySchemes", None)
        for item in schema.get("paths", {}).values():
            for operation in item.values():
                if isinstance(operation, dict):
                    operation.pop("security", None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
