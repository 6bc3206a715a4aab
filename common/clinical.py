"""Clinical factors as model input: site statistics (mergeable across sites), imputation and standardisation.

A site computes `ClinicalStats` on its training split only: per numeric factor the count, sum and sum of squares
of observed values, per categorical factor the count of each category and of missing values. Sites' statistics
add up; from the pooled statistics the server derives one `ClinicalEncoder` (impute numeric factors with the
pooled mean and categorical ones with the pooled mode, then z-score every encoded column) that every site uses.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tace.common.manifest import PatientRecord

#: Numeric factors and the transform applied before statistics (AFP and diameter are log-normal).
NUMERIC: dict[str, str] = {"age": "identity", "afp_ng_ml": "log10p1", "tumour_diameter_mm": "log"}
#: Categorical factors: every category, the first being the reference level (not encoded).
CATEGORICAL: dict[str, tuple[str, ...]] = {
    "sex": ("F", "M"),
    "tumour_number": ("1", "2-3", ">3"),
    "child_pugh": ("A", "B"),
    "bclc_stage": ("A", "0", "B", "C"),
    "albi_grade": ("1", "2", "3"),
    "portal_vein_invasion": ("0", "1"),
    "tace_type": ("conventional", "deb"),
}
FEATURES: tuple[str, ...] = tuple(NUMERIC) + tuple(f"{k}={c}" for k, cats in CATEGORICAL.items() for c in cats[1:])

#: Reference standardisation for runs in which no clinical statistics may leave the sites (differential privacy):
#: mean and SD of each numeric factor after its transform, and category prevalences, typical of published TACE
#: cohorts (age about 60 +/- 10 years, 80 % men, median AFP about 60 ng/mL, median largest tumour about 50 mm, BCLC B
#: the commonest stage). Standardisation needs to be only roughly right: the models learn the rest.
REFERENCE_NUMERIC: dict[str, tuple[float, float]] = {
    "age": (60.0, 10.0),
    "afp_ng_ml": (1.8, 1.1),
    "tumour_diameter_mm": (math.log(50.0), 0.5),
}
REFERENCE_PREVALENCE: dict[str, dict[str, float]] = {
    "sex": {"F": 0.18, "M": 0.82},
    "tumour_number": {"1": 0.45, "2-3": 0.35, ">3": 0.2},
    "child_pugh": {"A": 0.85, "B": 0.15},
    "bclc_stage": {"A": 0.3, "0": 0.05, "B": 0.5, "C": 0.15},
    "albi_grade": {"1": 0.4, "2": 0.55, "3": 0.05},
    "portal_vein_invasion": {"0": 0.85, "1": 0.15},
    "tace_type": {"conventional": 0.7, "deb": 0.3},
}


def _transform(name: str, value: float) -> float:
    kind = NUMERIC[name]
    if kind == "log10p1":
        return math.log10(value + 1.0)
    if kind == "log":
        return math.log(value)
    return value


def _category(value: float | str | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass
class ClinicalStats:
    """Aggregate statistics of clinical factors (counts and sums only; nothing patient-level)."""

    n: int = 0
    numeric: dict[str, list[float]] = field(default_factory=lambda: {k: [0.0, 0.0, 0.0] for k in NUMERIC})  # count, sum, sumsq
    categorical: dict[str, dict[str, int]] = field(
        default_factory=lambda: {k: {c: 0 for c in (*cats, "missing")} for k, cats in CATEGORICAL.items()}
    )

    @classmethod
    def from_records(cls, records: Iterable[PatientRecord], min_cell_count: int = 0) -> ClinicalStats:
        """The statistics of `records`; with `min_cell_count` k > 1 no count describes fewer than k patients (`suppress`)."""
        stats = cls()
        for r in records:
            stats.n += 1
            for name in NUMERIC:
                value = r.clinical.get(name)
                if value is not None:
                    v = _transform(name, float(value))
                    acc = stats.numeric[name]
                    acc[0] += 1
                    acc[1] += v
                    acc[2] += v * v
            for name in CATEGORICAL:
                cat = _category(r.clinical.get(name))
                stats.categorical[name][cat if cat is not None else "missing"] += 1
        return stats.suppress(min_cell_count) if min_cell_count > 1 else stats

    def suppress(self, k: int) -> ClinicalStats:
        """No count below `k` patients: a numeric factor recorded for fewer than k patients is sent as not recorded
        (its sum would be a few patients' values); a category of fewer than k patients is counted with the missing
        ones, and so are the next smallest categories until the missing count is 0 or at least k (complementary
        suppression: the categories sent must not give a small one away). The encoder imputes missing values with the
        pooled mode, so this only shifts the standardisation slightly; each patient's own category is still used."""
        out = ClinicalStats(n=self.n, numeric={k_: list(v) for k_, v in self.numeric.items()},
                            categorical={k_: dict(v) for k_, v in self.categorical.items()})  # fmt: skip
        for name, acc in out.numeric.items():
            if 0 < acc[0] < k:
                out.numeric[name] = [0.0, 0.0, 0.0]
        for counts in out.categorical.values():
            small = [c for c, v in counts.items() if c != "missing" and 0 < v < k]
            while small or 0 < counts["missing"] < k:
                for c in small:
                    counts["missing"] += counts[c]
                    counts[c] = 0
                rest = [c for c, v in counts.items() if c != "missing" and v > 0]
                small = [min(rest, key=lambda c: counts[c])] if 0 < counts["missing"] < k and rest else []
                if not small:
                    break
        return out

    def merge(self, other: ClinicalStats) -> ClinicalStats:
        out = ClinicalStats(n=self.n + other.n)
        for k in NUMERIC:
            out.numeric[k] = [a + b for a, b in zip(self.numeric[k], other.numeric[k], strict=True)]
        for k in CATEGORICAL:
            out.categorical[k] = {c: self.categorical[k][c] + other.categorical[k][c] for c in self.categorical[k]}
        return out

    def to_flat(self) -> dict[str, float]:
        """Flat `name -> number` mapping (for a Flower MetricRecord)."""
        flat: dict[str, float] = {"n": float(self.n)}
        for k, (c, s, ss) in self.numeric.items():
            flat[f"num.{k}.count"], flat[f"num.{k}.sum"], flat[f"num.{k}.sumsq"] = c, s, ss
        for k, counts in self.categorical.items():
            for cat, v in counts.items():
                flat[f"cat.{k}.{cat}"] = float(v)
        return flat

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> ClinicalStats:
        stats = cls(n=int(flat["n"]))
        for k in NUMERIC:
            stats.numeric[k] = [float(flat[f"num.{k}.{p}"]) for p in ("count", "sum", "sumsq")]
        for k, cats in CATEGORICAL.items():
            stats.categorical[k] = {c: int(flat[f"cat.{k}.{c}"]) for c in (*cats, "missing")}
        return stats


@dataclass(frozen=True)
class ClinicalEncoder:
    """Imputation values and standardisation (mean, SD) per encoded column, derived from pooled statistics."""

    impute_numeric: dict[str, float]
    impute_categorical: dict[str, str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_stats(cls, stats: ClinicalStats) -> ClinicalEncoder:
        if stats.n == 0:
            raise ValueError("no training patients: clinical statistics are empty")
        impute_num, means, stds = {}, [], []
        for k in NUMERIC:
            count, s, ss = stats.numeric[k]
            mu = s / count if count else 0.0
            var = max(ss / count - mu * mu, 0.0) if count else 1.0
            impute_num[k] = mu
            # Imputed patients sit at the mean: the variance over all patients shrinks by count / n.
            means.append(mu)
            stds.append(math.sqrt(var * count / stats.n) if count else 1.0)
        impute_cat = {}
        for k, cats in CATEGORICAL.items():
            counts = stats.categorical[k]
            mode = max(cats, key=lambda c: (counts[c], -cats.index(c)))
            impute_cat[k] = mode
            for c in cats[1:]:
                p = (counts[c] + (counts["missing"] if c == mode else 0)) / stats.n
                means.append(p)
                stds.append(math.sqrt(p * (1 - p)))
        return cls(impute_num, impute_cat, tuple(means), tuple(s if s > 1e-8 else 1.0 for s in stds))

    @classmethod
    def reference(cls) -> ClinicalEncoder:
        """The encoder from the reference values (`REFERENCE_NUMERIC`, `REFERENCE_PREVALENCE`), derived from no site's data."""
        means = [REFERENCE_NUMERIC[k][0] for k in NUMERIC]
        stds = [REFERENCE_NUMERIC[k][1] for k in NUMERIC]
        for k, cats in CATEGORICAL.items():
            for c in cats[1:]:
                p = REFERENCE_PREVALENCE[k][c]
                means.append(p)
                stds.append(math.sqrt(p * (1 - p)))
        modes = {k: max(cats, key=lambda c, k=k: REFERENCE_PREVALENCE[k][c]) for k, cats in CATEGORICAL.items()}  # type: ignore[misc]
        return cls({k: REFERENCE_NUMERIC[k][0] for k in NUMERIC}, modes, tuple(means), tuple(stds))

    def encode(self, records: Iterable[PatientRecord]) -> np.ndarray:
        """Standardised clinical matrix ``(N, len(FEATURES))``, float32."""
        rows = []
        for r in records:
            row = []
            for k in NUMERIC:
                value = r.clinical.get(k)
                row.append(_transform(k, float(value)) if value is not None else self.impute_numeric[k])
            for k, cats in CATEGORICAL.items():
                cat = _category(r.clinical.get(k)) or self.impute_categorical[k]
                row.extend(1.0 if cat == c else 0.0 for c in cats[1:])
            rows.append(row)
        x = np.array(rows, dtype=np.float64).reshape(-1, len(FEATURES))
        return ((x - np.array(self.mean)) / np.array(self.std)).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"features": list(FEATURES), "impute_numeric": self.impute_numeric, "impute_categorical": self.impute_categorical,
                "mean": list(self.mean), "std": list(self.std)}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClinicalEncoder:
        return cls(dict(d["impute_numeric"]), dict(d["impute_categorical"]), tuple(d["mean"]), tuple(d["std"]))
