"""Shared fixtures: a temporary BentoML home, a model trained and exported through the real
CLI, and a real BentoML server on a free port, stopped at the end of the session.

`make test` runs the suite in two processes (pytest-xdist, `-n 2`): each has its own
BentoML home and servers; the three --quick models are trained once per run, by whichever
process needs one first, and copied by the other (a run folder both share). A test marked
`exclusive` (it puts the machine under load, or bounds a time) runs alone: while it runs,
the other process starts no test (`machine_lock`)."""

from __future__ import annotations

import contextlib
import fcntl
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import IO

import httpx
import pytest

from bench.http import Server, dlserve_server

ROOT = Path(__file__).resolve().parent.parent
# Hermetic: nothing the tests do touches the user's ~/bentoml or ./artifacts. Set before any
# test module imports bentoml, which reads BENTOML_HOME once.
_SCRATCH = Path(tempfile.mkdtemp(prefix="dlserve-tests-"))
os.environ["BENTOML_HOME"] = str(_SCRATCH / "bentoml")
os.environ["DLSERVE_ARTIFACTS_DIR"] = str(_SCRATCH / "artifacts")
os.environ.setdefault("DLSERVE_DATA_DIR", str(ROOT.parent / "shared" / "data"))
os.environ["DLSERVE_MODELS"] = "digits,sentiment,recommender"
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
# gRPC off unless a test asks for it: every worker binds its port with SO_REUSEPORT, so the
# servers of parallel tests would share the default one (tests/test_grpc.py picks a port).
os.environ["DLSERVE_GRPC_PORT"] = "0"


# One folder per run, shared by the processes of a parallel run: the controller makes it
# before it starts the worker processes, which inherit the variable.
_RUN_DIR_VAR = "DLSERVE_TEST_RUN_DIR"
_OWNS_RUN_DIR = _RUN_DIR_VAR not in os.environ
if _OWNS_RUN_DIR:
    os.environ[_RUN_DIR_VAR] = tempfile.mkdtemp(prefix="dlserve-test-run-")
RUN_DIR = Path(os.environ[_RUN_DIR_VAR])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "exclusive: runs while no other test runs (it loads the machine, or asserts a time bound)",
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SCRATCH, ignore_errors=True)
    if _OWNS_RUN_DIR:
        shutil.rmtree(RUN_DIR, ignore_errors=True)


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[IO[str]]:
    with path.open("a") as f:
        fcntl.flock(f, mode)
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# The turnstile and machine lock files while this process's exclusive test holds them.
_held_alone: tuple[IO[str], IO[str]] | None = None


@contextlib.contextmanager
def machine_lock(exclusive: bool) -> Iterator[None]:
    """Shared by ordinary tests, held alone by an exclusive one: a readers-writer lock over
    the run's processes. Everyone passes the turnstile first, so that an exclusive test
    waiting for the running ones keeps new ones from starting (plain flock lets a steady
    stream of shared holders starve it)."""
    global _held_alone
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    # A worker that made its own run folder would lock nothing the other one sees.
    assert not _OWNS_RUN_DIR, "the controller did not load tests/conftest.py"
    with _flock(RUN_DIR / "turnstile.lock", fcntl.LOCK_EX):
        pass
    if not exclusive:
        with _flock(RUN_DIR / "machine.lock", fcntl.LOCK_SH):
            yield
        return
    with (
        _flock(RUN_DIR / "turnstile.lock", fcntl.LOCK_EX) as turnstile,
        _flock(RUN_DIR / "machine.lock", fcntl.LOCK_EX) as machine,
    ):
        _held_alone = (turnstile, machine)
        try:
            yield
        finally:
            _held_alone = None


@contextlib.contextmanager
def machine_shared_meanwhile() -> Iterator[None]:
    """Let the other process run its tests while this one does work that no exclusive
    test measures: training the session's models. The first exclusive test of a run used
    to train all three --quick models holding the machine alone (173 s of CI's run, with
    the other process idle)."""
    global _held_alone
    if _held_alone is None:
        yield
        return
    held, _held_alone = _held_alone, None  # a nested call changes nothing
    turnstile, machine = held
    fcntl.flock(machine, fcntl.LOCK_SH)  # converts: the other's shared tests may start
    fcntl.flock(turnstile, fcntl.LOCK_UN)
    try:
        yield
    finally:
        # Let go of the machine before queueing at the turnstile: the other process may
        # hold the turnstile, waiting for the machine alone for an exclusive test of its own.
        fcntl.flock(machine, fcntl.LOCK_UN)
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(machine, fcntl.LOCK_EX)
        _held_alone = held


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    # Around set-up, call and tear-down, so that the servers a test starts count too.
    with machine_lock(item.get_closest_marker("exclusive") is not None):
        yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["DLSERVE_DATA_DIR"])
    for name in ("mnist", "sst2", "ml-100k"):
        assert (path / name).is_dir(), f"test data not found at {path}; set DLSERVE_DATA_DIR"
    return path


