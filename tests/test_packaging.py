"""The repository is the whole product: nothing it runs or reads reaches outside the checkout, and the package
declares the Python it needs."""

from __future__ import annotations

import re
import site
from importlib.metadata import distributions
from pathlib import Path

import tomllib
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]

#: What a fresh clone runs or reads: the package, its tests and benchmarks, deployment material, build, CI and docs.
CHECKED = ("common", "client", "server", "analysis", "simulation", "tests", "benchmarks", "deploy", "Makefile", ".ci", "pyproject.toml",
           "README.md", "docs")  # fmt: skip
#: The project workspace's folder beside the checkout, however it is spelled.
WORKSPACE = re.compile(r"\.\./shared\b|[\"']shared[\"']\s*/\s*[\"'](?:data|docs)[\"']")
#: ``Path(__file__).parents[N]``: above the checkout when N reaches past the file's depth in it.
PARENTS = re.compile(r"Path\(__file__\)(?:\.resolve\(\))?\.parents\[(\d+)\]")


def outside_references(root: Path) -> list[str]:
    """``file:line`` of every reference to a path outside `root` in the files of `CHECKED` under it."""
    found = []
    for name in CHECKED:
        top = root / name
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        for path in files:
            if path.resolve() == Path(__file__).resolve():
                continue  # its examples of what the check finds
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # binary files hold no paths to follow
            depth = len(path.relative_to(root).parts) - 1  # parents[depth] is the checkout's root
            for number, line in enumerate(text.splitlines(), start=1):
                if WORKSPACE.search(line) or any(int(n) > depth for n in PARENTS.findall(line)):
                    found.append(f"{path.relative_to(root)}:{number}")
    return found


def test_nothing_reaches_outside_the_checkout():
    assert outside_references(ROOT) == []


def test_the_check_finds_a_path_outside(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "a.py").write_text(  # the workspace path is split so that this checkout never spells it
        'A = Path(__file__).resolve().parents[1] / "data"\nB = Path(__file__).resolve().parents[2] / "x"\nC = "../' + 'shared/docs"\n'
    )
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "b.py").write_text('D = ROOT / "shared" / "data" / "msigdb"\n')
    assert outside_references(tmp_path) == ["tests/a.py:2", "tests/a.py:3", "benchmarks/b.py:1"]


def test_python_older_than_3_11_is_refused():
    """The code needs 3.11 (tomllib, warnings.catch_warnings(action=...)): installers must refuse 3.10."""
    declared = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["requires-python"])
    assert not declared.contains("3.10.14") and not declared.contains("3.9.19")
    assert declared.contains("3.11.0") and declared.contains("3.12.3") and declared.contains("3.13.1")
    # The installed distribution's metadata (what an installer checks), not a build folder's egg-info that the
    # checkout on sys.path may shadow it with.
    installed = next(distributions(name="tace-fl", path=[*site.getsitepackages(), site.getusersitepackages()])).metadata["Requires-Python"]
    assert SpecifierSet(installed) == declared, f"the installed metadata says {installed}: reinstall (`make install`, or pip install -e .)"
