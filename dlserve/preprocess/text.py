"""The one tokenizer: the same text → the same token ids in training, export and serving.

SST-2's text is already Penn-Treebank tokenised and lower-cased ("it 's a charming and
often affecting journey ."), while users send ordinary text ("It's a charming, often
affecting journey."). `tokenize` maps both onto the same tokens:

1. normalise: Unicode NFKC, lower case, curly quotes to straight ones, the treebank's
   bracket escapes (-lrb- → "(") and its quote tokens (`` and '' → ");
2. split contractions the treebank way: "don't" → "do n't", "it's" → "it 's";
3. tokens are words (letters and digits, hyphenated compounds kept whole: "well-made"),
   a few abbreviations ("mr."), runs of repeated punctuation ("...", "--"), and any other
   single non-space character (punctuation, emoji, symbols).

A `Vocabulary` maps tokens to ids: 0 is `<pad>`, 1 is `<unk>`. A token not seen at least
`min_freq` times in the training data is looked up by a known form: an unseen hyphenated
compound as its parts, an unseen word without a common suffix ("rehashed" → "rehash");
failing that, it is `<unk>`. Texts longer than `max_tokens` tokens are
truncated: the first `max_tokens` are kept, the rest ignored.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from itertools import islice
from typing import Any

import numpy as np

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1

_ESCAPES = {
    "-lrb-": " ( ",
    "-rrb-": " ) ",
    "-lsb-": " [ ",
    "-rsb-": " ] ",
    "-lcb-": " { ",
    "-rcb-": " } ",
    "``": ' " ',
    "''": ' " ',
    "\\/": "/",
    "\\*": "*",
}
_QUOTES = str.maketrans({"‘": "'", "’": "'", "`": "'", "“": '"', "”": '"', "´": "'"})
_ESCAPE_RE = re.compile("|".join(re.escape(k) for k in _ESCAPES))
_SUFFIXES = ("s", "es", "ed", "d", "ing", "ly", "er", "est", "ness")
_NOT = re.compile(r"(?<=\w)n't\b")
_CLITIC = re.compile(r"(?<=\w)'(s|re|ve|ll|d|m)\b")
_TOKEN = re.compile(
    r"""
    n't | '(?:s|re|ve|ll|d|m)\b             # contractions, already split off
  | (?:mr|mrs|ms|dr|st|jr|sr|vs|bros)\.     # abbreviations the treebank keeps whole
  | '\d0s\b                                 # decades: '60s
  | [^\W_]+(?:-[^\W_]+)*                    # words, hyphenated compounds whole
  | ([^\w\s])\1+                            # runs of one punctuation mark: ... -- !!
  | [^\s]                                   # anything else, one character at a time
""",
    re.VERBOSE,
)


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower().translate(_QUOTES)
    text = _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group()], text)
    return _CLITIC.sub(r" '\1", _NOT.sub(" n't", text))


def token_stream(text: str) -> Iterator[str]:
    return (m.group() for m in _TOKEN.finditer(normalize(text)))


def tokenize(text: str) -> list[str]:
    return list(token_stream(text))


@dataclass(frozen=True)
class Vocabulary:
    tokens: list[str]  # index = id; tokens[0] = <pad>, tokens[1] = <unk>
    max_tokens: int

    def __post_init__(self) -> None:
        if self.tokens[:2] != [PAD, UNK]:
            raise ValueError("a vocabulary starts with <pad>, <unk>")

    @cached_property
    def ids(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Ids of the first max_tokens tokens of `text` (the rest is not even tokenised);
        [] when it holds no token."""
        return list(islice(self._ids(token_stream(text)), self.max_tokens))

    def encode_corpus(self, texts: Iterable[str]) -> list[list[int]]:
        """Ids of every text of a data set (training, evaluation); a text without a token
        (SST-2 has none) becomes one <unk>, so that every text has a length."""
        return [self.encode(t) or [UNK_ID] for t in texts]

    def _ids(self, tokens: Iterable[str]) -> Iterator[int]:
        ids = self.ids
        for token in tokens:
            if (i := ids.get(token)) is not None:
                yield i
            elif "-" in token:  # an unseen compound: its parts ("rap-metal" → rap - metal)
                for j, part in enumerate(token.split("-")):
                    if j:
                        yield ids.get("-", UNK_ID)
                    yield self._known_form(part)
            else:
                yield self._known_form(token)

    def _known_form(self, token: str) -> int:
        """An unseen word's id through a known form of it ("rehashed" → "rehash"), else <unk>.
        About a third of the words in SST-2 dev that training never saw are found this way."""
        ids = self.ids
        if (i := ids.get(token)) is not None:
            return i
        for suffix in _SUFFIXES:
            if token.endswith(suffix) and (i := ids.get(token[: -len(suffix)])) is not None:
                return i
        return UNK_ID

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "max_tokens": self.max_tokens}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Vocabulary:
        return cls(tokens=list(raw["tokens"]), max_tokens=int(raw["max_tokens"]))

    @classmethod
    def build(cls, texts: Iterable[str], *, min_freq: int, max_tokens: int) -> Vocabulary:
        """Every token seen at least min_freq times, most frequent first (ties by spelling,
        so the same data always gives the same ids)."""
        counts = Counter(t for text in texts for t in tokenize(text))
        kept = sorted(
            (t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t)
        )
        return cls(tokens=[PAD, UNK, *kept], max_tokens=max_tokens)


def pad_batch(sequences: list[list[int]]) -> np.ndarray:
    """int64 [N, longest] with PAD_ID after each sequence's end."""
    out = np.full((len(sequences), max(map(len, sequences), default=0)), PAD_ID, np.int64)
    for row, seq in zip(out, sequences, strict=True):
        row[: len(seq)] = seq
    return out
