"""The four console scripts exist, say what they do, and expose only the commands that exist."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def script_path(name: str) -> str:
    """The console script installed beside this interpreter (the venv need not be on PATH)."""
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is not installed next to {sys.executable}"
    return str(path)


@pytest.mark.parametrize(
    ("script", "commands"),
    [
        ("tace-client", ["check", "preprocess", "features", "keygen", "start"]),
        ("tace-sim", ["cohort", "demo", "run"]),
        ("tace-server", ["init", "sites", "start", "status", "stop"]),
        ("tace-analysis", []),
    ],
)
def test_help_and_version(script, commands):
    exe = script_path(script)
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "TACE-FL" in out.stdout
    for c in commands:
        assert c in out.stdout
        sub = subprocess.run([exe, c, "--help"], capture_output=True, text=True, timeout=60)
        assert sub.returncode == 0 and len(sub.stdout) > 200
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
    second = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert "0 computed, 8 already cached" in second.stdout
    bad = subprocess.run([*args[:-4], "--box", "8,8"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "X,Y,Z" in bad.stderr
    (manifest.parent / "images/site-c-0002/arterial.nrrd").unlink()
    refused = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "Nothing was preprocessed" in refused.stderr and "row 3" in refused.stderr
