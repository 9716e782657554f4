"""The demo's HTTP side without a browser: GET / and its static files, and POST /v1/attack (issue 7).

The real app (service.app.create_app) with the shipped model models/zoo/mnist-fcn-dr, in process.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.config import ServiceSettings
from service.routes.demo import MAX_ATTACK_BYTES, MAX_ATTACK_STEPS, STATIC_DIR

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "zoo" / "mnist-fcn-dr"
MNIST = ROOT / "tests" / "data" / "mnist"


def _client(**settings) -> TestClient:
    return TestClient(create_app(ServiceSettings(models=[MODEL], device="cpu", compute_process=False, **settings)))


@pytest.fixture(scope="module")
def off():
    with _client() as client:
        yield client


@pytest.fixture(scope="module")
def on():
    with _client(enable_attack=True) as client:
        yield client


def _png(digit: int, index: int = 0) -> bytes:
    return sorted((MNIST / str(digit)).glob("*.png"))[index].read_bytes()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64) / 255.0


def test_index_and_static_files_are_served(off):
    page = off.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    # Relative links, so the page also works behind a path prefix; every one of them resolves.
    refs = re.findall(r'(?:src|href)="(static/[^"]+)"', page.text)
    assert sorted(refs) == ["static/app.js", "static/style.css"]
    for ref in refs:
        r = off.get("/" + ref)
        assert r.status_code == 200
        assert len(r.content) > 1000
    assert "javascript" in off.get("/static/app.js").headers["content-type"]
    assert off.get("/static/nope.js").status_code == 404


def test_page_is_self_contained():
    """Nothing in the shipped files points outside the service: the page works offline (no CDN)."""
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:)?//""", text), path.name
        assert "@import" not in text, path.name
        assert "import(" not in text, path.name


def test_attack_info_reports_switch_and_limits(off, on):
    assert off.get("/v1/attack").json()["enabled"] is False
    info = on.get("/v1/attack").json()
    assert info["enabled"] is True
    assert info["max_steps"] == MAX_ATTACK_STEPS
    assert info["defaults"]["mnist-fcn-dr"] == {"epsilon": 0.3, "step_size": 0.01, "steps": 40}


def test_attack_is_403_when_off(off):
    r = off.post("/v1/attack", files={"file": ("x.png", _png(4), "image/png")})
    assert r.status_code == 403
    assert r.json()["error"] == "attack_disabled"


def test_attack_returns_adversarial_png_within_budget(on):
    png = _png(7)
    r = on.post("/v1/attack", files={"file": ("x.png", png, "image/png")})  # MNIST defaults: ε 0.3, 40 x 0.01
    assert r.status_code == 200, r.text
    body = r.json()
    adv_png = base64.b64decode(body["adversarial_png"])
    clean, adv = _pixels(png), _pixels(adv_png)
    assert adv.shape == (28, 28)
    distance = np.abs(adv - clean).max()
    assert 0 < distance <= 0.3 + 1e-9
    assert body["linf"] == pytest.approx(distance, abs=1e-6)
    assert (body["epsilon"], body["steps"], body["step_size"]) == (0.3, 40, 0.01)
    # The labels are the undefended classifier's on exactly these bytes (no purification).
    network = on.app.state.runtime.get(None).loaded.network
    with torch.no_grad():
        logits = network(torch.tensor(np.stack([clean, adv]), dtype=torch.float32).unsqueeze(1))
    assert logits.argmax(1).tolist() == [body["clean_label"], body["adversarial_label"]]
    assert body["clean_class_name"] == str(body["clean_label"])
    # The undefended classifier is fooled at the standard MNIST budget: a real attack, not a copy.
    assert body["adversarial_label"] != body["clean_label"]
    # Purification through /classify uses the adversarial PNG like any other upload.
    c = on.post("/classify", params={"return_curve": "true"}, files={"file": ("adv.png", adv_png, "image/png")})
    assert c.status_code == 200
    assert len(c.json()["results"][0]["aux_curve"]) == 11


def test_attack_accepts_raw_image_body_and_form_fields(on):
    raw = on.post("/v1/attack?steps=5", content=_png(1), headers={"content-type": "image/png"})
    assert raw.status_code == 200, raw.text
    assert raw.json()["steps"] == 5
    form = on.post("/v1/attack", data={"steps": "3", "epsilon": "0.1"}, files={"file": ("x.png", _png(1), "image/png")})
    assert form.status_code == 200, form.text
    assert (form.json()["steps"], form.json()["epsilon"]) == (3, 0.1)
    adv = _pixels(base64.b64decode(form.json()["adversarial_png"]))
    assert 0 < np.abs(adv - _pixels(_png(1))).max() <= 0.1 + 1e-9


@pytest.mark.parametrize(
    ("params", "status", "error"),
    [
        ({"steps": MAX_ATTACK_STEPS + 1}, 422, "bad_options"),
        ({"epsilon": 0.9}, 422, "bad_options"),
        ({"epsilon": 0}, 422, "bad_options"),
        ({"restarts": 3}, 422, "bad_options"),
        ({"model": "nope"}, 404, "unknown_model"),
    ],
)
def test_attack_rejects_bad_options(on, params, status, error):
    r = on.post("/v1/attack", params=params, files={"file": ("x.png", _png(2), "image/png")})
    assert r.status_code == status, r.text
    assert r.json()["error"] == error


def test_attack_rejects_bad_uploads(on):
    not_image = on.post("/v1/attack", files={"file": ("x.png", b"plain text", "image/png")})
    assert not_image.status_code == 422
    assert not_image.json()["error"] == "bad_image"
    two = on.post(
        "/v1/attack", files=[("file", ("a.png", _png(2), "image/png")), ("file", ("b.png", _png(3), "image/png"))]
    )
    assert two.status_code == 413
    big = on.post("/v1/attack", content=b"\0" * (MAX_ATTACK_BYTES + 1), headers={"content-type": "image/png"})
    assert big.status_code == 413
    assert big.json()["error"] == "payload_too_large"
    as_json = on.post("/v1/attack", json={"images": [base64.b64encode(_png(2)).decode()]})
    assert as_json.status_code == 415
    assert "multipart/form-data" in as_json.json()["detail"]
    # The service is still healthy and attacks still work.
    assert on.post("/v1/attack", files={"file": ("x.png", _png(2), "image/png")}).status_code == 200


def test_attack_needs_the_api_key_when_one_is_set(monkeypatch):
    monkeypatch.setenv("SOAP_TEST_WEB_KEY", "s3cret")
    with _client(enable_attack=True, api_key_env="SOAP_TEST_WEB_KEY") as client:
        files = {"file": ("x.png", _png(5), "image/png")}
        assert client.post("/v1/attack", files=files).status_code == 401
        assert client.post("/v1/attack", files=files, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.get("/").status_code == 200  # the page itself is public; it asks for the key


def test_one_attack_at_a_time():
    """A second attack while one is computing gets 503 + Retry-After at once (it costs compute)."""
    app = create_app(ServiceSettings(models=[MODEL], device="cpu", compute_process=False, enable_attack=True))

    async def both():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

            def one():
                return client.post(
                    "/v1/attack", params={"steps": MAX_ATTACK_STEPS}, files={"file": ("x.png", _png(6), "image/png")}
                )

            return await asyncio.gather(one(), one())

    first, second = asyncio.run(both())
    assert sorted([first.status_code, second.status_code]) == [200, 503]
    busy = first if first.status_code == 503 else second
    assert busy.json()["error"] == "attack_busy"
    assert busy.headers["retry-after"] == "1"
