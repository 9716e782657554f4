"""Read a request body, bounded in size while streaming and in time (`read_body`: every route that takes a body), and
split a /classify body into image payloads and options (`parse_upload`).

Three /classify body shapes: multipart/form-data (`file` parts; other text fields are options), a raw image
(`Content-Type: image/*`), or JSON {"images": [base64, ...], ...options}. Query parameters are options too;
the body's options override the query's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request as StarletteRequest
from starlette.types import Message

from .errors import (
    bad_image,
    bad_options,
    body_timeout,
    option_problems,
    payload_too_large,
    too_many_images,
    unsupported_media_type,
)
from .schemas import ClassifyJSON

ACCEPTED_TYPES = "multipart/form-data, image/* or application/json"


@dataclass
class Upload:
    payloads: list[bytes]
    options: dict[str, Any] = field(default_factory=dict)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def check_media_type(kind: str) -> None:
    if kind in ("multipart/form-data", "application/json") or kind.startswith("image/"):
        return
    raise unsupported_media_type(f"Content-Type {kind or 'none'} is not accepted; send {ACCEPTED_TYPES}")


async def read_body(request: Request, limit: int, model: str | None = None, timeout_s: float | None = None) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` (Content-Length, or while streaming),
    and with 408 when it has not fully arrived within `timeout_s` (a slow or stalled client must not hold a
    connection and its buffers forever)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise payload_too_large(limit, model)
    chunks: list[bytes] = []

    async def collect() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise payload_too_large(limit, model)
            chunks.append(chunk)

    try:
        async with asyncio.timeout(timeout_s):
            await collect()
    except TimeoutError:
        raise body_timeout(timeout_s, model) from None
    return b"".join(chunks)


async def _parse_multipart(request: Request, body: bytes, max_images: int, model: str | None) -> Upload:
    """Parse with Starlette's multipart parser from the already-bounded body."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    replayed = StarletteRequest(request.scope, replay)
    try:
        form = await replayed.form(max_files=max_images, max_fields=64, max_part_size=len(body) + 1)
    except Exception as exc:  # noqa: BLE001 - python-multipart raises several types for malformed bodies
        detail = str(getattr(exc, "detail", None) or exc or type(exc).__name__)
        if "too many files" in detail.lower():
            raise too_many_images(max_images, max_images + 1, model) from None
        raise bad_image(f"malformed multipart body: {detail}", model) from None
    try:
        payloads: list[bytes] = []
        options: dict[str, Any] = {}
        for key, value in form.multi_items():
            if key == "file":
                if not isinstance(value, UploadFile):
                    raise bad_image("a 'file' part must be a file upload, not a text field", model)
                payloads.append(await value.read())
            elif isinstance(value, UploadFile):
                raise bad_options(f"unexpected file part {key!r}; images go in parts named 'file'", model)
            else:
                options[key] = value
    finally:
        await form.close()
    if not payloads:
        raise bad_image("the multipart body has no 'file' part", model)
    return Upload(payloads, options)


def _decode_base64(text: str, index: int, model: str | None) -> bytes:
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_image(f"images[{index}] is not valid base64", model) from None


def _parse_json(body: bytes, model: str | None) -> Upload:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_options(f"the body is not valid JSON: {exc}", model) from None
    if not isinstance(data, dict):
        raise bad_options('the JSON body must be an object {"images": [...], ...options}', model)
    try:
        parsed = ClassifyJSON.model_validate(data)
    except ValidationError as exc:
        raise bad_options(option_problems(exc.errors(include_url=False)), model) from None
    options = dict(parsed.model_extra or {})
    return Upload([_decode_base64(t, i, model) for i, t in enumerate(parsed.images)], options)


async def parse_upload(request: Request, kind: str, body: bytes, max_images: int, model: str | None = None) -> Upload:
    """Split the body into image payloads and body options. Raises ServiceError (413 for too many images)."""
    if kind == "multipart/form-data":
        upload = await _parse_multipart(request, body, max_images, model)
    elif kind == "application/json":
        upload = _parse_json(body, model)
    else:
        if not body:
            raise bad_image("the request body is empty", model)
        upload = Upload([body])
    if len(upload.payloads) > max_images:
        raise too_many_images(max_images, len(upload.payloads), model)
    return upload
