"""deploy/compose, as far as it can be checked without pulling Prometheus and Grafana images
(no image registry here): docker-compose's own validation of the file, promtool's of the
Prometheus configuration it mounts, and that the files Grafana is given exist and name the
services compose defines. Grafana itself is not run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

COMPOSE = ROOT / "deploy" / "compose"


def compose_config(path: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (Debian package: make container-tools)")
    return subprocess.run(
        [binary, "-f", str(path), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=path.parent,
    )


def test_docker_compose_accepts_the_file() -> None:
    result = compose_config(COMPOSE / "compose.yaml")
    assert result.returncode == 0, result.stderr
    assert set(yaml.safe_load(result.stdout)["services"]) == {"dlserve", "prometheus", "grafana"}


def test_docker_compose_would_refuse_a_wrong_field(tmp_path: Path) -> None:
    """The validation above can fail: a misspelt key is refused."""
    spec = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    spec["services"]["dlserve"]["read_onyl"] = True
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(spec))
    result = compose_config(tmp_path / "compose.yaml")
    assert result.returncode != 0 and "read_onyl" in result.stderr, result.stderr


def test_every_mounted_file_exists() -> None:
    spec = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    for name, service in spec["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name}: {source}"


def test_promtool_accepts_the_prometheus_config(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus: make monitoring-tools)")
    # As mounted in the container: the alert rules beside the configuration.
    shutil.copy(COMPOSE / "prometheus.yml", tmp_path)
    shutil.copy(ROOT / "deploy" / "monitoring" / "alerts.yml", tmp_path)
    result = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["dlserve:3000"]


def test_grafana_is_given_the_prometheus_of_the_compose_file() -> None:
    provisioning = COMPOSE / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards/dlserve.yml").read_text())["providers"]
    grafana = yaml.safe_load((COMPOSE / "compose.yaml").read_text())["services"]["grafana"]
    mounted = {v.split(":")[1] for v in grafana["volumes"]}
    assert any(m.startswith(provider["options"]["path"]) for m in mounted)
