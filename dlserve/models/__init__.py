"""Torch-free model runners: an ONNX Runtime session plus the model's own input checks,
pre- and post-processing. The service, `dlserve eval` and `dlserve score` all use these.
"""

from __future__ import annotations

from dlserve.models.base import Runner
from dlserve.settings import Settings


def load_runner(name: str, settings: Settings) -> Runner:
    """The latest stored version of model `name`, opened on the best execution provider."""
    if name == "digits":
        from dlserve.models.digits import DigitsRunner

        return DigitsRunner.load(name, settings)
    if name == "sentiment":
        from dlserve.models.sentiment import SentimentRunner

        return SentimentRunner.load(name, settings)
    if name == "recommender":
        from dlserve.models.recommender import RecommenderRunner

        return RecommenderRunner.load(name, settings)
    raise KeyError(f"unknown model {name!r}")
