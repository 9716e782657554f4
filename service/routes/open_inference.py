"""Open Inference Protocol (KServe v2) REST routes beside /classify, on the same batchers, limits, API key and
errors (in the protocol's shape, {"error": "..."}, with /classify's status codes), so that standard clients
(tritonclient, KServe's InferenceService, perf_analyzer) talk to the service.

    GET  /v2                          server metadata          GET /v2/health/live, /v2/health/ready
    GET  /v2/models/{name}            model metadata           GET /v2/models/{name}/ready
    POST /v2/models/{name}/infer      one input: `images` (BYTES [N], encoded image files) or
                                      `pixels` (FP32 [N, C, H, W] in [0, 1]); parameters: mode, epsilon
                                      (mode=certify: samples, alpha, seed; certificate outputs instead)

The wire format (JSON and binary tensor data) is service/inference_protocol.py; the inference request goes through
the same pipeline as POST /classify (service/pipeline.py: this module is its Front for the protocol) and, like it, is
handed straight to `infer_endpoint` by the middleware (service/middleware.py). This module is the thin HTTP layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from models import __version__

from ..auth import PROTECTED, SECURITY
from ..batcher import ItemResult
from ..certify import CertifyRequest, CertifyResult
from ..config import ServiceSettings
from ..dependencies import Runtime
from ..errors import bad_options, bad_request, documented, option_problems, unsupported_media_type
from ..inference_protocol import (
    HEADER_LENGTH,
    Datatype,
    InferRequest,
    InferResponse,
    Live,
    ModelMetadata,
    OutputTensor,
    ProtocolError,
    Ready,
    ServerMetadata,
    Tensor,
    TensorMetadata,
    encode_response,
    parse_request,
)
from ..ingest import read_body
from ..pipeline import DEFAULT_OPTIONS, Job, Result, Work, serve, work_for
from ..runtime import ModelRuntime, ServiceRuntime
from ..schemas import ClassifyOptions
from .models import certify_info

IMAGES, PIXELS = "images", "pixels"
OUTPUTS = ("label", "class_name", "probabilities", "epsilon", "aux_loss", "aux_loss_before", "suspicious")
PURIFIED = "purified"  # only when asked for by name: N x C x H x W floats
# mode=certify answers these instead (randomized smoothing; label -1 and class_name "" where it abstains)
CERTIFY_OUTPUTS = ("label", "class_name", "certified_radius", "abstained", "p_lower", "sigma", "samples")
PARAMETERS = frozenset({"mode", "epsilon", "samples", "alpha", "seed"})  # /classify's options, model aside


class ProtocolErrorBody(BaseModel):
    error: str


class ModelReady(BaseModel):
    name: str
    ready: bool


router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])


# ------------------------------------------------------------------------------------------------ metadata


def model_metadata(model: ModelRuntime, settings: ServiceSettings) -> ModelMetadata:
    c, h, w = model.input_shape
    return ModelMetadata(
        name=model.name,
        platform="soap-pytorch",
        inputs=[
            TensorMetadata(name=IMAGES, datatype=Datatype.BYTES, shape=[-1]),
            TensorMetadata(name=PIXELS, datatype=Datatype.FP32, shape=[-1, c, h, w]),
        ],
        outputs=[
            TensorMetadata(name="label", datatype=Datatype.INT64, shape=[-1]),
            TensorMetadata(name="class_name", datatype=Datatype.BYTES, shape=[-1]),
            TensorMetadata(name="probabilities", datatype=Datatype.FP32, shape=[-1, len(model.class_names)]),
            TensorMetadata(name="epsilon", datatype=Datatype.FP32, shape=[-1]),
            TensorMetadata(name="aux_loss", datatype=Datatype.FP32, shape=[-1]),
            TensorMetadata(name="aux_loss_before", datatype=Datatype.FP32, shape=[-1]),
            TensorMetadata(name="suspicious", datatype=Datatype.BOOL, shape=[-1]),
            TensorMetadata(name=PURIFIED, datatype=Datatype.FP32, shape=[-1, c, h, w]),
            TensorMetadata(name="certified_radius", datatype=Datatype.FP32, shape=[-1]),
            TensorMetadata(name="abstained", datatype=Datatype.BOOL, shape=[-1]),
            TensorMetadata(name="p_lower", datatype=Datatype.FP32, shape=[-1]),
            TensorMetadata(name="sigma", datatype=Datatype.FP32, shape=[-1]),
            TensorMetadata(name="samples", datatype=Datatype.INT64, shape=[-1]),
        ],
        certify=certify_info(model, settings),
    )


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="soap-serving", version=__version__, extensions=["binary_tensor_data"])


@router.get("/health/live", response_model=Live, summary="Liveness: the process answers")
async def server_live() -> Live:
    return Live(live=True)


@router.get(
    "/health/ready",
    response_model=Ready,
    responses={503: {"model": Ready}},
    summary="Readiness: every model loaded and warmed up, not shutting down",
)
async def server_ready(runtime: Runtime) -> Response:
    ready = runtime.ready
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@router.get(
    "/models/{name}",
    response_model=ModelMetadata,
    responses=documented(ProtocolErrorBody, 401, 404),
    dependencies=PROTECTED,
    summary="Model metadata: its inputs (send one) and outputs",
)
async def get_model_metadata(name: str, runtime: Runtime) -> ModelMetadata:
    return model_metadata(runtime.get(name), runtime.settings)


@router.get(
    "/models/{name}/ready",
    response_model=ModelReady,
    responses={503: {"model": ModelReady}, **documented(ProtocolErrorBody, 401, 404)},
    dependencies=PROTECTED,
    summary="Model readiness: warmed up, its batcher running, not shutting down",
)
async def get_model_ready(name: str, runtime: Runtime) -> Response:
    model = runtime.get(name)
    ready = model.ready and model.batcher.running and not runtime.draining
    return JSONResponse({"name": model.name, "ready": ready}, status_code=200 if ready else 503)


# ------------------------------------------------------------------------------------------------ inference


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its $defs inlined (OpenAPI resolves refs from the document root)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    inlined: dict[str, Any] = walk(schema)
    return inlined


_INFER_OPENAPI = {
    "security": SECURITY,
    "requestBody": {
        "required": True,
        "description": "JSON; or, with the Inference-Header-Content-Length header, that many bytes of JSON followed "
        "by the binary data of each input whose parameters give binary_data_size",
        "content": {"application/json": {"schema": _inline_refs(InferRequest.model_json_schema())}},
    },
}


_HEADER_LENGTH = HEADER_LENGTH.lower()


def _header_length(value: str | None, model: ModelRuntime) -> int | None:
    """The Inference-Header-Content-Length header's byte count (None: the whole body is JSON)."""
    if value is None:
        return None
    if not value.strip().isdigit():
        raise bad_request(f"{HEADER_LENGTH} must be a byte count, not {value!r}", model.name)
    return int(value)


