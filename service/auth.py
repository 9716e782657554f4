"""Optional API key. When the service was started with --api-key-env NAME, protected routes need
`Authorization: Bearer <key>` or `X-API-Key: <key>`; without it they answer 401.

Use as a FastAPI dependency: `@app.post(..., dependencies=[Depends(require_api_key)])`.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import ServiceError


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key")


async def require_api_key(request: Request) -> None:
    """Raise 401 unless the service has no key or the request carries the right one."""
    runtime = request.app.state.runtime
    expected = runtime.api_key
    if expected is None:
        return
    given = presented_key(request)
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ServiceError(
            401,
            "unauthorized",
            "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            reason="unauthorized",
            model=request.query_params.get("model"),
            headers={"WWW-Authenticate": "Bearer"},
        )
