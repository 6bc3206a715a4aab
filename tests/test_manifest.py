"""Schema validation of site manifests: every bad-input kind gets a located, actionable message."""

from __future__ import annotations

from pathlib import Path

import pytest

from tace.common.manifest import COLUMNS, check_relative_path, parse_manifest
from tests.helpers import read_rows, set_cell, write_rows


def kinds(manifest: Path) -> list[tuple[str, int | None, str | None]]:
    return [(p.kind, p.row, p.column) for p in parse_manifest(manifest).problems]


def test_generated_manifest_is_clean(site_copy):
    m = parse_manifest(site_copy())
    assert m.problems == []
    assert len(m.records) == m.n_rows == 8
    r = m.records[0]
    assert r.row == 2 and set(r.images) == {"arterial", "portal_venous", "delayed"}
    assert r.response in (0, 1) and r.pfs_event in (0, 1)


@pytest.mark.parametrize(
    ("column", "value", "kind", "words"),
    [
        ("age", "999", "out-of-range", "out of range"),
        ("age", "sixty", "wrong-type", "must be a number"),
        ("afp_ng_ml", "-3", "out-of-range", "out of range"),
        ("afp_ng_ml", "inf", "wrong-type", "finite"),
        ("sex", "male", "unknown-category", "allowed categories"),
        ("bclc_stage", "b", "unknown-category", "case-sensitive"),
        ("tumour_number", "4", "unknown-category", "allowed categories"),
        ("split", "training", "unknown-category", "allowed categories"),
        ("response", "2", "unknown-category", "allowed categories"),
        ("patient_id", "Jane Doe", "bad-id", "1-64 characters"),
        ("age", "", "missing-value", "required"),
        ("arterial_path", "../other-site/a.nii.gz", "path-escapes", "outside the manifest's folder"),
        ("mask_path", "/data/mask.nii.gz", "absolute-path", "absolute path"),
        ("delayed_path", "C:\\scans\\d.nii", "absolute-path", "absolute path"),
    ],
)
def test_bad_cell_is_reported_with_row_and_column(site_copy, column, value, kind, words):
    manifest = site_copy()
    row = set_cell(manifest, 3, column, value)
    problems = parse_manifest(manifest).problems
    assert [(p.kind, p.row, p.column) for p in problems] == [(kind, row, column)]
    text = problems[0].format()
    assert words in text
    assert problems[0].hint  # every problem says what to do
    if kind not in ("path-escapes", "absolute-path") and len(value) >= 3:
        assert value not in text.replace(column, "")  # patient values never appear in messages


def test_allowed_values_are_listed(site_copy):
    manifest = site_copy()
    set_cell(manifest, 0, "child_pugh", "C")
    (p,) = parse_manifest(manifest).problems
    assert "'A', 'B'" in p.hint


def test_duplicate_patient_id_names_first_row(site_copy):
    manifest = site_copy()
    header, rows = read_rows(manifest)
    rows[5]["patient_id"] = rows[1]["patient_id"]
    write_rows(manifest, header, rows)
    (p,) = parse_manifest(manifest).problems
    assert (p.kind, p.row, p.column) == ("duplicate-id", 7, "patient_id")
    assert "row 3" in p.message


def test_unknown_and_missing_columns(site_copy):
    manifest = site_copy()
    header, rows = read_rows(manifest)
    for r in rows:
        r["tumor_diameter_mm"] = r.pop("tumour_diameter_mm")
        r.pop("sex")
    header = [("tumor_diameter_mm" if h == "tumour_diameter_mm" else h) for h in header if h != "sex"]
    write_rows(manifest, header, rows)
    problems = parse_manifest(manifest).problems
    found = {(p.kind, p.column) for p in problems}
    assert ("unknown-column", "tumor_diameter_mm") in found
    assert ("missing-column", "sex") in found
    assert ("missing-column", "tumour_diameter_mm") in found
    unknown = next(p for p in problems if p.kind == "unknown-column")
    assert "did you mean tumour_diameter_mm" in unknown.hint and "valid columns:" in unknown.hint
    assert all(p.row == 1 for p in problems)
    assert parse_manifest(manifest).records == []  # nothing usable without the required columns


