"""OpenAPI and /docs: the API key is a security scheme on every protected operation (so Swagger UI's Authorize sends
it), and /docs is Swagger UI served by the service itself: no external host, every asset it names answers 200."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support import ServiceProcess, serve_app, settings_for

pytestmark = pytest.mark.anyio

PROTECTED = [("/classify", "post"), ("/v1/models", "get"), ("/v1/models/{name}", "get"), ("/v1/attack", "post")]
PROTECTED += [("/v2/models/{name}/infer", "post"), ("/v2/models/{name}", "get"), ("/v2/models/{name}/ready", "get")]
OPEN = [("/healthz", "get"), ("/readyz", "get"), ("/v2/health/ready", "get"), ("/v2", "get")]


async def test_the_api_key_is_a_security_scheme_of_every_protected_operation(model_dir, monkeypatch):
    monkeypatch.setenv("SOAP_DOCS_TEST_KEY", "docs-key")
    async with serve_app(settings_for(model_dir, api_key_env="SOAP_DOCS_TEST_KEY")) as (app, client):
        schema = (await client.get("/openapi.json")).json()
        docs = await client.get("/docs")
        keyed = await client.get("/v1/models", headers={"X-API-Key": "docs-key"})
        bearer = await client.get("/v1/models", headers={"Authorization": "Bearer docs-key"})
    schemes = schema["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "the service's API key (when it has one)",
    }
    assert schemes["Bearer"]["type"] == "http"
    assert schemes["Bearer"]["scheme"] == "bearer"
    for path, method in PROTECTED:
        security = schema["paths"][path][method].get("security")
        assert security is not None, f"{method.upper()} {path} does not declare the API key"
        assert {"ApiKey": []} in security, path
        assert {"Bearer": []} in security, path
    for path, method in OPEN:
        assert "security" not in schema["paths"][path][method], path
    # What Swagger UI's Authorize sends (either header) is what the service accepts.
    assert keyed.status_code == 200
    assert bearer.status_code == 200
    assert docs.status_code == 200
    assert "'/openapi.json'" in docs.text or '"/openapi.json"' in docs.text
    assert '"persistAuthorization": true' in docs.text


async def test_docs_are_served_locally_with_no_external_host(model_dir):
    async with serve_app(settings_for(model_dir)) as (app, client):
        docs = await client.get("/docs")
        urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", docs.text)
        assets = {url: await client.get(url) for url in urls}
        redoc = await client.get("/redoc")
    assert docs.status_code == 200
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", docs.text), "the page names an external host"
    assert '"validatorUrl": null' in docs.text  # no badge fetched from validator.swagger.io
    assert len(urls) >= 3  # the script, the stylesheet, the icon
    for url, response in assets.items():
        assert url.startswith("/docs/assets/"), url
        assert response.status_code == 200, url
        assert len(response.content) > 0, url
    bundle = next(r for u, r in assets.items() if u.endswith(".js"))
    assert "javascript" in bundle.headers["content-type"]
    assert "SwaggerUIBundle" in bundle.text
    assert redoc.status_code == 404  # FastAPI's ReDoc page loads from a CDN: off


async def test_a_server_without_a_key_documents_none(model_dir):
    async with serve_app(settings_for(model_dir)) as (app, client):
        schema = (await client.get("/openapi.json")).json()
    assert "securitySchemes" not in schema.get("components", {})
    assert "security" not in schema["paths"]["/classify"]["post"]
    assert "security" not in schema["paths"]["/v1/models"]["get"]


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)")
def test_swagger_ui_renders_offline_and_authorize_sends_the_key(model_dir):
    """Headless chromium on /docs of a keyed real server: the OpenAPI 3.1 document renders, nothing is fetched from
    outside the service, and after Authorize (X-API-Key) "Try it out" on GET /v1/models answers 200."""
    sync_api = pytest.importorskip("playwright.sync_api")
    server = ServiceProcess(
        ["--model", str(model_dir)], {"SOAP_API_KEY_ENV": "SOAP_DOCS_UI_KEY", "SOAP_DOCS_UI_KEY": "ui-key"}
    )
    external: list[str] = []
    errors: list[str] = []
    try:
        server.wait_ready()
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda r: None if r.url.startswith(server.url) else external.append(r.url))
            page.goto(server.url + "/docs")
            page.wait_for_selector('.opblock-summary-path[data-path="/v2/models/{name}/infer"]')
            assert page.locator(".opblock").count() >= 10
            page.click("button.authorize")
            page.fill("input[type=text], input[type=password]", "ui-key")
            page.click(".auth-btn-wrapper button.authorize")
            page.click("button.btn-done")
            block = page.locator('.opblock-get:has(.opblock-summary-path[data-path="/v1/models"])')
            block.locator(".opblock-summary").click()
            block.locator("button.try-out__btn").click()
            block.locator("button.execute").click()
            status = block.locator(".live-responses-table tbody .response-col_status").first
            status.wait_for()
            assert status.inner_text().strip().startswith("200")
            browser.close()
    finally:
        server.stop()
    assert not errors, errors
    assert not external, f"/docs reached outside the service: {external}"
