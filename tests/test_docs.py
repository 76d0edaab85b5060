"""The documentation site: its generated pages match the code, and the service serves the built site at
/guide/ offline, without a key and without leaving the site's folder."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gen_docs  # noqa: E402

from service.server.app import create_app  # noqa: E402
from service.server.ops import guide  # noqa: E402
from service.settings import ENV_PREFIX, Settings  # noqa: E402


# ---- generated pages ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    return {rel: make() for rel, make in gen_docs.PAGES.items()}


@pytest.mark.parametrize("rel", sorted(gen_docs.PAGES))
def test_generated_pages_match_the_code(generated, rel):
    committed = (ROOT / rel).read_text()
    assert committed == generated[rel], f"{rel} differs from the code: run `python scripts/gen_docs.py` and commit it"


def test_every_setting_is_on_the_configuration_page_with_its_variable_and_help():
    page = (ROOT / "docs/configuration.md").read_text()
    for name, field in Settings.model_fields.items():
        row = next((line for line in page.splitlines() if line.startswith(f"| `--{name.replace('_', '-')}` |")), None)
        assert row is not None, f"--{name} is not on the page"
        assert f"`{ENV_PREFIX}{name.upper()}`" in row
        if field.description:
            assert field.description.split(";")[0].replace("|", "\\|")[:40] in row


def test_every_route_and_event_of_the_openapi_document_is_on_the_reference(generated):
    doc = gen_docs.openapi_document()
    page = generated["docs/api-reference.md"]
    for path, item in doc["paths"].items():
        for method in item:
            assert f"| {method.upper()} | `{path}` |" in page, (method, path)
    for code in ("invalid_generation", "overloaded", "webhook_not_allowed", "guide_not_built"):
        assert f"| `{code}` |" in page
    for event in ("image_progress", "image_generation.partial_image", "done", "error"):
        assert f"| `{event}` |" in page


def test_the_check_fails_on_a_drifted_page_and_passes_when_regenerated(tmp_path, monkeypatch, generated):
    """The drift check itself (what `gen_docs.py --check` and the pre-commit hook run): a page edited
    by hand, or missing, is reported; regenerating makes it pass."""
    (tmp_path / "docs").mkdir()
    for rel, text in generated.items():
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(gen_docs, "ROOT", tmp_path)
    monkeypatch.setattr(gen_docs, "PAGES", {rel: (lambda text=text: text) for rel, text in generated.items()})
    assert gen_docs.main(["--check"]) == 0
    page = tmp_path / "docs/configuration.md"
    page.write_text(page.read_text().replace("| `--max-queue` |", "| `--max-queue-length` |"))
    assert gen_docs.main(["--check"]) == 1
    page.unlink()
    assert gen_docs.main(["--check"]) == 1
    assert gen_docs.main([]) == 0 and gen_docs.main(["--check"]) == 0


def test_error_codes_are_read_from_the_calls(tmp_path):
    (tmp_path / "m.py").write_text(
        "APIError(418, 'x', 'teapot')\nbad_request('y')\nbad_request('z', 'odd_field', 'f')\n"
        "APIError(status=409, message='m', code='clash')\nAPIError(500, 'n', some_variable)\n")
    assert gen_docs.error_codes(tmp_path) == {"teapot": {418}, "invalid_request": {400}, "odd_field": {400},
                                              "clash": {409}}


# ---- /guide/ ---------------------------------------------------------------------------------------
@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    """A stand-in for the built site (mkdocs' layout: folders with index.html, assets/)."""
    built = tmp_path / "guide"
    (built / "quickstart").mkdir(parents=True)
    (built / "assets").mkdir()
    (built / "index.html").write_text("<html>home</html>")
    (built / "quickstart" / "index.html").write_text("<html>quickstart</html>")
    (built / "assets" / "main.css").write_text("body{}")
    (tmp_path / "secret.txt").write_text("not part of the site")
    monkeypatch.setattr(guide, "SITE", built)
    return built


def get(path: str, api_key: str | None = "key") -> httpx.Response:
    app = create_app(Settings(demo=True, api_key=api_key))

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.get(path)

    return asyncio.run(run())


def test_the_guide_is_served_without_a_key(site):
    home = get("/guide/")
    assert home.status_code == 200 and home.text == "<html>home</html>"
    assert home.headers["content-type"].startswith("text/html")
    page = get("/guide/quickstart/")
    assert page.status_code == 200 and "quickstart" in page.text
    css = get("/guide/assets/main.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


def test_guide_without_slash_redirects_so_relative_links_work(site):
    answer = get("/guide")
    assert answer.status_code == 308 and answer.headers["location"] == "/guide/"


@pytest.mark.parametrize("path", ["/guide/nope/", "/guide/../secret.txt", "/guide/%2e%2e/secret.txt",
                                  "/guide/..%2fsecret.txt", "/guide//etc/passwd"])
def test_the_guide_serves_nothing_outside_its_folder(site, path):
    answer = get(path)
    assert answer.status_code == 404, path
    assert "not part of the site" not in answer.text


def test_site_file_refuses_paths_that_leave_the_site(site):
    assert guide.site_file(site, "quickstart") == site / "quickstart" / "index.html"
    assert guide.site_file(site, "../secret.txt") is None
    assert guide.site_file(site, "/etc/passwd") is None
    (site / "link").symlink_to(site.parent / "secret.txt")
    assert guide.site_file(site, "link") is None


def test_an_unbuilt_guide_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setattr(guide, "SITE", tmp_path / "absent")
    answer = get("/guide/")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "guide_not_built"
    assert "make docs" in answer.json()["error"]["message"]


def test_the_playground_links_to_the_guide():
    page = (ROOT / "service/server/ops/static/playground.html").read_text()
    assert re.search(r'<a href="/guide/">', page)


@pytest.mark.skipif(shutil.which("mkdocs") is None and not (ROOT / ".venv-docs/bin/mkdocs").exists(),
                    reason="mkdocs is installed by make docs")
def test_the_site_loads_nothing_from_elsewhere():
    """The theme's web fonts are off, so a built page names no other host (the site works offline)."""
    built = guide.SITE / "index.html"
    if not built.exists():
        pytest.skip("run make docs first")
    html = built.read_text()
    assert "fonts.googleapis.com" not in html and "fonts.gstatic.com" not in html
    assert not re.search(r'<(?:script|link)[^>]+(?:src|href)="https?://', html)