def test_every_problem_is_reported_not_just_the_first(site_copy):
    manifest = site_copy()
    set_cell(manifest, 0, "age", "abc")
    set_cell(manifest, 2, "sex", "X")
    set_cell(manifest, 2, "albi_grade", "7")
    set_cell(manifest, 6, "pfs_days", "")
    found = kinds(manifest)
    assert found == [
        ("wrong-type", 2, "age"),
        ("unknown-category", 4, "sex"),
        ("unknown-category", 4, "albi_grade"),
        ("incomplete-survival", 8, "pfs_event"),
    ]
    assert len(parse_manifest(manifest).records) == 5


def test_wrong_field_count(site_copy):
    manifest = site_copy()
    lines = manifest.read_text().splitlines()
    lines[2] = lines[2] + ",extra"
    manifest.write_text("\n".join(lines) + "\n")
    assert kinds(manifest) == [("wrong-field-count", 3, None)]


def test_optional_values_may_be_missing_and_na_tokens(site_copy):
    manifest = site_copy()
    for col in ("afp_ng_ml", "tumour_diameter_mm", "child_pugh", "albi_grade", "portal_vein_invasion", "tace_type", "response"):
        set_cell(manifest, 0, col, "NA")
    set_cell(manifest, 1, "pfs_days", "")
    set_cell(manifest, 1, "pfs_event", "n/a")
    m = parse_manifest(manifest)
    assert m.problems == []
    assert m.records[0].clinical["afp_ng_ml"] is None and m.records[0].response is None
    assert m.records[1].pfs_days is None and m.records[1].pfs_event is None


def test_unlabeled_manifest_without_outcome_columns(site_copy):
    manifest = site_copy()
    header, rows = read_rows(manifest)
    drop = ("response", "pfs_days", "pfs_event")
    write_rows(manifest, [h for h in header if h not in drop], [{k: v for k, v in r.items() if k not in drop} for r in rows])
    m = parse_manifest(manifest)
    assert m.problems == [] and not m.labelled
    assert all(r.response is None for r in m.records)


def test_semicolon_csv_and_excel_bom_are_read(site_copy):
    manifest = site_copy()
    text = manifest.read_text().replace(",", ";")
    manifest.write_bytes("\ufeff".encode() + text.encode())
    m = parse_manifest(manifest)
    assert m.problems == [] and len(m.records) == 8


@pytest.mark.parametrize(
    ("content", "kind"),
    [(b"", "empty-manifest"), (",".join(c.name for c in COLUMNS).encode() + b"\n", "empty-manifest"), (b"\xff\xfe\x00a", "bad-encoding")],
)
def test_unusable_manifest_files(tmp_path, content, kind):
    path = tmp_path / "manifest.csv"
    path.write_bytes(content)
    assert [p.kind for p in parse_manifest(path).problems] == [kind]


def test_missing_manifest(tmp_path):
    (p,) = parse_manifest(tmp_path / "nope.csv").problems
    assert p.kind == "missing-file" and "--manifest" in p.hint


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a/b.nii", None),
        ("./a/../b.nii", None),
        ("../b.nii", "path-escapes"),
        ("a/../../b", "path-escapes"),
        ("/abs/b", "absolute-path"),
        ("a\\..\\..\\b", "path-escapes"),
    ],
)
def test_relative_path_rule(path, expected):
    assert check_relative_path(path) == expected


def test_excel_trailing_empty_columns_are_ignored_but_unnamed_values_are_not(site_copy):
    manifest = site_copy()
    lines = manifest.read_text().splitlines()
    manifest.write_text("\r\n".join(line + ",," for line in lines) + "\r\n")
    m = parse_manifest(manifest)
    assert m.problems == [] and len(m.records) == 8
    lines[3] = lines[3] + ",note"
    manifest.write_text("\n".join(line + ("" if i == 3 else ",") for i, line in enumerate(lines)) + "\n")
    (p,) = parse_manifest(manifest).problems
    assert (p.kind, p.row, p.column) == ("unknown-column", 1, "(unnamed)")
