"""The demo page in a real headless Chromium against real uvicorn servers (issue 7).

Two servers on loopback with the shipped model models/zoo/mnist-fcn-dr: one as shipped (attack endpoint
off), one with --enable-attack. Playwright drives Debian's /usr/bin/chromium (never a downloaded browser).
Screenshots go to test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import httpx
import pytest
import torch
from support import ServiceProcess, mnist_path

from models import create_model, load_checkpoint, save_checkpoint
from models.checkpoint import Calibration, meta_for

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "zoo" / "mnist-fcn-dr"
CIFAR10 = ROOT / "tests" / "data" / "cifar10"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 20_000
SECOND = "mnist-second"
TINY_THRESHOLD = 1e-6
CIFAR = "cifar10-untrained"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)"),
]
sync_api = pytest.importorskip("playwright.sync_api")


# ----------------------------------------------------------------------------- servers and browser


class Server(ServiceProcess):
    """The service with the shipped model on the CPU (one OpenMP thread), optionally behind an API key; its log is
    kept in test-artifacts/."""

    def __init__(self, *extra: str, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.headers = {"X-API-Key": api_key} if api_key else {}
        env = {"OMP_NUM_THREADS": "1"}
        if api_key:
            env["WEB_TEST_API_KEY"] = api_key
            extra = (*extra, "--api-key-env", "WEB_TEST_API_KEY")
        super().__init__(["--model", str(MODEL), "--device", "cpu", *extra], env, log_dir=ARTIFACTS)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    assert (MODEL / "model.safetensors").is_file(), f"the shipped model {MODEL} is missing"
    ARTIFACTS.mkdir(exist_ok=True)
    zoo = tmp_path_factory.mktemp("zoo")
    # A second model for the picker: the shipped weights under another name (= folder name), with a calibration
    # whose threshold is so low that every image is flagged suspicious (the page's "yes" path).
    shipped = load_checkpoint(MODEL)
    calibration = Calibration(n=1, aux_loss_quantiles={"0.99": TINY_THRESHOLD})
    save_checkpoint(shipped.network, shipped.meta.model_copy(update={"calibration": calibration}), zoo / SECOND)
    # A three-channel model for the colour path: a real checkpoint of an untrained (seeded) CIFAR-10 network, marked
    # as having a trained auxiliary head so that the page's purification display runs on a colour model too.
    torch.manual_seed(0)
    cifar = zoo / CIFAR
    network = create_model("cifar10-resnet18-rp")
    classes = sorted(p.name for p in CIFAR10.iterdir())
    meta = meta_for(
        network, network="cifar10-resnet18-rp", dataset="cifar10", class_names=classes, aux_head_trained=True
    )
    save_checkpoint(network, meta, cifar)
    # The attack-enabled server also requires an API key, which the page asks for.
    off = Server("--model", str(cifar))
    on = Server("--enable-attack", "--model", str(zoo / SECOND), api_key="web-test-key")
    try:
        off.wait_ready()
        on.wait_ready()
        yield {"off": off, "on": on}
    finally:
        off.stop()
        on.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    external: list[str] = []
    pg.on(
        "request",
        lambda r: None if r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else external.append(r.url),
    )
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not external, f"the page reached outside the service: {external}"


def open_page(page, server: Server) -> None:
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='true']")
    if server.api_key:
        # Without the key the page cannot list models: it says so and asks for the key.
        assert "HTTP 401" in page.locator("#error").inner_text()
        page.fill("#api-key", server.api_key)
        page.click("#api-key-apply")
        page.wait_for_selector("#model:not([disabled])")
        page.wait_for_selector("#error[hidden]", state="attached")
    assert page.locator("#model").input_value() == "mnist-fcn-dr"


def wait_for_result(page) -> None:
    page.wait_for_function(
        "() => !document.getElementById('result').hidden || !document.getElementById('error').hidden"
    )
    assert page.locator("#error").is_hidden(), page.locator("#error").inner_text()


def shown(page) -> dict:
    return {
        k: page.locator(f"#pred-{k}").inner_text() for k in ("label", "eps", "aux-before", "aux-after", "suspicious")
    }


def direct_classify(server: Server, png: bytes, model: str = "mnist-fcn-dr") -> dict:
    params = {"model": model, "top_k": 10, "return_purified": "true", "return_curve": "true"}
    r = httpx.post(
        f"{server.url}/classify",
        params=params,
        files={"file": ("x.png", png, "image/png")},
        headers=server.headers,
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def label_text(result: dict) -> str:
    label, name = str(result["label"]), result["class_name"]
    return label if name == label else f"{name} (class {label})"


def assert_matches(page, result: dict, side: int = 28) -> None:
    """The page shows what /classify answers for the same bytes (rounded as the page rounds)."""
    s = shown(page)
    assert s["label"] == label_text(result)
    assert float(s["eps"]) == pytest.approx(result["epsilon"], abs=1e-3)
    assert float(s["aux-before"]) == pytest.approx(result["aux_loss_before"], rel=1e-3)
    assert float(s["aux-after"]) == pytest.approx(result["aux_loss"], rel=1e-3)
    assert s["suspicious"].startswith("yes" if result["suspicious"] else "no")
    # Bars: one per class, the first is the prediction; the curve has a point per budget and marks the choice.
    bars = page.locator("#bars li")
    assert bars.count() == 10
    assert bars.first.locator(".name").inner_text() == result["class_name"]
    assert page.locator("#curve svg circle").count() == len(result["aux_curve"]) == 11
    assert page.locator("#curve svg circle.chosen-point").count() == 1
    assert f"chosen ε = {s['eps']}" in page.locator("#curve svg").inner_html()
    assert page.evaluate("document.getElementById('img-purified').naturalWidth") == side


def shown_input_png(page) -> bytes:
    """The bytes behind the page's "Input" image: the very blob it sent to /classify."""
    b64 = page.evaluate("""async () => {
        const blob = await (await fetch(document.getElementById('img-input').src)).blob();
        const bytes = new Uint8Array(await blob.arrayBuffer());
        let s = ''; for (const b of bytes) s += String.fromCharCode(b);
        return btoa(s);
    }""")
    return base64.b64decode(b64)


