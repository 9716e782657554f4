"""The real app in-process: its settings for tests, and the app with its lifespan running behind an httpx client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI

from service.app import create_app
from service.config import ServiceSettings


def settings_for(*models: Path, **overrides) -> ServiceSettings:
    """In-process apps compute in a thread unless a test asks for the child process (the service's default, which
    the real-server tests and tests/test_compute_process.py exercise): a child per app would add seconds each."""
    return ServiceSettings(models=list(models), **{"compute_process": False, **overrides})


@asynccontextmanager
async def serve_app(
    settings: ServiceSettings, timeout: float = 60.0
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The real app with its lifespan running, and an httpx client talking to it in-process."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        deadline = time.monotonic() + timeout
        while not app.state.runtime.ready:
            if time.monotonic() > deadline:
                raise TimeoutError("the app did not become ready")
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://soap.test", timeout=60) as client:
            yield app, client
