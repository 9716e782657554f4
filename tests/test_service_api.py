"""POST /classify and the other routes, on the real app (in-process ASGI) with the shipped model and real digits."""

from __future__ import annotations

import base64
import json

import pytest
from PIL import Image
from support import (
    bad_images,
    encode,
    metric_value,
    mnist_files,
    mnist_image,
    mnist_png,
    serve_app,
    settings_for,
)

from service.metrics import REJECTION_REASONS

pytestmark = pytest.mark.anyio
PNG = {"Content-Type": "image/png"}


def assert_error(response, status: int, error: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == error
    assert body["detail"]
    assert "Traceback" not in response.text
    return body


async def test_classify_raw_png_returns_the_documented_response(model_dir):
    async with serve_app(settings_for(model_dir)) as (app, client):
        r = await client.post("/classify", content=mnist_png(7), headers=PNG)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"request_id", "model", "results", "timing_ms"}
    assert body["model"] == "mnist-fcn-dr"
    assert r.headers["x-request-id"] == body["request_id"]
    (result,) = body["results"]
    assert set(result) == {
        "label",
        "class_name",
        "confidence",
        "top_k",
        "epsilon",
        "aux_loss",
        "aux_loss_before",
        "suspicious",
        "purified_png",
        "aux_curve",
    }
    assert result["label"] == 7
    assert result["class_name"] == "7"
    assert len(result["top_k"]) == 5
    assert result["top_k"][0]["label"] == 7
    assert result["top_k"][0]["probability"] == pytest.approx(result["confidence"])
    assert sorted((t["probability"] for t in result["top_k"]), reverse=True) == [
        t["probability"] for t in result["top_k"]
    ]
    budgets = [e * 0.05 for e in range(11)]
    assert min(abs(result["epsilon"] - b) for b in budgets) < 1e-6
    assert result["aux_loss"] <= result["aux_loss_before"] + 1e-7  # min-aux never ends above the unpurified loss
    assert result["purified_png"] is None
    assert result["aux_curve"] is None
    assert set(body["timing_ms"]) == {"queue", "compute", "total"}
    assert body["timing_ms"]["total"] >= body["timing_ms"]["compute"] > 0


async def test_real_digits_are_classified_correctly_through_all_three_body_shapes(model_dir):
    files = mnist_files(per_digit=2)
    labels = [d for d, _ in files]
    async with serve_app(settings_for(model_dir)) as (app, client):
        multipart = await client.post(
            "/classify", files=[("file", (p.name, p.read_bytes(), "image/png")) for _, p in files]
        )
        as_json = await client.post(
            "/classify", json={"images": [base64.b64encode(p.read_bytes()).decode() for _, p in files]}
        )
        raw = [await client.post("/classify", content=p.read_bytes(), headers=PNG) for _, p in files[:4]]
    assert multipart.status_code == 200
    assert as_json.status_code == 200
    got = [r["label"] for r in multipart.json()["results"]]
    assert got == [r["label"] for r in as_json.json()["results"]]
    assert [r.json()["results"][0]["label"] for r in raw] == got[:4]
    accuracy = sum(g == t for g, t in zip(got, labels, strict=True)) / len(labels)
    assert accuracy >= 0.8, (got, labels)


async def test_options_top_k_purified_image_curve_and_modes(model_dir):
    async with serve_app(settings_for(model_dir)) as (app, client):
        r = await client.post(
            "/classify?top_k=3&return_purified=true&return_curve=true", content=mnist_png(2), headers=PNG
        )
        fixed = await client.post(
            "/classify",
            json={
                "images": [base64.b64encode(mnist_png(2)).decode()],
                "mode": "fixed",
                "epsilon": 0.1,
                "return_curve": True,
            },
        )
        none = await client.post("/classify?mode=none&return_curve=true&top_k=100", content=mnist_png(2), headers=PNG)
        form = await client.post(
            "/classify", files={"file": ("d.png", mnist_png(2), "image/png")}, data={"mode": "none"}
        )
    result = r.json()["results"][0]
    assert len(result["top_k"]) == 3
    assert len(result["aux_curve"]) == 11
    assert result["aux_curve"][0] == pytest.approx(result["aux_loss_before"])
    assert min(result["aux_curve"]) == pytest.approx(result["aux_loss"])
    purified = Image.open(__import__("io").BytesIO(base64.b64decode(result["purified_png"])))
    assert purified.format == "PNG"
    assert purified.size == (28, 28)
    f = fixed.json()["results"][0]
    assert f["epsilon"] == pytest.approx(0.1)
    assert len(f["aux_curve"]) == 2
    n = none.json()["results"][0]
    assert n["epsilon"] == 0
    assert n["aux_loss"] == pytest.approx(n["aux_loss_before"])
    assert len(n["top_k"]) == 10
    assert form.json()["results"][0]["epsilon"] == 0  # options as multipart text fields


