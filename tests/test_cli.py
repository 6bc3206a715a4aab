"""The four console scripts exist, say what they do, and expose only the commands that exist."""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def script_path(name: str) -> str:
    """The console script installed beside this interpreter (the venv need not be on PATH)."""
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is not installed next to {sys.executable}"
    return str(path)


def build_parser(script: str) -> argparse.ArgumentParser:
    """The parser of a console script, from the entry point pyproject.toml declares for it (``module:main``)."""
    module = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"][script].split(":")[0]
    return importlib.import_module(module).build_parser()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's subcommands by name, as argparse dispatches them."""
    return {
        name: sub for action in parser._actions if isinstance(action, argparse._SubParsersAction) for name, sub in action.choices.items()
    }


def test_the_docs_name_only_commands_that_exist():
    """The study map (docs/study.md) names a command for every step of the study, and it and the README's command
    table name only subcommands the console scripts have."""
    named: dict[str, set[tuple[str, str]]] = {}
    for doc in ("docs/study.md", "README.md"):
        named[doc] = set(re.findall(r"`(tace-(?:client|sim|server|analysis)) ([a-z-]+)", (ROOT / doc).read_text(encoding="utf-8")))
    steps = {("tace-sim", c) for c in ("cohort", "run", "demo")} | {("tace-server", c) for c in ("init", "start")}
    steps |= {("tace-client", c) for c in ("check", "preprocess", "features", "predict", "finetune", "start")}
    steps |= {("tace-analysis", c) for c in ("validate", "survival", "radiogenomics", "report")}
    assert steps <= named["docs/study.md"], steps - named["docs/study.md"]
    for doc, commands in named.items():
        for script, command in sorted(commands):
            assert command in subcommands(build_parser(script)), (doc, script, command)


#: Every console script and exactly its subcommands (`tace-server sites` has its own: add, list).
COMMANDS = {
    "tace-client": {"check", "preprocess", "import", "features", "predict", "finetune", "keygen", "start"},
    "tace-sim": {"cohort", "run", "demo"},
    "tace-server": {"init", "sites", "start", "status", "stop"},
    "tace-analysis": {"validate", "survival", "radiogenomics", "report"},
}


def test_each_script_has_exactly_its_commands():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert set(scripts) == set(COMMANDS)
    for script, commands in COMMANDS.items():
        parsers = subcommands(build_parser(script))
        assert set(parsers) == commands, script
        for name, sub in parsers.items():
            assert len(sub.format_help()) > 200, (script, name)  # says what it does and its options
    assert set(subcommands(subcommands(build_parser("tace-server"))["sites"])) == {"add", "list"}


@pytest.mark.parametrize("script", sorted(COMMANDS))
def test_help_and_version(script):
    """The installed script lists exactly its commands in --help, prints its version, and shows usage when bare."""
    exe = script_path(script)
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "TACE-FL" in out.stdout
    listed = re.findall(r"^    ([a-z-]+)(?: |$)", out.stdout.split("\ncommands:", 1)[1], flags=re.MULTILINE)
    assert sorted(listed) == sorted(COMMANDS[script])
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and script in version.stdout
    bare = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2 and "usage" in bare.stdout


def test_preprocess_cli(site_copy, tmp_path):
    manifest = site_copy("site-c")
    args = [
        script_path("tace-client"),
        "preprocess",
        "--manifest",
        str(manifest),
        "--cache",
        str(tmp_path / "cache"),
        "--box",
        "8,8,8",
        "--spacing",
        "8,8,8",
    ]
    first = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "8 computed, 0 already cached" in first.stdout and "(3, 8, 8, 8)" in first.stdout
    assert len(list((tmp_path / "cache").rglob("*.radiomics.npy"))) == 8  # the radiomics features are cached too
    second = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert "0 computed, 8 already cached" in second.stdout
    bad = subprocess.run([*args[:-4], "--box", "8,8"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "X,Y,Z" in bad.stderr
    (manifest.parent / "images/site-c-0002/arterial.nrrd").unlink()
    refused = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "Nothing was preprocessed" in refused.stderr and "row 3" in refused.stderr
