"""Write the small CSV inputs that `golden.R` turns into R reference values (run once; deterministic).

Usage (from the repository root)::

    .venv/bin/python tests/reference/make_reference_data.py
    Rscript tests/reference/golden.R
    Rscript tests/reference/golden_validation.R

The CSVs, `r_golden.json` and `r_golden_validation.json` are committed, so the tests need neither R nor this script. Scores and times are
stored rather than refitted, so a newer scikit-learn or lifelines cannot change the inputs of the golden values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

OUT = Path(__file__).resolve().parents[1] / "data" / "reference"
SEED = 20261126
SITES3 = np.array(["s1", "s2", "s3"])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def scores_generated(seed: int = SEED, n: int = 300) -> pd.DataFrame:
    """Two correlated scores in [0, 1], rounded to 3 decimals so that ties occur within and across classes."""
    rng = np.random.default_rng(seed)
    site = SITES3[rng.integers(0, 3, size=n)]
    label = (rng.random(n) < 0.4).astype(int)
    shared = rng.normal(size=n)
    score_a = _sigmoid(-0.6 + 1.4 * label + 0.9 * shared + 0.6 * rng.normal(size=n))
    score_b = _sigmoid(-0.4 + 1.0 * label + 0.9 * shared + 0.8 * rng.normal(size=n))
    return pd.DataFrame({"site": site, "label": label, "score_a": score_a.round(3), "score_b": score_b.round(3)})


def breast_cancer_scores() -> pd.DataFrame:
    """scikit-learn's breast-cancer data; scores from logistic regressions on the first 2 and 5 standardized features."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    data = load_breast_cancer()
    x, y = data.data, data.target  # target 1 = benign, as shipped
    scores = {}
    for name, k in (("score_a", 2), ("score_b", 5)):
        xk = StandardScaler().fit_transform(x[:, :k])
        model = LogisticRegression(max_iter=5000).fit(xk, y)
        scores[name] = model.predict_proba(xk)[:, 1].round(6)
    site = SITES3[np.arange(len(y)) % 3]
    return pd.DataFrame({"site": site, "label": y.astype(int), **scores})


def validation_generated(seed: int = SEED + 2) -> pd.DataFrame:
    """Eight centres of different size and case mix whose outcomes follow the model with centre-specific
    calibration intercepts and slopes (so τ² > 0), two scores rounded to 4 decimals: the calibration and
    meta-analysis golden values (golden_validation.R)."""
    rng = np.random.default_rng(seed)
    frames = []
    for c, n in enumerate((60, 90, 120, 150, 80, 200, 110, 70)):
        lp = rng.normal(-0.8 + 0.15 * c, 1.2, size=n)  # the model's linear predictor
        truth = 0.35 * (c % 3 - 1) + (0.6 + 0.1 * c) * lp  # the centre's own calibration
        label = (rng.random(n) < _sigmoid(truth)).astype(int)
        label[:2] = (0, 1)  # both classes at every centre
        score_b = _sigmoid(0.6 * lp + 0.9 * rng.normal(size=n))
        frames.append(pd.DataFrame({"site": f"c{c + 1}", "label": label, "score_a": _sigmoid(lp).round(4), "score_b": score_b.round(4)}))
    return pd.concat(frames, ignore_index=True)


def survival_generated(seed: int = SEED, n: int = 240) -> pd.DataFrame:
    """Integer survival times in days (tied events and censorings), a real `group` effect, a 3-level `group3`."""
    rng = np.random.default_rng(seed + 1)
    site_idx = np.repeat(np.arange(3), n // 3)
    group = rng.integers(0, 2, size=n)
    group3 = rng.integers(0, 3, size=n)
    site_effect = np.array([0.0, 0.3, -0.3])[site_idx]  # different baseline hazards, for the stratified test
    rate = (1 / 365.0) * np.exp(0.7 * group + 0.25 * group3 + site_effect)
    event_time = rng.exponential(1.0 / rate)
    censor_time = rng.uniform(30.0, 540.0, size=n)
    time = np.ceil(np.minimum(event_time, censor_time) / 3.0) * 3.0  # coarse (3-day) grid: many tied times
    event = (event_time <= censor_time).astype(int)
    return pd.DataFrame({"site": SITES3[site_idx], "time": time.astype(int), "event": event, "group": group, "group3": group3})


def rossi() -> pd.DataFrame:
    """lifelines' Rossi recidivism data: time = week, event = arrest, group = fin, group3 = binned prio."""
    from lifelines.datasets import load_rossi

    df = load_rossi()
    group3 = np.select([df["prio"] <= 1, df["prio"] <= 3], [0, 1], default=2)
    return pd.DataFrame(
        {
            "site": SITES3[np.arange(len(df)) % 3],
            "time": df["week"].astype(int),
            "event": df["arrest"].astype(int),
            "group": df["fin"].astype(int),
            "group3": group3.astype(int),
        }
    )


def waltons() -> pd.DataFrame:
    """lifelines' Waltons fly data: group = 1 for miR-137, 0 for control; group3 is a copy (only 2 levels)."""
    from lifelines.datasets import load_waltons

    df = load_waltons()
    group = (df["group"] == "miR-137").astype(int)
    time = df["T"].astype(int) if (df["T"] % 1 == 0).all() else df["T"]
    return pd.DataFrame(
        {
            "site": np.array(["s1", "s2"])[np.arange(len(df)) % 2],
            "time": time,
            "event": df["E"].astype(int),
            "group": group,
            "group3": group,
        }
    )


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tables = {
        "scores_generated": scores_generated(),
        "breast_cancer_scores": breast_cancer_scores(),
        "validation_generated": validation_generated(),
        "survival_generated": survival_generated(),
        "rossi": rossi(),
        "waltons": waltons(),
    }
    for name, df in tables.items():
        path = OUT / f"{name}.csv"
        df.to_csv(path, index=False, lineterminator="\n")
        print(f"{path.relative_to(OUT.parents[2])}: {len(df)} rows, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
