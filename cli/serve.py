"""How `dlserve serve` runs the processes it starts, so that stopping it stops them all.

`dlserve serve` is a small supervisor. Training and export run in child processes (they
import PyTorch, whose memory a process keeps until it exits), then `bentoml serve` runs in
a session of its own. The supervisor itself stays small and only relays signals:

- SIGTERM (`kill`, Kubernetes, systemd) goes to the server's process group, i.e. to
  BentoML's arbiter (circus), which passes exactly one SIGTERM to each worker: each worker
  drains (not ready for DLSERVE_DRAIN_DELAY_S, then finishes its in-flight requests, at most
  DLSERVE_DRAIN_TIMEOUT_S). Circus runs every worker in a session of its own (`os.setsid`),
  so a signal to the arbiter's group reaches the arbiter only, and SIGTERM must not go to
  the workers directly: the arbiter's own SIGTERM would then be their second one, which
  skips the drain delay.
- SIGINT (Ctrl-C) is BentoML's quick stop. The arbiter treats SIGINT like SIGTERM (it
  sends SIGTERM to its workers, which would drain), so the supervisor also sends SIGINT to
  every worker itself: uvicorn then stops accepting at once and finishes in-flight requests.
- A second signal while stopping escalates: it goes to every process of the tree (a worker
  that is draining skips the rest of its delay; uvicorn stops waiting at its next one).
- DLSERVE_DRAIN_TIMEOUT_S + STOP_MARGIN_S after the first signal, whatever is left of the
  tree is killed (SIGKILL).

"The tree" is every process seen below the child (psutil, every POLL_S), so a process
whose parent has died is still stopped; and `dlserve serve` is a child subreaper (Linux), so
such orphans are re-parented to it rather than to init, and whatever is below it when it
returns is stopped too (`supervise` alone touches only its child's tree: it may run inside
a process that has other children); and the server's main process gets SIGTERM should the supervisor
itself die (PR_SET_PDEATHSIG), so that even `kill -9 <dlserve serve>` leaves nothing serving.

Exit status: the server's own (0 after a clean stop, whatever the signal), or 128 + N when
signal N ended it (137 when it had to be killed); 128 + N when a signal stopped the command
before the server started; 2 when a training or export child fails or the port is taken.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType

import psutil

from dlserve.settings import Settings

log = logging.getLogger("dlserve")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_MARGIN_S = 5.0  # beyond the drain timeout, before the tree is killed
TASK_STOP_S = 10.0  # a training or export child's time to exit after SIGTERM
POLL_S = 0.2  # how often the supervisor looks at its child and at the signals received
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PR_SET_CHILD_SUBREAPER = 36
# Loaded once here: a child calls it between fork and exec, where loading a library is unsafe.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None

# (child, signal, how many signals were relayed before this one) -> None
Relay = Callable[[psutil.Process, int, int], None]


class ServeError(Exception):
    """Why `dlserve serve` cannot go on, in one line for the user (exit status 2)."""


class PortInUseError(ServeError):
    """The port the server would listen on is taken."""


class Stopped(Exception):
    """A stop signal arrived before the server started (not an error: the user asked)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --- The port -------------------------------------------------------------------------------


