from __future__ import annotations

from pathlib import Path

import pytest

from dlserve.settings import SettingsError, settings_from_env


def test_defaults_and_overrides() -> None:
    s = settings_from_env({"DLSERVE_DATA_DIR": "/d", "DLSERVE_MAX_BATCH_SIZE": "32"}, port=4000)
    assert s.data_dir == Path("/d") and s.max_batch_size == 32 and s.port == 4000
    assert settings_from_env({}).data_dir == Path("data")


@pytest.mark.parametrize("env, message", [
    ({"DLSERVE_WORKERS": "two"}, "DLSERVE_WORKERS: expected int, got 'two'"),
    ({"DLSERVE_MAX_ITEMS": "0"}, "DLSERVE_MAX_ITEMS: must be at least 1"),
    ({"DLSERVE_MODELS": "digits,cats"}, "DLSERVE_MODELS: unknown model"),
    ({"DLSERVE_BATCHING": "maybe"}, "DLSERVE_BATCHING: expected true/false"),
])
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        settings_from_env(env)
