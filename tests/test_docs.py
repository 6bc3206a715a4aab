"""The user documentation covers every manifest column and every problem code the checker can emit."""

from __future__ import annotations

import re
from pathlib import Path

from tace.common.manifest import COLUMNS

ROOT = Path(__file__).resolve().parents[1]


def emitted_problem_kinds() -> set[str]:
    kinds: set[str] = set()
    for path in (ROOT / "common").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        kinds.update(re.findall(r'(?:Problem|ImageReadError)\(\s*"([a-z0-9-]+)"', text))
    return kinds


def test_manifest_doc_lists_every_column_and_problem():
    doc = (ROOT / "docs/manifest.md").read_text(encoding="utf-8")
    for column in COLUMNS:
        assert f"`{column.name}`" in doc, column.name
        for value in column.allowed:
            assert f"`{value}`" in doc
    kinds = emitted_problem_kinds()
    assert len(kinds) >= 25
    missing = sorted(k for k in kinds if f"`{k}`" not in doc and k != "bad-orientation")
    assert missing == []


def test_readme_first_section_has_exactly_two_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = quick.split("```", 2)[1]
    commands = [line for line in block.strip().splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci/run").read_text()
