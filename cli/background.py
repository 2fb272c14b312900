"""`dlserve serve` on a machine that lacks models: serve what is there, train the rest beside.

The missing models are trained shortest first (each registry entry's `train_minutes`),
so that the server starts as soon as one model is exported: on a fresh 2-core machine the
recommender (about 25 s) rather than sentiment (about 12 minutes). The others are trained
and exported one after the other on a thread of `dlserve serve`, each step in a child
process as before (cli/main.py, `run_cli`), while the server runs; the server's workers
answer their requests with 503 and how far the training has got, and serve each model as
soon as its export is in the model store (DLSERVE_STILL_TRAINING, service/app.py).

A stop signal reaches the training child as it reaches the server (both supervision
loops relay it). A training or export that fails stops the server too, and `dlserve
serve` exits with status 2 naming the step, as it does when the step runs before the
server.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

from dlserve import registry, store
from dlserve.settings import Settings

log = logging.getLogger("dlserve")

# (model name) -> None; trains it if it has no checkpoint, then exports it
Prepare = Callable[[str], None]


def missing_models(settings: Settings) -> list[str]:
    """The configured models the store does not hold, the quickest to train first."""
    specs = registry.available(settings.model_modules)
    missing = [name for name in settings.models if not store.exists(name)]
    return sorted(missing, key=lambda name: specs[name].train_minutes)


class Trainer(threading.Thread):
    """Prepares `models` one after the other, beside the running server."""

    def __init__(self, models: list[str], prepare: Prepare, stop: Callable[[], None]) -> None:
        super().__init__(name="dlserve-train", daemon=True)
        self.models = models
        self.prepare = prepare
        self.stop = stop  # stops the server, when a step fails
        self.failure: Exception | None = None

    def run(self) -> None:
        from cli.serve import ServeError, Stopped

        for name in self.models:
            try:
                self.prepare(name)
            except Stopped:
                return  # the server is stopping too
            except (ServeError, OSError, ValueError) as exc:
                log.error("%s: %s; stopping the server", name, exc)
                self.failure = exc
                self.stop()
                return
            log.info("%s: exported; the server's workers serve it within a second", name)


def stopper(received: list[int]) -> Callable[[], None]:
    """Stop the server as SIGTERM would (it drains), through the supervisor's record of
    stop signals, which its loop relays to the server."""
    return lambda: received.append(signal.SIGTERM)
