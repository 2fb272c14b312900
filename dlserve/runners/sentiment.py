"""The sentiment runner: token ids in, negative/positive probabilities out.

Texts become token ids through the one tokenizer (`dlserve.preprocess.text`) with the
vocabulary from the model's manifest (`encode`). A batch mixes texts of very different
lengths, and an LSTM's cost grows with the padded length of its input, so `run_batch`
sorts the texts by length and runs them in length buckets (`length_buckets`) instead of
padding all of them to the longest one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dlserve.preprocess.text import UNK_ID, Vocabulary, pad_batch
from dlserve.runners.base import Runner, Seen, softmax, split_rows
from dlserve.runtime import Session
from dlserve.store import StoredModel

# What one extra ONNX Runtime call costs, in token-steps of one text. Timed on SST-2 dev
# sentences in random batches of 8-64 (60 batches each, best of 3, one thread): 10 ran
# them 10-25 % faster than 3 (64 texts: 53 against 71 ms), and 6, 20 or 40 no faster
# than 10.
RUN_OVERHEAD_TOKENS = 10
# The most tokens one model run takes (service/batching.py splits requests to fit): a run
# of 64 long texts (200 tokens) took 0.70 s here, and every request behind it waited it out;
# 16 took 0.14 s, no slower per text. 64 SST-2 sentences (~20 tokens) fit in one run.
RUN_TOKENS = 4096
TokenIds = list[list[int]]


def length_buckets(lengths: list[int]) -> list[np.ndarray]:
    """Indices of the texts grouped into runs of similar length, shortest first.

    Going through the texts sorted by length, a new run starts when padding the current
    run's n texts up to the next text's length would cost more token-steps than a separate
    call does: (next length − current longest) × n > RUN_OVERHEAD_TOKENS.
    """
    order = np.argsort(lengths, kind="stable")
    buckets: list[np.ndarray] = []
    start = 0
    for i in range(1, len(order)):
        extra_padding = (lengths[order[i]] - lengths[order[i - 1]]) * (i - start)
        if extra_padding > RUN_OVERHEAD_TOKENS:
            buckets.append(order[start:i])
            start = i
    buckets.append(order[start:])
    return buckets


def token_counts(seqs: TokenIds) -> np.ndarray:
    """How many tokens of each text the model reads (up to the vocabulary's max_tokens)."""
    return np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))


class SentimentRunner(Runner[TokenIds, np.ndarray]):
    run_budget = RUN_TOKENS

    def __init__(self, stored: StoredModel, session: Session) -> None:
        super().__init__(stored, session)
        self.vocab = Vocabulary.from_json(stored.manifest.assets["vocabulary"])
        self.labels: list[str] = stored.manifest.labels

    def encode(self, text: str) -> list[int]:
        """Token ids of a text's first max_tokens tokens; [] when it holds none."""
        return self.vocab.encode(text)

    def predict(self, seqs: TokenIds, *, bucketed: bool = True) -> np.ndarray:
        """Token-id lists → [N, 2] probabilities, one model run per length bucket (or one
        run padded to the longest text, for comparison)."""
        probs = np.empty((len(seqs), len(self.labels)), dtype=np.float32)
        lengths = [len(s) for s in seqs]
        buckets = length_buckets(lengths) if bucketed else [np.arange(len(seqs))]
        for bucket in buckets:
            ids = pad_batch([seqs[i] for i in bucket])
            (logits,) = self.session.run({self.session.input_names[0]: ids})
            probs[bucket] = softmax(logits)
        return probs

    def item_costs(self, part: TokenIds) -> list[int]:
        return [max(1, len(seq)) for seq in part]  # an empty text still runs one step

    def run_batch(self, parts: list[TokenIds]) -> list[np.ndarray]:
        seqs = [seq for part in parts for seq in part]
        probs = self.predict(seqs)
        if self.observe is not None:
            self.observe(Seen(probs.argmax(axis=1), probs.max(axis=1), token_counts(seqs)))
        return split_rows(probs, [len(p) for p in parts])

    def warm_up(self) -> list[Any]:
        return [self.predict([[UNK_ID] * length] * n) for n, length in ((1, 4), (8, 16), (64, 64))]
