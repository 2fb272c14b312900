"""The server's allocator (dlserve/allocator.py): jemalloc preloaded where it is installed,
really mapped into every process of the real test server, and the choices that say
otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.http import Server, dlserve_server
from cli.main import server_command
from dlserve import allocator
from dlserve.settings import load_settings

JEMALLOC = allocator.find_jemalloc()
needs_jemalloc = pytest.mark.skipif(
    JEMALLOC is None, reason="libjemalloc2 is not installed (make allocator installs it)"
)


@needs_jemalloc
def test_every_process_of_the_server_runs_on_jemalloc(running_server: Server) -> None:
    processes = running_server.processes()
    assert len(processes) >= 3  # bentoml serve and its 2 workers
    for p in processes:
        assert allocator.running_jemalloc(p.pid), p.cmdline()


@needs_jemalloc
def test_auto_preloads_jemalloc_and_keeps_what_is_already_preloaded() -> None:
    env = allocator.server_env("auto", {"LD_PRELOAD": "/opt/other.so"})
    assert env == {"LD_PRELOAD": f"{JEMALLOC} /opt/other.so", "MALLOC_CONF": allocator.CONF}
    # A MALLOC_CONF of the operator's wins over dlserve's.
    assert allocator.server_env("jemalloc", {"MALLOC_CONF": "narenas:2"})["MALLOC_CONF"] == (
        "narenas:2"
    )


def bench_server_env(tmp_path: Path, **env: str) -> dict[str, str]:
    """The environment the bench and the tests start a server with (none is started)."""
    return dlserve_server("x", ["digits"], BENTOML_HOME=str(tmp_path), **env).env


def test_system_preloads_nothing_for_any_way_the_server_starts(tmp_path: Path) -> None:
    assert allocator.server_env("system", {}) == {}
    assert "LD_PRELOAD" not in bench_server_env(tmp_path, DLSERVE_ALLOCATOR="system")
    _, env = server_command(load_settings(allocator="system"))
    assert env.get("LD_PRELOAD", "") == "" or "jemalloc" not in env["LD_PRELOAD"]


@needs_jemalloc
def test_dlserve_serve_and_the_bench_preload_it_by_default(tmp_path: Path) -> None:
    assert str(JEMALLOC) in bench_server_env(tmp_path)["LD_PRELOAD"]
    _, env = server_command(load_settings())
    assert str(JEMALLOC) in env["LD_PRELOAD"]


def test_jemalloc_required_but_missing_is_an_error_that_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(allocator, "CANDIDATES", ("/nonexistent/libjemalloc.so.2",))
    with pytest.raises(allocator.AllocatorError, match="apt-get install libjemalloc2"):
        allocator.server_env("jemalloc", {})
    assert allocator.server_env("auto", {}) == {}  # auto: glibc's malloc, no error


def test_an_unknown_allocator_is_refused_naming_the_variable() -> None:
    with pytest.raises(Exception, match="DLSERVE_ALLOCATOR"):
        load_settings(allocator="tcmalloc")
