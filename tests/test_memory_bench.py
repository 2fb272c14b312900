"""The bench's memory section: one configuration measured in a fresh process, as
`dlserve bench --only memory` does for each, and its rendering."""

from __future__ import annotations

from bench.memory import CONFIGS, render, run_child


def test_a_configuration_is_measured_in_its_own_process(digits_model: str) -> None:
    config = next(c for c in CONFIGS if c.name.endswith("(dlserve)"))
    row = run_child("digits", config)
    steps = ("loaded_mib", "after_burst_mib", "after_small_mib", "after_varied_mib")
    assert all(row[k] > 50 for k in steps), row  # a Python process with ONNX Runtime
    assert row["items_per_s_1"] > 0 and row["items_per_s_64"] > row["items_per_s_1"], row
    lines = render({"large_items": 256, "small_runs": 200, "varied_runs": 1000,
                    "rows": [{"model": "digits", "config": config.name, **row}]}, {})
    assert lines[0] == "## Memory: ONNX Runtime's options after a burst"
    assert f"| digits | {config.name} | {row['loaded_mib']} |" in "\n".join(lines)
