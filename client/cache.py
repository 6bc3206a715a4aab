"""The site's on-disk cache of preprocessed tensors, safe to share between processes.

An entry is keyed by the identity of every source file (resolved path, size, modification time; for a DICOM
folder, of each file in it) and by the preprocessing configuration, so a changed image or parameter misses the
cache and is recomputed. Entries are written to a temporary file and renamed into place, so a process never
reads a half-written entry even when several preprocess the same patient at once (Flower starts a fresh client
process for every round in deployment).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tace.common.errors import ImageReadError
from tace.common.imageio import data_files
from tace.common.manifest import PatientRecord
from tace.common.preprocess import PreprocessConfig, PreprocessInfo, preprocess_record, require_sequences


def source_identity(path: Path) -> list[object]:
    """What identifies a source's content cheaply: resolved path, size and mtime of every file holding its data
    (the header and its detached voxel file for .nhdr/.mhd; every file of a DICOM folder)."""
    path = path.resolve()
    if not path.exists():
        raise ImageReadError("missing-file", "file or folder not found", "check the path and that the export is complete")
    try:
        files = data_files(path)
        return [str(path)] + [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    except OSError:
        raise ImageReadError("unreadable", "a data file of this image cannot be read", "check the files and their permissions") from None


@dataclass(frozen=True)
class CacheResult:
    array: np.ndarray
    info: PreprocessInfo
    hit: bool


class PreprocessCache:
    """Preprocessed tensors of one site, under `root`, for one preprocessing configuration.

    Parameters
    ----------
    root : Path
        Cache folder on the site's disk (created if missing).
    config : PreprocessConfig
    """

    def __init__(self, root: Path | str, config: PreprocessConfig) -> None:
        self.root = Path(root)
        self.config = config
        self.root.mkdir(parents=True, exist_ok=True)
        self._fingerprint = config.fingerprint()

    def key(self, record: PatientRecord, manifest_root: Path) -> str:
        require_sequences(record, self.config)
        sources = {seq: source_identity(record.image_path(seq, manifest_root)) for seq in self.config.sequences}
        sources["mask"] = source_identity(record.mask_path(manifest_root))
        payload = json.dumps({"config": self._fingerprint, "sources": sources, "mask_label": record.mask_label}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def entry_path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def load(self, record: PatientRecord, manifest_root: Path) -> CacheResult:
        """Return the preprocessed tensor, from the cache when the entry is current, else computed and stored."""
        path = self.entry_path(self.key(record, manifest_root))
        cached = self._read(path)
        if cached is not None:
            return cached
        array, info = preprocess_record(record, manifest_root, self.config)
        self._write(path, array, info)
        return CacheResult(array, info, hit=False)

    def prepare(self, record: PatientRecord, manifest_root: Path) -> CacheResult:
        """Everything a study reads of the patient, in the cache: the tensor (`load`, returned) and the radiomics
        features (`radiomics`). What `tace-client preprocess` and the demo's preprocessing do per patient."""
        result = self.load(record, manifest_root)
        self.radiomics(record, manifest_root, result)
        return result

    def radiomics(self, record: PatientRecord, manifest_root: Path, loaded: CacheResult | None = None) -> np.ndarray:
        """The patient's radiomics features (`tace.common.radiomics.extract` on its box and tumour mask; NaN where the
        tumour gives none: a few voxels, or filling the box), computed once and kept beside its tensor. `loaded`:
        the patient's tensor as `load` just returned it (a freshly computed one carries its box mask)."""
        from tace.common.preprocess import box_mask
        from tace.common.radiomics import RadiomicsError, extract, feature_names

        path = self.entry_path(self.key(record, manifest_root)).with_suffix(".radiomics.npy")
        try:
            return np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)
        except (OSError, ValueError):
            pass
        loaded = loaded or self.load(record, manifest_root)
        image = loaded.array
        if loaded.info.tumour is not None and loaded.info.spacing_mm is not None:
            mask, spacing = loaded.info.tumour, loaded.info.spacing_mm
        else:
            mask, spacing = box_mask(record, manifest_root, self.config)
        try:
            features = extract(image, mask, spacing)
        except RadiomicsError:
            features = np.full(len(feature_names(len(self.config.sequences))), np.nan)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npy", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, features)
        os.replace(tmp, path)
        return features

    def _read(self, path: Path) -> CacheResult | None:
        try:
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as data:
                array = data["image"]
                meta = json.loads(str(data["meta"]))
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001 - any damaged entry (empty after a power loss, bit rot) is recomputed
            return None
        if array.shape != self.config.shape or not np.isfinite(array).all():
            return None
        ex, ey, ez = (float(v) for v in meta["tumour_extent_mm"])
        info = PreprocessInfo((ex, ey, ez), bool(meta["cropped"]), float(meta["scale"]))
        return CacheResult(array, info, hit=True)

    def _write(self, path: Path, array: np.ndarray, info: PreprocessInfo) -> None:
        if array.shape != self.config.shape or array.dtype != np.float32 or not np.isfinite(array).all():
            # Preprocessing refuses bad input before this point; this guards the cache's promise of valid tensors.
            raise ImageReadError("non-finite", f"preprocessing produced an invalid tensor ({array.shape}, {array.dtype})",
                                 "report this as a bug; nothing was written to the cache")  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"tumour_extent_mm": info.tumour_extent_mm, "cropped": info.cropped, "scale": info.scale})
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, image=array, meta=np.array(meta))
                fh.flush()
                os.fsync(fh.fileno())
            # mkstemp creates 0600; entries must be readable by every account sharing the cache (umask decides).
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
