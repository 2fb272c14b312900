"""The documentation site (mkdocs.yml, docs/) and the README that points into it.

The site is built the way a maintainer builds it, `mkdocs build --strict`: a broken link
or anchor, a page missing from the nav or an include that finds nothing fails the build,
and so this test. BENCHMARKS.md and SECURITY.md stay at the repository root and are shown
in the site, so a bench run that rewrites BENCHMARKS.md is checked here too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urljoin, urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250


def nav_pages(nav: list) -> list[str]:
    """Every Markdown file the nav names, in order."""
    pages: list[str] = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages.extend(nav_pages(value) if isinstance(value, list) else [value])
    return pages


def built_page(site: Path, page: str) -> Path:
    """Where `mkdocs build` writes a page (directory URLs: docs/x.md → site/x/index.html)."""
    stem = page.removesuffix(".md")
    return site / ("index.html" if stem == "index" else f"{stem}/index.html")


@pytest.fixture(scope="module")
def built_site(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess, Path]:
    """`python -m mkdocs build --strict` with this Python, into a temporary folder."""
    site = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    return build, site


@pytest.fixture(scope="module")
def pages() -> list[str]:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    return nav_pages(config["nav"])


def test_docs_build_strict_passes(built_site) -> None:
    build, _ = built_site
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-6000:]


def test_every_nav_page_is_built(built_site, pages: list[str]) -> None:
    build, site = built_site
    assert build.returncode == 0, build.stderr[-6000:]
    assert "benchmarks.md" in pages and "configuration.md" in pages
    missing = [page for page in pages if not built_page(site, page).is_file()]
    assert not missing, missing


def test_every_page_in_docs_is_in_the_nav(pages: list[str]) -> None:
    docs = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert docs == sorted(pages)


def test_every_image_resolves_in_the_built_site(built_site, pages: list[str]) -> None:
    """The screenshots and the soak plot (linked from BENCHMARKS.md as docs/soak-rss.png,
    relative to the repository root) must be where each built page points."""
    build, site = built_site
    assert build.returncode == 0, build.stderr[-6000:]
    seen, broken = 0, []
    for page in pages:
        html_file = built_page(site, page)
        base = "file://" + html_file.as_posix()
        for src in re.findall(r'<img[^>]*\ssrc="([^"]+)"', html_file.read_text()):
            if urlparse(src).scheme in ("http", "https", "data"):
                continue
            seen += 1
            if not Path(urlparse(urljoin(base, src)).path).is_file():
                broken.append(f"{page}: {src}")
    assert not broken, broken
    assert seen >= 3  # docs.png, demo.png and soak-rss.png at least


def test_benchmarks_and_security_pages_show_the_root_files(built_site) -> None:
    """Every section of BENCHMARKS.md and SECURITY.md is a section of its page."""
    build, site = built_site
    assert build.returncode == 0, build.stderr[-6000:]
    for page, source in (("benchmarks.md", "BENCHMARKS.md"), ("security.md", "SECURITY.md")):
        text = re.sub(r"</?code>", "", built_page(site, page).read_text())
        headings = re.findall(r"^##+ (.+)$", (ROOT / source).read_text(), re.MULTILINE)
        assert headings
        missing = [h for h in headings if f">{h.replace('`', '')}<" not in text]
        assert not missing, (page, missing)


def test_readme_is_at_most_250_lines() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, len(lines)
