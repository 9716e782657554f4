"""Python client for the SOAP service (`pip install 'soap-serving[client]'`): sync `SoapClient` and async
`AsyncSoapClient` over httpx, typed results and typed errors.

    with SoapClient("http://localhost:8000", api_key=KEY) as soap:
        result = soap.classify(["digit.png", png_bytes, pil_image, tensor], mode="min-aux")
        print(result.predictions[0].label, result.predictions[0].suspicious)

Images may be file paths, encoded image bytes, PIL images or tensors/arrays in [0, 1] ([C, H, W], [H, W] or a
batch [N, C, H, W]); PIL images and tensors are sent as 8-bit PNG (exact for pixels that came from an 8-bit image),
so they need Pillow. A 503 (queue full, draining) is retried after its Retry-After, with jitter, at most
`max_retries` times; every other refusal raises a `SoapError` subclass that carries the service's error code.

This module needs only httpx (and Pillow/numpy for PIL images and tensors): it imports nothing of the service.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias

import httpx

if TYPE_CHECKING:
    from PIL.Image import Image

Mode = Literal["min-aux", "fixed", "none"]


class ArrayLike(Protocol):
    """A tensor or array: torch.Tensor and numpy.ndarray both qualify."""

    @property
    def shape(self) -> Any: ...


ImageInput: TypeAlias = "str | os.PathLike[str] | bytes | Image | ArrayLike"


# ------------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class TopClass:
    label: int
    class_name: str
    probability: float


@dataclass(frozen=True)
class Prediction:
    """One image's answer (the service's ImageResult)."""

    label: int
    class_name: str
    confidence: float
    top_k: list[TopClass]
    epsilon: float
    aux_loss: float
    aux_loss_before: float
    suspicious: bool
    purified_png: str | None = None  # base64, with return_purified=True
    aux_curve: list[float] | None = None  # with return_curve=True


@dataclass(frozen=True)
class ClassifyResult:
    request_id: str
    model: str
    predictions: list[Prediction]
    timing_ms: dict[str, float]
    attempts: int = 1  # 1 + the 503s retried

    @staticmethod
    def from_json(body: Mapping[str, Any], attempts: int) -> ClassifyResult:
        predictions = [
            Prediction(
                label=r["label"],
                class_name=r["class_name"],
                confidence=r["confidence"],
                top_k=[TopClass(t["label"], t["class_name"], t["probability"]) for t in r["top_k"]],
                epsilon=r["epsilon"],
                aux_loss=r["aux_loss"],
                aux_loss_before=r["aux_loss_before"],
                suspicious=r["suspicious"],
                purified_png=r.get("purified_png"),
                aux_curve=r.get("aux_curve"),
            )
            for r in body["results"]
        ]
        return ClassifyResult(body["request_id"], body["model"], predictions, dict(body["timing_ms"]), attempts)


# ------------------------------------------------------------------------------------------------ errors


@dataclass
class SoapError(Exception):
    """The service refused a request. `error` is its machine-readable code (bad_image, queue_full, ...)."""

    status: int
    error: str
    detail: Any
    request_id: str | None = None
    retry_after_s: float | None = None

    def __str__(self) -> str:
        return f"HTTP {self.status} {self.error}: {self.detail}"


class InvalidRequestError(SoapError):
    """400, 408, 413, 415, 422: the request (image, options, size) cannot be served as sent; do not retry it."""


class AuthenticationError(SoapError):
    """401: missing or wrong API key."""


class ModelNotFoundError(SoapError):
    """404: no model of that name is loaded."""


class ServiceUnavailableError(SoapError):
    """503 after every retry: the queue stayed full or the service is draining."""


class DeadlineExceededError(SoapError):
    """504: compute did not start before the request's deadline."""


class ServerError(SoapError):
    """500 or anything else unexpected."""


