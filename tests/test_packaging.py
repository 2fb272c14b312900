"""What the serving image carries: the files bentofile.yaml includes are enough to start the
service, and nothing of training, export, the data readers, evaluation, the bench or the
CLI comes with them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT

NOT_SERVING = ("torch", "training", "export", "readers", "evaluation", "bench", "cli", "tests",
               "scoring", "pyarrow", "ray")


def bento_files() -> list[Path]:
    """The project files `bentoml build` copies into the Bento, by bentofile's include list."""
    spec = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    return sorted({p for pattern in spec["include"] for p in ROOT.glob(pattern) if p.is_file()})


def test_the_bento_takes_only_the_core_and_the_service() -> None:
    tops = {p.relative_to(ROOT).parts[0] for p in bento_files()}
    assert tops == {"dlserve", "service"}, tops


def test_the_service_starts_from_the_bento_files_alone(digits_model: str, tmp_path: Path) -> None:
    for path in bento_files():
        dest = tmp_path / path.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
    # The project is installed in editable mode, whose import hook would find any package
    # of this checkout; drop it, so that only the copied files can be imported.
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "import service.app\n"
        "assert service.app.__file__.startswith(sys.argv[1]), service.app.__file__\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {NOT_SERVING!r})\n"
        "assert not bad, bad\n"
        "print('ok')\n")
    env = {**os.environ, "DLSERVE_MODELS": "digits", "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
