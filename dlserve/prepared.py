"""What a model's checks and preprocessing make of one request, whichever way it came in:
an HTTP route (dlserve/registry.py, Route) or an Open Inference Protocol infer request
(dlserve/protocol.py, Tensors). Apart from both, so that neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Prepared:
    """One request, checked and preprocessed: the runner's input (`part`, `items` rows of
    it) and whatever else the answer needs (the recommender's k, the movies asked about)."""

    part: Any
    items: int
    context: Any = None