@pytest.fixture
def http_mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving a folder; yields (base URL, folder)."""
    root = tmp_path / "mirror"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", root
    finally:
        httpd.shutdown()
        httpd.server_close()


def dlserve(
    *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `dlserve` console script, as a user would (`env`: extra variables)."""
    cli = Path(sys.executable).with_name("dlserve")
    result = subprocess.run(
        [str(cli), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"dlserve {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result


QUICK_MODELS = ("digits", "sentiment", "recommender")  # what a run's servers serve


def _saved(name: str) -> Path:
    cache = os.environ.get("DLSERVE_TEST_CACHE")
    return (Path(cache) if cache else RUN_DIR / "models") / name


def _train_and_keep(name: str) -> str:
    """Train and export `name` in this process's store, and keep both in the run folder."""
    saved = _saved(name)
    dlserve("train", name, "--quick")
    tag = dlserve("export", name).stdout.strip()
    shutil.rmtree(saved, ignore_errors=True)
    shutil.copytree(Path(os.environ["DLSERVE_ARTIFACTS_DIR"]) / name, saved / "artifacts")
    store = Path(os.environ["BENTOML_HOME"]) / "models" / name
    shutil.copytree(store, saved / "store", symlinks=True)
    # The tag last, whole (a rename): it is what says the entry is complete.
    (saved / "tag.part").write_text(tag)
    (saved / "tag.part").replace(saved / "tag")
    return tag


def _train_unless_taken(name: str) -> None:
    """Train `name` unless it is kept already or another process is training it."""
    lock = (_saved(name).parent / f"{name}.lock").open("a")
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        if not (_saved(name) / "tag").is_file():
            _train_and_keep(name)


def quick_model(name: str) -> str:
    """Train (--quick) and export a model through the real CLI; return its tag.

    Once per run: the first process of a parallel run to need the model trains it and
    keeps its run artefacts and model-store version in the run folder; the others copy
    them in. A process that finds another training the model it needs trains one that
    nobody has started meanwhile: both processes waited 213-222 s at the start of a run,
    one training at a time. With DLSERVE_TEST_CACHE set (a folder; for development, never
    set in CI), that folder keeps them across runs instead: busy shared machines train the
    --quick sentiment model in minutes, and every test run needs all three."""
    saved = _saved(name)
    saved.parent.mkdir(parents=True, exist_ok=True)
    with machine_shared_meanwhile():
        if not (saved / "tag").is_file():
            for other in (name, *(m for m in QUICK_MODELS if m != name)):
                _train_unless_taken(other)
                if (saved / "tag").is_file():
                    break
        with _flock(saved.parent / f"{name}.lock", fcntl.LOCK_EX):  # until it is kept
            if not (saved / "tag").is_file():
                return _train_and_keep(name)
    store = Path(os.environ["BENTOML_HOME"]) / "models" / name
    shutil.copytree(
        saved / "artifacts", Path(os.environ["DLSERVE_ARTIFACTS_DIR"]) / name, dirs_exist_ok=True
    )
    shutil.copytree(saved / "store", store, dirs_exist_ok=True, symlinks=True)
    return (saved / "tag").read_text().strip()


@pytest.fixture(scope="session")
def digits_model(data_dir: Path) -> str:
    """The --quick digits model, trained and exported once; its tag."""
    return quick_model("digits")


@pytest.fixture(scope="session")
def sentiment_model(data_dir: Path) -> str:
    """The --quick sentiment model, trained and exported once; its tag."""
    return quick_model("sentiment")


@pytest.fixture(scope="session")
def recommender_model(data_dir: Path) -> str:
    """The --quick recommender on MovieLens 100K, trained and exported once; its tag."""
    return quick_model("recommender")


@pytest.fixture(scope="session")
def bento(digits_model: str, sentiment_model: str, recommender_model: str) -> Path:
    """`bentoml build` of this checkout, with the three models; returns the Bento's folder.
    (Locking its packages reaches PyPI, as a real build does.)"""
    bentoml = Path(sys.executable).with_name("bentoml")
    result = subprocess.run(
        [str(bentoml), "build", str(ROOT), "--output", "tag"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    path = subprocess.run(
        [str(bentoml), "get", tag, "-o", "path"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return Path(path)


@contextlib.contextmanager
def start_server(log_dir: Path, *, ready: bool = True, **env: str) -> Iterator[Server]:
    """A real `bentoml serve` of the service (dlserve bench's Server) on a free port, with
    extra settings from `env`, its log in `log_dir`; stopped, whole process group, on exit."""
    server = dlserve_server("test", os.environ["DLSERVE_MODELS"].split(","), **env)
    server.log_dir = log_dir
    try:
        server.start(wait=ready)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def running_server(
    digits_model: str,
    sentiment_model: str,
    recommender_model: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    """A real BentoML server (2 workers, so metrics are checked across processes)."""
    with start_server(tmp_path_factory.mktemp("server"), DLSERVE_WORKERS="2") as running:
        yield running


@pytest.fixture(scope="session")
def server(running_server: Server) -> str:
    return running_server.url


@pytest.fixture
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c
