"""The Open Inference Protocol (KServe v2 REST) on the wire: typed messages and tensor (de)serialisation, JSON and
the binary tensor data extension (a JSON header, then raw tensor bytes; `Inference-Header-Content-Length` says where
the JSON ends). Pure functions of bytes and arrays, no HTTP: service/routes/open_inference.py is the HTTP layer.

Binary layout per datatype (little-endian, row-major): FP32 4 bytes, INT64 8 bytes, BOOL 1 byte, BYTES each element
as a 4-byte length then its bytes. In JSON a BYTES input element is base64 (KServe's convention for binary content,
e.g. encoded images); BYTES outputs here are UTF-8 text (class names) and go out as plain strings.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from enum import StrEnum
from typing import Any, NamedTuple

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .schemas import CertifyInfo

HEADER_LENGTH = "Inference-Header-Content-Length"


class Datatype(StrEnum):
    """The tensor datatypes this service reads or writes (the protocol has more; others are refused)."""

    BOOL = "BOOL"
    INT64 = "INT64"
    FP32 = "FP32"
    BYTES = "BYTES"


_NUMPY = {Datatype.BOOL: np.dtype("?"), Datatype.INT64: np.dtype("<i8"), Datatype.FP32: np.dtype("<f4")}


class ProtocolError(ValueError):
    """The request does not follow the protocol or the model's tensor metadata (the HTTP layer answers 422)."""


# ------------------------------------------------------------------------------------------------ messages


class TensorMetadata(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int] = Field(description="-1 for a dimension of any size")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(default_factory=list)
    platform: str
    inputs: list[TensorMetadata] = Field(description="send exactly one of these per request")
    outputs: list[TensorMetadata]
    certify: CertifyInfo | None = Field(
        None, description="this service's extension: mode=certify's σ and sample limits (null: cannot certify)"
    )


class Ready(BaseModel):
    ready: bool


class Live(BaseModel):
    live: bool


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = Field(None, description="row-major values; absent when sent as binary data")


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="mode (min-aux, fixed, none), epsilon (with fixed), binary_data_output"
    )
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = Field(None, description="which outputs to return (default: all but purified)")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


# ------------------------------------------------------------------------------------------------ tensors


class Tensor(NamedTuple):
    """One input tensor of `shape`: its values as a numpy array of that shape, or for BYTES the elements as a flat
    row-major list of bytes (an object array would cost the event loop more than the rest of the parsing). A
    NamedTuple: immutable, and cheaper to build than a frozen dataclass."""

    name: str
    datatype: Datatype
    shape: list[int]
    values: np.ndarray | list[bytes]


_DATATYPES = {d.value: d for d in Datatype}


def _count(shape: list[int]) -> int:
    if shape and min(shape) < 0:
        raise ProtocolError(f"shape {shape} has a negative dimension")
    return math.prod(shape)


