"""`dlserve compare MODEL BASELINE CANDIDATE`: how often two sets of answers disagree, and where.

Each side is a payload log (the answers the service gave: scoring/payloads.py, `answers`)
or the output of `dlserve score` (Parquet, CSV or JSON Lines): typically yesterday's log
against the same log replayed through a candidate version (`dlserve score MODEL LOG
OUT --model-tag CANDIDATE`). Rows are matched by id; two answers disagree when their labels
differ (the digit; the sentiment label). The report breaks the disagreements down by the
baseline's label and by its confidence (the probability of its label), and lists the
most frequent changes.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scoring import payloads
from scoring.errors import ScoringError
from scoring.formats import detect, open_table
from scoring.payloads import Replay

# Confidence bands: a model is most often wrong, and two versions most often differ, where
# it is unsure; the top bands are narrow because most answers fall there.
BANDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
TOP_CHANGES = 10


@dataclass(frozen=True)
class Share:
    """Rows of one group, and how many of them the two sides disagree on."""

    group: str
    rows: int
    disagree: int

    @property
    def rate(self) -> float:
        return self.disagree / self.rows if self.rows else 0.0


@dataclass(frozen=True)
class Comparison:
    model: str
    baseline: list[str]  # the model versions behind each side's answers
    candidate: list[str]
    matched: int  # rows with an answer on both sides
    only_baseline: int
    only_candidate: int
    disagree: int
    mean_confidence_change: float  # candidate's confidence of its label - baseline's
    by_label: list[Share]
    by_confidence: list[Share]
    changes: list[tuple[str, str, int]]  # (baseline label, candidate label, rows)

    @property
    def rate(self) -> float:
        return self.disagree / self.matched if self.matched else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rate"] = self.rate
        for key in ("by_label", "by_confidence"):
            for share, row in zip(getattr(self, key), out[key], strict=True):
                row["rate"] = share.rate
        return out

    def text(self) -> str:
        lines = [
            f"{self.model}: {', '.join(self.baseline) or '?'} (baseline) against "
            f"{', '.join(self.candidate) or '?'} (candidate)",
            f"{self.matched:,} answers compared ({self.only_baseline:,} only in the baseline, "
            f"{self.only_candidate:,} only in the candidate): {self.disagree:,} disagree "
            f"({self.rate:.2%}); mean confidence change {self.mean_confidence_change:+.4f}",
            "",
            f"{'baseline label':>16} {'answers':>9} {'disagree':>9} {'rate':>8}",
            *(_row(s) for s in self.by_label),
            "",
            f"{'confidence':>16} {'answers':>9} {'disagree':>9} {'rate':>8}",
            *(_row(s) for s in self.by_confidence),
        ]
        if self.changes:
            lines += ["", "most frequent changes (baseline → candidate):"]
            lines += [f"  {a} → {b}: {n:,}" for a, b, n in self.changes]
        return "\n".join(lines)


def _row(share: Share) -> str:
    return f"{share.group:>16} {share.rows:>9,} {share.disagree:>9,} {share.rate:>8.2%}"


def answers(path: Path, model: str, replay: Replay) -> tuple[pa.Table, list[str]]:
    """A side's answers (id and the model's answer columns) and the versions behind them."""
    if payloads.is_log(path, None):
        table = payloads.answers(path, model, replay)
        version = "served_by"
    else:
        source = open_table(path, detect(path, None))
        wanted = ["id", *replay.fields.names, "model"]
        missing = [c for c in wanted if c not in source.schema.names]
        if missing:
            raise ScoringError(
                f"{path}: no column {', '.join(missing)}; compare reads payload logs and "
                f"`dlserve score {model}` outputs"
            )
        table = source.dataset.to_table(columns=wanted)
        version = "model"
    versions = sorted(v for v in pc.unique(table.column(version)).to_pylist() if v)
    return table, versions


def _labelled(table: pa.Table, replay: Replay) -> pa.Table:
    """id (as text), label and confidence of the rows that have an answer (a logged
    response over the size cap, or left out of the log, has none)."""
    answered = functools.reduce(
        pc.and_, [pc.is_valid(table.column(name)) for name in replay.fields.names]
    )
    table = table.filter(answered)
    label, confidence = replay.label_confidence(table)
    return pa.table(
        {
            "id": pc.cast(table.column("id"), pa.string()),
            "label": pa.array(label).cast(pa.string()),
            "confidence": pa.array(confidence, pa.float64()),
        }
    )


def _band(low: float, high: float) -> str:
    return f"{low:.2f}-{high:.2f}"


def compare(model: str, baseline: Path, candidate: Path, replay: Replay) -> Comparison:
    (a, a_versions), (b, b_versions) = (answers(p, model, replay) for p in (baseline, candidate))
    a, b = _labelled(a, replay), _labelled(b, replay)
    for side, table in (("baseline", a), ("candidate", b)):
        if len(pc.unique(table.column("id"))) != len(table):
            raise ScoringError(f"the {side}'s answers repeat an id; compare needs one per row")
    joined = a.join(b, "id", join_type="inner", left_suffix="_a", right_suffix="_b")
    label_a = joined.column("label_a").to_numpy(zero_copy_only=False)
    label_b = joined.column("label_b").to_numpy(zero_copy_only=False)
    conf_a = joined.column("confidence_a").to_numpy(zero_copy_only=False)
    conf_b = joined.column("confidence_b").to_numpy(zero_copy_only=False)
    differ = label_a != label_b
    band = np.clip(np.digitize(conf_a, BANDS[1:-1]), 0, len(BANDS) - 2)
    by_label = [
        Share(str(label), int((label_a == label).sum()), int(differ[label_a == label].sum()))
        for label in sorted(set(label_a.tolist()))
    ]
    by_confidence = [
        Share(_band(BANDS[i], BANDS[i + 1]), int((band == i).sum()), int(differ[band == i].sum()))
        for i in range(len(BANDS) - 1)
        if (band == i).any()
    ]
    changes = Counter(zip(label_a[differ].tolist(), label_b[differ].tolist(), strict=True))
    return Comparison(
        model=model,
        baseline=a_versions,
        candidate=b_versions,
        matched=len(joined),
        only_baseline=len(a) - len(joined),
        only_candidate=len(b) - len(joined),
        disagree=int(differ.sum()),
        mean_confidence_change=float(np.mean(conf_b - conf_a)) if len(joined) else 0.0,
        by_label=by_label,
        by_confidence=by_confidence,
        changes=[(str(x), str(y), n) for (x, y), n in changes.most_common(TOP_CHANGES)],
    )
