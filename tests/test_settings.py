from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from dlserve.settings import Settings, SettingsError, settings_from_env


def test_defaults_and_overrides() -> None:
    s = settings_from_env({"DLSERVE_DATA_DIR": "/d", "DLSERVE_MAX_BATCH_SIZE": "32"}, port=4000)
    assert s.data_dir == Path("/d") and s.max_batch_size == 32 and s.port == 4000
    assert settings_from_env({}).data_dir == Path("data")


@pytest.mark.parametrize("env, message", [
    ({"DLSERVE_WORKERS": "two"}, "DLSERVE_WORKERS: expected int, got 'two'"),
    ({"DLSERVE_MAX_ITEMS": "0"}, "DLSERVE_MAX_ITEMS: must be at least 1"),
    ({"DLSERVE_MODELS": "digits,cats"}, "DLSERVE_MODELS: unknown model"),
    ({"DLSERVE_BATCHING": "maybe"}, "DLSERVE_BATCHING: expected true/false"),
    ({"DLSERVE_KEEPALIVE_REQUESTS": "-1"}, "DLSERVE_KEEPALIVE_REQUESTS: must be 0"),
])
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        settings_from_env(env)


def test_every_setting_is_in_the_readme_configuration_table() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("## Configuration"):].split("\n## ")[0]
    names = [f.metadata["env"] for f in fields(Settings)]
    missing = [name for name in names if f"| `{name}` |" not in table]
    assert not missing, missing
