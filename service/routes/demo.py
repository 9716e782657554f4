"""The demo web page (GET /) and the opt-in attack endpoint POST /v1/attack (issue 7; docs/web.md).

The page is static (service/static: index.html, app.js, style.css; no build step, no CDN) and talks to the
public API like any other client. The attack endpoint returns a PGD adversarial version of an image against
the *undefended* classifier (the same network without purification), so the page can show
attack -> purification -> prediction. It costs compute, so it is off unless the service runs with
--enable-attack (SOAP_ENABLE_ATTACK=1), answers 403 when off, and is bounded: one image per request, a
smaller body and pixel limit than /classify, at most MAX_ATTACK_STEPS steps and MAX_ATTACK_EPSILON, one
attack at a time (503 when busy).
"""

from __future__ import annotations

import base64
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from models.attacks import pgd

from ..auth import PROTECTED
from ..decode import DecodeLimits, ImageRejected, decode_image, encode_png
from ..dependencies import Runtime
from ..errors import (
    attack_busy,
    attack_disabled,
    bad_image,
    bad_options,
    documented,
    option_problems,
    unsupported_media_type,
)
from ..ingest import media_type, parse_upload, read_body
from ..runtime import ServiceRuntime
from ..schemas import ErrorResponse, image_upload_body, query_parameters

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

MAX_ATTACK_STEPS = 100
MAX_ATTACK_EPSILON = 0.5
MAX_ATTACK_BYTES = 2 * 1024 * 1024
MAX_ATTACK_PIXELS = 1024 * 1024


class AttackDefaults(BaseModel):
    """PGD settings the page starts from: the usual L∞ threat models (MNIST ε=0.3, CIFAR ε=8/255)."""

    epsilon: float
    step_size: float
    steps: int


ATTACK_DEFAULTS = {"mnist": AttackDefaults(epsilon=0.3, step_size=0.01, steps=40)}
FALLBACK_DEFAULTS = AttackDefaults(epsilon=8 / 255, step_size=2 / 255, steps=20)


class AttackOptions(BaseModel):
    """Options of POST /v1/attack (query string or multipart text fields); unset ones take the dataset's defaults."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="model name; default: the first model")
    epsilon: float | None = Field(None, gt=0, le=MAX_ATTACK_EPSILON, description="L∞ radius (pixels in [0, 1])")
    step_size: float | None = Field(None, gt=0, le=MAX_ATTACK_EPSILON, description="PGD step size")
    steps: int | None = Field(None, ge=1, le=MAX_ATTACK_STEPS, description="PGD steps")


class AttackResponse(BaseModel):
    model: str
    epsilon: float
    step_size: float
    steps: int
    clean_label: int = Field(description="the undefended classifier's prediction on the input (the attacked label)")
    clean_class_name: str
    adversarial_label: int = Field(description="the undefended classifier's prediction on the adversarial PNG")
    adversarial_class_name: str
    linf: float = Field(description="measured L∞ distance between the decoded input and the adversarial PNG")
    adversarial_png: str = Field(description="the adversarial image at the model's input size, base64 PNG (8-bit)")
    compute_ms: float


class AttackInfo(BaseModel):
    enabled: bool
    max_steps: int
    max_epsilon: float
    max_image_bytes: int
    defaults: dict[str, AttackDefaults]


@dataclass
class Adversarial:
    image: torch.Tensor  # [C, H, W] on the CPU, 8-bit values (what the PNG holds)
    clean_label: int
    adversarial_label: int
    linf: float


def adversarial_example(network: torch.nn.Module, x: torch.Tensor, options: AttackDefaults) -> Adversarial:
    """PGD on the undefended classifier, away from its own prediction on `x` ([C, H, W] in [0, 1]).

    The perturbation is rounded to 8-bit levels (within ε) before the label is taken, so the reported label
    is the one of the PNG the client receives (for an 8-bit input). Runs with autograd (not under inference_mode);
    the network is not modified.
    """
    device = next(network.buffers()).device
    batch = x.unsqueeze(0).to(device)
    with torch.no_grad():
        clean = network(batch).argmax(1)
    adv = pgd(network, batch, clean, options.epsilon, options.step_size, options.steps, keep_best=True)
    # Round the perturbation to whole 8-bit levels inside the ball, so the PNG stays within ε of the input.
    levels = int(options.epsilon * 255 + 1e-6)
    delta = (adv - batch).mul(255).round().clamp(-levels, levels).div(255)
    adv = (batch + delta).clamp(0.0, 1.0)
    with torch.no_grad():
        adv_label = network(adv).argmax(1)
    return Adversarial(
        image=adv[0].cpu(),
        clean_label=int(clean.item()),
        adversarial_label=int(adv_label.item()),
        linf=float((adv - batch).abs().max().item()),
    )


def attack_defaults(dataset: str) -> AttackDefaults:
    return ATTACK_DEFAULTS.get(dataset, FALLBACK_DEFAULTS)


def _options(query: dict[str, Any], body: dict[str, Any], model: str | None) -> AttackOptions:
    try:
        return AttackOptions.model_validate({**query, **body})
    except ValidationError as exc:
        raise bad_options(option_problems(exc.errors(include_url=False)), model) from None


def static_files() -> StaticFiles:
    """The page's files, which create_app mounts at /static (a router cannot carry a mount)."""
    return StaticFiles(directory=STATIC_DIR)