async def test_batched_results_equal_one_at_a_time_results(model_dir):
    files = mnist_files(per_digit=2)
    payloads = [p.read_bytes() for _, p in files]
    query = "/classify?return_curve=true&return_purified=true"
    async with serve_app(settings_for(model_dir, max_batch_size=64)) as (app, client):
        batched = (await client.post(query, files=[("file", ("d.png", b, "image/png")) for b in payloads])).json()
        assert app.state.runtime.metrics.batch_size.labels("mnist-fcn-dr")._sum.get() >= len(payloads)
    async with serve_app(settings_for(model_dir, max_batch_size=1)) as (app, client):
        single = [(await client.post(query, content=b, headers=PNG)).json()["results"][0] for b in payloads]
    for one, many in zip(single, batched["results"], strict=True):
        assert one["label"] == many["label"]
        assert one["epsilon"] == pytest.approx(many["epsilon"])
        assert one["aux_curve"] == pytest.approx(many["aux_curve"], rel=1e-4, abs=1e-6)
        assert one["confidence"] == pytest.approx(many["confidence"], rel=1e-4, abs=1e-6)
        assert one["purified_png"] == many["purified_png"]


async def test_every_supported_format_is_classified_through_http(model_dir):
    digit = mnist_image(2, 1)
    formats = {
        "png": ("PNG", {}),
        "jpeg": ("JPEG", {"quality": 95}),
        "webp": ("WEBP", {"lossless": True}),
        "bmp": ("BMP", {}),
        "tiff": ("TIFF", {}),
        "gif": ("GIF", {}),
    }
    async with serve_app(settings_for(model_dir)) as (app, client):
        rs = {
            name: await client.post(
                "/classify", content=encode(digit, fmt, **kw), headers={"Content-Type": f"image/{name}"}
            )
            for name, (fmt, kw) in formats.items()
        }
    for name, r in rs.items():
        assert r.status_code == 200, (name, r.text)
        assert r.json()["results"][0]["label"] == 2, name


async def test_a_large_photo_is_decoded_off_the_event_loop_and_classified(model_dir):
    big = mnist_image(4).resize((1024, 1024), Image.Resampling.BICUBIC).convert("RGB")  # 1 M pixels: thread path
    async with serve_app(settings_for(model_dir)) as (app, client):
        r = await client.post(
            "/classify", content=encode(big, "JPEG", quality=90), headers={"Content-Type": "image/jpeg"}
        )
    assert r.status_code == 200
    assert r.json()["results"][0]["label"] == 4


@pytest.mark.parametrize("name", list(bad_images()))
async def test_bad_images_get_422_and_a_reason(model_dir, name):
    payload, word = bad_images()[name]
    async with serve_app(settings_for(model_dir)) as (app, client):
        raw = await client.post("/classify", content=payload, headers=PNG)
        multipart = await client.post(
            "/classify",
            files=[("file", ("a.png", mnist_png(1), "image/png")), ("file", ("b.png", payload, "image/png"))],
        )
        metrics = (await client.get("/metrics")).text
    assert word in assert_error(raw, 422, "bad_image")["detail"]
    assert assert_error(multipart, 422, "bad_image")["detail"].startswith("image 1:")
    assert metric_value(metrics, "soap_rejections_total", model="mnist-fcn-dr", reason="bad_image") == 2


async def test_bad_image_never_fails_its_batch_mates(model_dir):
    import asyncio

    async with serve_app(settings_for(model_dir, max_delay_ms=200)) as (app, client):
        good = [client.post("/classify", content=mnist_png(d), headers=PNG) for d in range(4)]
        bad = [client.post("/classify", content=p, headers=PNG) for p, _ in list(bad_images().values())[:3]]
        responses = await asyncio.gather(*good, *bad)
    assert [r.status_code for r in responses] == [200] * 4 + [422] * 3
    assert [r.json()["results"][0]["label"] for r in responses[:4]] == [0, 1, 2, 3]


