#!/usr/bin/env python3
"""Helpers of scripts/device-proof.sh: the requirements of a wheel on the CUDA box, and the proof's table.

    python scripts/device_proof.py requirements WHEEL       # one requirement a line (Python 3.12, Linux)
    python scripts/device_proof.py download DIR REQ...      # REQ and what it needs, minus what the box has
    python scripts/device_proof.py table OUT DEVICE         # markdown table from OUT's JSON and logs
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

#: the CUDA box's interpreter and platform, for environment markers
BOX_ENV = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def _requirement_class():
    try:
        from packaging.requirements import Requirement
    except ImportError:  # a bare interpreter: pip's own copy
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def requirements(wheel: Path) -> list[str]:
    """The wheel's unconditional requirements (no extras) whose markers hold on the box."""
    Requirement = _requirement_class()  # noqa: N806

    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(name).decode())
    out = []
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(BOX_ENV):
            out.append(str(Requirement(line.split(";")[0])))
    return out


#: distributions the CUDA box already has (torch brings its CUDA libraries): never downloaded
BOX_HAS = re.compile(r"^(torch|triton|nvidia-.*|cuda-toolkit|transformers|tokenizers|huggingface-hub|hf-xet|numpy|"
                     r"pillow|safetensors|tiktoken)$")
PIP_BOX = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
           "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
           "--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64", "--platform", "any"]


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download(folder: Path, reqs: list[str]) -> list[str]:
    """Wheels for ``reqs`` and everything they need on the box, one ``pip download --no-deps`` each (so
    the box's torch is never fetched and one missing package does not stop the rest). Returns what the
    registry could not give."""
    Requirement = _requirement_class()  # noqa: N806
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    missing: list[str] = []
    queue = list(reqs)
    while queue:
        spec = queue.pop(0)
        path = Path(spec)
        name = _canon(path.name.split("-")[0]) if path.suffix == ".whl" else _canon(Requirement(spec).name)
        if name in seen or BOX_HAS.match(name):
            continue
        seen.add(name)
        before = set(folder.glob("*.whl"))
        if path.suffix == ".whl":
            new = [path]
        else:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder),
                                   *PIP_BOX, spec], capture_output=True, text=True)
            new = sorted(set(folder.glob("*.whl")) - before) or [
                w for w in folder.glob("*.whl") if _canon(w.name.split("-")[0]) == name]
            if done.returncode != 0 or not new:
                missing.append(spec)
                continue
        queue += requirements(new[0])
    return missing


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def table(out: Path, device: str) -> str:
    """What a reader needs from the run: step results, graph capture, throughput, processor share."""
    steps = (out / "steps.txt").read_text().splitlines() if (out / "steps.txt").is_file() else []
    log = (out / "device-proof.log").read_text(errors="replace") if (out / "device-proof.log").is_file() else ""
    lines = [f"# device proof ({device})", "", (out / "machine.txt").read_text().strip()
             if (out / "machine.txt").is_file() else "", "", "| step | result |", "|---|---|"]
    lines += [f"| {s.split(' ', 1)[0]} | {s.split(' ', 1)[1] if ' ' in s else ''} |" for s in steps]
    passed = re.findall(r"^=*\s*(\d+ passed.*?)\s*=*$", log, re.M)
    lines += ["", f"tests: {passed[0] if passed else 'no pytest summary in the log'}"]
    captured = len(re.findall(r"[Cc]apturing CUDA graphs|Graph capturing finished", log))
    lines.append(f"CUDA graph capture lines in the log: {captured}" + ("" if device == "cuda" else " (CPU: eager)"))
    engine = _load(out / "engine.json")
    if engine:
        lines += ["", f"engine bench: {engine.get('model')} ({engine.get('dtype')})", "",
                  "| concurrent | tokens/s | images/s | step ms |", "|---|---|---|---|"]
        for conc, row in engine["throughput_by_concurrency"].items():
            lines.append(f"| {conc} | {row['tokens_per_s']} | {row['images_per_s']} | {row['step_ms']} |")
        lines += [""] + [f"- {k}: {v}" for k, v in engine.items() if "ratio" in k or "share" in k or "overhead" in k]
    flashar = _load(out / "flashar.json")
    if flashar:
        lines += ["", "flashar bench:", "```", json.dumps(flashar, indent=1)[:3000], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv[:1] == ["requirements"] and len(argv) == 2:
        print("\n".join(requirements(Path(argv[1]))))
        return 0
    if argv[:1] == ["download"] and len(argv) >= 3:
        missing = download(Path(argv[1]), argv[2:])
        print("\n".join(missing))
        return 0
    if argv[:1] == ["table"] and len(argv) == 3:
        print(table(Path(argv[1]), argv[2]), end="")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
