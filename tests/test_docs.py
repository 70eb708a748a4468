"""The documentation: the mkdocs site under docs/ builds in strict mode (offline, built-in theme), every page
is in its nav, and the README stays short with links that resolve."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
README_MAX_BYTES = 18_000
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def nav_pages() -> list[str]:
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    return [page for entry in nav for page in entry.values()]


def test_mkdocs_builds_strict_with_every_page_in_the_nav(tmp_path):
    pages = nav_pages()
    assert sorted(pages) == sorted(p.name for p in (ROOT / "docs").glob("*.md")), (
        "docs/*.md and the nav differ"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "index.html").is_file()
    for page in pages:
        built = tmp_path / ("index.html" if page == "index.md" else f"{Path(page).stem}/index.html")
        assert built.is_file(), f"{page} was not built"


def test_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/"


def test_readme_relative_links_resolve():
    links = [t for t in LINK.findall((ROOT / "README.md").read_text()) if not t.startswith(("http", "#"))]
    assert {f"docs/{page}" for page in nav_pages()} <= set(links), "the README links every docs page"
    for target in links:
        assert (ROOT / target.split("#")[0]).exists(), f"README.md links to missing {target}"