async def test_body_over_the_limit_is_refused_while_streaming(model_dir):
    sent = 0

    async def endless():
        nonlocal sent
        while True:
            sent += 1
            yield b"\0" * 65536

    async with serve_app(settings_for(model_dir, max_body_bytes=256 * 1024)) as (app, client):
        streamed = await client.post("/classify", content=endless(), headers=PNG)
        declared = await client.post("/classify", content=b"\0" * (300 * 1024), headers=PNG)
        ok = await client.post("/classify", content=mnist_png(4), headers=PNG)
        metrics = (await client.get("/metrics")).text
    assert_error(streamed, 413, "payload_too_large")
    assert sent <= 6  # stopped reading right after the limit (256 KiB = 4 chunks), not at the end of an endless body
    assert_error(declared, 413, "payload_too_large")
    assert ok.status_code == 200
    assert metric_value(metrics, "soap_rejections_total", reason="payload_too_large") == 2


async def test_too_many_images_in_one_request_is_413(model_dir):
    async with serve_app(settings_for(model_dir, max_images_per_request=3)) as (app, client):
        parts = [("file", (f"{i}.png", mnist_png(i), "image/png")) for i in range(4)]
        multipart = await client.post("/classify", files=parts)
        as_json = await client.post(
            "/classify", json={"images": [base64.b64encode(mnist_png(i)).decode() for i in range(4)]}
        )
    assert_error(multipart, 413, "payload_too_large")
    assert_error(as_json, 413, "payload_too_large")


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/octet-stream", None, "application/x-www-form-urlencoded"]
)
async def test_unsupported_content_type_is_415(model_dir, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    async with serve_app(settings_for(model_dir)) as (app, client):
        r = await client.post("/classify", content=mnist_png(1), headers=headers)
        metrics = (await client.get("/metrics")).text
    assert_error(r, 415, "unsupported_media_type")
    assert metric_value(metrics, "soap_rejections_total", reason="unsupported_media_type") == 1


@pytest.mark.parametrize(
    "query",
    [
        "mode=bogus",
        "top_k=0",
        "top_k=-3",
        "top_k=abc",
        "epsilon=0.1",
        "mode=fixed",
        "mode=fixed&epsilon=0.9",
        "mode=fixed&epsilon=-0.1",
        "return_curve=maybe",
        "unknown_option=1",
    ],
)
async def test_bad_options_are_422(model_dir, query):
    async with serve_app(settings_for(model_dir)) as (app, client):
        r = await client.post(f"/classify?{query}", content=mnist_png(1), headers=PNG)
    assert_error(r, 422, "bad_options")


async def test_bad_json_bodies_are_422(model_dir):
    async with serve_app(settings_for(model_dir)) as (app, client):
        cases = [
            b"{not json",
            b"[1, 2]",
            json.dumps({"images": []}).encode(),
            json.dumps({"images": ["@@@"]}).encode(),
            json.dumps({"images": [base64.b64encode(mnist_png(1)).decode()], "top_k": "many"}).encode(),
        ]
        rs = [await client.post("/classify", content=c, headers={"Content-Type": "application/json"}) for c in cases]
    assert [r.status_code for r in rs] == [422] * 5
    assert [r.json()["error"] for r in rs] == ["bad_options", "bad_options", "bad_options", "bad_image", "bad_options"]


async def test_unknown_model_is_404_and_models_are_listed(model_dir, fresh_model_dir):
    async with serve_app(settings_for(model_dir, fresh_model_dir)) as (app, client):
        missing = await client.post("/classify?model=nope", content=mnist_png(1), headers=PNG)
        chosen = await client.post("/classify?model=tiny-fcn", content=mnist_png(1), headers=PNG)
        listing = (await client.get("/v1/models")).json()
        one = await client.get("/v1/models/tiny-fcn")
        absent = await client.get("/v1/models/nope")
    assert_error(missing, 404, "unknown_model")
    assert chosen.status_code == 200
    assert chosen.json()["model"] == "tiny-fcn"
    assert listing["default"] == "mnist-fcn-dr"
    assert [m["name"] for m in listing["models"]] == [
        "mnist-fcn-dr",
        "tiny-fcn",
    ]
    info = one.json()
    assert info["input_shape"] == [1, 28, 28]
    assert info["class_names"] == [str(i) for i in range(10)]
    assert info["aux_task"] == "reconstruction"
    assert info["purifier"]["num_budgets"] == 11
    assert info["purifier"]["budgets"][-1] == pytest.approx(info["purifier"]["max_budget"]) == pytest.approx(0.5)
    assert info["calibration"]["suspicious_threshold"] == info["calibration"]["aux_loss_quantiles"]["0.99"]
    assert 0 <= info["metrics"]["clean_accuracy"] <= 1
    assert_error(absent, 404, "unknown_model")


async def test_suspicious_flag_follows_the_calibrated_threshold(fresh_model_dir):
    noise = encode(Image.effect_noise((28, 28), 120), "PNG")
    async with serve_app(settings_for(fresh_model_dir)) as (app, client):
        threshold = (await client.get("/v1/models/tiny-fcn")).json()["calibration"]["suspicious_threshold"]
        clean = (await client.post("/classify", content=mnist_png(0), headers=PNG)).json()["results"][0]
        odd = (await client.post("/classify", content=noise, headers=PNG)).json()["results"][0]
        metrics = (await client.get("/metrics")).text
    assert clean["suspicious"] == (clean["aux_loss_before"] > threshold)
    assert odd["suspicious"]
    assert odd["aux_loss_before"] > threshold
    assert metric_value(metrics, "soap_suspicious_inputs_total", model="tiny-fcn") == clean["suspicious"] + 1


async def test_api_key_protects_classify_and_model_routes_only(model_dir, monkeypatch):
    monkeypatch.setenv("TEST_SOAP_KEY", "s3cret")
    async with serve_app(settings_for(model_dir, api_key_env="TEST_SOAP_KEY")) as (app, client):
        no_key = await client.post("/classify", content=mnist_png(1), headers=PNG)
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        bearer = await client.post("/classify", content=mnist_png(1), headers={**PNG, "Authorization": "Bearer s3cret"})
        header = await client.get("/v1/models/mnist-fcn-dr", headers={"X-API-Key": "s3cret"})
        open_routes = [await client.get(p) for p in ("/healthz", "/readyz", "/metrics")]
    assert_error(no_key, 401, "unauthorized")
    assert no_key.headers["www-authenticate"] == "Bearer"
    assert_error(wrong, 401, "unauthorized")
    assert bearer.status_code == 200
    assert header.status_code == 200
    assert [r.status_code for r in open_routes] == [200, 200, 200]
    assert metric_value(open_routes[2].text, "soap_rejections_total", reason="unauthorized") == 2


async def test_metrics_can_be_protected_too(model_dir, monkeypatch):
    monkeypatch.setenv("TEST_SOAP_KEY", "k")
    async with serve_app(settings_for(model_dir, api_key_env="TEST_SOAP_KEY", protect_metrics=True)) as (app, client):
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers={"X-API-Key": "k"})).status_code == 200
        assert (await client.get("/healthz")).status_code == 200