# ----------------------------------------------------------------------------- tests


def test_draw_stroke_shows_prediction_consistent_with_api(page, servers):
    server = servers["off"]
    open_page(page, server)
    box = page.locator("#draw").bounding_box()
    x, y, w, h = box["x"], box["y"], box["width"], box["height"]
    page.mouse.move(x + 0.3 * w, y + 0.25 * h)
    page.mouse.down()
    for fx, fy in ((0.5, 0.25), (0.72, 0.25), (0.6, 0.5), (0.5, 0.8)):  # a "7"
        page.mouse.move(x + fx * w, y + fy * h, steps=8)
    page.mouse.up()
    with page.expect_request(lambda r: "/classify" in r.url) as req:
        page.click("#classify-drawing")
    wait_for_result(page)
    assert req.value.method == "POST"
    png = shown_input_png(page)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # The drawing was downscaled to the model's 28x28 input before it was sent.
    assert page.evaluate("document.getElementById('img-input').naturalWidth") == 28
    assert_matches(page, direct_classify(server, png))
    assert "Classified" in page.locator("#status").inner_text()
    page.screenshot(path=str(ARTIFACTS / "web-draw.png"), full_page=True)


def test_upload_real_mnist_png_matches_direct_classify(page, servers):
    server = servers["off"]
    open_page(page, server)
    path = mnist_path(3)
    page.set_input_files("#file", str(path))
    wait_for_result(page)
    result = direct_classify(server, path.read_bytes())
    assert_matches(page, result)
    assert result["epsilon"] in [pytest.approx(0.05 * e) for e in range(11)]
    page.screenshot(path=str(ARTIFACTS / "web-upload.png"), full_page=True)


def test_non_image_upload_shows_plain_error(page, servers, tmp_path):
    server = servers["off"]
    open_page(page, server)
    bogus = tmp_path / "notes.png"
    bogus.write_text("this is a text file, not a picture\n")
    page.set_input_files("#file", str(bogus))
    page.wait_for_selector("#error:not([hidden])")
    message = page.locator("#error").inner_text()
    assert "could not use this input (HTTP 422)" in message
    assert "not an image" in message
    assert page.locator("#result").is_hidden()
    assert page.locator("#error").get_attribute("role") == "alert"
    page.screenshot(path=str(ARTIFACTS / "web-error.png"), full_page=True)
    # A good upload afterwards clears the error.
    page.set_input_files("#file", str(mnist_path(1)))
    wait_for_result(page)