def check_port_free(port: int, *, what: str = "port", host: str = "0.0.0.0") -> None:
    """Raise PortInUseError, naming the process that holds it, if `port` cannot be bound.

    Binds as uvicorn will (SO_REUSEADDR, which ignores connections in TIME_WAIT, but not
    SO_REUSEPORT, which would let two servers share the port), so that a taken port is one
    clear line here instead of a traceback from the server later. `what` names the port in
    the message ("gRPC port" for a second one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise ServeError(f"{what} {port}: cannot listen on it ({exc.strerror})") from None
            holder = port_holder(port)
            by = f" (by pid {holder.pid}: {describe(holder)})" if holder is not None else ""
            raise PortInUseError(f"{what} {port} is already in use{by}") from None


def check_ports_free(settings: Settings) -> None:
    """The HTTP port, and the gRPC port unless it is off (DLSERVE_GRPC_PORT=0).

    The gRPC port needs this check more than the HTTP one: every worker binds it with
    SO_REUSEPORT (service/grpc_server.py), which a second server's workers would share
    without a word, taking half of the first one's new connections. The probe binds
    without SO_REUSEPORT, which fails whenever anything listens there."""
    check_port_free(settings.port)
    if settings.grpc_port:
        check_port_free(settings.grpc_port, what="gRPC port (DLSERVE_GRPC_PORT)")


def port_holder(port: int) -> psutil.Process | None:
    """The process listening on TCP `port` (IPv4 or IPv6), where psutil can see it.

    psutil names one process per socket; a server's workers share its listening socket, so
    this goes up from that one to the ancestor that shares it too (BentoML's arbiter, the
    `bentoml serve` process, rather than one of its workers)."""
    try:
        holder = next(
            (
                psutil.Process(c.pid)
                for c in psutil.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN
                and c.laddr
                and c.laddr.port == port
                and c.pid is not None
            ),
            None,
        )
    except psutil.Error:  # no permission, or it has just exited
        return None
    while holder is not None:
        parent = _parent(holder)
        if parent is None or not _listens_on(parent, port):
            break
        holder = parent
    return holder


def _parent(process: psutil.Process) -> psutil.Process | None:
    try:
        return process.parent()
    except psutil.Error:
        return None


def _listens_on(process: psutil.Process, port: int) -> bool:
    # Process.net_connections is psutil >= 6's name for 5.9's Process.connections.
    connections = getattr(process, "net_connections", None) or process.connections
    try:
        return any(
            c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
            for c in connections(kind="tcp")
        )
    except psutil.Error:
        return False


def describe(process: psutil.Process, width: int = 120) -> str:
    """`bentoml serve service.app:DLServe ...` rather than `/long/path/python -m bentoml ...`."""
    try:
        argv = process.cmdline() or [process.name()]
    except psutil.Error:
        return "?"
    argv = [os.path.basename(argv[0]), *argv[1:]]
    if argv[0].startswith("python") and len(argv) > 2 and argv[1] == "-m":
        argv = argv[2:]
    text = " ".join(" ".join(argv).split())  # one line, whatever the arguments hold
    return text if len(text) <= width else text[: width - 3] + "..."


# --- Signals and the process tree -----------------------------------------------------------


class StopSignals:
    """Records SIGTERM and SIGINT for the supervisor's loop, which relays them.

    The handler only records: relaying from the loop (every POLL_S) means that a signal
    that arrives while no child is running, or just as one starts, is never lost."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, signal.Handlers | Callable[..., object] | int | None] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    def __enter__(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _libc_prctl(option: int, value: int) -> None:
    if _LIBC is not None:
        _LIBC.prctl(option, value, 0, 0, 0)


def become_subreaper() -> None:
    """Have orphaned descendants (a worker whose arbiter died) re-parented to this process,
    so that they are still in its tree and can be stopped. Linux only; elsewhere a no-op."""
    _libc_prctl(_PR_SET_CHILD_SUBREAPER, 1)


def _sigterm_when_parent_dies(parent: int) -> Callable[[], None]:
    def preexec() -> None:  # runs in the child between fork and exec
        _libc_prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def descendants() -> list[psutil.Process]:
    """Every live process below this one (orphans included, as a subreaper)."""
    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    return [p for p in procs if _alive(p)]


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def send(processes: Sequence[psutil.Process], signum: int) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signum)


def signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)  # the child is its session's and group's leader: pgid == pid


def track(child: psutil.Process, known: dict[int, psutil.Process]) -> list[psutil.Process]:
    """The live processes of `child`'s tree: those below it now, and those seen below it
    before (`known`, updated) whose parent has since gone. Only the child's: `supervise`
    may run inside a process with other children (a test runner's servers), never touched."""
    with contextlib.suppress(psutil.Error):
        for process in child.children(recursive=True):
            known.setdefault(process.pid, process)
    return [p for p in known.values() if _alive(p)]


