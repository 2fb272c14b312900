"""The memory allocator the server's processes run on: jemalloc where it can be had.

Why: glibc's malloc keeps what a burst of large requests freed inside its per-thread
arenas, so a worker's resident memory ratchets up burst after burst and stays. Trimming
every 30 s (service/lifecycle.py) slowed that but did not stop it: in an hour's soak with
bursts (`dlserve bench --soak 60`) the two workers still grew 4.3 and 6.6 % an hour.
jemalloc returns freed pages to the system on its own within seconds (its dirty-page
decay), and on the same soak the whole server stayed within a few MiB, at higher
throughput (BENCHMARKS.md, "Soak").

A process cannot change its allocator once it runs, so jemalloc is preloaded
(LD_PRELOAD) into the server by whatever starts it: `dlserve serve` (cli/serve.py), the
bench's and the tests' servers (bench/http.py) and the image (deploy/docker/, which
installs Debian's libjemalloc2). `server_env` is the one place that decides how.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

Choice = Literal["auto", "jemalloc", "system"]  # DLSERVE_ALLOCATOR

# Where Debian and Ubuntu (libjemalloc2), Fedora/RHEL (jemalloc) and Alpine put it.
CANDIDATES = (
    "/usr/local/lib/libjemalloc.so.2",  # the image's link to its architecture's copy
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
)
# Purge freed pages from a thread of jemalloc's own, not only when the process next
# allocates: a worker that goes idle after a burst returns its memory too.
CONF = "background_thread:true"


class AllocatorError(RuntimeError):
    """DLSERVE_ALLOCATOR=jemalloc, and jemalloc is not installed."""


def find_jemalloc() -> Path | None:
    return next((Path(p) for p in CANDIDATES if Path(p).is_file()), None)


def server_env(choice: Choice, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables that make a server process run on the chosen allocator
    (DLSERVE_ALLOCATOR): `auto` preloads jemalloc where it is installed and otherwise
    leaves glibc's malloc (with its periodic trim); `jemalloc` requires it; `system`
    preloads nothing. An LD_PRELOAD already set is kept, after jemalloc, and a MALLOC_CONF
    already set wins."""
    if choice == "system":
        return {}
    found = find_jemalloc()
    if found is None:
        if choice == "jemalloc":
            raise AllocatorError(
                "DLSERVE_ALLOCATOR=jemalloc, but libjemalloc.so.2 is in none of "
                f"{', '.join(CANDIDATES)}; install it (Debian: apt-get install libjemalloc2) "
                "or set DLSERVE_ALLOCATOR=auto"
            )
        return {}
    env = environ if environ is not None else dict(os.environ)
    current = env.get("LD_PRELOAD", "").split()
    preload = [str(found), *(p for p in current if p != str(found))]
    return {"LD_PRELOAD": " ".join(preload), "MALLOC_CONF": env.get("MALLOC_CONF", CONF)}


def running_jemalloc(pid: int | str = "self") -> bool:
    """Whether a process (this one by default) has jemalloc mapped: how a server, a test
    or the trim thread tells which allocator is in charge."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
    return "libjemalloc" in maps