def _flatten(data: list[Any]) -> list[Any]:
    """Row-major data may come flat or nested (the protocol allows both)."""
    if not any(isinstance(v, list) for v in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            flat.append(v)
        else:
            stack.pop()
    return flat


def _split_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    out = []
    offset, end = 0, len(raw)
    for i in range(count):
        if offset + 4 > end:
            raise ProtocolError(f"input {name!r}: binary BYTES data ends inside element {i}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > end:
            raise ProtocolError(f"input {name!r}: binary BYTES element {i} is longer than the data")
        out.append(raw[offset : offset + length])
        offset += length
    if offset != end:
        raise ProtocolError(f"input {name!r}: {end - offset} bytes left after {count} BYTES elements")
    return out


def _unbase64(text: Any, name: str, index: int) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError(f"input {name!r}: BYTES element {index} must be a base64 string in JSON")
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"input {name!r}: BYTES element {index} is not valid base64") from None


def decode_input(spec: RequestInput, raw: bytes | None) -> Tensor:
    """The tensor an input carries, from its JSON `data` or its binary bytes, checked against its shape."""
    datatype = _DATATYPES.get(spec.datatype)
    if datatype is None:
        raise ProtocolError(f"input {spec.name!r}: datatype {spec.datatype} is not supported")
    count = _count(spec.shape)
    if raw is None and spec.data is None:
        raise ProtocolError(f"input {spec.name!r} has neither data nor binary_data_size")
    if raw is not None and spec.data is not None:
        raise ProtocolError(f"input {spec.name!r} has both data and binary_data_size")
    if datatype is Datatype.BYTES:
        if raw is not None:
            return Tensor(spec.name, datatype, spec.shape, _split_bytes(raw, count, spec.name))
        items = _flatten(spec.data or [])
        if len(items) != count:
            raise ProtocolError(f"input {spec.name!r}: shape {spec.shape} needs {count} elements, got {len(items)}")
        return Tensor(spec.name, datatype, spec.shape, [_unbase64(item, spec.name, i) for i, item in enumerate(items)])
    dtype = _NUMPY[datatype]
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise ProtocolError(
                f"input {spec.name!r}: shape {spec.shape} {datatype} needs {count * dtype.itemsize} bytes, "
                f"got {len(raw)}"
            )
        values = np.frombuffer(raw, dtype=dtype)
    else:
        items = _flatten(spec.data or [])
        if len(items) != count:
            raise ProtocolError(f"input {spec.name!r}: shape {spec.shape} needs {count} elements, got {len(items)}")
        if datatype is not Datatype.BOOL and any(isinstance(v, bool) or not isinstance(v, int | float) for v in items):
            raise ProtocolError(f"input {spec.name!r}: {datatype} data must be numbers")
        try:
            values = np.asarray(items, dtype=dtype)
        except (TypeError, ValueError, OverflowError):
            raise ProtocolError(f"input {spec.name!r}: data are not {datatype} values") from None
    return Tensor(spec.name, datatype, spec.shape, values.reshape(spec.shape))


def parse_request(body: bytes, header_length: int | None) -> tuple[InferRequest, list[Tensor]]:
    """The request and its input tensors. `header_length` is the Inference-Header-Content-Length header (None
    when the whole body is JSON); binary inputs follow the JSON in the order of `inputs`."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH} {header_length} does not fit a body of {len(body)} bytes")
    head = body if header_length is None else body[:header_length]
    try:  # parsed and validated in one step, by pydantic-core (cheaper than json.loads, then validation)
        request = InferRequest.model_validate_json(head)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors and errors[0]["type"] == "json_invalid":
            raise ProtocolError(f"the inference request is not valid JSON: {errors[0]['msg']}") from None
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in errors)
        raise ProtocolError(problems) from None
    offset = len(head)
    tensors = []
    for spec in request.inputs:
        raw = None
        size = spec.parameters.get("binary_data_size")
        if size is not None:
            if header_length is None:
                raise ProtocolError(f"input {spec.name!r} has binary_data_size but the request has no {HEADER_LENGTH}")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(body):
                raise ProtocolError(f"input {spec.name!r}: binary_data_size {size} does not fit the body")
            raw = body[offset : offset + size]
            offset += size
        tensors.append(decode_input(spec, raw))
    if offset != len(body):
        raise ProtocolError(f"{len(body) - offset} bytes of binary data belong to no input")
    return request, tensors


class OutputTensor(NamedTuple):
    """One tensor of an answer: its values flat and row-major as Python values (str for BYTES), laid out by `shape`.
    Lists, not arrays: JSON needs them anyway, and binary data is one struct.pack of them (numpy's per-call cost,
    several calls per output, was most of an answer's event-loop time)."""

    name: str
    datatype: Datatype
    shape: list[int]
    data: list[Any]


_PACK = {Datatype.BOOL: "?", Datatype.INT64: "q", Datatype.FP32: "f"}  # struct codes, little-endian (<)


def _binary(tensor: OutputTensor) -> bytes:
    if tensor.datatype is Datatype.BYTES:
        return b"".join(struct.pack("<I", len(b)) + b for b in (text.encode() for text in tensor.data))
    return struct.pack(f"<{len(tensor.data)}{_PACK[tensor.datatype]}", *tensor.data)


def encode_response(
    model_name: str,
    request_id: str | None,
    outputs: list[OutputTensor],
    binary: set[str],
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """The response body and, when any output in `binary` goes as binary data, the JSON header's length (for
    Inference-Header-Content-Length)."""
    entries = []
    chunks = []
    for tensor in outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if tensor.name in binary:
            chunk = _binary(tensor)
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        elif tensor.datatype is Datatype.FP32:  # as float32, so JSON has 0.05, not the float64 0.05000000074505806
            entry["data"] = np.asarray(tensor.data, dtype=np.float32)
        else:
            entry["data"] = tensor.data
        entries.append(entry)
    message: dict[str, Any] = {"model_name": model_name, "outputs": entries}
    if request_id is not None:
        message["id"] = request_id
    if parameters:
        message["parameters"] = parameters
    head = orjson.dumps(message, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)
