#!/usr/bin/env python3
"""Print ``name==version`` for every installed distribution, one a line, sorted.

``docker/install.sh`` uses it twice: as the pip constraints file that keeps every package of the base
image (vLLM, vllm-ascend, torch, torch_npu, ...) exactly where it is while the few missing dependencies
are added, and as the before/after snapshot that proves nothing moved. ``pip freeze`` cannot serve:
the base images install vLLM and vllm-ascend editable (``-e`` lines are not valid constraints) and carry
distro packages whose versions are not PEP 440 (pip rejects those lines).

Usage: ``python3 freeze.py [--exclude NAME ...]`` (names compared after PEP 503 normalisation).
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib.metadata import distributions

_PEP440 = re.compile(
    r"^([1-9][0-9]*!)?(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*((a|b|rc)(0|[1-9][0-9]*))?"
    r"(\.post(0|[1-9][0-9]*))?(\.dev(0|[1-9][0-9]*))?(\+[a-z0-9]+(\.[a-z0-9]+)*)?$",
    re.IGNORECASE,
)


def canonical(name: str) -> str:
    """PEP 503 name: ``Torch_NPU`` and ``torch-npu`` are the same distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(exclude: set[str]) -> list[str]:
    """``name==version`` of each installed distribution, first on ``sys.path`` wins (as for pip)."""
    found: dict[str, str] = {}
    for dist in distributions():
        name = dist.metadata["Name"]
        if not name or canonical(name) in exclude or canonical(name) in found:
            continue
        if not _PEP440.match(dist.version):  # e.g. Debian's "1.1build1": not pinnable, never a vLLM dep
            continue
        found[canonical(name)] = f"{name}=={dist.version}"
    return sorted(found.values(), key=str.lower)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exclude", nargs="*", default=[], help="distributions to leave out")
    args = parser.parse_args(argv)
    print("\n".join(pins({canonical(n) for n in args.exclude})))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
