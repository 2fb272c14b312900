"""The pages a person opens, the API docs (/) and the demo page (/demo), in a real browser.

Debian's Chromium (`make browser-tools`), driven headless by Playwright, against the real
server of the test session: the docs page lists every route of /docs.json and makes no
request to any other origin; on the demo page a digit drawn with mouse moves is
classified, a clear-cut review gets its label, three rated movies come back with
recommendations that leave them out, and a refused input shows the API's own message.
With an API key set, both pages ask for it and then work. The OpenAPI document itself,
its examples and the movie search are checked over plain HTTP.

Screenshots of both pages are taken on every run; DLSERVE_UPDATE_SCREENSHOTS=1 also
writes them, small, to docs/screenshots/ for the README and docs/pages.md.
"""

from __future__ import annotations

import http.client
import io
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

import dlserve
from dlserve import registry
from dlserve.models.digits import example_pixels
from dlserve.settings import load_settings
from tests.conftest import ROOT, start_server
from tests.images import encode
from tests.routes import request_examples

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless, and nothing of its own on the network: no updates, sync or QUIC probing.
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
SCREENSHOTS = ROOT / "docs" / "screenshots"
KEY = "browser-test-key"
ERROR_STATUSES = {"400", "401", "413", "415", "429", "503", "504"}


# ---- The OpenAPI document, over HTTP --------------------------------------------------------


def operations(doc: dict[str, Any]) -> set[str]:
    return {f"{method.upper()} {path}" for path, item in doc["paths"].items() for method in item}


def test_the_openapi_document_is_dlserves_own(client: httpx.Client) -> None:
    doc = client.get("/docs.json").json()
    tags = {m["name"]: m["tag"] for m in client.get("/models").json()["models"]}
    settings = load_settings()
    info = doc["info"]
    assert info["title"] == "dlserve" and info["license"]["name"] == "Apache-2.0"
    assert info["version"].startswith(dlserve.__version__ + " (")
    assert all(tag in info["version"] for tag in tags.values()) and len(tags) == 3
    assert "bentoml" not in str(info).lower()
    for name, spec in registry.serving(settings).items():
        assert spec.summary in info["description"] and tags[name] in info["description"]
        for route in spec.routes:
            post = doc["paths"][route.path]["post"]
            assert post["tags"] == [name] and post["summary"] == route.summary
            assert set(post["responses"]) == {"200"} | ERROR_STATUSES
            assert post["responses"]["413"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"
            }
    assert f"{settings.max_body_bytes:,} bytes" in info["description"]
    assert "No API key is set" in info["description"]
    assert {"GET /models", "GET /recommender/movies", "GET /readyz", "GET /metrics"} <= operations(
        doc
    )
    schemas = doc["components"]["schemas"]
    assert "InvalidArgument" not in schemas and "TaskStatusResponse" not in schemas
    assert schemas["ModelsResponse"]["properties"]["models"]["items"] == {
        "$ref": "#/components/schemas/ModelInfo"
    }


def test_every_request_example_works_when_pasted(client: httpx.Client) -> None:
    doc = client.get("/docs.json").json()
    answered = {}
    for path, item in doc["paths"].items():
        media = item.get("post", {}).get("requestBody", {}).get("content", {})
        if "application/json" in media:
            for real, example in request_examples(doc, path, media["application/json"]).items():
                r = client.post(real, json=example)
                if real.startswith("/v2/repository/"):  # model control is off on this server
                    assert r.status_code == 403, (real, r.text)
                    continue
                assert r.status_code == 200, (real, r.text)
                answered[real] = r.json()
    # 4 JSON routes; the protocol's infer, with and without the version, for each model.
    assert len(answered) == 4 + 2 * 3
    seven = answered["/v2/models/digits/infer"]["outputs"]
    assert [o["data"] for o in seven if o["name"] == "digit"] == [[7]]
    assert answered["/digits/predict"]["predictions"][0]["digit"] == 7  # the example is a 7
    assert [p["label"] for p in answered["/sentiment/predict"]["predictions"]] == [
        "positive",
        "negative",
    ]


