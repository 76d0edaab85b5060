"""The repository is self-contained: code, tests and docs cite no document a person who clones it does
not have. What the project relies on from elsewhere is written into docs/ in its own words.

Test data that CI provides beside the checkout (the real tokenizer files, ``../shared/emu35-tokenizer``)
is not a citation. Web addresses are citations of published documents and are fine.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: This file names the patterns it looks for.
SELF = Path(__file__).resolve().relative_to(ROOT).as_posix()
#: Test data CI lays beside the checkout: read by the tests, not cited as a document.
TEST_DATA = ("shared/emu35-tokenizer",)
#: Names of files the project writes (outputs, not documents it cites).
OUTPUT_NAMES = frozenset({"table.md"})

#: The development machines' work folder, or the folder laid beside the checkout. (Paths inside a container,
#: such as /home/… in the Dockerfiles, are not citations.)
OUTSIDE = re.compile(r"(?<![\w.-])(?:/work/|(?:\.\./)*shared/[\w.-]+)")
#: A markdown document named in prose or code (a path or a bare file name).
MD_FILE = re.compile(r"(?<![\w.-])((?:[\w.-]+/)*[\w.-]+\.md)\b")
URL = re.compile(r"[a-z][a-z0-9+.-]*://\S+")


def repository_files(root: Path = ROOT) -> list[str]:
    """The files git tracks or would track (untracked but not ignored), so a new file counts at once."""
    done = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                          capture_output=True, text=True, check=True)
    return sorted({f for f in done.stdout.splitlines() if (root / f).is_file()})


def text_of(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def outside_citations(text: str, known: set[str]) -> list[str]:
    """What ``text`` cites outside the repository: machine paths, the folder beside the checkout (test
    data aside), and markdown documents that are no file of the repository (``known``: its paths and
    file names). Web addresses are skipped."""
    text = URL.sub(" ", text)
    found = [m.group(0) for m in OUTSIDE.finditer(text) if not m.group(0).lstrip("./").startswith(TEST_DATA)]
    for m in MD_FILE.finditer(text):
        name = m.group(1)
        if name.lstrip("./") not in known and Path(name).name not in known and Path(name).name not in OUTPUT_NAMES:
            found.append(name)
    return found


def test_no_file_cites_a_document_outside_the_repository():
    files = repository_files()
    known = set(files) | {Path(f).name for f in files}
    bad = {}
    for rel in files:
        if rel == SELF:
            continue
        text = text_of(ROOT / rel)
        if text is None:
            continue
        cited = outside_citations(text, known)
        if cited:
            bad[rel] = sorted(set(cited))
    assert not bad, f"cites files outside the repository (write what is needed into docs/): {bad}"


@pytest.mark.parametrize("text, cited", [
    ("the format (/work/shared/flashar.md §2)", ["/work/", "shared/flashar.md"]),
    ("the shape (DESIGN.md; 64 layers)", ["DESIGN.md"]),
    ("the release's fields (flashar.md §2)", ["flashar.md"]),
    ("read from ../shared/notes.txt", ["../shared/notes.txt"]),
    ("open /home/someone/spec.md", ["home/someone/spec.md"]),
])
def test_the_check_finds_outside_citations(text, cited):
    assert set(cited) <= set(outside_citations(text, {"design.md", "docs/design.md"}))


@pytest.mark.parametrize("text", [
    "design.md §4 and docs/design.md", "tokenizer files from ../shared/emu35-tokenizer when present",
    "https://github.com/example/repo/blob/main/README.md", "results in $OUT/table.md",
])
def test_the_check_allows_the_repository_test_data_and_the_web(text):
    assert outside_citations(text, {"design.md", "docs/design.md", "README.md"}) == []
