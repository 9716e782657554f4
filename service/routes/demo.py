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

import asyncio
import base64
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from models.attacks import pgd

from .auth import PROTECTED
from .decode import DecodeLimits, ImageRejected, decode_image, encode_png
from .errors import ServiceError, validation_problems
from .ingest import media_type, parse_upload, read_body
from .schemas import ErrorResponse, image_upload_body, query_parameters

STATIC_DIR = Path(__file__).parent / "static"

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
        problems = validation_problems(exc.errors(include_url=False))
        raise ServiceError(422, "bad_options", problems, reason="bad_options", model=model) from None


def register_demo(app: FastAPI) -> None:
    """Mount the demo page (GET /, /static) and the attack endpoint (GET/POST /v1/attack) on `app`.

    Reads the runtime from `app.state.runtime` at request time (service.runtime.ServiceRuntime).
    """
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/v1/attack", response_model=AttackInfo, dependencies=PROTECTED, tags=["demo"])
    async def attack_info(request: Request) -> AttackInfo:
        """Whether POST /v1/attack is enabled, its limits and the default PGD settings per model."""
        runtime = request.app.state.runtime
        return AttackInfo(
            enabled=runtime.settings.enable_attack,
            max_steps=MAX_ATTACK_STEPS,
            max_epsilon=MAX_ATTACK_EPSILON,
            max_image_bytes=_byte_limit(runtime),
            defaults={name: attack_defaults(m.loaded.meta.dataset) for name, m in runtime.models.items()},
        )

    one_at_a_time = asyncio.Lock()

    @app.post(
        "/v1/attack",
        response_model=AttackResponse,
        dependencies=PROTECTED,
        tags=["demo"],
        responses={
            status: {"model": ErrorResponse, "description": text}
            for status, text in {
                401: "missing or wrong API key",
                403: "the attack endpoint is off (start with --enable-attack)",
                404: "unknown model",
                408: "the body did not arrive in time",
                413: "body over the limit",
                415: "Content-Type is not multipart/form-data or image/*",
                422: "bad image or bad options",
                503: "another attack is running, or shutting down (see Retry-After)",
            }.items()
        },
        openapi_extra={
            "parameters": query_parameters(AttackOptions),
            "requestBody": image_upload_body(1, AttackOptions),
        },
    )
    async def attack(request: Request) -> AttackResponse:
        """PGD adversarial version of one image against the undefended classifier (demo; off by default).

        Body: multipart with one `file` part, or a raw image (`Content-Type: image/*`). Options (query or
        multipart fields): model, epsilon, step_size, steps.
        """
        runtime = request.app.state.runtime
        query_model = request.query_params.get("model")
        if not runtime.settings.enable_attack:
            raise ServiceError(
                403,
                "attack_disabled",
                "the demo attack endpoint is off; start the service with --enable-attack "
                "(or SOAP_ENABLE_ATTACK=1) to use it",
            )
        kind = media_type(request)
        if kind != "multipart/form-data" and not kind.startswith("image/"):
            raise ServiceError(
                415,
                "unsupported_media_type",
                f"Content-Type {kind or 'none'} is not accepted; send multipart/form-data (one 'file' "
                "part) or a raw image/*",
                reason="unsupported_media_type",
                model=query_model,
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
            raise ServiceError(exc.status, exc.error, exc.detail, reason=exc.error, model=model.name) from None
        if one_at_a_time.locked():  # checked and taken on the event loop with no await between: no race
            raise ServiceError(
                503, "attack_busy", "another attack is running; try again in a moment", headers={"Retry-After": "1"}
            )
        start = time.perf_counter()
        async with one_at_a_time:
            result = await run_in_threadpool(adversarial_example, model.loaded.network, x, settings)
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


def _byte_limit(runtime: Any) -> int:
    return min(MAX_ATTACK_BYTES, runtime.settings.max_body_bytes)
