"""POST /classify, the service's own protocol: images as multipart parts, a raw image or base64 JSON; options in the
query string and the body; one JSON object per image back. This module is the protocol's two ends (reading the
request into a pipeline Job, encoding the result); everything between is service/pipeline.py.

POST /classify is handed straight to `endpoint` by the middleware (service/middleware.py, the measured fast path);
the route registered here serves the OpenAPI document and the 405 for other methods.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError

from ..auth import SECURITY
from ..batcher import ItemResult
from ..certify import CertifyRequest
from ..decode import encode_png
from ..errors import bad_options, documented, option_problems
from ..ingest import check_media_type, media_type, parse_upload, read_body
from ..pipeline import DEFAULT_OPTIONS, Job, Result, serve, work_for
from ..runtime import ModelRuntime, ServiceRuntime, as_written
from ..schemas import (
    CertifyResponse,
    ClassifyOptions,
    ClassifyResponse,
    ErrorResponse,
    image_upload_body,
    query_parameters,
)


class ClassifyFront:
    """The pipeline's Front for POST /classify; its Job's answer is the request's options."""

    async def read(self, request: Request, runtime: ServiceRuntime) -> Job[ClassifyOptions]:
        settings = runtime.settings
        query = dict(request.query_params)
        query_model = query.get("model")
        request.scope["soap.model"] = runtime.metrics_label(query_model)
        kind = media_type(request)  # (draining was refused by the middleware, full queues where it knew the model)
        check_media_type(kind)
        body = await read_body(request, settings.max_body_bytes, query_model, settings.body_timeout_s)
        upload = await parse_upload(request, kind, body, settings.max_images_per_request, query_model)
        options = classify_options(query, upload.options, query_model)
        model = runtime.get(options.model)
        request.scope["soap.model"] = model.name
        return Job(model, work_for(options, model, settings), upload.payloads, options)

    def respond(self, request: Request, job: Job[ClassifyOptions], result: Result, started: float) -> Response:
        model = job.model
        if isinstance(result, ItemResult):
            results = _results(model, result, job.answer)
            timing = {"queue": result.queue_s * 1000, "compute": result.compute_s * 1000}
        else:
            work = job.work
            assert isinstance(work, CertifyRequest)
            results = _certificates(model, result.certificates, work)
            timing = {
                "queue": result.queue_s * 1000,
                "compute": result.compute_s * 1000,
                "paused": result.paused_s * 1000,
            }
        timing["total"] = (time.perf_counter() - started) * 1000
        body = {"request_id": request.scope["soap.request_id"], "model": model.name, "results": results}
        body["timing_ms"] = timing
        return Response(orjson.dumps(body), media_type="application/json")


FRONT = ClassifyFront()


async def endpoint(request: Request) -> Response:
    """POST /classify (the middleware calls it directly)."""
    return await serve(request, FRONT)


router = APIRouter()


@router.post(
    "/classify",
    response_model=ClassifyResponse | CertifyResponse,
    responses=documented(ErrorResponse, 401, 404, 408, 413, 415, 422, 500, 503, 504),
    openapi_extra={
        "security": SECURITY,  # the pipeline calls require_api_key itself, not as a declared dependency
        "parameters": query_parameters(ClassifyOptions),
        "requestBody": image_upload_body(None, ClassifyOptions, json_images=True),
    },
    summary="Purify each image with SOAP, then classify it (mode=certify: a certified smoothed prediction instead)",
)
async def classify(request: Request) -> Response:
    return await endpoint(request)


def classify_options(query: dict[str, Any], body: dict[str, Any], query_model: str | None) -> ClassifyOptions:
    """Query options, overridden by body options; but a body may not send the request to another model than the
    query string names (load shedding judged the request by the query's model before the body was read). An empty
    `model` field names no model (a form's unchosen input); other options are validated as sent."""
    if not query and not body:  # validating nothing cost ~20 µs of event loop per request (ablation, 64 clients)
        return DEFAULT_OPTIONS
    if body.get("model") == "":
        body = {k: v for k, v in body.items() if k != "model"}
    body_model = body.get("model")
    if query_model and body_model is not None and body_model != query_model:
        raise bad_options(
            f"the query string names model {query_model!r} and the body {body_model!r}; name one", query_model
        )
    if query.keys() & body.keys():  # otherwise the merged validation below sees every query option as sent
        try:
            ClassifyOptions.model_validate(query)
        except ValidationError as exc:
            # A malformed query option is refused even where the body overrides it; the rules that tie options
            # together (no field location) apply to the merged options below.
            problems = option_problems(e for e in exc.errors(include_url=False) if e["loc"])
            if problems:
                raise bad_options(problems, query_model) from None
    try:
        return ClassifyOptions.model_validate({**query, **body})
    except ValidationError as exc:
        raise bad_options(option_problems(exc.errors(include_url=False)), query_model) from None


def _results(model: ModelRuntime, result: ItemResult, options: ClassifyOptions) -> list[dict[str, Any]]:
    """One JSON object per image."""
    p = result.predictions
    names = model.class_names
    k = min(options.top_k, len(names))
    ranked_probs, ranked_labels = p.ranked()
    tensors = p.tensors() if options.return_purified or options.return_curve else None
    threshold = model.suspicious_threshold
    rows = []
    for j, (ranked, ranked_by, eps, after, before) in enumerate(
        zip(ranked_probs, ranked_labels, p.epsilon(), p.aux_after(), p.aux_before(), strict=True)
    ):
        probs, labels = ranked[:k], ranked_by[:k]
        rows.append(
            {
                "label": labels[0],
                "class_name": names[labels[0]],
                "confidence": probs[0],
                "top_k": [
                    {"label": c, "class_name": names[c], "probability": q} for c, q in zip(labels, probs, strict=True)
                ],
                "epsilon": as_written(eps),  # 0.05 rather than the float32 0.05000000074505806
                "aux_loss": after,
                "aux_loss_before": before,
                "suspicious": before > threshold,
                "purified_png": base64.b64encode(encode_png(tensors.purified[j])).decode()
                if tensors is not None and options.return_purified
                else None,
                "aux_curve": tensors.curve[j].tolist() if tensors is not None and options.return_curve else None,
            }
        )
    return rows


def _certificates(model: ModelRuntime, certificates: list[Any], work: CertifyRequest) -> list[dict[str, Any]]:
    """One JSON object per image of a mode=certify request."""
    names = model.class_names
    return [
        {
            "label": c.label,
            "class_name": names[c.label] if c.label is not None else None,
            "certified_radius": c.radius,
            "abstained": c.abstained,
            "p_lower": c.p_lower,
            "sigma": c.sigma,
            "samples": c.samples,
            "alpha": work.alpha,
            "seed": work.seed + i,
        }
        for i, c in enumerate(certificates)
    ]
