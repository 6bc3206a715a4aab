"""Run a finished run's models on a cohort's images: per-patient deep features and the three models' scores.

Used for radiogenomics (`tace-client features`, called by `tace-analysis radiogenomics`): the cohort's images
are read where they are, preprocessed exactly as in the run, and the output (one row per patient) stays in the
folder the user names. Nothing here needs a response label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from tace.client.cache import PreprocessCache
from tace.client.data import SiteDataset
from tace.common.artifact import locate, read_model
from tace.common.clinical import FEATURES, ClinicalEncoder
from tace.common.errors import ManifestError, TaceError
from tace.common.manifest import Manifest, PatientRecord, parse_manifest
from tace.common.models import StudyModels
from tace.common.preprocess import PreprocessConfig
from tace.common.training import predict_images, predict_tabular, select_device
from tace.common.validate import check_site


@dataclass
class TrainedModels:
    """A finished run's models with everything needed to apply them: preprocessing, clinical standardisation and
    the cut-offs fixed on the training sites (read from the run's exported model file, `tace.common.artifact`)."""

    models: StudyModels
    encoder: ClinicalEncoder
    preprocess: PreprocessConfig
    path: Path
    cutoffs: dict[str, Any] = field(default_factory=dict)
    bins: int = 100_000
    backbone: str = "small"
    version: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    privacy: dict[str, Any] = field(default_factory=dict)
    cutoffs_note: str = ""

    @classmethod
    def load(cls, path: Path | str) -> TrainedModels:
        """From a model file (tace-model.zip) or a finished run folder; an incompatible file is a clear error."""
        art = read_model(path)
        models = StudyModels.build(art.backbone, len(art.preprocess.sequences), len(FEATURES))
        models.load(art.arrays)
        return cls(models, ClinicalEncoder.from_dict(art.encoder), art.preprocess, locate(path), art.cutoffs, art.bins, art.backbone,
                   art.version, art.training, art.source, art.privacy, art.cutoffs_note)  # fmt: skip

    def extract(
        self,
        manifest: Path | str,
        cache_dir: Path | str,
        device: str = "auto",
        batch_size: int = 16,
        validate: bool = True,
        patients: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """Per-patient scores and deep features of every patient in `manifest`, in manifest order.

        With `validate` (default) the manifest and every image header are checked first (`tace-client check`);
        any problem raises `ManifestError` listing them all.

        Returns
        -------
        DataFrame with ``patient_id``, ``dltrmlp``, ``dltr``, ``clinical`` (probabilities of objective response)
        and ``feature_000 ... feature_{F-1}`` (DLTR's deep features, before its dropout and linear head).
        """
        parsed, records = manifest_records(manifest, validate, patients)
        return self.score(records, parsed.root, cache_dir, device, batch_size)

    def score(
        self, records: list[PatientRecord], root: Path, cache_dir: Path | str, device: str = "auto", batch_size: int = 16
    ) -> pd.DataFrame:
        """`extract` for records already read from a manifest in folder `root` (and checked)."""
        dev = select_device(device)
        cache = PreprocessCache(cache_dir, self.preprocess)
        dataset = SiteDataset(records, root, cache)
        probs, feats = predict_images(self.models.dltr, _Progress(dataset), batch_size=batch_size, device=dev)
        clinical = torch.from_numpy(self.encoder.encode(records))
        table: dict[str, Any] = {
            "patient_id": [r.patient_id for r in records],
            "dltrmlp": predict_tabular(self.models.head, [torch.from_numpy(feats), clinical], dev),
            "dltr": probs,
            "clinical": predict_tabular(self.models.clinical, [clinical], dev),
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