def test_attack_button_disabled_and_endpoint_403_when_off(page, servers):
    server = servers["off"]
    open_page(page, server)
    page.set_input_files("#file", str(mnist_path(2)))
    wait_for_result(page)
    assert page.locator("#attack").is_disabled()
    note = page.locator("#attack-note").inner_text()
    assert "switched off" in note
    assert "SOAP_ENABLE_ATTACK=1 make run" in note  # says why it is off under `make run` and how to switch it on
    r = httpx.post(f"{server.url}/v1/attack", files={"file": ("x.png", mnist_path(2).read_bytes(), "image/png")})
    assert r.status_code == 403
    assert r.json()["error"] == "attack_disabled"
    assert "--enable-attack" in r.json()["detail"]


def test_attack_then_purify_when_enabled(page, servers):
    server = servers["on"]
    open_page(page, server)
    path = mnist_path(7)
    page.set_input_files("#file", str(path))
    wait_for_result(page)
    sync_api.expect(page.locator("#attack")).to_be_enabled()
    with page.expect_response(lambda r: "/v1/attack" in r.url) as resp:
        page.click("#attack")
    attack = resp.value.json()
    page.wait_for_selector("#attack-summary:not([hidden])")
    wait_for_result(page)
    assert resp.value.status == 200
    assert attack["epsilon"] == pytest.approx(0.3)
    assert attack["steps"] == 40
    assert 0 < attack["linf"] <= 0.3 + 1e-6
    summary = page.locator("#attack-summary").inner_text()
    assert f"the undefended classifier says {attack['clean_label']} on the input" in summary
    assert f"{attack['adversarial_label']} on the adversarial image" in summary
    # The attacked label is the undefended classifier's own prediction (/classify with mode=none).
    undefended = httpx.post(
        f"{server.url}/classify",
        params={"mode": "none"},
        headers=server.headers,
        files={"file": ("x.png", path.read_bytes(), "image/png")},
    ).json()["results"][0]
    assert attack["clean_label"] == undefended["label"]
    assert page.locator("#fig-adversarial").is_visible()
    assert page.evaluate("document.getElementById('img-adversarial').naturalWidth") == 28
    # What the page shows after the attack is /classify's answer for the adversarial PNG.
    assert_matches(page, direct_classify(server, base64.b64decode(attack["adversarial_png"])))
    assert f"After purification the service says {shown(page)['label']}" in summary
    page.screenshot(path=str(ARTIFACTS / "web-attack.png"), full_page=True)


def test_keyboard_only_drawing_and_labels(page, servers):
    server = servers["off"]
    open_page(page, server)
    # Every form control has a label (or an accessible name); the result region is announced.
    unlabeled = page.evaluate("""() => [...document.querySelectorAll('input, select, button, canvas')]
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                      && !el.getAttribute('aria-labelledby') && !el.textContent.trim())
        .map(el => el.id)""")
    assert unlabeled == []
    assert page.locator("#result").get_attribute("aria-live") == "polite"
    assert page.locator("#status").get_attribute("aria-live") == "polite"
    # Tab order reaches the controls in reading order (the model card link sits under the model picker).
    page.wait_for_function("() => document.getElementById('model-robustness').textContent.includes('Does not resist')")
    order = []
    page.locator("#model").focus()
    for _ in range(5):
        order.append(page.evaluate("document.activeElement.id"))
        page.keyboard.press("Tab")
    assert order == ["model", "model-robustness-card", "draw", "classify-drawing", "clear-drawing"]
    # Draw a vertical bar (a "1") with Shift+arrows on the focused canvas, then Enter to classify.
    page.locator("#draw").focus()
    for _ in range(4):
        page.keyboard.press("ArrowUp")
    for _ in range(9):
        page.keyboard.press("Shift+ArrowDown")
    page.keyboard.press("Enter")
    wait_for_result(page)
    assert re.fullmatch(r"\d", shown(page)["label"])
    page.screenshot(path=str(ARTIFACTS / "web-keyboard.png"), full_page=True)