def kill_tree(child: psutil.Process, signum: int, known: dict[int, psutil.Process]) -> None:
    """`signum` to the child's group and to every process of its tree. The tree is listed
    first: once a parent is gone, its children are found only as known before."""
    tree = track(child, known)
    signal_group(child.pid, signum)
    send(tree, signum)


def end_tree(grace_s: float, left: list[psutil.Process] | None = None) -> None:
    """SIGTERM what is left (`left`, else everything below this process), SIGKILL it
    `grace_s` later; reap it all."""
    left = descendants() if left is None else left
    if left:
        log.warning(
            "stopping %d process(es) left behind: %s",
            len(left),
            ", ".join(str(p.pid) for p in left),
        )
        send(left, signal.SIGTERM)
        _, still = psutil.wait_procs(left, timeout=grace_s)
        send(still, signal.SIGKILL)
        psutil.wait_procs(still, timeout=5)
    _reap_zombies()


def _reap_zombies() -> None:
    """Collect re-parented descendants that have exited (a subreaper must, like init)."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children():
            with contextlib.suppress(ChildProcessError, psutil.Error):
                if child.status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(child.pid, os.WNOHANG)


# --- Relaying ---------------------------------------------------------------------------------


def relay_to_server(child: psutil.Process, signum: int, count: int) -> None:
    """How a stop signal reaches `bentoml serve` (see the module's docstring)."""
    if count == 0 and signum == signal.SIGTERM:
        log.info("SIGTERM: the server drains, then stops")
        signal_group(child.pid, signal.SIGTERM)
        return
    log.info("%s: the server stops now", signal.Signals(signum).name)
    workers = track(child, {})  # before any of them exits
    signal_group(child.pid, signum)
    send(workers, signum)


def relay_to_task(child: psutil.Process, signum: int, count: int) -> None:
    """Training and export have nothing to drain: SIGTERM, then SIGKILL if asked again."""
    stop = signal.SIGTERM if count == 0 else signal.SIGKILL
    kill_tree(child, stop, {})


def supervise(
    command: Sequence[str],
    signals: StopSignals,
    *,
    relay: Relay,
    stop_s: float,
    env: Mapping[str, str] | None = None,
) -> int:
    """Run `command` in a session of its own until it exits; relay each stop signal to it
    and kill its whole tree `stop_s` after the first. Returns its exit status (128 + N if
    signal N ended it)."""
    if signals.received:
        raise Stopped(signals.received[0])
    child = subprocess.Popen(
        list(command),
        env=None if env is None else dict(env),
        start_new_session=True,
        preexec_fn=_sigterm_when_parent_dies(os.getpid()),
    )
    handle = psutil.Process(child.pid)
    known: dict[int, psutil.Process] = {}  # its tree, as seen so far
    relayed = 0
    deadline: float | None = None
    while True:
        try:
            status = child.wait(timeout=POLL_S)
            break
        except subprocess.TimeoutExpired:
            track(handle, known)
        for signum in signals.received[relayed:]:
            relay(handle, signum, relayed)
            relayed += 1
            deadline = deadline or time.monotonic() + stop_s
        if deadline is not None and time.monotonic() > deadline:
            log.warning(
                "still running %.0f s after %s: killing every process it started",
                stop_s,
                signal.Signals(signals.received[0]).name,
            )
            kill_tree(handle, signal.SIGKILL, known)
            deadline = float("inf")  # killed once; now wait for the exit
    # Workers whose arbiter died: they may drain, as after a signal.
    end_tree(grace_s=stop_s, left=[p for p in known.values() if _alive(p)])
    return status if status >= 0 else 128 - status


@contextlib.contextmanager
def supervisor() -> Iterator[StopSignals]:
    """The setting `dlserve serve` runs its children in: stop signals recorded for relaying,
    orphans re-parented to it, and nothing it started left running when it returns."""
    become_subreaper()
    with StopSignals() as signals:
        try:
            yield signals
        finally:
            end_tree(grace_s=TASK_STOP_S)