def _work(parameters: dict[str, Any], model: ModelRuntime, runtime: ServiceRuntime) -> tuple[Work, bool]:
    """What the request parameters ask of the model (the same options and rules as /classify's): a purification
    or, for mode=certify, a certification; and whether all outputs go as binary data."""
    binary = parameters.get("binary_data_output", False)
    if not isinstance(binary, bool):
        raise bad_request("parameter binary_data_output must be true or false", model.name)
    options = {k: v for k, v in parameters.items() if k != "binary_data_output"} if parameters else parameters
    if not options:  # most requests name no option: they share the validated default, as /classify's do
        return work_for(DEFAULT_OPTIONS, model, runtime.settings), binary
    unknown = sorted(set(options) - PARAMETERS)
    if unknown:
        raise bad_request(f"unknown parameters {unknown}; this model takes {sorted(PARAMETERS)}", model.name)
    try:
        chosen = ClassifyOptions.model_validate(options)
    except ValidationError as exc:
        problems = option_problems(exc.errors(include_url=False), noun="parameter")
        raise bad_options(problems, model.name) from None
    return work_for(chosen, model, runtime.settings), binary


def _requested(
    message: InferRequest, binary_all: bool, certify: bool, model: ModelRuntime
) -> tuple[list[str], set[str]]:
    """Output names in order, and those that go as binary data."""
    known = CERTIFY_OUTPUTS if certify else (*OUTPUTS, PURIFIED)
    if message.outputs is None:
        names = list(CERTIFY_OUTPUTS if certify else OUTPUTS)
        return names, set(names) if binary_all else set()
    names, binary = [], set()
    for out in message.outputs:
        if out.name not in known:
            mode = "mode=certify" if certify else "this mode"
            raise bad_request(f"unknown output {out.name!r}; {mode} answers {list(known)}", model.name)
        names.append(out.name)
        if out.parameters.get("binary_data", binary_all):
            binary.add(out.name)
    return names, binary


