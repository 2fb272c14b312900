"""What the serving image carries: the files bentofile.yaml includes are enough to start the
service, nothing of training, export, the data readers, evaluation, the bench or the CLI
comes with them, and the one package list (service/requirements.txt) brings in every
package the service imports; `bentoml build` makes a Bento of it all."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

NOT_SERVING = (
    "torch",
    "training",
    "export",
    "readers",
    "evaluation",
    "bench",
    "cli",
    "tests",
    "scoring",
    "pyarrow",
    "ray",
)


def bento_files() -> list[Path]:
    """The project files `bentoml build` copies into the Bento, by bentofile's include list."""
    spec = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    return sorted({p for pattern in spec["include"] for p in ROOT.glob(pattern) if p.is_file()})


def test_the_bento_takes_only_the_core_and_the_service() -> None:
    tops = {p.relative_to(ROOT).parts[0] for p in bento_files()}
    assert tops == {"dlserve", "service"}, tops


@pytest.fixture(scope="module")
def serving_imports(digits_model: str, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """What importing the service from the Bento's files alone loads, in a fresh
    interpreter: each module's file within site-packages, or else its name. (Every
    registered model's module is imported whichever are served; digits is the one whose
    model the store holds here.)"""
    tmp_path = tmp_path_factory.mktemp("bento-files")
    for path in bento_files():
        dest = tmp_path / path.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
    # The project is installed in editable mode, whose import hook would find any package
    # of this checkout; drop it, so that only the copied files can be imported.
    # Printed: the file of each module the import loads (not those the interpreter had
    # already loaded), relative to site-packages when it comes from an installed package.
    code = (
        "import os, sys, sysconfig\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "before = set(sys.modules)\n"
        "import service.app\n"
        "assert service.app.__file__.startswith(sys.argv[1]), service.app.__file__\n"
        "site = sysconfig.get_paths()['purelib']\n"
        "for name in sorted(set(sys.modules) - before):\n"
        "    where = getattr(sys.modules[name], '__file__', None) or ''\n"
        "    print(os.path.relpath(where, site) if where.startswith(site) else name)\n"
    )
    env = {**os.environ, "DLSERVE_MODELS": "digits", "PYTHONPATH": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.split()


def test_the_service_starts_from_the_bento_files_alone(serving_imports: list[str]) -> None:
    loaded = {name.split(".")[0] for name in serving_imports if "/" not in name}
    assert {"service", "dlserve"} <= loaded
    assert not loaded & set(NOT_SERVING), sorted(loaded & set(NOT_SERVING))


def requirement_closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution that installing `requirements` brings in (as installed here)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = list(requirements)
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        for line in metadata.requires(req.name) or []:
            sub = Requirement(line)
            if sub.marker is None or any(
                sub.marker.evaluate({"extra": extra}) for extra in (*req.extras, "")
            ):
                todo.append(sub)
    return {name for name, _ in seen}


def serving_requirements() -> list[Requirement]:
    """service/requirements.txt, the list bentofile.yaml gives the Bento."""
    spec = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    lines = (ROOT / spec["python"]["requirements_txt"]).read_text().splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]


# Packages a dependency imports only when they happen to be installed (it carries on
# without them), by top-level package: present in the development environment through a
# development tool, absent from the image, harmless either way.
OPTIONAL_IMPORTS = {
    # tornado.log (circus needs tornado) colours its log with it if it can; the docs
    # site's theme, mkdocs-material, installs it
    "colorama": "tornado.log: try: import colorama / except ImportError",
    # grpc looks for grpcio-tools' protoc at import, and goes on without it
    "grpc_tools": "grpc/__init__.py: try: import grpc_tools / except ImportError",
}


def test_the_package_list_brings_in_every_package_the_service_imports(
    serving_imports: list[str],
) -> None:
    """An import the list misses (as `onnx` once was: the image stopped at start-up with
    No module named 'onnx') fails here, without building an image."""
    closure = requirement_closure(serving_requirements())
    provided = {str(file) for name in closure for file in metadata.distribution(name).files or []}
    owners = metadata.packages_distributions()

    def brought_in(file: str) -> bool:
        # The file itself, as the distribution's RECORD lists it, or else the distribution
        # that owns its top-level package: a CI run once reported psutil (which bentoml
        # requires) as missing on file names alone.
        top = file.split("/")[0].split(".")[0]
        return file in provided or any(canonicalize_name(d) in closure for d in owners.get(top, []))

    missing = {
        file.split("/")[0] for file in serving_imports if "/" in file and not brought_in(file)
    } - OPTIONAL_IMPORTS.keys()
    assert not missing, (
        "the service imports from these, which service/requirements.txt "
        f"does not bring in: {sorted({d for top in missing for d in owners.get(top, [top])})}"
    )


def test_the_project_depends_on_the_serving_list() -> None:
    """pyproject.toml reads its dependencies from the same file (no second copy)."""
    declared = {
        canonicalize_name(Requirement(r).name)
        for r in metadata.requires("dlserve")
        if "extra ==" not in r
    }
    assert {canonicalize_name(r.name) for r in serving_requirements()} <= declared


def test_bentoml_build_makes_a_bento_with_the_models_and_the_locked_list(bento: Path) -> None:
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    models = {m["tag"].split(":")[0] for s in info.get("services", []) for m in s["models"]}
    models |= {m["tag"].split(":")[0] for m in info.get("models", [])}
    assert models == set(os.environ["DLSERVE_MODELS"].split(",")), info
    locked = {
        canonicalize_name(Requirement(line).name)
        for line in (bento / "env/python/requirements.lock.txt").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "-"))
    }
    assert {canonicalize_name(r.name) for r in serving_requirements()} <= locked
    dockerfile = (bento / "env/docker/Dockerfile").read_text()
    for line in ("USER bentoml", "EXPOSE 3000", "HEALTHCHECK", "ARG BASE_IMAGE", "ARG VARIANT"):
        assert line in dockerfile, line
    assert {p.relative_to(bento / "src").parts[0] for p in (bento / "src").rglob("*.py")} == {
        "dlserve",
        "service",
    }


def test_the_lock_file_pins_every_dependency_within_its_bounds() -> None:
    """`make install` installs requirements.lock: a dependency added to pyproject.toml
    without `make lock` would be missing from a fresh install, and a bound raised without
    it would be ignored."""
    every = [Requirement(r) for r in metadata.requires("dlserve") or []]
    extras = ("train", "dev", "bench")
    declared = [
        r for r in every if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in extras)
    ]
    pinned = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            name, _, version = line.partition("==")
            pinned[canonicalize_name(Requirement(name).name)] = version.strip()
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement} is not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"requirements.lock pins {name}=={pinned[name]}, outside {requirement}: run `make lock`"
        )
