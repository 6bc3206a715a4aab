"""Apply a study's exported model (`tace.common.artifact.TrainedModels`) to a cohort's images: per-patient deep
features and the three models' scores.

Used for radiogenomics (`tace-client features`, called by `tace-analysis radiogenomics`): the cohort's images
are read where they are, preprocessed exactly as in the run, and the output (one row per patient) stays in the
folder the user names. Nothing here needs a response label.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from tace.client.cache import PreprocessCache
from tace.client.data import SiteDataset
from tace.common.artifact import TrainedModels
from tace.common.errors import ManifestError, TaceError
from tace.common.manifest import Manifest, PatientRecord, parse_manifest
from tace.common.radiomics import feature_names, model_inputs
from tace.common.training import predict_images, predict_tabular, select_device
from tace.common.validate import check_site


def extract_features(
    trained: TrainedModels, manifest: Path | str, cache_dir: Path | str, device: str = "auto", validate: bool = True,
    patients: Sequence[str] | None = None,
) -> pd.DataFrame:  # fmt: skip
    """Per-patient scores and deep features of every patient in `manifest`, in manifest order.

    With `validate` (default) the manifest and every image header are checked first (`tace-client check`);
    any problem raises `ManifestError` listing them all.

    Returns
    -------
    DataFrame with ``patient_id``, ``dltrmlp``, ``dltr``, ``radiomics``, ``clinical`` (probabilities of objective response)
    and ``feature_000 ... feature_{F-1}`` (DLTR's deep features, before its dropout and linear head).
    """
    parsed, records = manifest_records(manifest, validate, patients)
    return score_patients(trained, records, parsed.root, cache_dir, device)


def score_patients(
    trained: TrainedModels, records: list[PatientRecord], root: Path, cache_dir: Path | str, device: str = "auto", batch_size: int = 16
) -> pd.DataFrame:
    """`extract_features` for records already read from a manifest in folder `root` (and checked)."""
    dev = select_device(device)
    cache = PreprocessCache(cache_dir, trained.preprocess)
    dataset = SiteDataset(records, root, cache)
    probs, feats = predict_images(trained.models.dltr, _Progress(dataset), batch_size=batch_size, device=dev)
    clinical = torch.from_numpy(trained.encoder.clinical.encode(records))
    channels = len(trained.preprocess.sequences)
    full = np.array([cache.radiomics(r, root) for r in records]).reshape(len(records), len(feature_names(channels)))
    radiomics = torch.from_numpy(trained.encoder.radiomics.encode(model_inputs(full, channels)))
    table: dict[str, Any] = {
        "patient_id": [r.patient_id for r in records],
        "dltrmlp": predict_tabular(trained.models.head, [torch.from_numpy(feats), clinical, radiomics], dev),
        "dltr": probs,
        "radiomics": predict_tabular(trained.models.radiomics, [radiomics], dev),
        "clinical": predict_tabular(trained.models.clinical, [clinical], dev),
    }
    table.update({f"feature_{j:03d}": feats[:, j] for j in range(feats.shape[1])})
    frame = pd.DataFrame(table)
    _check_finite(frame)
    return frame


def manifest_records(
    manifest: Path | str, validate: bool = True, patients: Sequence[str] | None = None
) -> tuple[Manifest, list[PatientRecord]]:
    """The parsed manifest and its records (of `patients` only, when given). With `validate`, the manifest and every
    image header are checked first (`tace-client check`): any problem raises `ManifestError` listing them all."""
    manifest = Path(manifest)
    parsed = parse_manifest(manifest)
    problems = check_site(parsed).problems if validate else list(parsed.problems)
    if problems:
        raise ManifestError(problems, str(manifest))
    records = select(parsed.records, patients, manifest)
    if not records:
        raise TaceError(f"{manifest} lists no patients", "add the patients to the manifest")
    return parsed, records


def select(records: list[PatientRecord], patients: Sequence[str] | None, manifest: Path) -> list[PatientRecord]:
    """The manifest's records of `patients` (all when None), in manifest order; unknown ids are an error."""
    if patients is None:
        return records
    known = {r.patient_id for r in records}
    missing = [p for p in patients if p not in known]
    if missing:
        raise TaceError(f"{len(missing)} patient id(s) given are not in {manifest}: {', '.join(missing[:5])}",
                        "check the ids against the manifest's patient_id column")  # fmt: skip
    wanted = set(patients)
    return [r for r in records if r.patient_id in wanted]


class _Progress(torch.utils.data.Dataset[dict[str, Any]]):
    """The dataset with a progress bar over the patients (preprocessing is the slow part on first use)."""

    def __init__(self, dataset: SiteDataset) -> None:
        from tqdm import tqdm

        self.dataset = dataset
        self.bar = tqdm(total=len(dataset), desc="features", unit="patient", disable=None, dynamic_ncols=True)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        self.bar.update(1)
        if self.bar.n >= len(self.dataset):
            self.bar.close()
        return item


def write_features(table: pd.DataFrame, out: Path | str) -> Path:
    """Write the features table as CSV (atomically: a half-written file never replaces a good one)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    table.to_csv(tmp, index=False, float_format="%.7g")
    tmp.replace(out)
    return out


def _check_finite(table: pd.DataFrame) -> None:
    values = table.drop(columns="patient_id").to_numpy(dtype=float)
    bad = int((~np.isfinite(values)).any(axis=1).sum())
    if bad:
        raise TaceError(
            f"the model gave non-finite outputs for {bad} patient(s)", "check those patients' images with `tace-client check --deep`"
        )
