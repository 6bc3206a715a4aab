"""The standardisation of the models' tabular inputs, fixed once per study: clinical factors and radiomics features.

A training site sends `SiteStatistics` (counts and sums over its training split, nothing per patient); the
coordinator merges every site's into one `Encoders` that every site, every stage and the exported model use. Under
differential privacy no statistics leave the sites: the clinical encoder uses reference values and the radiomics
features only their fixed signed-log compression (`Encoders.reference`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tace.common.clinical import ClinicalEncoder, ClinicalStats
from tace.common.radiomics import MODEL_FAMILIES, MODEL_FEATURES_VERSION


@dataclass
class RadiomicsStats:
    """Sums over a site's training patients of each (signed-log) model feature and of its square, and the count of
    patients with features (aggregates only: they merge across sites into one standardisation)."""

    n: int
    sums: np.ndarray
    sumsq: np.ndarray

    @classmethod
    def from_matrix(cls, features: np.ndarray, min_cell_count: int = 0) -> RadiomicsStats:
        """From the ``(N, R)`` signed-log features of N patients (rows with a non-finite value are left out). With a
        minimum cell count k > 1, sums over fewer than k patients are not sent (the statistics of none: the other
        sites' standardise the features, or none at all)."""
        ok = np.isfinite(features).all(axis=1)
        x = features[ok].astype(np.float64)
        if min_cell_count > 1 and 0 < len(x) < min_cell_count:
            x = x[:0]
        return cls(len(x), x.sum(axis=0), (x * x).sum(axis=0))

    def merge(self, other: RadiomicsStats) -> RadiomicsStats:
        return RadiomicsStats(self.n + other.n, self.sums + other.sums, self.sumsq + other.sumsq)

    def to_flat(self) -> dict[str, float | list[float]]:
        return {
            "radiomics.n": float(self.n),
            "radiomics.sum": [float(v) for v in self.sums],
            "radiomics.sumsq": [float(v) for v in self.sumsq],
        }

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RadiomicsStats | None:
        """The statistics in a flat mapping (None when it holds none)."""
        if "radiomics.n" not in flat:
            return None
        sums, sumsq = np.asarray(flat["radiomics.sum"], dtype=np.float64), np.asarray(flat["radiomics.sumsq"], dtype=np.float64)
        if sums.shape != sumsq.shape or sums.ndim != 1:
            raise ValueError("radiomics sums and sums of squares differ in length")
        return cls(int(float(flat["radiomics.n"])), sums, sumsq)


@dataclass(frozen=True)
class RadiomicsEncoder:
    """Standardisation of the signed-log model features (mean, SD per feature); a patient whose features could not
    be computed (`RadiomicsError`: a tumour of a few voxels, one filling the box) sits at the mean."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_stats(cls, stats: RadiomicsStats) -> RadiomicsEncoder:
        if stats.n < 2:
            raise ValueError("radiomics statistics of fewer than two patients")
        mean = stats.sums / stats.n
        var = np.maximum(stats.sumsq / stats.n - mean * mean, 0.0)
        std = np.sqrt(var)
        return cls(tuple(float(v) for v in mean), tuple(float(s) if s > 1e-8 else 1.0 for s in std))

    @classmethod
    def unit(cls, n_features: int) -> RadiomicsEncoder:
        """No standardisation beyond the signed log: when no statistics may leave the sites (differential privacy)."""
        return cls((0.0,) * n_features, (1.0,) * n_features)

    def encode(self, features: np.ndarray) -> np.ndarray:
        """Standardised ``(N, R)`` float32 matrix, clipped to +-5 SD; non-finite rows at the mean (0)."""
        z = (np.asarray(features, dtype=np.float64) - np.array(self.mean)) / np.array(self.std)
        z = np.where(np.isfinite(features).all(axis=1, keepdims=True), z, 0.0)
        return np.clip(z, -5.0, 5.0).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"version": MODEL_FEATURES_VERSION, "families": list(MODEL_FAMILIES), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RadiomicsEncoder:
        return cls(tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))


@dataclass(frozen=True)
class SiteStatistics:
    """What a training site sends for the encoders: its clinical and radiomics statistics (aggregates only)."""

    clinical: ClinicalStats
    radiomics: RadiomicsStats | None = None

    def to_flat(self) -> dict[str, float | list[float]]:
        """One flat mapping of numbers and lists of numbers (a Flower MetricRecord)."""
        return {**self.clinical.to_flat(), **(self.radiomics.to_flat() if self.radiomics else {})}

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> SiteStatistics:
        return cls(ClinicalStats.from_flat(flat), RadiomicsStats.from_flat(flat))


@dataclass(frozen=True)
class Encoders:
    """The clinical and the radiomics standardisation of one study."""

    clinical: ClinicalEncoder
    radiomics: RadiomicsEncoder

    @classmethod
    def from_statistics(cls, stats: Iterable[SiteStatistics], n_radiomics: int) -> Encoders:
        """Merged in the order given (float sums depend on it): the coordinator passes the sites in site order."""
        clinical, radiomics = ClinicalStats(), RadiomicsStats(0, np.zeros(n_radiomics), np.zeros(n_radiomics))
        for s in stats:
            clinical = clinical.merge(s.clinical)
            if s.radiomics is not None:
                if s.radiomics.sums.shape != (n_radiomics,):
                    raise ValueError(f"radiomics statistics of {len(s.radiomics.sums)} features, expected {n_radiomics}")
                radiomics = radiomics.merge(s.radiomics)
        encoder = RadiomicsEncoder.from_stats(radiomics) if radiomics.n >= 2 else RadiomicsEncoder.unit(n_radiomics)
        return cls(ClinicalEncoder.from_stats(clinical), encoder)

    @classmethod
    def reference(cls, n_radiomics: int) -> Encoders:
        """From no site's data (differential privacy): `ClinicalEncoder.reference` and `RadiomicsEncoder.unit`."""
        return cls(ClinicalEncoder.reference(), RadiomicsEncoder.unit(n_radiomics))

    def to_dict(self) -> dict[str, Any]:
        return {"clinical": self.clinical.to_dict(), "radiomics": self.radiomics.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Encoders:
        return cls(ClinicalEncoder.from_dict(d["clinical"]), RadiomicsEncoder.from_dict(d["radiomics"]))