def test_the_pages_replace_bentomls_own(client: httpx.Client) -> None:
    """dlserve's routes for / and /docs.json come before BentoML's own (which load Google
    Tag Manager and describe BentoML); this fails if a BentoML upgrade changes that."""
    for path in ("/", "/docs", "/demo"):
        r = client.get(path)
        assert r.status_code == 200 and "<title>dlserve" in r.text, path
        assert "googletagmanager" not in r.text
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self';" in csp
        assert "http" not in csp and "*" not in csp  # no other origin is allowed anything
    assert client.get("/docs.json").json()["info"]["title"] == "dlserve"
    assert client.get("/static/swagger-ui/swagger-ui-bundle.js").status_code == 200


def test_movie_search_finds_titles_as_people_type_them(client: httpx.Client) -> None:
    r = client.get("/recommender/movies", params={"query": "STAR wars", "limit": 5})
    assert r.status_code == 200 and r.headers["cache-control"].startswith("private, max-age=")
    body = r.json()
    assert body["model"].startswith("recommender:") and body["matches"] == len(body["movies"])
    assert {"movie_id": 50, "title": "Star Wars (1977)"}.items() <= body["movies"][0].items()
    found = client.get("/recommender/movies", params={"query": "miserables"}).json()["movies"]
    assert [m["title"] for m in found] == ["Misérables, Les (1995)"]
    top = client.get("/recommender/movies", params={"limit": 3}).json()
    assert top["matches"] == 1682 and len(top["movies"]) == 3
    counts = [m["times_rated"] for m in top["movies"]]
    assert counts == sorted(counts, reverse=True)
    for params, message in [
        ({"limit": 0}, "limit: Input should be greater than or equal to 1"),
        ({"limit": "ten"}, "limit: Input should be a valid integer"),
        ({"q": "x"}, "q: Extra inputs are not permitted"),
    ]:
        r = client.get("/recommender/movies", params=params)
        assert r.status_code == 400 and r.json()["error"].startswith(message), r.text


def raw_get(url: str, path: str) -> int:
    """The status of GET `path` sent as it is (httpx would resolve the dots first)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


# ---- In the browser ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(
            f"Chromium is not installed at {CHROMIUM}: run `make browser-tools` "
            "(apt-get install chromium)"
        )
    from playwright.sync_api import expect

    expect.set_options(timeout=15_000)  # a busy 2-core machine answers slowly now and then
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@dataclass
class Visit:
    """A page open in a fresh browser context, with everything it asked the network for."""

    page: Any
    requests: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # script errors and CSP violations

    def foreign_requests(self, origin: str) -> list[str]:
        return [
            u
            for u in self.requests
            if urlsplit(u).scheme not in ("data", "blob")
            and urlsplit(u).netloc != urlsplit(origin).netloc
        ]


@contextmanager
def visit(browser: Any, url: str) -> Iterator[Visit]:
    context = browser.new_context(viewport={"width": 1100, "height": 820})
    page = context.new_page()
    seen = Visit(page)
    page.on("request", lambda r: seen.requests.append(r.url))
    page.on("pageerror", lambda e: seen.problems.append(f"script error: {e}"))
    page.on(
        "console",
        lambda m: seen.problems.append(m.text) if "Content Security Policy" in m.text else None,
    )
    page.goto(url)
    try:
        yield seen
    finally:
        context.close()


def screenshot(page: Any, name: str, tmp_path: Path, *, full_page: bool = False) -> None:
    """A small PNG of the page (32 colours); into docs/screenshots/ when asked to update."""
    shot = Image.open(io.BytesIO(page.screenshot(full_page=full_page))).convert("RGB")
    small = shot.quantize(colors=32, dither=Image.Dither.NONE)
    folder = SCREENSHOTS if os.environ.get("DLSERVE_UPDATE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    small.save(folder / f"{name}.png", optimize=True)


def re_answer(model: str) -> re.Pattern[str]:
    """What the demo says under an answer: the model version that gave it, and the time."""
    return re.compile(rf"Answered by {model}:\w+ in \d+ ms")


def draw(page: Any, strokes: list[list[tuple[float, float]]]) -> None:
    """Draw with the mouse on the demo's pad; points are fractions of its width and height."""
    page.locator("#pad").scroll_into_view_if_needed()
    box = page.locator("#pad").bounding_box()
    for stroke in strokes:
        points = [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in stroke]
        page.mouse.move(*points[0])
        page.mouse.down()
        for point in points[1:]:
            page.mouse.move(*point, steps=12)
        page.mouse.up()


