"""`python tools/with_pip_config.py uv pip install ...`: run a command with pip's
configuration on this machine handed to uv as its environment variables, so that `make
install` gets its packages from the same places whichever installer runs: uv does not read
pip's configuration files. Where pip has package mirrors, a folder of wheels or constraints
set up (`pip config list`), uv is pointed at them too; variables already set win.
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

# pip's option → uv's variable. pip merges every index and picks the best version across
# them; uv's default stops at the first index that has a package, hence the strategy.
UV_NAMES = {
    "index-url": "UV_INDEX_URL",
    "extra-index-url": "UV_EXTRA_INDEX_URL",
    "find-links": "UV_FIND_LINKS",
    "constraint": "UV_CONSTRAINT",
}
LINE = re.compile(r"^(?:global|install|:env:)\.(?P<key>[a-z-]+)='(?P<value>.*)'$")


def uv_environment(pip_config: str) -> dict[str, str]:
    found = {}
    for line in pip_config.splitlines():
        if (m := LINE.match(line.strip())) and m["key"] in UV_NAMES:
            found[UV_NAMES[m["key"]]] = m["value"]
    if "UV_EXTRA_INDEX_URL" in found or "UV_FIND_LINKS" in found:
        found["UV_INDEX_STRATEGY"] = "unsafe-best-match"
    return found


def main(command: list[str]) -> None:
    if not command:
        sys.exit("usage: with_pip_config.py COMMAND [ARGS...]")
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    os.execvpe(command[0], command, {**uv_environment(listing), **os.environ})


if __name__ == "__main__":
    main(sys.argv[1:])
