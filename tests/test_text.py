"""The one tokenizer, on the treebank's own text and on what users write."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlserve.preprocess.text import PAD, UNK, UNK_ID, Vocabulary, pad_batch, tokenize
from readers.sst2 import load_sst2


@pytest.mark.parametrize(
    "text, tokens",
    [
        (
            "It's a charming, often affecting journey.",
            ["it", "'s", "a", "charming", ",", "often", "affecting", "journey", "."],
        ),
        (
            "I don't know... can't say!!",
            ["i", "do", "n't", "know", "...", "ca", "n't", "say", "!!"],
        ),
        (
            "A well-made, 90-minute film -- Mr. Smith's best.",
            ["a", "well-made", ",", "90-minute", "film", "--", "mr.", "smith", "'s", "best", "."],
        ),
        ("it ’s “great”", ["it", "'s", '"', "great", '"']),  # curly quotes are straight ones
        (
            "-lrb- t -rrb- here `` quoted '' writer\\/director",  # the treebank's escapes
            ["(", "t", ")", "here", '"', "quoted", '"', "writer", "/", "director"],
        ),
        ("CAPITALS and Ｆｕｌｌｗｉｄｔｈ", ["capitals", "and", "fullwidth"]),
        ("😀 日本語 текст", ["😀", "日本語", "текст"]),
        ("", []),
        (" \t\n ", []),
    ],
)
def test_tokenize(text: str, tokens: list[str]) -> None:
    assert tokenize(text) == tokens


def test_tokenize_reproduces_the_treebank_tokens(data_dir: Path) -> None:
    """SST-2 text is tokenised already: the tokenizer must (nearly) leave it alone, or the
    model would see different tokens for the same words at training and at serving."""
    dev = load_sst2(data_dir, "dev")
    unescape = {"-lrb-": "(", "-rrb-": ")", "``": '"', "''": '"', "`": "'", "\\/": "/"}
    same = sum(tokenize(t) == [unescape.get(w, w) for w in t.split()] for t in dev.texts)
    assert same / len(dev.texts) >= 0.98


def test_vocabulary_is_built_by_frequency_and_maps_the_rest_to_unk() -> None:
    vocab = Vocabulary.build(["good good bad", "good fun", "bad"], min_freq=2, max_tokens=4)
    assert vocab.tokens == [PAD, UNK, "good", "bad"]
    assert vocab.encode("Good, bad and ugly!") == [2, UNK_ID, 3, UNK_ID]  # "," "and" unknown
    assert vocab.encode("good " * 10) == [2] * 4  # truncated to max_tokens
    assert Vocabulary.from_json(vocab.to_json()) == vocab


def test_vocabulary_must_start_with_pad_and_unk() -> None:
    with pytest.raises(ValueError, match="starts with <pad>, <unk>"):
        Vocabulary(tokens=["good"], max_tokens=5)


def test_pad_batch_pads_after_each_sequence() -> None:
    assert pad_batch([[5, 6, 7], [8]]).tolist() == [[5, 6, 7], [8, 0, 0]]


def test_unseen_words_are_looked_up_by_a_known_form() -> None:
    vocab = Vocabulary.build(["rap metal rehash good - film"], min_freq=1, max_tokens=20)
    ids = vocab.ids
    assert vocab.encode("rap-metal") == [ids["rap"], ids["-"], ids["metal"]]
    assert vocab.encode("rehashed goodness films") == [ids["rehash"], ids["good"], ids["film"]]
    assert vocab.encode("zany-film quux") == [UNK_ID, ids["-"], ids["film"], UNK_ID]
