"""Reading what the sites returned in a finished run, as rows the statistics work on.

A run folder holds ``site_returns/<site>.json`` (each site's final summary, see `tace.common.summaries`),
``cutoffs.json`` and ``summary.json``; a leave-one-centre-out run has one such set per fold under
``folds/<site>/``. Two sources give rows:

* ``aggregate``: the joint score tables expand into one row per patient whose scores are the centres of its
  grid cells, and the event tables into one row per event or censoring: exactly the information the tables hold.
* ``patient-level``: the rows that sites opted in to share.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tace.common.errors import TaceError
from tace.common.protocol import MODELS
from tace.common.summaries import SiteSummary, groupings

#: The models' names in tables, figures and text.
MODEL_NAMES = {"dltrmlp": "DLTRMLP", "dltr": "DLTR", "radiomics": "Radiomics", "clinical": "Clinical"}


@dataclass
class SiteReturn:
    site_id: str
    role: str
    fold: str  # "" in a holdout layout; the held-out site in a leave-one-centre-out fold
    summary: dict[str, Any]
    cutoffs: dict[str, Any]

    @property
    def sharing(self) -> str:
        return str(self.summary.get("sharing", "aggregate"))

    @property
    def has_patients(self) -> bool:
        return "patients" in self.summary


@dataclass
class RunData:
    path: Path
    layout: str
    models: tuple[str, ...]
    sites: list[SiteReturn]
    run_config: dict[str, Any] = field(default_factory=dict)

    @property
    def external(self) -> list[SiteReturn]:
        return [s for s in self.sites if s.role == "holdout"]

    @property
    def training(self) -> list[SiteReturn]:
        return [s for s in self.sites if s.role == "train"]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TaceError(f"{path} is missing", "the run did not finish; rerun it, or point to a finished run folder") from None
    except json.JSONDecodeError as exc:
        raise TaceError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})", "the file was damaged; rerun the study") from None


def load_run(path: Path | str) -> RunData:
    """Everything the analysis needs from a finished run folder (no patient-level data unless sites shared it)."""
    path = Path(path)
    if not path.is_dir():
        raise TaceError(f"run folder not found: {path}", "give the folder a run wrote (it holds summary.json)")
    summary = _read_json(path / "summary.json")
    config = _read_json(path / "run_config.json") if (path / "run_config.json").exists() else {}
    layout = str(summary.get("layout", "holdout"))
    folds = [(d.name, d) for d in sorted((path / "folds").iterdir()) if d.is_dir()] if layout == "loco" else [("", path)]
    sites: list[SiteReturn] = []
    for fold, folder in folds:
        returns = folder / "site_returns"
        if not returns.is_dir():
            raise TaceError(
                f"{folder} has no site_returns/ folder: the run finished before its final evaluation, or was made by an "
                "older TACE-FL without the analysis summaries",
                "rerun the study with this version",
            )
        cutoffs = _read_json(folder / "cutoffs.json")
        for file in sorted(returns.glob("*.json")):
            s = SiteSummary.decode(_read_json(file), file.stem, MODELS).encode()
            if fold and s["role"] == "train":
                continue  # in leave-one-centre-out each site counts once: in the fold that held it out
            sites.append(SiteReturn(str(s["site_id"]), str(s["role"]), fold, s, cutoffs))
    if not sites:
        raise TaceError(f"{path} holds no site summaries", "rerun the study")
    return RunData(path, layout, MODELS, sites, config.get("run_config", {}))


def score_rows(sites: list[SiteReturn], source: str = "aggregate") -> pd.DataFrame:
    """One row per patient of the sites' evaluation sets: ``site, label`` and one column of scores per model."""
    frames = []
    for s in sites:
        if source == "aggregate":
            frames.append(table_rows(s.summary["scores"], s.site_id))
        else:
            if not s.has_patients:
                raise TaceError(f"site {s.site_id} did not share patient-level data", "use the aggregate source for it")
            p = s.summary["patients"]
            frames.append(pd.DataFrame({"site": s.site_id, "label": p["label"], "paired": True, **p["scores"]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["site", "label", "paired", *MODELS])


def table_rows(table: dict[str, Any], site: str) -> pd.DataFrame:
    """A score table (joint, or one per model) expanded into one row per patient: ``site, label, paired`` and each
    model's score at the centre of its grid cell.

    One table per model (a site's minimum cell count) pairs the models' scores in rank order within each class,
    which is right for every one-model statistic but not for the paired test: such rows are ``paired = False``.
    """
    bins = int(table["bins"])
    if "marginals" in table:
        data: dict[str, Any] = {}
        labels = np.zeros(0, int)
        for model in table["models"]:
            cells = np.asarray(table["marginals"][model], dtype=np.int64).reshape(-1, 3)
            neg = np.repeat((cells[:, 0] + 0.5) / bins, cells[:, 1])
            pos = np.repeat((cells[:, 0] + 0.5) / bins, cells[:, 2])
            data[model] = np.concatenate([np.sort(neg), np.sort(pos)])
            labels = np.r_[np.zeros(len(neg), int), np.ones(len(pos), int)]
        return pd.DataFrame({"site": site, "label": labels, "paired": False, **data})
    models = list(table["models"])
    m = len(models)
    cells = np.asarray(table["cells"], dtype=np.int64).reshape(-1, m + 2)
    reps = np.concatenate([cells[:, m], cells[:, m + 1]])
    base = np.concatenate([cells[:, :m], cells[:, :m]])
    labels = np.concatenate([np.zeros(len(cells), int), np.ones(len(cells), int)])
    out = {"site": site, "label": np.repeat(labels, reps), "paired": True}
    for j, model in enumerate(models):
        out[model] = np.repeat((base[:, j] + 0.5) / bins, reps)
    return pd.DataFrame(out)


def subgroup_rows(sites: list[SiteReturn], key: str) -> tuple[pd.DataFrame, dict[str, list[str]], list[str]]:
    """The patients of subgroup variable `key` at the sites that sent its tables: rows as `table_rows` with a
    ``level`` column; per level the sites that suppressed it; and every level in display order."""
    from tace.common.subgroups import level_order

    frames: list[pd.DataFrame] = []
    suppressed: dict[str, list[str]] = {}
    levels: list[str] = []
    for s in sites:
        sub = s.summary.get("subgroups", {}).get(key)
        if sub is None:
            continue
        levels += sub["levels"]
        for level in sub.get("suppressed", []):
            suppressed.setdefault(level, []).append(s.site_id)
        for level, table in sub["tables"].items():
            frames.append(table_rows(table, s.site_id).assign(level=level))
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["site", "label", "paired", "level", *MODELS])
    return rows, suppressed, level_order(key, levels)


def survival_rows(sites: list[SiteReturn], grouping: str, source: str = "aggregate") -> tuple[pd.DataFrame, list[str], list[str]]:
    """One row per patient with PFS: ``site, time, event, group``; plus the group names and notes on what is
    missing (sites without PFS data, groups a site suppressed)."""
    frames: list[pd.DataFrame] = []
    names: list[str] = []
    notes: list[str] = []
    for s in sites:
        tables = s.summary.get("survival", {}).get("tables", {})
        if grouping not in tables:
            notes.append(f"site {s.site_id} returned no PFS event table for {grouping}")
            continue
        if names and list(tables[grouping]["groups"]) != names:
            raise TaceError(
                f"the groups of {grouping} differ between sites (the folds fixed different numbers of risk groups)",
                "analyse each fold's run folder on its own",
            )
        names = list(tables[grouping]["groups"])
        if s.summary.get("n_with_pfs", 0) < s.summary.get("n", 0):
            notes.append(f"site {s.site_id}: {s.summary['n'] - s.summary['n_with_pfs']} of {s.summary['n']} patients have no PFS data")
        if source == "aggregate":
            table = tables[grouping]
            for g in table.get("suppressed", []):
                notes.append(f"site {s.site_id} suppressed group '{names[g]}' of {grouping} (fewer than its minimum cell count)")
            rows = np.asarray(table["rows"], dtype=float).reshape(-1, 5)
            t = np.concatenate([np.repeat(rows[:, 0], rows[:, 3].astype(int)), np.repeat(rows[:, 0], rows[:, 4].astype(int))])
            e = np.concatenate([np.ones(int(rows[:, 3].sum()), int), np.zeros(int(rows[:, 4].sum()), int)])
            g_ = np.concatenate([np.repeat(rows[:, 1], rows[:, 3].astype(int)), np.repeat(rows[:, 1], rows[:, 4].astype(int))])
            frames.append(pd.DataFrame({"site": s.site_id, "time": t, "event": e, "group": g_.astype(int)}))
        else:
            if not s.has_patients:
                raise TaceError(f"site {s.site_id} did not share patient-level data", "use the aggregate source for it")
            p = s.summary["patients"]
            keep = [i for i, (d, ev) in enumerate(zip(p["pfs_days"], p["pfs_event"], strict=True)) if d is not None and ev is not None]
            scores = {m: np.asarray(v, dtype=float)[keep] for m, v in p["scores"].items()}
            group, _ = groupings(scores, s.cutoffs, int(s.summary["scores"]["bins"]))[grouping]
            frames.append(pd.DataFrame({
                "site": s.site_id, "time": np.asarray(p["pfs_days"], dtype=object)[keep].astype(float),
                "event": np.asarray(p["pfs_event"], dtype=object)[keep].astype(int), "group": group,
            }))  # fmt: skip
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["site", "time", "event", "group"])
    return frame.sort_values(["site", "time", "event", "group"], kind="stable", ignore_index=True), names, notes


def patient_survival_scores(sites: list[SiteReturn], model: str) -> pd.DataFrame:
    """Patient-level continuous scores with PFS (only from sites that shared them), for the continuous C-index."""
    frames = []
    for s in sites:
        if not s.has_patients:
            continue
        p = s.summary["patients"]
        df = pd.DataFrame({"site": s.site_id, "time": p["pfs_days"], "event": p["pfs_event"], "score": p["scores"][model]})
        frames.append(df.dropna())
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["site", "time", "event", "score"])
