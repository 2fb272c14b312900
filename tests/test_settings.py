from __future__ import annotations

import os
from pathlib import Path

import pytest

from dlserve.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch):
    """Set DLSERVE_* variables for one test, starting from none at all."""
    for name in list(os.environ):
        if name.startswith("DLSERVE_"):
            monkeypatch.delenv(name)

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


def test_defaults_and_overrides(environ) -> None:
    environ(DLSERVE_DATA_DIR="/d", DLSERVE_MAX_BATCH_SIZE="32", DLSERVE_PROVIDERS="CUDA, cpu")
    s = load_settings(port=4000, workers=None)
    assert s.data_dir == Path("/d") and s.max_batch_size == 32 and s.port == 4000
    assert s.providers == ("cuda", "cpu")
    assert s.models == ("digits", "sentiment", "recommender")  # unset: every registered model
    environ(DLSERVE_DATA_DIR="")  # empty counts as unset
    assert load_settings().data_dir == Path("data")


@pytest.mark.parametrize(
    "env, message",
    [
        ({"DLSERVE_WORKERS": "two"}, "DLSERVE_WORKERS: expected int, got 'two'"),
        ({"DLSERVE_MAX_ITEMS": "0"}, "DLSERVE_MAX_ITEMS: must be at least 1"),
        ({"DLSERVE_MODELS": "digits,cats"}, "DLSERVE_MODELS: unknown model"),
        ({"DLSERVE_BATCHING": "maybe"}, "DLSERVE_BATCHING: expected true/false"),
        ({"DLSERVE_KEEPALIVE_REQUESTS": "-1"}, "DLSERVE_KEEPALIVE_REQUESTS: must be at least 0"),
        ({"DLSERVE_DRAIN_DELAY_S": "30"}, "DLSERVE_DRAIN_DELAY_S: must be less than"),
        ({"DLSERVE_MODEL_MODULES": "no.such.module"}, "model module 'no.such.module' cannot be"),
        ({"DLSERVE_PAYLOAD_LOG": "kafka://broker/topic"}, "DLSERVE_PAYLOAD_LOG: expected a"),
        ({"DLSERVE_PAYLOAD_LOG_SAMPLE_RATE": "0"}, "DLSERVE_PAYLOAD_LOG_SAMPLE_RATE: must be"),
        ({"DLSERVE_PAYLOAD_LOG_MODE": "inputs"}, "DLSERVE_PAYLOAD_LOG_MODE: "),
    ],
)
def test_bad_values_name_the_variable(environ, env: dict[str, str], message: str) -> None:
    environ(**env)
    with pytest.raises(SettingsError, match=message):
        load_settings()


def test_every_setting_is_in_the_docs_configuration_table() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    table = page[page.index("| variable | default | meaning |") :].split("\n\n")[0]
    names = [Settings.env_name(name) for name in Settings.model_fields]
    missing = [name for name in names if f"| `{name}` |" not in table]
    assert not missing, missing


def test_every_security_setting_is_in_security_md() -> None:
    security = (ROOT / "SECURITY.md").read_text()
    names = Settings.security_fields()
    assert "DLSERVE_MAX_BODY_BYTES" in names and "DLSERVE_API_KEY" in names
    missing = [name for name in names if name not in security]
    assert not missing, missing
