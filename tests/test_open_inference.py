"""The Open Inference Protocol (KServe v2) routes, spoken by the real Triton client (tritonclient[http]) to a real
`python -m service` (uvicorn, compute child process) keyed through --api-key-file: metadata, readiness, BYTES and
FP32 inference on real MNIST digits (binary and JSON tensors), and the refusals in the protocol's error shape."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from support import ServiceProcess, mnist_files, serve_app, settings_for
from tritonclient.utils import InferenceServerException

from models import __version__

KEY = "v2-test-key"
MODEL = "mnist-fcn-dr"


def auth() -> dict[str, str]:
    """A fresh header dict per call: tritonclient adds its own headers to the dict it is given."""
    return {"Authorization": f"Bearer {KEY}"}


MAX_IMAGES = 12


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    secret = tmp_path_factory.mktemp("secrets") / "soap_api_key"
    secret.write_text(KEY + "\n")
    proc = ServiceProcess(
        ["--model", str(model_dir), "--max-images-per-request", str(MAX_IMAGES)],
        {"SOAP_API_KEY_FILE": str(secret)},
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def digits() -> tuple[list[bytes], np.ndarray]:
    """One real test digit per class (the shipped model classifies each of these correctly under /classify)."""
    files = mnist_files(per_digit=1)
    return [p.read_bytes() for _, p in files], np.array([d for d, _ in files])


def _pixels(pngs: list[bytes]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("L"), dtype=np.float32)[None] / 255.0 for b in pngs])


def _status(exc: InferenceServerException) -> int:
    return int(exc.status())


def test_metadata_and_readiness(client, server):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL, headers=auth())
    meta = client.get_server_metadata()
    assert meta["name"] == "soap-serving"
    assert meta["version"] == __version__
    assert "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata(MODEL, headers=auth())
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in model["inputs"]} == {
        ("images", "BYTES", (-1,)),
        ("pixels", "FP32", (-1, 1, 28, 28)),
    }
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in model["outputs"]}
    assert outputs["label"] == ("INT64", [-1])
    assert outputs["probabilities"] == ("FP32", [-1, 10])
    assert outputs["suspicious"] == ("BOOL", [-1])
    assert {"epsilon", "aux_loss", "aux_loss_before", "class_name", "purified"} <= set(outputs)
    # Model routes take the API key like /v1/models; health and server metadata do not.
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata(MODEL)
    assert _status(info.value) == 401
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("no-such-model", headers=auth())
    assert _status(info.value) == 404
    assert "unknown_model" in info.value.message()


def test_bytes_inference_labels_real_digits(server, client, digits):
    pngs, labels = digits
    images = triton.InferInput("images", [len(pngs)], "BYTES")
    images.set_data_from_numpy(np.array(pngs, dtype=object))  # binary tensor data (the client's default)
    result = client.infer(MODEL, [images], headers=auth())
    np.testing.assert_array_equal(result.as_numpy("label"), labels)
    assert [c.decode() for c in result.as_numpy("class_name")] == [str(d) for d in labels]
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32
    assert probs.shape == (10, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(probs.argmax(axis=1), labels)
    eps = result.as_numpy("epsilon")
    assert eps.shape == (10,)
    assert (eps >= 0).all()
    assert (eps > 0).any()
    assert result.as_numpy("aux_loss").shape == (10,)
    assert (result.as_numpy("aux_loss") <= result.as_numpy("aux_loss_before") + 1e-6).all()
    info = httpx.get(f"{server.url}/v1/models/{MODEL}", headers=auth(), timeout=30).json()
    threshold = info["calibration"]["suspicious_threshold"]
    assert result.as_numpy("suspicious").dtype == np.bool_
    np.testing.assert_array_equal(result.as_numpy("suspicious"), result.as_numpy("aux_loss_before") > threshold)
    assert result.get_output("purified") is None  # only when asked for by name

    # The same images as JSON (base64 BYTES elements) with JSON outputs, and mode=none.
    as_text = triton.InferInput("images", [3], "BYTES")
    as_text.set_data_from_numpy(np.array([base64.b64encode(b) for b in pngs[:3]], dtype=object), binary_data=False)
    wanted = [triton.InferRequestedOutput(n, binary_data=False) for n in ("label", "epsilon", "suspicious")]
    result = client.infer(MODEL, [as_text], outputs=wanted, headers=auth(), parameters={"mode": "none"})
    np.testing.assert_array_equal(result.as_numpy("label"), labels[:3])
    np.testing.assert_array_equal(result.as_numpy("epsilon"), 0.0)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["label", "epsilon", "suspicious"]


def test_fp32_inference_matches_bytes_and_honours_fixed_epsilon(client, digits):
    pngs, labels = digits
    pixels = triton.InferInput("pixels", [len(pngs), 1, 28, 28], "FP32")
    pixels.set_data_from_numpy(_pixels(pngs))
    result = client.infer(MODEL, [pixels], headers=auth(), parameters={"mode": "fixed", "epsilon": 0.1})
    np.testing.assert_array_equal(result.as_numpy("label"), labels)
    np.testing.assert_allclose(result.as_numpy("epsilon"), 0.1, rtol=1e-6)
    # JSON outputs write FP32 values as float32 (0.1, not the float64 of a float32: 0.10000000149011612)
    as_json = [triton.InferRequestedOutput("epsilon", binary_data=False)]
    result = client.infer(
        MODEL, [pixels], outputs=as_json, headers=auth(), parameters={"mode": "fixed", "epsilon": 0.1}
    )
    assert result.get_response()["outputs"][0]["data"] == [0.1] * len(pngs)
    wanted = [triton.InferRequestedOutput("purified"), triton.InferRequestedOutput("label")]
    result = client.infer(MODEL, [pixels], outputs=wanted, headers=auth(), parameters={"mode": "none"})
    purified = result.as_numpy("purified")
    assert purified.shape == (10, 1, 28, 28)
    np.testing.assert_allclose(purified, _pixels(pngs), atol=1e-6)  # mode none leaves the image as it came


@pytest.mark.parametrize(
    ("name", "shape", "datatype", "parameters", "status", "words"),
    [
        ("pixels", [1, 1, 27, 28], "FP32", {}, 422, "shape"),
        ("pixels", [1, 3, 28, 28], "FP32", {}, 422, "shape"),
        ("pixels", [1, 1, 28, 28], "INT64", {}, 422, "FP32"),
        ("tensor", [1, 1, 28, 28], "FP32", {}, 422, "unknown input"),
        ("pixels", [1, 1, 28, 28], "FP32", {"mode": "fixed"}, 422, "epsilon"),
        ("pixels", [1, 1, 28, 28], "FP32", {"mode": "fixed", "epsilon": 5.0}, 422, "largest budget"),
        ("pixels", [1, 1, 28, 28], "FP32", {"colour": "blue"}, 422, "unknown parameters"),
        ("pixels", [MAX_IMAGES + 1, 1, 28, 28], "FP32", {}, 413, "limit"),
    ],
)
def test_bad_requests_are_refused_with_classify_status_codes(client, name, shape, datatype, parameters, status, words):
    tensor = triton.InferInput(name, shape, datatype)
    dtype = np.int64 if datatype == "INT64" else np.float32
    tensor.set_data_from_numpy(np.zeros(shape, dtype=dtype))
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, [tensor], headers=auth(), parameters=parameters)
    assert _status(info.value) == status
    assert words in info.value.message()


def test_errors_have_the_protocol_shape_and_the_service_survives(server, client, digits):
    url = f"{server.url}/v2/models/{MODEL}/infer"
    cases = [  # body, extra headers, status, words the error says
        (b"{not json", {}, 422, "not valid JSON"),
        (b'{"inputs": []}', {}, 422, "inputs: List should have at least 1 item"),
        (b'{"inputs": [{"name": "pixels"}], "colour": 1}', {}, 422, "colour: Extra inputs are not permitted"),
        (b'{"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [2.0]}]}', {}, 422,
         "needs 784 elements"),
        (b'{"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["bm90IGFuIGltYWdl"]}]}', {}, 422,
         "image"),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "9999"}, 422, "does not fit"),
        (b"{}", {"Content-Encoding": "gzip"}, 415, "compressed"),
    ]  # fmt: skip
    for body, extra, status, words in cases:
        r = httpx.post(url, content=body, headers={**auth(), **extra}, timeout=60)
        assert r.status_code == status, (body, r.text)
        assert set(r.json()) == {"error"}
        assert words in r.json()["error"], (body, r.text)
    r = httpx.post(url, content=b"{}", timeout=60)
    assert r.status_code == 401
    assert set(r.json()) == {"error"}
    # Out-of-range pixels: 422 bad_image, and the next request is served.
    pixels = triton.InferInput("pixels", [1, 1, 28, 28], "FP32")
    pixels.set_data_from_numpy(np.full((1, 1, 28, 28), 1.5, dtype=np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, [pixels], headers=auth())
    assert _status(info.value) == 422
    assert "[0, 1]" in info.value.message()
    pngs, labels = digits
    images = triton.InferInput("images", [1], "BYTES")
    images.set_data_from_numpy(np.array(pngs[:1], dtype=object))
    assert client.infer(MODEL, [images], headers=auth()).as_numpy("label").tolist() == labels[:1].tolist()


def test_certify_mode_answers_the_same_certificates_as_classify(server, client, digits):
    pngs, labels = digits
    parameters = {"mode": "certify", "samples": 300, "alpha": 0.01, "seed": 3}
    images = triton.InferInput("images", [2], "BYTES")
    images.set_data_from_numpy(np.array(pngs[:2], dtype=object))
    result = client.infer(MODEL, [images], headers=auth(), parameters=parameters)
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == [
        "label",
        "class_name",
        "certified_radius",
        "abstained",
        "p_lower",
        "sigma",
        "samples",
    ]
    assert response["parameters"]["seed"] == 3
    np.testing.assert_array_equal(result.as_numpy("samples"), 400)  # n0 + n
    files = [("file", (f"d{i}.png", png, "image/png")) for i, png in enumerate(pngs[:2])]
    classify = httpx.post(f"{server.url}/classify", params=parameters, files=files, headers=auth(), timeout=120).json()[
        "results"
    ]
    np.testing.assert_array_equal(result.as_numpy("label"), [r["label"] for r in classify])
    np.testing.assert_allclose(result.as_numpy("p_lower"), [r["p_lower"] for r in classify], rtol=1e-6)
    np.testing.assert_allclose(
        result.as_numpy("certified_radius"), [r["certified_radius"] for r in classify], rtol=1e-6
    )
    assert not result.as_numpy("abstained").any()
    np.testing.assert_array_equal(result.as_numpy("label"), labels[:2])
    with pytest.raises(InferenceServerException) as info:
        client.infer(
            MODEL, [images], headers=auth(), outputs=[triton.InferRequestedOutput("epsilon")], parameters=parameters
        )
    assert _status(info.value) == 422


@pytest.mark.anyio
async def test_a_full_queue_refuses_v2_infer_with_503_in_the_protocol_shape(model_dir):
    """The same admission control as /classify: with the model's queue full, POST /v2/models/{name}/infer gets 503
    with Retry-After, shaped {"error": "queue_full: ..."}; the queued request is still served."""
    body = {"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 784}]}
    async with serve_app(settings_for(model_dir, max_queue=1, max_delay_ms=2000)) as (app, client):
        model = app.state.runtime.models[MODEL]
        first = asyncio.create_task(client.post(f"/v2/models/{MODEL}/infer", json=body))
        while model.batcher.depth < 1:  # the first request's image waits for its batch (2 s)
            await asyncio.sleep(0.01)
        refused = await client.post(f"/v2/models/{MODEL}/infer", json=body)
        served = await first
    assert refused.status_code == 503
    assert refused.json()["error"].startswith("queue_full: ")
    assert set(refused.json()) == {"error"}
    assert int(refused.headers["retry-after"]) >= 1
    assert served.status_code == 200
    assert [o["name"] for o in served.json()["outputs"]][:2] == ["label", "class_name"]
