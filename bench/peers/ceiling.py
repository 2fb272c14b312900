"""The HTTP ceiling: bare uvicorn + Starlette that parses each request's JSON (orjson) and
answers a fixed small JSON object, running no model: the most requests per second this
machine serves over HTTP with this stack, which every real server is measured against.

    uvicorn bench.peers.ceiling:app --port 8000 --workers 2
"""

from __future__ import annotations

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from dlserve import registry
from dlserve.settings import get_settings

ANSWER = orjson.dumps({"model": "none", "predictions": []})


async def parse_and_answer(request: Request) -> Response:
    orjson.loads(await request.body())
    return Response(ANSWER, media_type="application/json")


app = Starlette(
    routes=[
        Route("/health", lambda _: PlainTextResponse("ok")),
        *(
            Route(route.path, parse_and_answer, methods=["POST"])
            for spec in registry.serving(get_settings()).values()
            for route in spec.routes
            if route.request is not None
        ),
    ]
)
