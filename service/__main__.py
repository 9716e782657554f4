"""`python -m service --model PATH [...]` (or `soap-serve ...`): load the models, then serve with uvicorn until
SIGTERM/SIGINT.

On SIGTERM the service drains (service/server.py): /readyz turns 503, new work gets 503, every response closes its
connection, idle connections and then the listener close, every request a client sent is answered, and the process
exits 0.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle worker threads sleep instead of spinning, which on a small shared CPU would
# steal the cores the event loop needs (measured: 10x slower batches on a busy 2-core host with spinning).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import gc
import logging
import signal
import sys

import torch
import uvicorn
from fastapi import FastAPI

from models import CheckpointError

from .app import create_app
from .config import ServiceSettings, load_settings
from .connection_guard import ConnectionGuard, raise_open_file_limit
from .logs import LogFormat, configure_logging
from .server import DrainingServer

log = logging.getLogger("service")


def serve(app: FastAPI) -> None:
    settings: ServiceSettings = app.state.settings
    # Slow clients: a deadline for each request head, a cap on connections below the open-file limit.
    guard = ConnectionGuard(settings.head_timeout_s, settings.max_connections, raise_open_file_limit())
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        # JSON: uvicorn's loggers go through the root handler (JSON, request id); text: uvicorn's own format.
        log_config=None if settings.log_format is LogFormat.JSON else uvicorn.config.LOGGING_CONFIG,
        # uvicorn annotates int, but waits with asyncio.wait_for, which takes fractional seconds
        timeout_graceful_shutdown=settings.graceful_timeout_s,  # type: ignore[arg-type]
        lifespan="on",
        http=guard.protocol_class(),
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]  # call_later takes a float
    )
    DrainingServer(config, app.state.runtime, settings.shutdown_delay_s, guard).run()


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(argv)
    configure_logging(settings.log_format, settings.log_level)
    torch.set_num_threads(settings.compute_threads)
    # uvicorn re-raises the shutdown signal after a graceful exit; make that a clean exit status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    try:
        app = create_app(settings)  # loads and checks every checkpoint: fail here, before listening
    except (CheckpointError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # The ~200,000 objects of torch, FastAPI and the loaded models live as long as the process. Frozen, they are
    # out of the collector's way: otherwise every full collection walks them all while the event loop stands
    # still (measured under 4x overload on 2 cores: 145-243 ms pauses, which were the p99 of the fast 503s).
    gc.collect()
    gc.freeze()
    serve(app)
    return 0


if __name__ == "__main__":
    sys.exit(main())
