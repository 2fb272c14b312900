"""The pages a person opens: the API docs (`/`, `/docs`) and the demo page (`/demo`).

Both are static files (service/static/, no build step) that call the HTTP API from the
browser. Nothing is loaded from anywhere but this server: Swagger UI's files come from
the `swagger-ui-py` package, and every page is sent with a Content-Security-Policy that
lets the browser fetch, run or show nothing from any other origin. (BentoML's own docs
page, which these replace, loads Google Tag Manager.) DLSERVE_DOCS=false turns all of it
off: 404.

The pages and their files need no API key even when one is set: they are the same files
in every install and hold no data. What they show comes from the API, which does need
the key; /docs.json is API too (it names the models and limits), and the pages ask for
the key when the server answers 401.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from dlserve.settings import Settings
from service import predict
from service.state import WorkerState, current

STATIC = Path(__file__).with_name("static")
DOCS_PAGES = ("/", "/docs")
PAGES = (*DOCS_PAGES, "/demo")
ASSETS = "/static/"
# 'unsafe-inline' for styles only: Swagger UI writes style attributes into its markup.
# Scripts, fetches, images and fonts: this origin only (data: for Swagger UI's icons).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; font-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

Build = Callable[[WorkerState], dict[str, Any]]  # the worker's state → the document


def is_page(path: str) -> bool:
    """Whether `path` is one of the pages or their files (no API key needed for them)."""
    return path in PAGES or path.startswith(ASSETS)


class Assets(StaticFiles):
    """Static files sent with the pages' security headers (and 304s on revalidation)."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(HEADERS)
        return response


def swagger_ui_files() -> Path:
    """Swagger UI's own distribution files, as the swagger-ui-py package ships them (found
    without importing the package, whose web-framework glue serving does not need)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the swagger-ui-py package is not installed; install it, or turn "
            "the docs off with DLSERVE_DOCS=false"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def page(name: str) -> Callable[[Request], Any]:
    async def endpoint(_: Request) -> Response:
        return FileResponse(STATIC / name, media_type="text/html", headers=HEADERS)

    return endpoint


def document_endpoint(build: Build) -> Callable[[Request], Any]:
    """/docs.json: built once per worker, once its models are loaded (their tags are in it)."""
    cached: list[bytes] = []

    async def endpoint(_: Request) -> Response:
        if cached:
            return Response(cached[0], media_type=predict.JSON)
        state = current()
        # As a predict request would, wait (a while) for the models, whose tags it names.
        ready = state.ready or await state.wait_until_loaded()
        body = orjson.dumps(build(state))
        if ready:
            cached.append(body)
        return Response(body, media_type=predict.JSON)

    return endpoint


async def turned_off(_: Request) -> Response:
    return predict.json_response(
        {
            "error": "the API docs and the demo page are turned off "
            "on this server (DLSERVE_DOCS=false)"
        },
        404,
    )


def routes(settings: Settings, build: Build) -> list[BaseRoute]:
    """The pages' routes; with the docs off, the same paths answer 404 (BentoML's own
    docs page and /docs.json, which these shadow, would answer otherwise)."""
    if not settings.docs:
        return [
            *(Route(p, turned_off) for p in (*PAGES, "/docs.json")),
            Mount(ASSETS.rstrip("/"), routes=[Route("/{path:path}", turned_off)]),
        ]
    return [
        *(Route(p, page("docs.html")) for p in DOCS_PAGES),
        Route("/demo", page("demo.html")),
        Route("/docs.json", document_endpoint(build)),
        Mount(ASSETS + "swagger-ui", Assets(directory=swagger_ui_files())),
        Mount(ASSETS + "dlserve", Assets(directory=STATIC)),
    ]
