"""The package boundaries: HTTP → task → engine and VQ worker → record, and the serving path free of
demo and test code. Read from the import statements, so a new upward or sideways import fails here."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[1] / "service"
#: What the HTTP layer may import: itself, the task package, and the shared vocabulary below it.
HTTP_MAY_IMPORT = ("service.server", "service.jobs", "service.task", "service.types", "service.limits", "service.prompts",
                   "service.atomic_file", "service.settings", "service.schema")


def imports_of(path: Path, *, runtime_only: bool) -> set[str]:
    """Modules ``path`` imports (with ``runtime_only``, not those under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip |= {id(n) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {m for m in found if m == "service" or m.startswith("service.")}


@pytest.mark.parametrize("path", sorted((SERVICE / "server").rglob("*.py")), ids=lambda p: str(p.relative_to(SERVICE / "server")))
def test_http_layer_imports_only_the_task_package_and_shared_types(path):
    bad = {m for m in imports_of(path, runtime_only=False)
           if m != "service" and not m.startswith(HTTP_MAY_IMPORT)}
    assert not bad, f"{path.name} imports {sorted(bad)}"


#: The HTTP layer's API families (service/server/<family>/); app.py and run.py assemble them.
HTTP_FAMILIES = sorted(p.name for p in (SERVICE / "server").iterdir() if p.is_dir() and (p / "__init__.py").exists()
                       and p.name != "core")


def test_the_http_layer_has_a_shared_core_and_one_folder_per_api_family():
    assert {"emu35", "openai", "ops"} <= set(HTTP_FAMILIES)
    flat = sorted(p.name for p in (SERVICE / "server").glob("*.py"))
    assert flat == ["__init__.py", "app.py", "run.py"], flat


@pytest.mark.parametrize("family", ["core", *HTTP_FAMILIES])
def test_an_api_family_imports_only_the_core_and_itself(family):
    """The core knows no family; a family knows the core and nothing of its neighbours."""
    allowed = ("service.server.core",) if family == "core" else ("service.server.core", f"service.server.{family}")
    for path in sorted((SERVICE / "server" / family).rglob("*.py")):
        bad = {m for m in imports_of(path, runtime_only=False)
               if m.startswith("service.server") and m != "service.server" and not m.startswith(allowed)}
        assert not bad, f"{path.relative_to(SERVICE)} imports {sorted(bad)}"


@pytest.mark.parametrize("package", ["engine", "vq", "record", "task", "jobs", "server"])
def test_lower_layers_never_import_upper_ones(package):
    upper = {"engine": ("service.server", "service.task", "service.jobs"),
             "vq": ("service.server", "service.task", "service.engine", "service.jobs"),
             "record": ("service.server", "service.task", "service.engine", "service.vq", "service.jobs"),
             "task": ("service.server", "service.jobs"), "jobs": ("service.server",),
             "server": ()}[package] + ("service.batch",)  # batch: an upper layer like HTTP
    for path in sorted((SERVICE / package).rglob("*.py")):
        bad = {m for m in imports_of(path, runtime_only=False) if m.startswith(upper)}
        assert not bad, f"{path.relative_to(SERVICE)} imports {sorted(bad)}"


def test_the_batch_command_imports_nothing_from_the_http_layer():
    """The settings and the request schema a JSONL line shares with POST /v1/generate live below both
    commands (service.settings, service.schema); the batch command needs nothing else of HTTP's."""
    for path in sorted((SERVICE / "batch").rglob("*.py")):
        bad = {m for m in imports_of(path, runtime_only=False) if m.startswith("service.server")}
        assert not bad, f"{path.relative_to(SERVICE)} imports {sorted(bad)}"
    shared = {m for p in (SERVICE / "batch").rglob("*.py") for m in imports_of(p, runtime_only=False)}
    assert {"service.settings", "service.schema.emu35"} <= shared, "the shared modules moved: update this test"


@pytest.mark.parametrize("package", ["settings", "schema"])
def test_what_both_commands_share_imports_neither(package):
    path = SERVICE / f"{package}.py"
    paths = [path] if path.exists() else sorted((SERVICE / package).rglob("*.py"))
    assert paths
    for p in paths:
        bad = {m for m in imports_of(p, runtime_only=False) if m.startswith(("service.server", "service.batch"))}
        assert not bad, f"{p.relative_to(SERVICE)} imports {sorted(bad)}"


def module_name(path: Path, root: Path = SERVICE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = SERVICE) -> dict[str, set[str]]:
    """Each module of the project → the project's modules it names in an import (type-only imports too:
    a circle drawn only for the type checker still means two modules that cannot be read apart).
    ``from package import name`` counts the package and, when ``name`` is a module, that module."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        named: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                named |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                named |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        graph[name] = {m for m in named if m in modules and m != name}
    return graph


def import_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` (its modules, the first repeated at the end), or None."""
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def test_no_import_circle_between_the_projects_modules():
    circle = import_circle(import_graph())
    assert circle is None, "import circle: " + " → ".join(circle or [])


#: Core modules no family imports: they serve the process before any route is chosen (run.py's guard of
#: every connection).
PROCESS_LEVEL = {"service.server.core.connections"}


def families_using(module: str, graph: dict[str, set[str]]) -> set[str]:
    """The API families that import ``module``, directly or through other core modules."""
    core = "service.server.core."
    found: set[str] = set()
    todo, seen = [module], {module}
    while todo:
        current = todo.pop()
        for src, deps in graph.items():
            if current not in deps or src in seen:
                continue
            seen.add(src)
            if src.startswith(core):
                todo.append(src)
            elif src.startswith("service.server.") and src.split(".")[2] in HTTP_FAMILIES:
                found.add(src.split(".")[2])
    return found


def test_the_core_holds_only_what_two_api_families_share():
    graph = import_graph()
    core = sorted(m for m in graph if m.startswith("service.server.core.") and m not in PROCESS_LEVEL)
    assert core
    lonely = {m: sorted(families_using(m, graph)) for m in core if len(families_using(m, graph)) < 2}
    assert not lonely, f"core modules used by fewer than two API families (move them to their family): {lonely}"


def test_the_circle_check_sees_a_circle(tmp_path):
    """The check above, on a made-up package where a imports b (type-only) and b imports a."""
    pkg = tmp_path / "service" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from service.pkg.b import B\n")
    (pkg / "b.py").write_text("from service.pkg import a\n")
    graph = import_graph(tmp_path / "service")
    assert set(import_circle(graph) or []) == {"service.pkg.a", "service.pkg.b"}
    (pkg / "b.py").write_text("import json\n")
    assert import_circle(import_graph(tmp_path / "service")) is None


def test_serving_never_imports_demo_or_test_code():
    """Importing the whole serving path (app, runner, engines' front ends) loads no tiny-model trainer."""
    code = ("import sys, service.server.run, service.server.app, service.task, service.engine.vllm_engine; "
            "bad = [m for m in sys.modules if m.startswith(('service.tiny', 'tests', 'scripts'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.vllm
def test_vllm_processes_import_only_the_in_vllm_and_policy_packages():
    """What vLLM loads in its engine core and workers (plugin, model, processor, scheduler) brings in
    neither the front-end client, the reference engine, the task layer nor HTTP."""
    pytest.importorskip("vllm")
    code = ("import sys, service.engine.in_vllm.plugin, service.engine.in_vllm.model, "
            "service.engine.in_vllm.processor, service.engine.in_vllm.scheduler; "
            "bad = [m for m in sys.modules if m.startswith(('service.engine.vllm_engine', 'service.engine.reference', "
            "'service.engine.vllm_self_check', 'service.task', 'service.server', 'service.tiny', 'service.vq'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_policy_is_pure():
    for path in sorted((SERVICE / "engine" / "policy").glob("*.py")):
        mods = imports_of(path, runtime_only=True)
        bad = {m for m in mods if m.startswith("service.engine") and not m.startswith("service.engine.policy")}
        assert not bad, f"{path.name} imports {sorted(bad)}"
        assert not any(line.lstrip().startswith(("import vllm", "from vllm")) for line in path.read_text().splitlines())