_ERRORS: dict[int, type[SoapError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    404: ModelNotFoundError,
    408: InvalidRequestError,
    413: InvalidRequestError,
    415: InvalidRequestError,
    422: InvalidRequestError,
    503: ServiceUnavailableError,
    504: DeadlineExceededError,
}


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # absent, or an HTTP date (the service always sends seconds)


def _error(response: httpx.Response) -> SoapError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    cls = _ERRORS.get(response.status_code, ServerError)
    return cls(
        status=response.status_code,
        error=str(body.get("error", "http_error")),
        detail=body.get("detail", response.text[:500]),
        request_id=response.headers.get("x-request-id"),
        retry_after_s=_retry_after(response),
    )


# ------------------------------------------------------------------------------------------------ requests


def _png(image: Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _tensor_pngs(array: ArrayLike) -> list[bytes]:
    """[H, W], [C, H, W] or [N, C, H, W] values in [0, 1] -> one 8-bit PNG per image."""
    import numpy as np
    from PIL import Image as PILImage

    if hasattr(array, "detach"):  # torch.Tensor, without importing torch
        array = array.detach().cpu().numpy()
    values = np.asarray(array, dtype=np.float32)
    if values.ndim == 2:
        values = values[None]
    if values.ndim == 3:
        values = values[None]
    if values.ndim != 4 or values.shape[1] not in (1, 3):
        raise ValueError(f"a tensor image must be [H, W], [C, H, W] or [N, C, H, W] with C 1 or 3; got {values.shape}")
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise ValueError("tensor pixels must be finite and in [0, 1]")
    pixels = np.rint(values * 255.0).astype(np.uint8)
    return [_png(PILImage.fromarray(p[0] if p.shape[0] == 1 else p.transpose(1, 2, 0))) for p in pixels]


def image_payloads(images: ImageInput | Sequence[ImageInput]) -> list[bytes]:
    """Encoded image files for any mix of paths, bytes, PIL images and tensors (a batch tensor gives several)."""
    items: Iterable[Any] = images if isinstance(images, list | tuple) else [images]
    payloads: list[bytes] = []
    for item in items:
        if isinstance(item, bytes | bytearray | memoryview):
            payloads.append(bytes(item))
        elif isinstance(item, str | os.PathLike):
            payloads.append(Path(item).read_bytes())
        elif hasattr(item, "save") and hasattr(item, "mode"):  # a PIL image
            payloads.append(_png(item))
        elif hasattr(item, "shape"):
            payloads.extend(_tensor_pngs(item))
        else:
            raise TypeError(f"cannot send {type(item).__name__} as an image (path, bytes, PIL image or tensor)")
    if not payloads:
        raise ValueError("no image to classify")
    return payloads


@dataclass(frozen=True)
class _Call:
    params: dict[str, str]
    files: list[tuple[str, tuple[str, bytes, str]]]


def _call(
    images: ImageInput | Sequence[ImageInput],
    model: str | None,
    mode: Mode | None,
    epsilon: float | None,
    top_k: int | None,
    return_purified: bool,
    return_curve: bool,
) -> _Call:
    options: dict[str, Any] = {
        "model": model,
        "mode": mode,
        "epsilon": epsilon,
        "top_k": top_k,
        "return_purified": return_purified or None,
        "return_curve": return_curve or None,
    }
    params = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in options.items() if v is not None}
    files = [("file", (f"image{i}", data, "application/octet-stream")) for i, data in enumerate(image_payloads(images))]
    return _Call(params, files)


@dataclass
class RetryPolicy:
    """Retries of 503 answers: wait Retry-After (else `backoff_s` doubling), times a random 1..1+jitter so that
    refused clients do not all come back at once, capped at `max_wait_s`; give up after `max_retries`."""

    max_retries: int = 3
    backoff_s: float = 0.5
    max_wait_s: float = 30.0
    jitter: float = 0.25
    rng: random.Random = field(default_factory=random.Random)

    def wait_s(self, attempt: int, retry_after_s: float | None) -> float:
        base = retry_after_s if retry_after_s is not None else self.backoff_s * 2**attempt
        return min(self.max_wait_s, base * (1.0 + self.jitter * self.rng.random()))


def _headers(api_key: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    headers = dict(extra or {})
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


class SoapClient:
    """Blocking client. Use as a context manager, or call close()."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(
            base_url=base_url, headers=_headers(api_key, headers), timeout=timeout_s, transport=transport
        )

    def classify(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        model: str | None = None,
        mode: Mode | None = None,
        epsilon: float | None = None,
        top_k: int | None = None,
        return_purified: bool = False,
        return_curve: bool = False,
    ) -> ClassifyResult:
        """Purify and classify `images` in one request (POST /classify)."""
        call = _call(images, model, mode, epsilon, top_k, return_purified, return_curve)
        for attempt in range(self.retry.max_retries + 1):
            response = self._http.post("/classify", params=call.params, files=call.files)
            if response.status_code == 200:
                return ClassifyResult.from_json(response.json(), attempt + 1)
            error = _error(response)
            if response.status_code != 503 or attempt == self.retry.max_retries:
                raise error
            time.sleep(self.retry.wait_s(attempt, error.retry_after_s))
        raise AssertionError("unreachable")

    def model_info(self, name: str | None = None) -> dict[str, Any]:
        """GET /v1/models/{name} (or /v1/models for None): the service's model description."""
        response = self._http.get("/v1/models" if name is None else f"/v1/models/{name}")
        if response.status_code != 200:
            raise _error(response)
        info: dict[str, Any] = response.json()
        return info

    def ready(self) -> bool:
        return self._http.get("/readyz").status_code == 200

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SoapClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSoapClient:
    """asyncio client; the same methods as SoapClient, awaited. Use `async with`, or await aclose()."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=_headers(api_key, headers), timeout=timeout_s, transport=transport
        )

    async def classify(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        model: str | None = None,
        mode: Mode | None = None,
        epsilon: float | None = None,
        top_k: int | None = None,
        return_purified: bool = False,
        return_curve: bool = False,
    ) -> ClassifyResult:
        """Purify and classify `images` in one request (POST /classify)."""
        call = _call(images, model, mode, epsilon, top_k, return_purified, return_curve)
        for attempt in range(self.retry.max_retries + 1):
            response = await self._http.post("/classify", params=call.params, files=call.files)
            if response.status_code == 200:
                return ClassifyResult.from_json(response.json(), attempt + 1)
            error = _error(response)
            if response.status_code != 503 or attempt == self.retry.max_retries:
                raise error
            await asyncio.sleep(self.retry.wait_s(attempt, error.retry_after_s))
        raise AssertionError("unreachable")

    async def model_info(self, name: str | None = None) -> dict[str, Any]:
        response = await self._http.get("/v1/models" if name is None else f"/v1/models/{name}")
        if response.status_code != 200:
            raise _error(response)
        info: dict[str, Any] = response.json()
        return info

    async def ready(self) -> bool:
        return (await self._http.get("/readyz")).status_code == 200

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSoapClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
