"""The code's size at a glance: lines per package, the largest file and the largest class.

Issue 31 asks for these before and after a restructuring; run it on any commit to compare:

    python scripts/code_figures.py            # this checkout
    git stash; python scripts/code_figures.py # ... or on another commit's tree

Lines are physical lines of ``service/**/*.py`` (blank lines and comments included), as ``wc -l`` counts.
A package is a folder under ``service/`` (``service/server/core`` counts apart from the rest of ``server``);
modules directly under ``service/`` count as ``service (top level)``.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Folders reported apart from their parent package (the HTTP layer's shared core and its families).
SPLIT = ("server",)


def package_of(path: Path) -> str:
    parts = path.relative_to(ROOT / "service").parts
    if len(parts) == 1:
        return "service (top level)"
    if parts[0] in SPLIT and len(parts) > 2:
        return f"{parts[0]}/{parts[1]}"
    return parts[0]


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def classes(path: Path) -> list[tuple[int, str]]:
    """Each class of ``path`` as (lines, qualified name)."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(ROOT)
    return [((node.end_lineno or node.lineno) - node.lineno + 1, f"{rel}:{node.name}")
            for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]


def main() -> int:
    files = sorted((ROOT / "service").rglob("*.py"))
    per_package: Counter[str] = Counter()
    for f in files:
        per_package[package_of(f)] += lines(f)
    print("lines per package:")
    for name, n in sorted(per_package.items()):
        print(f"  {name:22} {n:6}")
    print(f"  {'total':22} {sum(per_package.values()):6}")
    largest = max(files, key=lines)
    print(f"largest file:  {largest.relative_to(ROOT)} ({lines(largest)} lines)")
    size, name = max(c for f in files for c in classes(f))
    print(f"largest class: {name} ({size} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
