"""The playground (``GET /``) in a real browser: Debian's chromium, driven headless by Playwright,
against ``python -m service serve --demo`` (the tiny model) with an API key, so the page's key handling
is exercised too.

Install the browser first with ``bash scripts/install-browser.sh`` (never Playwright's own download).
The browser tests skip with the reason when chromium or the ``playwright`` package is missing. Each
test leaves screenshots of the states it checks under its ``tmp_path``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from service.record import story_pb2
from tests.serverproc import metric, running_server, scrape, wait_engine_idle

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the browser tests skip; the page-serving test still runs
    expect = sync_playwright = None

pytestmark = pytest.mark.slow

KEY = "playground-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SMALL = "128x128"  # an 8×8-token image: about a second on the tiny model
GENERATION_TIMEOUT_MS = 90_000  # generous: CI machines may share their CPUs


def chromium_path() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    with running_server(["--demo", "--api-key", KEY], tmp_path_factory.mktemp("log") / "server.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        pytest.skip("the playwright package is not installed (pip install playwright)")
    executable = chromium_path()
    if executable is None:
        pytest.skip("chromium is not installed: run scripts/install-browser.sh")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, server):
    """The playground in a fresh browser context (empty sessionStorage) with the API key entered."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    js_errors: list[str] = []
    page.on("pageerror", lambda exc: js_errors.append(str(exc)))
    page.goto(server.url + "/")
    page.get_by_label("API key").fill(KEY)
    yield page
    context.close()
    assert not js_errors, f"uncaught errors in the page: {js_errors}"


# ---- helpers --------------------------------------------------------------------------------------


#: ``make screenshot`` sets this to ``docs/playground.png``: the README's picture is the page of
#: :func:`test_t2i_shows_the_image_timings_and_the_record` once its image is done.
README_PICTURE_ENV = "EMU35_SCREENSHOT"


def shot(page, path: Path) -> Path:
    page.screenshot(path=str(path), full_page=True)
    return path


def image_size(img) -> list[int]:
    """The natural size of a rendered <img>, once its data has loaded."""
    return img.evaluate("im => im.decode().then(() => [im.naturalWidth, im.naturalHeight])")


def png(tmp_path: Path, width: int = 96, height: int = 64) -> Path:
    import numpy as np
    from PIL import Image

    path = tmp_path / "reference.png"
    pixels = np.random.default_rng(5).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def generate(panel) -> None:
    panel.get_by_role("button", name="Generate").click()


def wait_state(panel, state: str) -> None:
    expect(panel.locator(".output")).to_have_attribute("data-state", state, timeout=GENERATION_TIMEOUT_MS)


# ---- the page itself --------------------------------------------------------------------------------