def _inputs(tensor: Tensor, model: ModelRuntime) -> list[bytes] | torch.Tensor:
    """The input tensor as the pipeline's inputs: encoded image files (decoded like /classify's), or pixels of the
    model's input shape (their range is the pipeline's decode step to check)."""
    if tensor.name == IMAGES:
        shape, payloads = tensor.shape, tensor.values
        if (
            tensor.datatype is not Datatype.BYTES
            or not isinstance(payloads, list)
            or not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1))
        ):
            raise bad_request(f"input {IMAGES!r} must be BYTES of shape [N] (encoded image files)", model.name)
        if not payloads:
            raise bad_request("the input holds no image", model.name)
        return payloads
    if tensor.name == PIXELS:
        expected = [-1, *model.input_shape]
        if tensor.datatype is not Datatype.FP32 or len(tensor.shape) != 4 or tensor.shape[1:] != expected[1:]:
            raise bad_request(
                f"input {PIXELS!r} must be FP32 of shape {expected}; got {tensor.datatype} {tensor.shape}", model.name
            )
        if tensor.shape[0] < 1:
            raise bad_request("the input holds no image", model.name)
        return torch.from_numpy(np.array(tensor.values, dtype=np.float32))  # a copy: binary input is a read-only view
    raise bad_request(f"unknown input {tensor.name!r}; send one input, {IMAGES!r} or {PIXELS!r}", model.name)


def _outputs(model: ModelRuntime, result: ItemResult, names: list[str]) -> list[OutputTensor]:
    """The request's rows as the named output tensors, only those asked for, from the batch's lists (Python)."""
    p = result.predictions
    n, classes = len(p), len(model.class_names)
    labels = [ranked[0] for ranked in p.ranked()[1]]  # the batch's one ranking: the first of equal maxima, as argmax
    out = []
    for name in names:
        if name == "label":
            out.append(OutputTensor(name, Datatype.INT64, [n], labels))
        elif name == "class_name":
            out.append(OutputTensor(name, Datatype.BYTES, [n], [model.class_names[i] for i in labels]))
        elif name == "probabilities":
            out.append(OutputTensor(name, Datatype.FP32, [n, classes], [q for row in p.probs() for q in row]))
        elif name == "epsilon":
            out.append(OutputTensor(name, Datatype.FP32, [n], p.epsilon()))
        elif name == "aux_loss":
            out.append(OutputTensor(name, Datatype.FP32, [n], p.aux_after()))
        elif name == "aux_loss_before":
            out.append(OutputTensor(name, Datatype.FP32, [n], p.aux_before()))
        elif name == "suspicious":
            threshold = model.suspicious_threshold
            out.append(OutputTensor(name, Datatype.BOOL, [n], [b > threshold for b in p.aux_before()]))
        else:  # PURIFIED (_requested let no other name through)
            purified = p.tensors().purified
            out.append(OutputTensor(name, Datatype.FP32, list(purified.shape), purified.flatten().tolist()))
    return out