async def test_metrics_follow_the_contract(model_dir):
    async with serve_app(settings_for(model_dir)) as (app, client):
        await client.post("/classify", content=mnist_png(1), headers=PNG)
        await client.post("/classify", content=b"", headers=PNG)
        text = (await client.get("/metrics")).text
    for name in (
        "soap_request_duration_seconds_bucket",
        "soap_queue_wait_seconds_bucket",
        "soap_batch_compute_seconds_bucket",
        "soap_batch_size_images_bucket",
        "soap_purification_epsilon_bucket",
        "soap_aux_loss_before_bucket",
        "soap_aux_loss_after_bucket",
        "soap_rejections_total",
        "soap_queue_depth_images",
        "soap_images_total",
        "soap_model_info",
        "soap_ready",
    ):
        assert name in text, name
    assert "# TYPE soap_suspicious_inputs_total counter" in text
    assert (
        metric_value(text, "soap_request_duration_seconds_count", model="mnist-fcn-dr", route="/classify", status="200")
        == 1
    )
    assert (
        metric_value(text, "soap_request_duration_seconds_count", model="mnist-fcn-dr", route="/classify", status="422")
        == 1
    )
    assert 'le="0.001"' in text
    assert 'le="30.0"' in text
    assert metric_value(text, "soap_images_total", model="mnist-fcn-dr", mode="min-aux") == 1
    assert (
        metric_value(
            text,
            "soap_model_info",
            model="mnist-fcn-dr",
            network="mnist-fcn-dr",
            dataset="mnist",
            aux_task="reconstruction",
            device="cpu",
        )
        == 1
    )
    assert metric_value(text, "soap_ready") == 1
    assert set(REJECTION_REASONS) == {
        "queue_full",
        "deadline",
        "client_gone",
        "payload_too_large",
        "bad_image",
        "unsupported_media_type",
        "bad_options",
        "unauthorized",
        "body_timeout",
    }


