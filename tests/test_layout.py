"""Architecture rules: import directions between the packages, and a lean `tace.analysis`."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "analysis", "simulation")
# package -> our packages it may import
ALLOWED = {
    "common": {"common"},
    "client": {"common", "client"},
    "server": {"common", "server"},
    "analysis": {"common", "analysis"},
    "simulation": set(PACKAGES),
}
FORBIDDEN_THIRD_PARTY = {"common": {"flwr"}, "analysis": {"flwr", "torch"}}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_import_directions(package):
    for path in (ROOT / package).rglob("*.py"):
        for name in imports_of(path):
            parts = name.split(".")
            if parts[0] == "tace" and len(parts) > 1:
                assert parts[1] in ALLOWED[package], f"{path.relative_to(ROOT)} imports {name}"
            assert parts[0] not in FORBIDDEN_THIRD_PARTY.get(package, set()), f"{path.relative_to(ROOT)} imports {name}"
            assert parts[0] not in PACKAGES, f"{path.relative_to(ROOT)}: import through tace.{parts[0]}, not {parts[0]}"


def test_every_module_has_a_docstring():
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            assert ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))), f"{path.relative_to(ROOT)} has no module docstring"


def test_analysis_and_client_cli_stay_lean():
    code = "import sys, tace.analysis, tace.analysis.cli, tace.client.cli; print(sorted(m for m in ('torch', 'flwr', 'monai') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``tace.server.rounds``; a subpackage by its ``__init__``)."""
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out["tace." + ".".join(parts)] = path
    return out


def test_no_import_circles():
    """Imports inside functions and under TYPE_CHECKING count: an import circle is a design question."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.update([node.module, *(f"{node.module}.{a.name}" for a in node.names)])
        graph[name] = {m for m in found if m in modules and m != name}
    # Depth-first search for a back edge; report the circle it closes.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_architecture_page_lists_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"`((?:common|client|server|analysis|simulation)/[\w/]+\.py)`", text))
    actual = {str(p.relative_to(ROOT)) for p in _modules().values() if p.name != "__init__.py"}
    assert not actual - listed, f"docs/architecture.md does not list {sorted(actual - listed)}"
    assert not listed - actual, f"docs/architecture.md lists modules that do not exist: {sorted(listed - actual)}"


def test_the_flower_apps_a_run_bundle_names_exist(tmp_path):
    import importlib

    import tomllib
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from tace.common.config import RunConfig
    from tace.common.launch import APP_COMPONENTS, write_app

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"] == APP_COMPONENTS
    bundle = tomllib.loads((write_app(tmp_path, RunConfig()) / "pyproject.toml").read_text())
    assert bundle["tool"]["flwr"]["app"]["components"] == APP_COMPONENTS
    for key, kind in (("serverapp", ServerApp), ("clientapp", ClientApp)):
        module, _, attr = APP_COMPONENTS[key].partition(":")
        assert isinstance(getattr(importlib.import_module(module), attr), kind)
