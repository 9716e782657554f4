"""OpenAPI conformance: schemathesis generates requests (valid and invalid ones) from the app's own OpenAPI document
and sends them to a real `python -m service` process, checking every answer against the document with all its checks:
no 5xx, documented status codes, content types, headers and bodies, invalid input refused, valid input accepted,
undocumented methods answered 405 with the right `Allow`. Bounded and derandomized (fixed seed): reproducible."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import negative_data_rejection
from schemathesis.generation.meta import ParameterLocation
from schemathesis.generation.modes import GenerationMode
from support import SHIPPED, ServiceProcess, mnist_png, settings_for

from service.app import create_app

OPTIONS = ["--enable-attack", "--no-compute-process", "--max-batch-size", "8", "--max-delay-ms", "1"]
# The document the server serves, built here: parametrization needs it at collection time, before any fixture runs.
DOCUMENT = create_app(settings_for(SHIPPED, enable_attack=True)).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT)
# Image bytes are real digits: random bytes are refused as "not an image" (422), which no document can express, and
# the positive-data check would count that as a valid request refused.
PNGS = [mnist_png(d) for d in range(10)]
schemathesis.openapi.format("binary", st.sampled_from(PNGS))
schemathesis.openapi.format("byte", st.sampled_from([base64.b64encode(p).decode() for p in PNGS]))
schemathesis.openapi.media_type("image/*", st.sampled_from(PNGS))


def within_cross_option_rules(case: schemathesis.Case) -> None:
    """OpenAPI cannot tie one option to another; /classify does (epsilon only with mode=fixed, which needs one, at
    most the largest budget; samples and alpha only with mode=certify; one model name; refusals that
    tests/test_service_api.py checks). Valid (positive) cases are brought within those rules, so the positive-data
    check judges the rest."""
    if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return
    body = case.body if isinstance(case.body, dict) else None
    query_model = (case.query or {}).get("model")
    if body and query_model and body.get("model") not in (None, "", query_model):
        body.pop("model")  # a body may not name another model than the query string (422 "name one")
    for options in (case.query, case.body if isinstance(case.body, dict) else None):
        if not options:
            continue
        mode = _final(case, "mode")
        if mode != "fixed":
            options.pop("epsilon", None)
        elif _final(case, "epsilon") is None:
            options["epsilon"] = 0.1
        else:
            options["epsilon"] = min(float(options.get("epsilon", 0.1)), 0.5)
        if mode != "certify":
            options.pop("samples", None)
            options.pop("alpha", None)


def unrepresentable_negative_checks(case: schemathesis.Case) -> list[Any]:
    """Multipart text fields carry no types: a negative body (a field set to null, a list, a number where a string
    goes) is sent as the text of that value, e.g. null as an empty field, which can be a valid value. Such a case
    cannot be judged by whether the server refuses it; every other check still runs on it."""
    meta = case.meta
    if meta is None or case.media_type != "multipart/form-data":
        return []
    body = meta.components.get(ParameterLocation.BODY)
    return [negative_data_rejection] if body is not None and body.mode == GenerationMode.NEGATIVE else []


def _final(case: schemathesis.Case, name: str) -> Any:
    """An option's value as the server sees it: the body's overrides the query's."""
    body = case.body if isinstance(case.body, dict) else {}
    return body.get(name, (case.query or {}).get(name))


@pytest.fixture(scope="module")
def server():
    process = ServiceProcess(["--model", str(SHIPPED), *OPTIONS])
    try:
        process.wait_ready()
        assert httpx.get(process.url + "/openapi.json").json() == DOCUMENT
        yield process
    finally:
        process.stop()


@schema.parametrize()
@settings(max_examples=20, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_route_conforms_to_its_openapi_document(case, server):
    if case.path == "/classify":
        within_cross_option_rules(case)
    case.call_and_validate(base_url=server.url, excluded_checks=unrepresentable_negative_checks(case))
