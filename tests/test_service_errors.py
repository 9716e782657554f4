"""Errors in plain language (issue 28 point 3), on the real app with the shipped model and a real digit: every refusal
has one body shape ({"error": code, "detail": one string}; the Open Inference Protocol's {"error": "code: detail"}),
and a bad option's detail names the option, the value sent and what is allowed, never pydantic's internal locations.
Every option of /classify is tried in the query string, a multipart field and the JSON body, and every parameter
of /v2 infer in the request's parameters."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from support import mnist_png, serve_app, settings_for

from service.errors import option_problems
from service.schemas import ClassifyOptions

pytestmark = pytest.mark.anyio
PNG = {"Content-Type": "image/png"}
MODEL = "mnist-fcn-dr"
INTERNALS = ("str-enum", "literal[", "'loc'", '"loc"', "Value error", "Input should")

# option -> (the options of a request with one bad value, words its detail must hold: the option, the value, what
# is allowed)
BAD_OPTIONS: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "model": ({"model": "no-such-model"}, ("no-such-model", MODEL)),
    "mode": ({"mode": "purify"}, ("mode", "purify", "min-aux, fixed, none, certify")),
    "epsilon": ({"mode": "fixed", "epsilon": "lots"}, ("epsilon", "lots", "number")),
    "epsilon-negative": ({"mode": "fixed", "epsilon": "-0.1"}, ("epsilon", "-0.1", "greater than or equal to 0")),
    "epsilon-too-large": ({"mode": "fixed", "epsilon": "0.9"}, ("epsilon", "0.9", "0 to 0.5")),
    "top_k": ({"top_k": "0"}, ("top_k", "0", "greater than or equal to 1")),
    "return_purified": ({"return_purified": "maybe"}, ("return_purified", "maybe", "true, false")),
    "return_curve": ({"return_curve": "perhaps"}, ("return_curve", "perhaps", "true, false")),
    "samples": ({"mode": "certify", "samples": "0"}, ("samples", "0", "greater than or equal to 1")),
    "samples-over-limit": ({"mode": "certify", "samples": "100001"}, ("samples", "100001", "1 to 100000")),
    "alpha": ({"mode": "certify", "alpha": "0.9"}, ("alpha", "0.9", "less than 0.5")),
    "seed": ({"mode": "certify", "seed": "-1"}, ("seed", "-1", "greater than or equal to 0")),
    "unknown": ({"colour": "blue"}, ("colour",)),
    # rules that tie options together name the option that is missing or out of place
    "fixed-without-epsilon": ({"mode": "fixed"}, ("epsilon", "mode=fixed")),
    "epsilon-without-fixed": ({"epsilon": "0.1"}, ("epsilon", "mode=fixed")),
    "samples-without-certify": ({"samples": "100"}, ("samples", "mode=certify")),
}


def assert_plain(body: dict, words: tuple[str, ...]) -> str:
    assert set(body) == {"error", "detail"}, body
    detail = body["detail"]
    assert isinstance(detail, str), body
    for word in words:
        assert word in detail, (word, detail)
    for internal in INTERNALS:
        assert internal not in detail, (internal, detail)
    return detail


def test_every_option_of_classify_is_covered():
    assert {case.split("-")[0] for case in BAD_OPTIONS} >= set(ClassifyOptions.model_fields)


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
async def test_a_bad_option_is_named_with_its_value_and_the_allowed_values_in_every_body_shape(model_dir, case):
    options, words = BAD_OPTIONS[case]
    status = 404 if case == "model" else 422
    png = mnist_png(7)
    async with serve_app(settings_for(model_dir)) as (app, client):
        query = await client.post("/classify", params=options, content=png, headers=PNG)
        form = await client.post("/classify", data=options, files={"file": ("d.png", png, "image/png")})
        as_json = await client.post("/classify", json={"images": [base64.b64encode(png).decode()], **options})
    details = []
    for r in (query, form, as_json):
        assert r.status_code == status, r.text
        details.append(assert_plain(r.json(), words))
    assert details[0] == details[1] == details[2]  # wherever the option was sent, the same sentence


V2_BAD_PARAMETERS = {
    "mode": ({"mode": "purify"}, ("parameter mode", "purify", "min-aux, fixed, none, certify")),
    "epsilon": ({"mode": "fixed", "epsilon": "lots"}, ("parameter epsilon", "lots")),
    "epsilon-too-large": ({"mode": "fixed", "epsilon": 0.9}, ("epsilon", "0.9", "0 to 0.5")),
    "samples": ({"mode": "certify", "samples": 0}, ("parameter samples", "0", "greater than or equal to 1")),
    "alpha": ({"mode": "certify", "alpha": 0.9}, ("parameter alpha", "0.9", "less than 0.5")),
    "seed": ({"mode": "certify", "seed": -1}, ("parameter seed", "-1", "greater than or equal to 0")),
    "fixed-without-epsilon": ({"mode": "fixed"}, ("epsilon", "mode=fixed")),
    "unknown": ({"colour": "blue"}, ("colour", "mode")),
}


@pytest.mark.parametrize("case", sorted(V2_BAD_PARAMETERS))
async def test_a_bad_v2_parameter_is_named_in_the_protocols_error_shape(model_dir, case):
    parameters, words = V2_BAD_PARAMETERS[case]
    image = base64.b64encode(mnist_png(7)).decode()
    message = {
        "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [image]}],
        "parameters": parameters,
    }
    async with serve_app(settings_for(model_dir)) as (app, client):
        r = await client.post(f"/v2/models/{MODEL}/infer", json=message)
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == {"error"}
    code, _, detail = body["error"].partition(": ")
    assert code in ("bad_options", "bad_request")
    assert_plain({"error": code, "detail": detail}, words)


async def test_every_other_refusal_has_the_same_body_shape(model_dir):
    async with serve_app(settings_for(model_dir)) as (app, client):
        answers = {
            404: await client.get("/no/such/route"),
            405: await client.delete("/classify"),
            415: await client.post("/classify", content=b"x", headers={"Content-Type": "text/plain"}),
            422: await client.post("/classify", content=b"not an image", headers=PNG),
        }
        answers[413] = await client.post(
            "/classify", content=b"x" * (app.state.runtime.settings.max_body_bytes + 1), headers=PNG
        )
    for status, r in answers.items():
        assert r.status_code == status, r.text
        body = r.json()
        assert set(body) == {"error", "detail"}, body
        assert isinstance(body["detail"], str), body


def test_fastapis_own_validation_errors_lose_the_request_part_of_their_location():
    """RequestValidationError locations start with where the value was ("query", "body"): the sentence names the
    option only."""
    errors = [
        {"type": "int_parsing", "loc": ("query", "steps"), "msg": "Input should be a valid integer", "input": "x"},
        {"type": "missing", "loc": ("body", "file"), "msg": "Field required", "input": None},
    ]
    assert option_problems(errors) == "option steps='x': must be a valid integer; option file is required"


async def test_a_large_phone_photo_is_decoded_at_reduced_scale_and_accepted(model_dir):
    """Issue 28 point 4: a 6000x4000 JPEG (24 MP, over the default pixel limit of 16.7 MP) is decoded at 1/8 scale
    (750x500) for a 28x28 model and classified; with a pixel limit below even that, the refusal names the option."""
    photo = Image.new("L", (60, 40))
    photo.putdata([(x * 4 + y * 3) % 256 for y in range(40) for x in range(60)])
    buffer = io.BytesIO()
    photo.resize((6000, 4000), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=60)
    jpeg = buffer.getvalue()
    assert settings_for(model_dir).max_image_pixels < 6000 * 4000
    async with serve_app(settings_for(model_dir)) as (app, client):
        accepted = await client.post("/classify", content=jpeg, headers={"Content-Type": "image/jpeg"})
    assert accepted.status_code == 200, accepted.text
    assert 0 <= accepted.json()["results"][0]["label"] <= 9
    async with serve_app(settings_for(model_dir, max_image_pixels=100_000)) as (app, client):
        refused = await client.post("/classify", content=jpeg, headers={"Content-Type": "image/jpeg"})
    assert refused.status_code == 422
    assert_plain(refused.json(), ("750x500", "100000", "--max-image-pixels", "SOAP_MAX_IMAGE_PIXELS"))