def test_page_and_assets_are_served_without_a_key_and_load_nothing_external(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name, media_type in (("playground.css", "text/css"), ("playground.js", "text/javascript")):
        assert f"/playground/{name}" in page.text
        asset = httpx.get(f"{server.url}/playground/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media_type)
        assert not re.search(r"https?://", asset.text), f"{name} refers to another site"
    assert not re.search(r"(src|href)=\"https?://", page.text)
    missing = httpx.get(server.url + "/playground/app.py")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


# ---- in the browser ---------------------------------------------------------------------------------


def test_t2i_shows_the_image_timings_and_the_record(page, tmp_path):
    # the key is kept for the tab's session: a reload keeps it
    page.reload()
    expect(page.get_by_label("API key")).to_have_value(KEY)
    expect(page.get_by_role("tab", name="Image")).to_have_attribute("aria-selected", "true")
    panel = page.locator("#panel-image")
    prompt = "a blue bird sits on a tree"
    panel.get_by_label("Prompt").fill(prompt)
    panel.get_by_label("Size").fill(SMALL)
    panel.get_by_label("Seed").fill("11")
    panel.get_by_label("Stream progress").uncheck()  # the one-JSON-body path

    with page.expect_request("**/v1/t2i") as sent:
        generate(panel)
    assert sent.value.post_data_json == {"prompt": prompt, "size": SMALL, "seed": 11}
    assert sent.value.all_headers()["authorization"] == f"Bearer {KEY}"
    wait_state(panel, "done")

    out = panel.locator(".output")
    img = out.locator('figure[data-state="done"] img')
    expect(img).to_have_count(1)
    assert image_size(img) == [128, 128]
    expect(out.locator(".status")).to_contain_text(re.compile(r"Done in \d+\.\d+ s · first token after"))
    expect(out.get_by_role("alert")).to_be_hidden()
    screenshot = shot(page, tmp_path / "t2i-done.png")
    readme_picture = os.environ.get(README_PICTURE_ENV)
    if readme_picture:  # `make screenshot`: this run's page is the README's picture
        page.screenshot(path=readme_picture, full_page=False)

    with page.expect_download() as download:
        out.get_by_role("link", name="Download record (.pb)").click()
    name = download.value.suggested_filename
    assert re.fullmatch(r"gen-[0-9a-f]+\.pb", name), name
    story = story_pb2.Story()
    story.ParseFromString(Path(download.value.path()).read_bytes())
    assert story.question == prompt and story.story_id == name.removesuffix(".pb")
    assert screenshot.stat().st_size > 0


def test_x2i_uploads_a_reference_image_and_shows_the_result(page, tmp_path):
    panel = page.locator("#panel-image")
    panel.get_by_label("Prompt").fill("make it night")
    panel.locator('input[type="file"]').set_input_files(str(png(tmp_path)))
    expect(panel.get_by_role("img", name="Reference image 1: reference.png")).to_be_visible()
    panel.get_by_label("Size").fill(SMALL)
    panel.get_by_label("Seed").fill("1")
    panel.get_by_text("Advanced sampling").click()
    panel.get_by_label("Image area (px)").fill(str(128 * 128))  # a small reference grid: a short prompt
    panel.get_by_label("Image top-k").fill("100")
    shot(page, tmp_path / "x2i-reference.png")

    with page.expect_request("**/v1/x2i") as sent:
        generate(panel)
    body = sent.value.post_data_json
    assert body["stream"] is True and body["size"] == SMALL and body["image_area"] == 128 * 128
    assert body["image_sampling"] == {"top_k": 100} and "text_sampling" not in body
    assert len(body["images"]) == 1 and body["images"][0].startswith("data:image/png;base64,")
    wait_state(panel, "done")

    img = panel.locator('.output figure[data-state="done"] img')
    expect(img).to_have_count(1)
    assert image_size(img) == [128, 128]
    expect(panel.get_by_role("link", name="Download record (.pb)")).to_be_visible()
    assert shot(page, tmp_path / "x2i-done.png").stat().st_size > 0


# Marks, in the page, when the result first shows narrative text, a progress bar, a preview and a
# finished image (a MutationObserver sees each DOM change as the stream is rendered).
WATCH_OUTPUT = """out => {
  window.seen = {};
  const mark = (name, cond) => { if (cond && !(name in window.seen)) window.seen[name] = performance.now(); };
  new MutationObserver(() => {
    mark("text", [...out.querySelectorAll(".segment.text")].some(p => p.textContent.trim()));
    mark("progress", out.querySelector("figure progress"));
    mark("preview", out.querySelector('figure[data-state="drawing"] img[src]'));
    mark("image", out.querySelector('figure[data-state="done"]'));
  }).observe(out, { subtree: true, childList: true, characterData: true, attributes: true });
}"""


def test_narrative_streams_text_before_the_image_completes(page, tmp_path):
    # keyboard: the arrow key moves from the Image tab to the Interleaved tab
    page.get_by_role("tab", name="Image").focus()
    page.keyboard.press("ArrowRight")
    tab = page.get_by_role("tab", name="Interleaved")
    expect(tab).to_have_attribute("aria-selected", "true")
    expect(tab).to_be_focused()
    panel = page.locator("#panel-interleaved")
    expect(panel).to_be_visible()
    expect(page.locator("#panel-image")).to_be_hidden()

    panel.get_by_label("Task").select_option("narrative")
    panel.get_by_label("Prompt").fill("a robot in the city")
    panel.get_by_label("Seed").fill("3")
    panel.get_by_label("Previews while drawing").check()
    expect(panel.get_by_label("every N rows")).to_be_enabled()
    panel.locator(".output").evaluate(WATCH_OUTPUT)

    with page.expect_request("**/v1/narrative") as sent:
        generate(panel)
    assert sent.value.post_data_json["preview_every_rows"] == 4
    wait_state(panel, "done")
    shot(page, tmp_path / "narrative-done.png")

    seen = page.evaluate("window.seen")
    assert {"text", "progress", "preview", "image"} <= set(seen), seen
    assert seen["text"] <= seen["progress"] < seen["image"], seen  # text was there when the image started
    assert seen["text"] < seen["image"] and seen["preview"] < seen["image"], seen
    out = panel.locator(".output")
    cot = out.locator("details.segment.cot").first
    expect(cot).to_contain_text("Chain of thought")
    assert cot.evaluate("d => !d.open")  # chain-of-thought starts collapsed
    cot.locator("summary").click()
    expect(cot.locator(".cot-text")).not_to_be_empty()
    assert image_size(out.locator('figure[data-state="done"] img').first)[0] > 0
    expect(out.get_by_role("link", name="Download record (.pb)")).to_be_visible()
    assert shot(page, tmp_path / "narrative-cot-open.png").stat().st_size > 0


def test_stop_mid_image_aborts_the_generation_on_the_server(page, http, tmp_path):
    wait_engine_idle(http, 60)
    panel = page.locator("#panel-image")
    panel.get_by_label("Prompt").fill("a long one")
    panel.get_by_label("Size").fill("512x512")  # 32 rows: many seconds on the tiny model
    expect(panel.get_by_label("Stream progress")).to_be_checked()
    generate(panel)
    page.wait_for_function("() => document.querySelector('#panel-image figure progress')?.value >= 2",
                           timeout=GENERATION_TIMEOUT_MS)
    assert metric(scrape(http), "emu35_running_pairs") == 1
    before = shot(page, tmp_path / "stop-drawing.png")

    panel.get_by_role("button", name="Stop").click()
    assert wait_engine_idle(http, 2.0) <= 2.0
    wait_state(panel, "stopped")
    expect(panel.locator(".output .status")).to_have_text("Stopped.")
    expect(panel.locator('.output figure[data-state="stopped"]')).to_have_count(1)
    expect(panel.get_by_role("button", name="Generate")).to_be_enabled()
    expect(panel.get_by_role("button", name="Stop")).to_be_disabled()
    after = shot(page, tmp_path / "stop-stopped.png")
    assert before.stat().st_size > 0 and after.stat().st_size > 0


def test_api_errors_are_shown(page, tmp_path):
    panel = page.locator("#panel-image")
    alert = panel.get_by_role("alert")
    panel.get_by_label("Prompt").fill("x")
    panel.get_by_label("Size").fill("1000x1000")
    generate(panel)
    wait_state(panel, "error")
    expect(alert).to_be_visible()
    expect(alert).to_contain_text("multiple of 16")
    shot(page, tmp_path / "error-size.png")

    # a wrong key: the API's 401 message, not a generic failure
    page.get_by_label("API key").fill("not-the-key")
    panel.get_by_label("Size").fill(SMALL)
    generate(panel)
    expect(alert).to_contain_text("missing or wrong API key")
    wait_state(panel, "error")
    assert shot(page, tmp_path / "error-key.png").stat().st_size > 0
    assert (tmp_path / "error-size.png").stat().st_size > 0


# ---- the API docs, offline ------------------------------------------------------------------------


def test_docs_pages_and_assets_need_no_key_and_name_no_other_site(server):
    page = httpx.get(server.url + "/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.search(r"(src|href)=\"https?://", page.text), "/docs loads from another site"
    assert "/docs/assets/swagger-ui-bundle.js" in page.text
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"):
        assert httpx.get(f"{server.url}/docs/assets/{name}").status_code == 200, name
    assert httpx.get(server.url + "/docs/assets/redoc.standalone.js").status_code == 404
    assert httpx.get(server.url + "/redoc").status_code == 404
    assert httpx.get(server.url + "/openapi.json").status_code == 200


def offline_page(browser, server):
    """A page whose every request to another host is aborted (and recorded), as on an air-gapped cluster."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    blocked: list[str] = []

    def only_the_service(route) -> None:
        if route.request.url.startswith(server.url + "/"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_service)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return context, page, blocked, errors


def test_swagger_ui_renders_the_operations_with_the_network_cut_off(browser, server, tmp_path):
    context, page, blocked, errors = offline_page(browser, server)
    try:
        page.goto(server.url + "/docs")
        generations = page.locator(".opblock-summary-path", has_text=re.compile(r"^/v1/images/generations$"))
        expect(generations).to_be_visible(timeout=30_000)
        for path in ("/v1/t2i", "/v1/x2i", "/v1/images/edits", "/health"):
            expect(page.locator(".opblock-summary-path", has_text=re.compile(f"^{path}$"))).to_be_visible()
        assert page.locator(".opblock").count() >= 12
        generations.click()  # an operation opens and shows its request body schema
        expect(page.locator(".opblock.is-open .opblock-section-request-body")).to_be_visible()
        shot(page, tmp_path / "docs-offline.png")
        assert not blocked, f"the docs tried to reach other hosts: {blocked}"
        assert not errors, errors
    finally:
        context.close()
