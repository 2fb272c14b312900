"""Realistic inputs for each model, taken from its held-out data, as runner-ready items."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dlserve.data.mnist import load_mnist
from dlserve.data.movielens import load_movielens
from dlserve.data.sst2 import load_sst2

LONG_TOKENS = 200


def digits_part(data_dir: Path) -> Callable[[int], np.ndarray]:
    images = load_mnist(data_dir, "test").images.astype(np.float32)
    return lambda n: np.resize(images, (n, *images.shape[1:]))


def sentiment_texts(runner: Any, data_dir: Path) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of SST-2 dev sentences (short), and of long texts made by joining dev
    sentences until each reaches LONG_TOKENS tokens (a long review)."""
    texts = load_sst2(data_dir, "dev").texts
    short = runner.parse_texts(texts, max_items=len(texts), max_chars=10**6)
    long, current = [], []
    for seq in short:
        current += seq
        if len(current) >= LONG_TOKENS:
            long.append(current[:LONG_TOKENS])
            current = []
    return short, long


def cycle(items: list[Any]) -> Callable[[int], list[Any]]:
    """n items, repeating `items` as often as needed."""
    return lambda n: [items[i % len(items)] for i in range(n)]


def recommender_queries(runner: Any, folder: Path) -> list[Any]:
    """One recommend query (k = 10) per training user, with all of that user's ratings."""
    from dlserve.models.recommender import Query
    from dlserve.preprocess.ratings import by_user

    users = by_user(load_movielens(folder).train, runner.catalogue)
    return [Query(user, k=10) for user in users.values()]