async def test_every_series_of_a_model_exists_at_zero_before_traffic(model_dir):
    """Dashboards show 0, not "No data", before the first rejection or suspicious input."""
    async with serve_app(settings_for(model_dir)) as (app, client):
        text = (await client.get("/metrics")).text

    def sample(name: str, **labels: str) -> float | None:
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            head, _, value = line.rpartition(" ")
            if head.startswith(name + "{") and ",".join(sorted(head[len(name) + 1 : -1].split(","))) == wanted:
                return float(value)
        return None  # no such series

    for reason in REJECTION_REASONS:
        assert sample("soap_rejections_total", model="mnist-fcn-dr", reason=reason) == 0
    assert sample("soap_suspicious_inputs_total", model="mnist-fcn-dr") == 0
    assert sample("soap_images_total", model="mnist-fcn-dr", mode="fixed") == 0
    assert sample("soap_purification_epsilon_count", model="mnist-fcn-dr") == 0
    assert sample("soap_rejections_total", model="mnist-fcn-dr", reason="no_such_reason") is None


async def test_health_readiness_docs_and_request_id(model_dir):
    async with serve_app(settings_for(model_dir)) as (app, client):
        assert (await client.get("/healthz")).json()["status"] == "ok"
        assert (await client.get("/readyz")).status_code == 200
        echoed = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
        hostile = await client.get("/healthz", headers={"X-Request-ID": "x" * 500})
        schema = (await client.get("/openapi.json")).json()
        docs = await client.get("/docs")
        missing = await client.get("/no/such/route")
    assert echoed.headers["x-request-id"] == "abc-123"
    assert len(hostile.headers["x-request-id"]) == 32  # replaced, not echoed
    assert "/classify" in schema["paths"]
    assert "multipart/form-data" in str(schema["paths"]["/classify"])
    assert docs.status_code == 200
    assert_error(missing, 404, "not_found")


async def test_an_unhandled_error_is_a_json_500_naming_the_request_on_the_hot_path_and_other_routes(
    model_dir, monkeypatch, caplog
):
    """POST /classify is handed straight to its endpoint, every other route goes through FastAPI's own layers; a bug
    in either is answered the same way (JSON 500, request id, no traceback), logged with its traceback, and the
    service keeps serving."""

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    async with serve_app(settings_for(model_dir)) as (app, client):
        with monkeypatch.context() as patch:
            patch.setattr(app.state.runtime.models["mnist-fcn-dr"], "purify_request", bug)
            patch.setattr("service.routes.models.describe", bug)
            hot = await client.post("/classify", content=mnist_png(1), headers={**PNG, "X-Request-ID": "bug-1"})
            other = await client.get("/v1/models/mnist-fcn-dr", headers={"X-Request-ID": "bug-2"})
        after = await client.post("/classify", content=mnist_png(1), headers=PNG)
    for response, request_id in ((hot, "bug-1"), (other, "bug-2")):
        body = assert_error(response, 500, "internal_error")
        assert request_id in body["detail"]
        assert response.headers["x-request-id"] == request_id
        assert "a bug" not in response.text
    logged = [r for r in caplog.records if r.name == "service.middleware" and r.exc_info]
    assert {("bug-1" in r.getMessage(), "bug-2" in r.getMessage()) for r in logged} == {(True, False), (False, True)}
    assert after.status_code == 200


async def test_an_empty_model_field_names_no_model_and_a_second_model_name_is_refused(model_dir):
    """Forms send an unchosen input as an empty string: an empty `model` field leaves the query's model in charge;
    a body naming another model than the query is refused (load shedding judged the query's)."""
    png = mnist_png(3)
    async with serve_app(settings_for(model_dir)) as (app, client):
        empty = await client.post(
            "/classify?model=mnist-fcn-dr",
            files={"file": ("d.png", png, "image/png")},
            data={"model": "", "mode": "none"},
        )
        other = await client.post(
            "/classify?model=mnist-fcn-dr", files={"file": ("d.png", png, "image/png")}, data={"model": "other"}
        )
    assert empty.status_code == 200, empty.text
    assert empty.json()["results"][0]["label"] == 3
    assert empty.json()["results"][0]["epsilon"] == 0
    assert "name one" in assert_error(other, 422, "bad_options")["detail"]
