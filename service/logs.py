"""Log format (plain text or one JSON object per line) and the request id on every line logged while serving a
request.

The id lives in a context variable that the request middleware sets: asyncio copies the context into every task
and callback the request starts, so a line logged anywhere on a request's path (uvicorn's access log included)
carries it, without passing it through every call. Work done for several requests at once (a batch) names their
ids in the message itself.
"""

from __future__ import annotations

import enum
import logging
import sys
from contextvars import ContextVar

REQUEST_ID: ContextVar[str] = ContextVar("soap_request_id", default="")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


class RequestIdFilter(logging.Filter):
    """Puts the current request id (empty outside requests) on the record as `request_id`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.__dict__.pop("color_message", None)  # uvicorn's ANSI-coloured copy of the message
        return True


def configure_logging(fmt: LogFormat, level: str) -> None:
    """One handler on the root logger, to stderr. JSON lines carry timestamp, level, logger, message, request_id
    and, for errors, the traceback as one string field (one line per event, as log shippers expect)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if fmt is LogFormat.JSON:
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
