"""Test helpers: editing manifests and hashing folders."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def write_rows(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def set_cell(path: Path, index: int, column: str, value: str) -> int:
    """Set one cell (0-based data row `index`); return the spreadsheet row number the checker reports (index + 2)."""
    header, rows = read_rows(path)
    rows[index][column] = value
    write_rows(path, header, rows)
    return index + 2


def tree_digest(folder: Path) -> str:
    """A digest of every file's relative path, bytes and mtime under `folder` (to prove nothing was modified)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
        h.update(str(f.stat().st_mtime_ns).encode())
    return h.hexdigest()


def final_weights(run_dir: Path) -> dict:
    """A run's kept weights of every stage, keyed ``<stage>.<name>`` (to compare two runs exactly)."""
    import numpy as np

    out = {}
    for stage in ("dltr", "head", "clinical", "radiomics"):
        with np.load(run_dir / "checkpoints" / stage / "best.npz") as z:
            out.update({f"{stage}.{k}": z[k] for k in z.files})
    return out


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    """A run's metrics.csv, one dict per row."""
    with open(run_dir / "metrics.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def render_report(run_dir: Path, tmp_path: Path) -> str:
    """`tace-analysis report` on a copy of a run folder (it writes analysis and figures into it); the HTML."""
    import shutil

    from tace.analysis.cli import main as analysis_main

    run = tmp_path / "report-run"
    shutil.copytree(run_dir, run)
    assert analysis_main(["report", str(run)]) == 0
    return (run / "report.html").read_text(encoding="utf-8")


def pdf_page_images(data: bytes) -> list[set[int]]:
    """Per page of a PDF that Chromium printed (no object streams), the image objects the page draws, found through
    its resources and those of the form objects it uses. An image cut by a page break is drawn on both pages."""
    import re

    objs = {int(m.group(1)): m.group(2) for m in re.finditer(rb"(\d+) 0 obj\s*(.*?)endobj", data, re.S)}

    def images(body: bytes, seen: set[int]) -> set[int]:
        out: set[int] = set()
        found = re.search(rb"/XObject\s*<<(.*?)>>", body, re.S)
        for n in (int(x) for x in re.findall(rb"(\d+) 0 R", found.group(1))) if found else ():
            if n not in seen:
                seen.add(n)
                out |= {n} if re.search(rb"/Subtype\s*/Image", objs[n]) else images(objs[n], seen)
        return out

    def pages(n: int) -> list[int]:
        if not re.search(rb"/Type\s*/Pages\b", objs[n]):
            return [n]
        kids = re.search(rb"/Kids\s*\[([^\]]*)\]", objs[n])
        return [p for k in re.findall(rb"(\d+) 0 R", kids.group(1) if kids else b"") for p in pages(int(k))]

    root = next(k for k, v in objs.items() if re.search(rb"/Type\s*/Pages\b", v) and b"/Parent" not in v)
    return [images(objs[p], set()) for p in pages(root)]