router = APIRouter()
# One attack at a time in this process (they take the CPU the service needs); a thread lock, taken without waiting,
# so that it belongs to no event loop.
_ONE_AT_A_TIME = threading.Lock()


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/v1/attack", response_model=AttackInfo, dependencies=PROTECTED, tags=["demo"])
async def attack_info(runtime: Runtime) -> AttackInfo:
    """Whether POST /v1/attack is enabled, its limits and the default PGD settings per model."""
    return AttackInfo(
        enabled=runtime.settings.enable_attack,
        max_steps=MAX_ATTACK_STEPS,
        max_epsilon=MAX_ATTACK_EPSILON,
        max_image_bytes=_byte_limit(runtime),
        defaults={name: attack_defaults(m.loaded.meta.dataset) for name, m in runtime.models.items()},
    )


@router.post(
    "/v1/attack",
    response_model=AttackResponse,
    dependencies=PROTECTED,
    tags=["demo"],
    responses=documented(ErrorResponse, 401, 403, 404, 408, 413, 415, 422, 503),
    openapi_extra={
        "parameters": query_parameters(AttackOptions),
        "requestBody": image_upload_body(1, AttackOptions),
    },
)
async def attack(request: Request, runtime: Runtime) -> AttackResponse:
    """PGD adversarial version of one image against the undefended classifier (demo; off by default).

    Body: multipart with one `file` part, or a raw image (`Content-Type: image/*`). Options (query or
    multipart fields): model, epsilon, step_size, steps.
    """
    query_model = request.query_params.get("model")
    if not runtime.settings.enable_attack:
        raise attack_disabled()
    kind = media_type(request)
    if kind != "multipart/form-data" and not kind.startswith("image/"):
        raise unsupported_media_type(
            f"Content-Type {kind or 'none'} is not accepted; "
            "send multipart/form-data (one 'file' part) or a raw image/*",
            query_model,
        )
    limit = _byte_limit(runtime)
    body = await read_body(request, limit, query_model, runtime.settings.body_timeout_s)
    upload = await parse_upload(request, kind, body, max_images=1, model=query_model)
    options = _options(dict(request.query_params), upload.options, query_model)
    model = runtime.get(options.model)
    request.scope["soap.model"] = model.name
    settings = attack_defaults(model.loaded.meta.dataset).model_copy(
        update={k: v for k, v in options.model_dump().items() if k != "model" and v is not None}
    )
    limits = DecodeLimits(
        max_pixels=min(MAX_ATTACK_PIXELS, runtime.settings.max_image_pixels),
        max_side=runtime.settings.max_image_side,
    )
    try:  # up to MAX_ATTACK_PIXELS: decode off the event loop
        x = await run_in_threadpool(decode_image, upload.payloads[0], model.input_shape, limits)
    except ImageRejected as exc:
        raise bad_image(exc.detail, model.name) from None
    if not _ONE_AT_A_TIME.acquire(blocking=False):
        raise attack_busy()
    try:
        start = time.perf_counter()
        result = await run_in_threadpool(adversarial_example, model.loaded.network, x, settings)
    finally:
        _ONE_AT_A_TIME.release()
    names = model.class_names
    return AttackResponse(
        model=model.name,
        epsilon=settings.epsilon,
        step_size=settings.step_size,
        steps=settings.steps,
        clean_label=result.clean_label,
        clean_class_name=names[result.clean_label],
        adversarial_label=result.adversarial_label,
        adversarial_class_name=names[result.adversarial_label],
        linf=result.linf,
        adversarial_png=base64.b64encode(encode_png(result.image)).decode("ascii"),
        compute_ms=(time.perf_counter() - start) * 1000.0,
    )


def _byte_limit(runtime: ServiceRuntime) -> int:
    return min(MAX_ATTACK_BYTES, runtime.settings.max_body_bytes)
