"""LitServe with its own batching (`max_batch_size=64`, `batch_timeout=0.01`), over the
same runners: each request is decoded on its own, the queued ones are run as one model
call, and each gets its row back. Run it with

    DLSERVE_MODELS=digits python -m bench.peers.litserve_peer 8000
"""

from __future__ import annotations

import sys
from typing import Any

import litserve as ls
import numpy as np

from dlserve import registry
from dlserve.models.recommender import user_ratings
from dlserve.settings import get_settings

settings = get_settings()
MAX_BATCH = 64
# LitServe's best settings found for this workload (digits, 64 clients, 2 workers, 5-s runs
# on the benchmark machine): with its default batch_timeout of 0 each inference loop spins
# on its queue (a whole core while idle) and served ~200 requests/s; 0.01 s, with
# `fast_queue` (ZeroMQ, LitServe's advice above 100 requests/s), ~420-470; 0.005, 0.02 and
# 0.05 s were no better.
BATCH_TIMEOUT_S = 0.01

K = 10  # the bench's recommend requests all ask for 10; LitAPI has no per-request context


class Model(ls.LitAPI):
    """One model's route: `decode_request` turns a request into the runner's part (its
    argument is left unannotated: LitServe reads the body as JSON only then), and
    `encode_response` writes a result."""

    name = ""

    def setup(self, device: str) -> None:
        self.runner = registry.load_runner(self.name, settings)
        self.runner.warm_up()

    def batch(self, inputs: list[Any]) -> list[Any]:
        return inputs

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def predict(self, parts: list[Any]) -> list[Any]:
        return [
            (part, result) for part, result in zip(parts, self.runner.run_batch(parts), strict=True)
        ]


class Digits(Model):
    name = "digits"

    def decode_request(self, request):
        return np.asarray(request["images"], dtype=np.float32)

    def encode_response(self, output: Any) -> dict[str, Any]:
        _, probs = output
        return {
            "model": self.runner.tag,
            "predictions": [
                {
                    "digit": int(row.argmax()),
                    "confidence": float(row.max()),
                    "probabilities": row.round(6).tolist(),
                }
                for row in probs
            ],
        }


class Sentiment(Model):
    name = "sentiment"

    def decode_request(self, request):
        return [self.runner.encode(t) for t in request["texts"]]

    def encode_response(self, output: Any) -> dict[str, Any]:
        _, probs = output
        labels = self.runner.labels
        return {
            "model": self.runner.tag,
            "predictions": [
                {
                    "label": labels[int(row.argmax())],
                    "positive_probability": float(row[labels.index("positive")]),
                }
                for row in probs
            ],
        }


class Recommender(Model):
    name = "recommender"

    def decode_request(self, request):
        user = user_ratings(
            self.runner,
            [(r["movie_id"], r["rating"]) for r in request["ratings"]],
            max_ratings=settings.max_ratings,
        )
        return [user]

    def encode_response(self, output: Any) -> dict[str, Any]:
        (user,), ((expected,), (relevance,)) = output
        cat = self.runner.catalogue
        return {
            "model": self.runner.tag,
            "recommendations": [
                {
                    "movie_id": int(cat.movie_ids[i]),
                    "title": cat.titles[i],
                    "predicted_rating": round(float(expected[i]), 4),
                }
                for i in self.runner.recommend(relevance, user, K)
            ],
        }


ROUTES = {
    "digits": (Digits, "/digits/predict"),
    "sentiment": (Sentiment, "/sentiment/predict"),
    "recommender": (Recommender, "/recommender/recommend"),
}


def main() -> None:
    apis = [
        cls(max_batch_size=MAX_BATCH, batch_timeout=BATCH_TIMEOUT_S, api_path=path)
        for name, (cls, path) in ROUTES.items()
        if name in settings.models
    ]
    server = ls.LitServer(
        apis, accelerator="cpu", workers_per_device=settings.workers, fast_queue=True
    )
    server.run(
        host="127.0.0.1",
        port=int(sys.argv[1]) if len(sys.argv) > 1 else 8000,
        generate_client_file=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
