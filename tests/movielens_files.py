"""Small MovieLens folders written in the real formats, for tests (never the real files)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

GENRES = ("Sci-Fi", "Romance", "Horror")


def write_csv_release(
    folder: Path, *, users: int = 120, movies: int = 60, seed: int = 0
) -> dict[int, str]:
    """A `ratings.csv` + `movies.csv` folder (newer GroupLens layout) with a real pattern:
    each user loves one genre (4-5 stars) and dislikes the others (0.5-2.5), in half
    stars. Returns each movie id's genre. Ids have gaps, as in the real files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    genre_of = {10 * m + 3: GENRES[m % len(GENRES)] for m in range(movies)}
    with (folder / "movies.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["movieId", "title", "genres"])
        for movie_id, genre in genre_of.items():
            w.writerow([movie_id, f"Film {movie_id}, the {genre} one (2001)", genre])
    with (folder / "ratings.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["userId", "movieId", "rating", "timestamp"])
        for user in range(1, users + 1):
            loves = GENRES[user % len(GENRES)]
            for movie_id in rng.choice(list(genre_of), size=movies // 2, replace=False):
                liked = genre_of[movie_id] == loves
                stars = rng.choice([4.0, 4.5, 5.0] if liked else [0.5, 1.0, 1.5, 2.0, 2.5])
                w.writerow([user, movie_id, f"{stars:.1f}", 964982703 + user])
    return genre_of
