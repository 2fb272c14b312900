"""Realistic inputs for each model, taken from its held-out data, as runner-ready items."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

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


# HTTP request bodies, exactly as a client sends them: (route, JSON body) pairs, each
# request carrying `items` items, taken in order from the held-out data (or, for the
# recommender, one u1.base user per request: a request is one user by design).
Request = tuple[str, bytes]


def digits_requests(data_dir: Path, items: int, count: int, *,
                    base64_pixels: bool = False) -> list[Request]:
    """Images as JSON arrays of 0-255 integers, or in the compact `images_base64` form."""
    images = load_mnist(data_dir, "test").images  # uint8 [N, 28, 28]
    picks = np.resize(np.arange(len(images)), count * items).reshape(count, items)
    if base64_pixels:
        return [("/digits/predict", orjson.dumps(
            {"images_base64": [base64.b64encode(images[i].tobytes()).decode() for i in rows]}))
            for rows in picks]
    return [("/digits/predict", orjson.dumps({"images": images[rows].tolist()}))
            for rows in picks]


def sentiment_requests(data_dir: Path, items: int, count: int) -> list[Request]:
    texts = load_sst2(data_dir, "dev").texts
    return [("/sentiment/predict",
             orjson.dumps({"texts": [texts[(i * items + j) % len(texts)] for j in range(items)]}))
            for i in range(count)]


def recommender_requests(folder: Path, count: int) -> list[Request]:
    train = load_movielens(folder).train
    out = []
    for user in np.unique(train.users)[:count]:
        mine = train.users == user
        ratings = [{"movie_id": int(m), "rating": int(r)}
                   for m, r in zip(train.movies[mine], train.levels[mine], strict=True)]
        out.append(("/recommender/recommend", orjson.dumps({"ratings": ratings, "k": 10})))
    return out
