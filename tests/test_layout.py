"""Architecture rules: import directions between the packages, and a lean `tace.analysis`."""

from __future__ import annotations

import ast
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