def test_drag_and_drop_and_model_picker(page, servers):
    server = servers["on"]
    open_page(page, server)
    assert page.locator("#model option").all_inner_texts() == ["mnist-fcn-dr (mnist)", f"{SECOND} (mnist)"]
    png = mnist_path(9).read_bytes()
    page.evaluate(
        """(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        document.getElementById('drop-zone').dispatchEvent(
            new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""",
        base64.b64encode(png).decode(),
    )
    wait_for_result(page)
    assert "model mnist-fcn-dr" in page.locator("#timing").inner_text()
    assert_matches(page, direct_classify(server, png))
    # Picking another model classifies the current image again with that model.
    with page.expect_request(lambda r: "/classify" in r.url and f"model={SECOND}" in r.url):
        page.select_option("#model", SECOND)
    page.wait_for_function(f"() => document.getElementById('timing').textContent.includes('model {SECOND}')")
    assert shown(page)["label"] == str(direct_classify(server, png)["label"])
    flagged = direct_classify(server, png, model=SECOND)
    assert flagged["suspicious"]
    assert not direct_classify(server, png)["suspicious"]
    assert shown(page)["suspicious"] == "yes (aux loss before > 1.000e-6, the clean-data threshold)"


def test_colour_model_hides_canvas_and_classifies_upload(page, servers):
    server = servers["off"]
    open_page(page, server)
    assert page.locator("#draw-panel").is_visible()
    page.select_option("#model", CIFAR)
    page.wait_for_function("() => document.getElementById('model-info').textContent.includes('3×32×32')")
    assert page.locator("#draw-panel").is_hidden()  # drawing is for one-channel (MNIST) models
    path = sorted((CIFAR10 / "cat").glob("*.jpg"))[0]
    page.set_input_files("#file", str(path))
    wait_for_result(page)
    result = direct_classify(server, path.read_bytes(), model=CIFAR)
    assert_matches(page, result, side=32)
    assert " (class " in shown(page)["label"]  # class names are shown with their index
    assert page.locator("#pred-eps-255").inner_text() == f" (= {round(result['epsilon'] * 255)}/255)"
    page.screenshot(path=str(ARTIFACTS / "web-colour.png"), full_page=True)


def test_page_states_what_purification_resists_and_what_it_does_not(page, servers):
    """Next to the purification: purifier-blind attacks are resisted, adaptive ones are not, with the model card
    (served by the service) and docs/results.md for the numbers."""
    server = servers["off"]
    open_page(page, server)
    page.wait_for_function("() => document.getElementById('model-robustness').textContent.includes('Does not resist')")
    robustness = page.locator("#model-robustness").inner_text()
    assert "Resists: purifier-blind attacks" in robustness
    assert "adaptive attacks" in robustness
    assert "docs/results.md" in robustness
    # The caveat is said once on the page (it was in the header and again under the model).
    text = page.locator("body").inner_text().lower()
    assert text.count("does not resist") == 1
    assert text.count("adaptive attacks") == 1
    href = page.locator("#model-robustness a").get_attribute("href")
    assert href == "v1/models/mnist-fcn-dr/card"
    card = page.request.get(f"{server.url}/{href}")
    assert card.status == 200
    assert card.headers["content-type"].startswith("text/markdown")
    assert "## Limitations" in card.text()


def test_sections_are_numbered_in_order_and_the_certificate_sits_under_the_result(page, servers):
    """Issue 28 point 7: the sections are numbered 1..N; after Certify the certificate appears in the result
    section, after the min-aux result of the same image, and a new image's result hides the old certificate."""
    server = servers["off"]
    open_page(page, server)
    headings = page.locator("main h2").all_inner_texts()
    assert [h.split(".")[0] for h in headings] == [str(i) for i in range(1, len(headings) + 1)], headings
    page.set_input_files("#file", str(mnist_path(7)))
    wait_for_result(page)
    page.fill("#certify-samples", "200")
    page.click("#certify")
    page.wait_for_selector("#certificate-panel:not([hidden])")
    assert "certified L2 radius" in page.locator("#certificate").inner_text()
    placed = page.evaluate("""() => {
        const result = document.getElementById('result'), cert = document.getElementById('certificate-panel');
        return {
          inResultSection: document.getElementById('result-heading').closest('section').contains(cert),
          afterResult: Boolean(result.compareDocumentPosition(cert) & Node.DOCUMENT_POSITION_FOLLOWING),
        };
    }""")
    assert placed == {"inResultSection": True, "afterResult": True}
    page.screenshot(path=str(ARTIFACTS / "web-certify.png"), full_page=True)
    page.set_input_files("#file", str(mnist_path(1)))
    page.wait_for_selector("#certificate-panel", state="hidden")
