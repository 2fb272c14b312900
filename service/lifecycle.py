"""How the server starts and stops: no half-loaded server, and a drain on SIGTERM.

- `verify_models` and `verify_metrics_dir` run when the service module is imported, which
  `bentoml serve` does in its main process before it starts any worker. A missing,
  truncated or altered model, a model with no version of DLSERVE_PRECISION, one that no
  GPU provider can run under DLSERVE_REQUIRE_GPU, or a metrics directory that cannot be
  written, stops the server there, naming the file (or model) and the fix. (Checked only
  in the workers, the failure would make each worker crash at start-up and be restarted,
  forever.)
- Workers load and warm their models on a background thread (service/app.py), so that
  /livez answers 200 at once and /readyz 503 until every model is ready.
- `start_trimming`: a worker returns its allocator's free memory to the system every
  DLSERVE_MALLOC_TRIM_S, so that what a burst freed does not stay in its RSS.
- `install_drain`: on SIGTERM a worker reports not-ready at once but keeps serving for the
  drain delay, the time a load balancer or Kubernetes needs to see that and stop sending
  it traffic; then it stops accepting, finishes its in-flight requests, and exits. A
  watchdog ends it at the drain timeout whatever is still running.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import NoReturn

from dlserve import store
from dlserve.allocator import running_jemalloc
from dlserve.manifest import ModelIntegrityError
from dlserve.registry import ModelSpec
from dlserve.runtime import GPURequired
from dlserve.settings import Settings
from service import internals

log = logging.getLogger("dlserve.service")


def verify_models(served: dict[str, ModelSpec], settings: Settings) -> None:
    """Check every model against its manifest (SHA-256, external data), in the precision
    DLSERVE_PRECISION names; under DLSERVE_REQUIRE_GPU also open it, to see that a GPU
    provider really works for it. Exit, naming the model and why, if one fails."""
    for name, spec in served.items():
        if name in settings.still_training and not store.exists(name, settings.precision):
            continue  # served once `dlserve serve` has trained and exported it
        try:
            stored = store.load(name, settings.precision)
            if settings.require_gpu:
                spec.runner.open(stored, settings)
        except (ModelIntegrityError, GPURequired) as exc:
            refuse_to_start(str(exc))


def metrics_dir() -> Path | None:
    """Where BentoML keeps Prometheus's multi-process files; where the environment says, if
    BentoML's own setting has moved (service/internals.py)."""
    container = internals.find(internals.METRICS_DIR)
    if container is not None:
        return Path(container.get())
    fallback = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(fallback) if fallback else None


def verify_metrics_dir() -> None:
    """Refuse to start when the directory Prometheus's multi-process counters live in
    exists but cannot be written (a read-only volume): every worker would fail its first
    metric write, and none would ever be ready."""
    path = metrics_dir()
    if path is None or not path.is_dir():
        return  # BentoML creates it, or falls back to a temporary directory
    if (exc := unwritable(path)) is not None:
        refuse_to_start(
            f"the metrics directory {path} is not writable ({exc.strerror}); give "
            "BENTOML_HOME a writable volume"
        )


def unwritable(directory: Path) -> OSError | None:
    """Why a file cannot be written in `directory` (checked by writing one), or None."""
    probe = directory / f".dlserve-write-check-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return exc
    return None


def refuse_to_start(message: str) -> NoReturn:
    """Stop the server before any worker starts, saying why in one line."""
    log.error("cannot start: %s", message)
    raise SystemExit(f"dlserve: cannot start: {message}") from None


def _exit_now(timeout_s: float) -> None:
    log.warning(
        "requests still running %.0f s after SIGTERM (DLSERVE_DRAIN_TIMEOUT_S): exiting", timeout_s
    )
    logging.shutdown()
    os._exit(1)


def install_drain(begin_drain: Callable[[], None], delay_s: float, timeout_s: float) -> None:
    """Put a drain in front of uvicorn's SIGTERM handler.

    Must be called in the worker's main thread with its event loop running (the service's
    __init__ is): uvicorn has installed its handler by then, which stops accepting
    connections and waits for in-flight requests. Ours calls it `delay_s` later.
    """
    uvicorn_exit = signal.getsignal(signal.SIGTERM)
    if not callable(uvicorn_exit) or threading.current_thread() is not threading.main_thread():
        log.warning("SIGTERM drain not installed: not running inside a uvicorn worker")
        return
    loop = asyncio.get_running_loop()
    started = threading.Event()

    def on_sigterm(sig: int, frame: FrameType | None) -> None:
        if started.is_set():  # a second SIGTERM: stop waiting for the delay
            loop.call_soon_threadsafe(uvicorn_exit, sig, frame)
            return
        started.set()
        begin_drain()
        log.info(
            "SIGTERM: not ready; serving %.1f s more, then finishing in-flight requests "
            "(at most %.0f s in all)",
            delay_s,
            timeout_s,
        )
        watchdog = threading.Timer(timeout_s, _exit_now, args=(timeout_s,))
        watchdog.daemon = True
        watchdog.start()
        # Signal handlers run between bytecodes of the main thread; call_soon_threadsafe
        # also wakes the event loop if it is asleep in select().
        loop.call_soon_threadsafe(loop.call_later, delay_s, uvicorn_exit, sig, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def start_trimming(every_s: float) -> bool:
    """Call glibc's malloc_trim(0) every `every_s` seconds on a daemon thread; False where
    there is no glibc (musl, macOS) or `every_s` is 0.

    Why: glibc gives a thread's freed memory back to the system only from the top of its
    arena, so what a burst of large requests freed in the middle stays resident. Measured
    in a 10-minute soak (2 workers, bursts of 256 long texts): each worker's anonymous
    memory grew 258 → 300 MiB; malloc_trim(0), called from gdb, took it to 242-255 MiB.
    A trim takes each arena's lock for about a millisecond; every 30 s, that costs nothing
    measurable (`dlserve bench --only soak`). Nothing to do where another allocator (musl's,
    or a preloaded jemalloc) handles it."""
    if every_s <= 0:
        return False
    if running_jemalloc():  # preloaded (dlserve/allocator.py): it returns memory itself
        log.info("running on jemalloc: no malloc_trim needed")
        return False
    try:  # the symbols the process has loaded: glibc's, if it runs on glibc
        trim = ctypes.CDLL(None).malloc_trim
    except AttributeError:
        trim = None
    if trim is None:
        log.info("malloc_trim is not available (no glibc): freed memory is left to the allocator")
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

    def loop() -> None:
        while True:
            time.sleep(every_s)
            started = time.perf_counter()
            released = trim(0)
            log.debug(
                "malloc_trim: %s in %.1f ms",
                "released memory" if released else "nothing to release",
                (time.perf_counter() - started) * 1000,
            )

    threading.Thread(target=loop, name="dlserve-trim", daemon=True).start()
    return True
