"""The digits runner: [N, 28, 28] pixel arrays (0-255, ink bright) in, digit probabilities out."""

from __future__ import annotations

import numpy as np

from dlserve.preprocess.images import SIDE, normalize
from dlserve.runners.base import Runner, softmax, split_rows


class DigitsRunner(Runner[np.ndarray, np.ndarray]):
    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """[N, 28, 28] pixels 0-255 → [N, 10] probabilities."""
        prep = self.manifest.preprocessing
        x = normalize(pixels, prep["mean"], prep["std"])
        (logits,) = self.session.run({self.session.input_names[0]: x})
        return softmax(logits)

    def run_batch(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        pixels = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return split_rows(self.predict(pixels), [len(p) for p in parts])

    def warm_up(self) -> list[np.ndarray]:
        return [self.predict(np.zeros((n, SIDE, SIDE), dtype=np.float32)) for n in (1, 8, 64)]
