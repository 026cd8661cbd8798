"""Documentation the code cites: it exists in the repository, and every citation names a part that exists."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
METAGRAD = REPO / "docs" / "metagrad.md"
# A design document that was never part of the repository, however it was cited.
MISSING_DESIGN = re.compile(r"DESIGN(\.md| §| section)")
SECTION_CITATION = re.compile(r"docs/metagrad\.md §(\d+)")


def repository_files() -> list[Path]:
    """Tracked files and untracked ones git does not ignore (so never .git, .venv or build outputs)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return [REPO / name for name in listed if name and (REPO / name).is_file()]


def text_of(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary files cite nothing


def test_no_file_cites_the_missing_design_document() -> None:
    citing = [f"{path.relative_to(REPO)}:{n}" for path in repository_files() if (text := text_of(path))
              for n, line in enumerate(text.splitlines(), 1) if MISSING_DESIGN.search(line)]
    assert not citing, f"cite docs/metagrad.md instead: {citing}"


def test_the_meta_gradient_document_exists_and_meta_py_points_to_it() -> None:
    assert METAGRAD.is_file()
    docstring = (REPO / "metadistil_scale" / "meta.py").read_text().split('"""')[1]
    assert "docs/metagrad.md" in docstring


def test_every_cited_section_exists() -> None:
    sections = set(re.findall(r"^## (\d+)\. ", METAGRAD.read_text(), flags=re.MULTILINE))
    cited = {(str(path.relative_to(REPO)), number) for path in repository_files() if (text := text_of(path))
             for number in SECTION_CITATION.findall(text)}
    assert cited, "nothing cites a section of docs/metagrad.md"
    assert all(number in sections for _, number in cited), sorted(cited)