def test_the_docs_page_lists_every_route_and_loads_nothing_from_elsewhere(
    browser: Any, server: str, client: httpx.Client, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    with visit(browser, server + "/") as seen:
        page = seen.page
        expect(page.locator(".info .title")).to_contain_text("dlserve")
        shown = page.locator(".opblock")
        expect(shown).to_have_count(len(operations(client.get("/docs.json").json())))
        listed = {
            f"{b.locator('.opblock-summary-method').inner_text()} "
            f"{b.locator('.opblock-summary-path').get_attribute('data-path')}"
            for b in shown.all()
        }
        assert listed == operations(client.get("/docs.json").json())
        screenshot(page, "docs", tmp_path)
        # Try one route from the page, with its example, as a reader would.
        page.locator(
            "#operations-sentiment-dlserve__sentiment_predict .opblock-summary-control"
        ).click()
        page.get_by_role("button", name="Try it out").click()
        page.get_by_role("button", name="Execute").click()
        expect(
            page.locator(".live-responses-table .response .response-col_status").first
        ).to_have_text("200")
        assert seen.foreign_requests(server) == [] and seen.problems == []
        assert any(u.endswith("/docs.json") for u in seen.requests)


def test_the_demo_classifies_a_drawn_digit_and_a_review(
    browser: Any, server: str, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    with visit(browser, server + "/demo") as seen:
        page = seen.page
        expect(page.locator("#served")).to_contain_text("digits:")
        for digit, strokes in [
            (7, [[(0.25, 0.22), (0.75, 0.22), (0.42, 0.85)]]),
            (1, [[(0.52, 0.15), (0.48, 0.85)]]),
        ]:
            page.get_by_role("button", name="Clear").click()
            draw(page, strokes)
            expect(page.locator("#digit")).to_have_text(str(digit))
            expect(page.locator("#bars li")).to_have_count(10)
            expect(page.locator("#bars li.top")).to_contain_text(str(digit))
            expect(page.locator("#digits-meta")).to_contain_text(re_answer("digits"))
        page.get_by_label("A movie review, in English").fill(
            "A very well-made, funny and entertaining picture."
        )
        page.get_by_role("button", name="Classify").click()
        expect(page.locator("#label")).to_have_text("positive")
        expect(page.locator("#sentiment-meta")).to_contain_text(re_answer("sentiment"))
        page.get_by_label("A movie review, in English").fill("A coarse and stupid gross-out.")
        page.get_by_label("A movie review, in English").press("Control+Enter")
        expect(page.locator("#label")).to_have_text("negative")
        assert seen.foreign_requests(server) == [] and seen.problems == []


def test_the_demo_recommends_movies_other_than_those_rated(
    browser: Any, server: str, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    rated = ["Star Wars (1977)", "Fargo (1996)", "Toy Story (1995)"]
    with visit(browser, server + "/demo") as seen:
        page = seen.page
        for title in rated:
            page.get_by_label("Find a movie by title").fill(title.split(" (")[0])
            expect(page.locator("#movies li").first).to_contain_text(title)
            page.get_by_label(f"Your rating of {title}").select_option("5")
        expect(page.locator("#rated li")).to_have_count(3)
        page.get_by_role("button", name="Recommend").click()
        recommendations = page.locator("#recommendations li")
        expect(recommendations).to_have_count(10)
        titles = recommendations.all_inner_texts()
        assert not [t for t in titles for r in rated if t.startswith(r)], titles
        expect(page.locator("#recommender-meta")).to_contain_text(re_answer("recommender"))
        page.get_by_label("Find a movie by title").fill("")
        page.get_by_label("A movie review, in English").fill("It all adds up to good fun.")
        page.get_by_role("button", name="Classify").click()
        draw(page, [[(0.25, 0.22), (0.75, 0.22), (0.42, 0.85)]])
        expect(page.locator("#digit")).to_have_text("7")
        expect(page.locator("#label")).to_have_text("positive")
        screenshot(page, "demo", tmp_path, full_page=True)
        assert seen.foreign_requests(server) == [] and seen.problems == []


def test_the_demo_shows_why_an_input_was_refused(browser: Any, server: str) -> None:
    from playwright.sync_api import expect

    with visit(browser, server + "/demo") as seen:
        page = seen.page
        page.get_by_label("A movie review, in English").fill("   ")
        page.get_by_role("button", name="Classify").click()
        expect(page.locator("#sentiment-error")).to_have_text(
            "Refused (HTTP 400): texts[0]: the text is empty or only whitespace; "
            "there is nothing to classify"
        )
        seven = Image.fromarray(np.asarray(example_pixels(), dtype=np.uint8))
        page.set_input_files(
            "#file",
            files=[{"name": "seven.gif", "mimeType": "image/gif", "buffer": encode(seven, "GIF")}],
        )
        expect(page.locator("#digits-error")).to_have_text(
            "Refused (HTTP 415): image: format GIF is not accepted; send PNG or JPEG"
        )
        page.set_input_files(
            "#file", files=[{"name": "seven.png", "mimeType": "image/png", "buffer": encode(seven)}]
        )
        expect(page.locator("#digit")).to_have_text("7")
        expect(page.locator("#digits-error")).to_be_empty()
        assert seen.foreign_requests(server) == [] and seen.problems == []


@pytest.fixture(scope="module")
def locked(
    digits_model: str,
    sentiment_model: str,
    recommender_model: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """A server with an API key, serving the sentiment model only."""
    with start_server(
        tmp_path_factory.mktemp("locked"),
        DLSERVE_WORKERS="1",
        DLSERVE_MODELS="sentiment",
        DLSERVE_API_KEY=KEY,
    ) as running:
        yield running.url


def test_with_an_api_key_the_pages_open_and_ask_for_it(browser: Any, locked: str) -> None:
    from playwright.sync_api import expect

    for path in ("/", "/demo", "/static/dlserve/demo.js", "/static/swagger-ui/swagger-ui.css"):
        assert httpx.get(locked + path).status_code == 200, path
    assert httpx.get(locked + "/docs.json").status_code == 401
    # The pages' files are open; nothing else is reached through their folder.
    for path in ("/static/dlserve/../../docs.json", "/static/../models", "/static//docs.json"):
        assert raw_get(locked, path) == 404, path
    with visit(browser, locked + "/demo") as seen:
        page = seen.page
        expect(page.locator("#key-why")).to_contain_text("needs an API key")
        page.get_by_label("API key").fill(KEY)
        page.get_by_role("button", name="Use this key").click()
        expect(page.locator("#served")).to_contain_text("sentiment:")
        expect(page.locator("#digits")).to_be_hidden()  # not served here
        expect(page.locator("#recommender")).to_be_hidden()
        page.get_by_label("A movie review, in English").fill("Lovely and poignant.")
        page.get_by_role("button", name="Classify").click()
        expect(page.locator("#label")).to_have_text("positive")
        page.goto(locked + "/")  # the same tab keeps the key for the docs
        expect(page.locator(".opblock")).to_have_count(
            len(
                operations(
                    httpx.get(
                        locked + "/docs.json", headers={"Authorization": f"Bearer {KEY}"}
                    ).json()
                )
            )
        )
        expect(page.locator(".info")).to_contain_text("This server requires an API key")
        assert seen.foreign_requests(locked) == [] and seen.problems == []
    with visit(browser, locked + "/") as seen:
        expect(seen.page.locator("#key-why")).to_contain_text("needs an API key")
        seen.page.get_by_label("API key").fill("wrong")
        seen.page.get_by_role("button", name="Show the docs").click()
        expect(seen.page.locator("#key-why")).to_contain_text("That key was refused")
        seen.page.get_by_label("API key").fill(KEY)
        seen.page.get_by_role("button", name="Show the docs").click()
        expect(seen.page.locator(".info .title")).to_contain_text("dlserve")