def _certificate_outputs(model: ModelRuntime, result: CertifyResult, names: list[str]) -> list[OutputTensor]:
    certificates = result.certificates
    n = len(certificates)
    values: dict[str, tuple[Datatype, list[Any]]] = {
        "label": (Datatype.INT64, [-1 if c.label is None else c.label for c in certificates]),
        "class_name": (Datatype.BYTES, ["" if c.label is None else model.class_names[c.label] for c in certificates]),
        "certified_radius": (Datatype.FP32, [c.radius or 0.0 for c in certificates]),
        "abstained": (Datatype.BOOL, [bool(c.abstained) for c in certificates]),
        "p_lower": (Datatype.FP32, [float(c.p_lower) for c in certificates]),
        "sigma": (Datatype.FP32, [float(c.sigma) for c in certificates]),
        "samples": (Datatype.INT64, [int(c.samples) for c in certificates]),
    }
    return [OutputTensor(name, values[name][0], [n], values[name][1]) for name in names]


@dataclass(slots=True)
class Answer:
    """What an infer request's answer needs: its id, the outputs asked for, those that go as binary data."""

    id: str | None
    outputs: list[str]
    binary: set[str]


class InferFront:
    """The pipeline's Front for POST /v2/models/{name}/infer (the path names the model)."""

    async def read(self, request: Request, runtime: ServiceRuntime) -> Job[Answer]:
        settings = runtime.settings
        model = runtime.get(request.path_params["name"])
        request.scope["soap.model"] = model.name
        headers = request.headers
        if headers.get("content-encoding", "identity").strip().lower() != "identity":
            raise unsupported_media_type("compressed request bodies (Content-Encoding) are not accepted", model.name)
        header_length = _header_length(headers.get(_HEADER_LENGTH), model)
        body = await read_body(request, settings.max_body_bytes, model.name, settings.body_timeout_s)
        try:
            message, tensors = parse_request(body, header_length)
        except ProtocolError as exc:
            raise bad_request(str(exc), model.name) from None
        if len(tensors) != 1:
            raise bad_request(f"send exactly one input ({IMAGES!r} or {PIXELS!r}), not {len(tensors)}", model.name)
        work, binary_all = _work(message.parameters, model, runtime)
        names, binary = _requested(message, binary_all, isinstance(work, CertifyRequest), model)
        inputs = _inputs(tensors[0], model)
        return Job(model, work, inputs, Answer(message.id, names, binary))

    def respond(self, request: Request, job: Job[Answer], result: Result, started: float) -> Response:
        model, answer = job.model, job.answer
        info: dict[str, Any] = {"request_id": request.scope["soap.request_id"]}
        if isinstance(result, CertifyResult):
            work = job.work
            assert isinstance(work, CertifyRequest)
            outputs = _certificate_outputs(model, result, answer.outputs)
            info |= {"alpha": work.alpha, "seed": work.seed, "queue_ms": result.queue_s * 1000}
            info |= {"compute_ms": result.compute_s * 1000, "paused_ms": result.paused_s * 1000}
        else:
            outputs = _outputs(model, result, answer.outputs)
            info |= {"queue_ms": result.queue_s * 1000, "compute_ms": result.compute_s * 1000}
        info["total_ms"] = (time.perf_counter() - started) * 1000
        content, json_length = encode_response(model.name, answer.id, outputs, answer.binary, info)
        if json_length is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)})


FRONT = InferFront()


async def infer_endpoint(request: Request) -> Response:
    """POST /v2/models/{name}/infer (the middleware calls it directly, with the path's name in path_params)."""
    return await serve(request, FRONT)


@router.post(
    "/models/{name}/infer",
    response_model=InferResponse,
    responses=documented(ProtocolErrorBody, 401, 404, 408, 413, 415, 422, 500, 503, 504),
    openapi_extra=_INFER_OPENAPI,
    summary="Purify each image with SOAP, then classify it (Open Inference Protocol)",
)
async def infer(name: str, request: Request) -> Response:
    return await infer_endpoint(request)
