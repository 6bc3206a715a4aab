"""`tace-client import`: a PACS-like tree (made with pydicom from the tiny cohort's volumes) becomes a site folder whose
tensors equal the NIfTI route's; every series is reported with its phase and why; nothing is guessed or leaked."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tace.client.cli import main as client
from tace.common.manifest import CLINICAL_COLUMNS, parse_manifest
from tace.common.preprocess import preprocess_record
from tace.simulation.pacs import uid
from tests.conftest import TINY_CONFIG
from tests.helpers import read_rows, tree_digest


def _clinical(tiny_cohort: Path, tiny_pacs, path: Path) -> Path:
    """The tiny site's clinical columns and labels, keyed by the export's PatientID (as a hospital's registry is)."""
    _, rows = read_rows(tiny_cohort / "sites" / "site-a" / "manifest.csv")
    by_id = {r["patient_id"]: r for r in rows}
    columns = ["split", *CLINICAL_COLUMNS, "response", "pfs_days", "pfs_event"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["PatientID", *columns])
        for p in tiny_pacs.patients:
            writer.writerow([p.dicom_patient_id, *(by_id[p.record_id][c] for c in columns)])
    return path


@pytest.fixture(scope="module")
def imported(tiny_cohort, tiny_pacs, tmp_path_factory):
    """The export imported twice (NIfTI, and --no-convert) with the clinical table joined; the exit statuses."""
    base = tmp_path_factory.mktemp("import")
    before = tree_digest(tiny_pacs.root)
    clinical = _clinical(tiny_cohort, tiny_pacs, base / "clinical.csv")
    codes = {}
    for name, extra in (("nifti", []), ("linked", ["--no-convert"])):
        codes[name] = client(["import", str(tiny_pacs.root), "--out", str(base / name), "--clinical", str(clinical), *extra])
    assert tree_digest(tiny_pacs.root) == before  # the export is never written to
    return base, codes


def _key(site: Path) -> dict[str, str]:
    with open(site / "pseudonyms.csv", newline="") as fh:
        return {r["PatientID"]: r["patient_id"] for r in csv.DictReader(fh)}


def test_imported_site_matches_the_nifti_route(imported, tiny_cohort, tiny_pacs):
    base, codes = imported
    site = base / "nifti"
    original = parse_manifest(tiny_cohort / "sites" / "site-a" / "manifest.csv")
    by_id = {r.patient_id: r for r in original.records}
    key = _key(site)
    # Every patient is complete but the one whose delayed phase was not exported: its cell is empty, never guessed.
    report = json.loads((site / "check-report.json").read_text())
    missing = [p for p in tiny_pacs.patients if p.missing]
    assert codes["nifti"] == 1 and [(p["kind"], p["column"]) for p in report["problems"]] == [("missing-value", "delayed_path")]
    parsed = parse_manifest(site / "manifest.csv")
    rows = {r.patient_id: r for r in parsed.records}
    assert set(rows) == {key[p.dicom_patient_id] for p in tiny_pacs.patients if not p.missing}
    for p in tiny_pacs.patients:
        if p.missing:
            continue
        record = rows[key[p.dicom_patient_id]]
        assert record.mask.endswith(".seg.dcm" if p.mask == "seg" else ".rtstruct.dcm")
        assert record.clinical == by_id[p.record_id].clinical and record.response == by_id[p.record_id].response
        # The images themselves: box-normalised (each voxel depends only on its phase's image and the tumour's box).
        boxed = replace(TINY_CONFIG, intensity_reference="box")
        got = preprocess_record(record, parsed.root, boxed)[0]
        expected = preprocess_record(by_id[p.record_id], original.root, boxed)[0]
        # Row 3's delayed phase was exported on its own grid: the other phases are the NIfTI route's exactly.
        channels = slice(0, 2) if p.record_id == original.records[2].patient_id else slice(None)
        np.testing.assert_allclose(got[channels], expected[channels], atol=1e-5)
        if channels.stop == 2:
            assert np.corrcoef(got[2].ravel(), expected[2].ravel())[0, 1] > 0.9  # the same anatomy, resampled
        # Against the liver the reference is the shell around the mask, which a SEG or RTSTRUCT gives within a voxel
        # of the NIfTI mask: the inputs agree to well under the contrasts the signs carry (tenths).
        liver_got = preprocess_record(record, parsed.root, TINY_CONFIG)[0]
        liver_expected = preprocess_record(by_id[p.record_id], original.root, TINY_CONFIG)[0]
        assert np.abs(liver_got[channels] - liver_expected[channels]).max() < 0.02
    assert missing and report["problems"][0]["row"] == 2 + sorted(key.values()).index(key[missing[0].dicom_patient_id])


def test_no_convert_links_the_series_and_gives_the_same_tensors(imported):
    base, codes = imported
    assert codes["linked"] == 1
    nifti, linked = parse_manifest(base / "nifti" / "manifest.csv"), parse_manifest(base / "linked" / "manifest.csv")
    assert all(Path(linked.root / r.images["arterial"]).is_dir() for r in linked.records)
    for a, b in zip(nifti.records, linked.records, strict=True):
        np.testing.assert_allclose(
            preprocess_record(a, nifti.root, TINY_CONFIG)[0], preprocess_record(b, linked.root, TINY_CONFIG)[0], atol=1e-5
        )


def test_report_lists_every_series_with_its_phase_and_reason(imported, tiny_pacs):
    base, _ = imported
    report = json.loads((base / "nifti" / "import-report.json").read_text())
    assert report["n_patients"] == len(tiny_pacs.patients) and report["n_series"] == tiny_pacs.n_series
    by_status: dict[str, list[dict]] = {}
    for s in report["series"]:
        by_status.setdefault(s["status"], []).append(s)
    assert {s["reason"].split(" (")[0] for s in by_status["ignored"] if "localiser" in s["reason"]} == {"a localiser"}
    assert sum("subtraction" in s["reason"] for s in by_status["ignored"]) == len(tiny_pacs.patients)
    dynamic = [s for s in report["series"] if s["volumes"] == 4]
    n_dynamic = sum(p.dynamic for p in tiny_pacs.patients)
    assert n_dynamic and len(dynamic) == 4 * n_dynamic
    assert [s["phase"] or "pre" for s in dynamic[:4]] == ["pre", "arterial", "portal_venous", "delayed"]
    assert "35 s after the contrast injection" in dynamic[1]["reason"]
    assert len(by_status["mask"]) == len(tiny_pacs.patients) and "ambiguous" not in by_status
    (incomplete,) = report["incomplete"]
    assert incomplete["problems"] == {"delayed_path": "missing: no series of the study fits this phase"}
    html = (base / "nifti" / "import-report.html").read_text()
    assert all(s["description"] in html for s in report["series"]) and incomplete["patient_id"] in html
    assert html.count("<tr class=") == len(report["series"])


def test_no_patient_id_leaves_the_key_file(imported, tiny_pacs):
    base, _ = imported
    for site in (base / "nifti", base / "linked"):
        text = "".join(f.read_text(errors="replace") for f in site.rglob("*") if f.is_file() and f.suffix in (".csv", ".json", ".html")
                       and f.name != "pseudonyms.csv")  # fmt: skip
        assert not any(p.dicom_patient_id in text for p in tiny_pacs.patients)
        assert set(_key(site)) == {p.dicom_patient_id for p in tiny_pacs.patients}
    nifti = base / "nifti" / "images"
    assert not any(p.dicom_patient_id.encode() in f.read_bytes() for f in nifti.rglob("*.nii.gz") for p in tiny_pacs.patients)


def _tree(tiny_pacs, tmp_path: Path, n: int = 2) -> Path:
    """A copy of the export's first `n` patients (to alter)."""
    root = tmp_path / "export"
    for p in tiny_pacs.patients[:n]:
        shutil.copytree(tiny_pacs.root / p.dicom_patient_id, root / p.dicom_patient_id)
    return root


def test_two_series_for_one_phase_are_listed_not_guessed(tiny_pacs, tmp_path, capsys):
    root = _tree(tiny_pacs, tmp_path, 2)
    patient = next(p for p in tiny_pacs.patients[:2] if not p.dynamic)
    files = [f for f in (root / patient.dicom_patient_id).rglob("*") if f.is_file()]
    arterial = [f for f in files if pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID == patient.phases["arterial"]]
    for f in arterial:  # a second arterial series (a repeat acquisition), its own UID
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SeriesNumber = uid(ds.SeriesInstanceUID, "repeat"), 99
        ds.SOPInstanceUID = uid(ds.SOPInstanceUID, "repeat")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(f.with_name(f.name + "r"))
    assert client(["import", str(root), "--out", str(tmp_path / "site")]) == 1
    out = capsys.readouterr()
    report = json.loads((tmp_path / "site" / "import-report.json").read_text())
    (p,) = [p for p in report["incomplete"] if "arterial_path" in p["problems"]]
    assert p["problems"]["arterial_path"].startswith("ambiguous: 2 volumes fit (series ")
    assert f"row {p['row']}: arterial_path ambiguous" in out.out
    assert patient.dicom_patient_id not in out.out + out.err


def test_rules_file_overrides_and_bad_rules_are_refused(tiny_pacs, tmp_path, capsys):
    root = _tree(tiny_pacs, tmp_path, 2)
    rules = tmp_path / "rules.toml"
    # No delay in the headers to go by: the dynamic series is named by its number of temporal phases instead.
    rules.write_text("[dynamic]\ndelay_s = {}\nby_count = { 4 = ['pre', 'delayed', 'portal_venous', 'arterial'] }\n")
    assert client(["import", str(root), "--out", str(tmp_path / "a"), "--rules", str(rules)]) == 1
    series = json.loads((tmp_path / "a" / "import-report.json").read_text())["series"]
    dynamic = [s for s in series if s["volumes"] == 4]
    assert dynamic and [s["phase"] for s in dynamic[1:4]] == ["delayed", "portal_venous", "arterial"]
    assert "by_count" in dynamic[1]["reason"]
    for text, message in (("[phases]\nliver = ['x']\n", "unknown phase"), ("[series]\nlocaliser = ['(']\n", "invalid regular expression"),
                          ("[colours]\n", "unknown table [colours]"), ("[dynamic]\nby_count = { 3 = ['venous'] }\n", "by_count may name only")):  # fmt: skip
        rules.write_text(text)
        assert client(["import", str(root), "--out", str(tmp_path / "b"), "--rules", str(rules)]) == 2
        assert message in capsys.readouterr().err


def test_refusals_name_what_to_do(tiny_pacs, tmp_path, capsys):
    root = _tree(tiny_pacs, tmp_path, 1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not DICOM")
    assert client(["import", str(tmp_path / "empty"), "--out", str(tmp_path / "s0")]) == 2
    assert "no DICOM series" in capsys.readouterr().err
    assert client(["import", str(root), "--out", str(root / "site")]) == 2
    assert "inside the DICOM export" in capsys.readouterr().err
    assert client(["import", str(root), "--out", str(tmp_path / "s1")]) == 1
    assert client(["import", str(root), "--out", str(tmp_path / "s1")]) == 2
    assert "--force" in capsys.readouterr().err
    bad = tmp_path / "clinical.csv"
    bad.write_text("PatientID,age,weight\nX,60,80\n")
    assert client(["import", str(root), "--out", str(tmp_path / "s2"), "--clinical", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown column(s) 'weight'" in err and "tumour_number" in err and "Traceback" not in err
    # The pseudonym key of an earlier import is kept: the same patient gets the same patient_id again.
    first = _key(tmp_path / "s1")
    assert client(["import", str(root), "--out", str(tmp_path / "s1"), "--force"]) == 1
    assert _key(tmp_path / "s1") == first


def test_documented_default_rules_are_the_defaults(tmp_path):
    import tomllib

    from tace.client.phaserules import DEFAULT_RULES, load_rules

    doc = (Path(__file__).resolve().parents[1] / "docs" / "manifest.md").read_text(encoding="utf-8")
    block = doc.split("The defaults:", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    assert tomllib.loads(block) == tomllib.loads(DEFAULT_RULES)
    example = tmp_path / "rules.toml"
    example.write_text(doc.split("the later kept) writes:", 1)[1].split("```toml", 1)[1].split("```", 1)[0])
    rules = load_rules(example)
    assert rules.by_count[5] == ("pre", "skip", "arterial", "portal_venous", "delayed") and rules.first_match(
        rules.phases["delayed"], "t1_late_hbp"
    )


def test_dicom_phases_from_another_patient_or_examination_are_refused(imported, tmp_path):
    """The linked (--no-convert) site keeps DICOM headers: a phase of another patient, or of another frame of
    reference, is refused even where the grids would do."""
    from tace.common.validate import check_site
    from tests.helpers import set_cell

    base, _ = imported
    site = tmp_path / "site"
    shutil.copytree(base / "linked", site, symlinks=False)  # real copies of the linked files, to alter
    manifest = site / "manifest.csv"
    parsed = parse_manifest(manifest)
    first, second = parsed.records[0], parsed.records[1]
    set_cell(manifest, 0, "delayed_path", second.images["delayed"])
    problems = [(p.kind, p.row, p.column) for p in check_site(manifest).problems]
    assert ("other-patient", 2, "delayed_path") in problems
    set_cell(manifest, 0, "delayed_path", first.images["delayed"])
    for f in (site / first.images["delayed"]).iterdir():
        ds = pydicom.dcmread(f)
        ds.FrameOfReferenceUID = uid("another examination")
        ds.save_as(f)
    (p,) = [p for p in check_site(manifest).problems if p.row == 2]
    assert (p.kind, p.column) == ("frame-of-reference", "delayed_path") and "same session" in p.message


def test_a_series_missing_a_slice_is_refused_not_converted(tiny_pacs, tmp_path, capsys):
    root = _tree(tiny_pacs, tmp_path, 2)
    patient = next(p for p in tiny_pacs.patients[:2] if not p.dynamic)
    files = sorted(f for f in (root / patient.dicom_patient_id).rglob("*") if f.is_file())
    pv = [f for f in files if pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID == patient.phases["portal_venous"]]
    pv[len(pv) // 2].unlink()
    assert client(["import", str(root), "--out", str(tmp_path / "site")]) == 1
    report = json.loads((tmp_path / "site" / "import-report.json").read_text())
    (p,) = [p for p in report["incomplete"] if "portal_venous_path" in p["problems"]]
    assert "unevenly spaced" in p["problems"]["portal_venous_path"] and "portal_venous_path" not in p["paths"]
    assert "portal_venous_path refused" in capsys.readouterr().out


def test_dynamic_series_without_temporal_positions_is_split_by_acquisition_time(tiny_pacs, tmp_path):
    """Some scanners give each temporal phase only its own AcquisitionTime, repeating the slice positions."""
    assert tiny_pacs.patients[0].dynamic
    root = _tree(tiny_pacs, tmp_path, 1)
    patient = tiny_pacs.patients[0]
    for f in (f for f in (root / patient.dicom_patient_id).rglob("*") if f.is_file()):
        ds = pydicom.dcmread(f)
        if "TemporalPositionIdentifier" in ds:
            del ds.TemporalPositionIdentifier, ds.NumberOfTemporalPositions
            ds.save_as(f)
    assert client(["import", str(root), "--out", str(tmp_path / "site")]) == 1
    series = json.loads((tmp_path / "site" / "import-report.json").read_text())["series"]
    dynamic = [s for s in series if s["volumes"] == 4]
    assert [s["phase"] for s in dynamic] == ["", "arterial", "portal_venous", "delayed"]
    assert all("35 s" in s["reason"] for s in dynamic if s["phase"] == "arterial")


def test_a_dwi_series_with_several_b_values_is_listed_not_picked(tiny_pacs, tmp_path):
    """Several volumes in one DWI series (b-values): which one is meant is not known, so dwi_path stays empty."""
    root = _tree(tiny_pacs, tmp_path, 2)
    patient = tiny_pacs.patients[1]
    files = sorted(f for f in (root / patient.dicom_patient_id).rglob("*") if f.is_file())
    dwi = [f for f in files if "DIFFUSION" in pydicom.dcmread(f, stop_before_pixels=True).get("ImageType", [])]
    for f in dwi:  # a second b-value: the same positions acquired again a minute later
        ds = pydicom.dcmread(f)
        ds.SOPInstanceUID = uid(ds.SOPInstanceUID, "b800")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AcquisitionTime = "1300" + str(ds.AcquisitionTime)[4:]
        ds.save_as(f.with_name(f.name + "b"))
    assert client(["import", str(root), "--out", str(tmp_path / "site")]) == 1
    report = json.loads((tmp_path / "site" / "import-report.json").read_text())
    (p,) = [p for p in report["incomplete"] if "dwi_path" in p["problems"]]
    assert p["problems"]["dwi_path"].startswith("ambiguous: 2 volumes fit") and "dwi_path" not in p["paths"]
