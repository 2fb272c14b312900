"""BentoML's own adaptive batching: `@bentoml.api(batchable=True)`, with BentoML's defaults
(tracing, access log, timeouts and its batching settings as shipped), over the same runners.

A batchable API takes a batch along its first axis and answers a bare array, one row per
item, so it serves the models whose requests are lists of items (digits' images,
sentiment's texts); a recommender request is one user with a ragged list of ratings,
which has no such axis. Run it with

    DLSERVE_MODELS=digits,sentiment bentoml serve bench.peers.bentoml_batchable:Batchable
"""

from __future__ import annotations

import bentoml
import numpy as np

from dlserve import registry
from dlserve.settings import get_settings

settings = get_settings()


@bentoml.service(workers=settings.workers)
class Batchable:
    def __init__(self) -> None:
        self.runners = {
            name: registry.load_runner(name, settings)
            for name in settings.models
            if name in ("digits", "sentiment")
        }
        for runner in self.runners.values():
            runner.warm_up()

    @bentoml.api(route="/digits/predict", batchable=True)
    def digits_predict(self, images: np.ndarray) -> np.ndarray:
        (probs,) = self.runners["digits"].run_batch([images.astype(np.float32)])
        return probs

    @bentoml.api(route="/sentiment/predict", batchable=True)
    def sentiment_predict(self, texts: list[str]) -> list[float]:
        runner = self.runners["sentiment"]
        (probs,) = runner.run_batch([[runner.encode(t) for t in texts]])
        return probs[:, runner.labels.index("positive")].tolist()
