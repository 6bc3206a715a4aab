"""The study's statistics on a finished run: external validation and survival, per external site and pooled.

`validate` and `survival` compute every number from what the sites returned (`tace.analysis.data`) and return
plain dicts; `write_analysis` merges them into ``analysis.json``, writes CSV tables under ``tables/`` and figures
under ``figures/``. Nothing here needs patient-level data: ``source="patient-level"`` recomputes the same
statistics from the rows of sites that opted in, and `equivalence` puts both next to the reference libraries.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tace.analysis import calibration, discrimination, exactness, meta, samplesize, subgroups, survival
from tace.analysis.data import MODEL_NAMES, RunData, SiteReturn, patient_survival_scores, score_rows, survival_rows
from tace.common.errors import TaceError
from tace.common.protocol import DISPLAY_ORDER
from tace.common.serialize import jsonable
from tace.common.summaries import bin_index

PAIRS = (("dltrmlp", "dltr"), ("dltrmlp", "clinical"), ("dltr", "clinical"))
POOLED = "pooled external"
#: The calibration statistics compared in the equivalence table and written to tables/calibration.csv.
CALIBRATION_STATISTICS = {"intercept": "calibration intercept", "slope": "calibration slope", "oe": "O/E", "ici": "ICI", "e50": "E50",
                          "e90": "E90", "emax": "Emax"}  # fmt: skip


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _predicted(df: pd.DataFrame, sites: list[SiteReturn], model: str) -> np.ndarray:
    """Predicted responder (1) at the Youden cut-off fixed on the training sites (per fold in leave-one-out)."""
    out = np.zeros(len(df), dtype=int)
    for s in sites:
        m = (df["site"] == s.site_id).to_numpy()
        cut = s.cutoffs.get(model)
        if cut is None:
            out[m] = -1  # no cut-off: the training sites' pooled validation had one class
            continue
        bins = int(s.summary["scores"]["bins"])
        out[m] = (bin_index(df.loc[m, model].to_numpy(), bins) >= int(cut["youden_bin"])).astype(int)
    return out


def _discrimination(
    df: pd.DataFrame,
    sites: list[SiteReturn],
    models: tuple[str, ...],
    reps: int,
    seed: int,
    notes: list[str],
    where: str,
    curves: bool = True,
) -> dict[str, Any]:
    y = df["label"].to_numpy(dtype=int)
    strata = df["site"].to_numpy()
    n_pos = int(y.sum())
    block: dict[str, Any] = {"n": len(y), "n_pos": n_pos, "models": {}, "paired": {}}
    both = 0 < n_pos < len(y)
    if not both:
        notes.append(f"{where}: only {'responders' if n_pos else 'non-responders'} in the evaluation set, so no AUC, ROC or paired "
                     "test; threshold metrics, calibration and decision curves were still computed")  # fmt: skip
    scores = df[list(models)].to_numpy(dtype=float)
    dl = discrimination.delong(y, scores) if both else None
    boot = discrimination.bootstrap_aucs(y, scores, strata, reps, seed) if both else None
    bins = int(sites[0].summary["scores"]["bins"])
    for j, model in enumerate(models):
        entry: dict[str, Any] = {}
        if dl is not None and boot is not None:
            lo, hi = dl.ci(j)
            blo, bhi = discrimination.percentile_ci(boot[:, j])
            degenerate = dl.cov[j, j] <= 1e-15
            entry.update({
                "auc": float(dl.aucs[j]), "ci_low": blo if degenerate else lo, "ci_high": bhi if degenerate else hi,
                "ci_method": "stratified bootstrap (DeLong variance is zero)" if degenerate else "DeLong",
                "delong_se": math.sqrt(max(float(dl.cov[j, j]), 0.0)), "bootstrap_ci_low": blo, "bootstrap_ci_high": bhi,
                "grid_error_bound": discrimination.grid_error_bound(y, scores[:, j], bins),
            })  # fmt: skip
        p = df[model].to_numpy(dtype=float)
        predicted = _predicted(df, sites, model)
        if (predicted < 0).any():
            notes.append(f"{where}: no threshold metrics for {MODEL_NAMES[model]}: no cut-off could be fixed on the training sites")
        else:
            entry["threshold"] = discrimination.threshold_metrics(y, predicted)
        entry["calibration"] = _calibration(y, p, entry, curves)
        if not curves:
            block["models"][model] = entry
            continue
        entry["brier"] = calibration.brier(y, p)
        entry["hosmer_lemeshow"] = calibration.hosmer_lemeshow(y, p)
        entry["calibration_curve"] = calibration.calibration_curve(y, p)
        entry["decision_curve"] = calibration.decision_curve(y, p)
        if both:
            entry["roc"] = discrimination.roc_band(y, p, strata, reps=min(reps, 500), seed=seed + j)
        block["models"][model] = entry
    if dl is not None and boot is not None and not df["paired"].all():
        unpaired = sorted(set(df.loc[~df["paired"].astype(bool), "site"]))
        notes.append(f"{where}: no paired DeLong test: site(s) {', '.join(unpaired)} require a minimum cell count and send one "
                     "score table per model, which cannot be paired")  # fmt: skip
    elif dl is not None and boot is not None:
        for a, b in PAIRS:
            if a in models and b in models:
                ia, ib = models.index(a), models.index(b)
                z, pval = dl.paired(ia, ib)
                dlo, dhi = discrimination.percentile_ci(boot[:, ia] - boot[:, ib])
                block["paired"][f"{a} vs {b}"] = {"difference": float(dl.aucs[ia] - dl.aucs[ib]), "z": _finite(z), "p": pval,
                                                  "bootstrap_ci_low": dlo, "bootstrap_ci_high": dhi}  # fmt: skip
    return block


def _calibration(y: np.ndarray, p: np.ndarray, entry: dict[str, Any], curves: bool) -> dict[str, Any]:
    """Calibration intercept and slope, O/E, and ICI/E50/E90/Emax of the flexible curve (kept in `entry` as
    ``calibration_flexible`` when `curves`)."""
    out = calibration.recalibration(y, p)
    flexible = calibration.flexible_calibration(y, p)
    if flexible is not None:
        out.update({k: flexible[k] for k in ("ici", "e50", "e90", "emax", "kind", "knots")})
        if curves:
            entry["calibration_flexible"] = flexible["curve"]
    return out


def validate(
    run: RunData, source: str = "aggregate", reps: int = 2000, seed: int = 0, curves: bool = True, hartung_knapp: bool = False
) -> dict[str, Any]:
    """External validation: discrimination, threshold metrics, calibration (intercept, slope, O/E, ICI, curves) and
    decision curves per external site and pooled; the random-effects meta-analysis across the external sites (the
    held-out centres of a leave-one-centre-out run), performance by subgroup, the sample size each site gave; the
    training sites' pooled internal validation for comparison."""
    external = run.external
    if not external:
        raise TaceError("this run has no external (holdout) site to validate on", "set holdout-sites, or use layout='loco'")
    if source == "patient-level":
        missing = [s.site_id for s in external if not s.has_patients]
        if missing:
            raise TaceError(f"site(s) {', '.join(missing)} did not share patient-level data", "use --source aggregate (the default)")
    notes: list[str] = []
    withheld = [s.site_id for s in external if s.summary.get("withheld")] if source == "aggregate" else []
    if withheld:
        notes.append(f"site(s) {', '.join(withheld)} had fewer patients than their minimum cell count and sent counts only: not in "
                     "this validation")  # fmt: skip
        external = [s for s in external if s.site_id not in withheld]
        if not external:
            raise TaceError("every external site had fewer patients than its minimum cell count and sent counts only: nothing to "
                            "validate on", "external sites with at least min-cell-count labelled patients are needed")  # fmt: skip
    models = run.models
    out: dict[str, Any] = {"source": source, "bins": int(external[0].summary["scores"]["bins"]), "bootstrap_reps": reps, "seed": seed,
                           "sites": {}, "notes": notes}  # fmt: skip
    rows = score_rows(external, source)
    for s in external:
        df = rows[rows["site"] == s.site_id]
        block = _discrimination(df, [s], models, reps, seed, notes, f"site {s.site_id}", curves)
        out["sites"][s.site_id] = {"role": s.role, "sharing": s.sharing, "fold": s.fold, **block}
        # What the site computed exactly replaces what the (coarsened) tables give: per-site results, the meta-analysis.
        if source == "aggregate" and exactness.apply_validation(out["sites"][s.site_id], s.summary, models, PAIRS):
            notes[:] = [n for n in notes if not n.startswith(f"site {s.site_id}: no paired DeLong test")]
    out["pooled"] = (
        _discrimination(rows, external, models, reps, seed, notes, POOLED, curves)
        if len(external) > 1
        else out["sites"][external[0].site_id]
    )
    coarse = [s.site_id for s in external if "marginals" in s.summary["scores"]]
    if len(external) > 1 and coarse and source == "aggregate":
        # Microaggregation keeps each site's ranking, but not the order of patients of different sites whose runs'
        # score ranges overlap: the pooled AUC's error is not bounded by ties within cells.
        for entry in out["pooled"]["models"].values():
            if "grid_error_bound" in entry:
                entry["grid_error_bound"] = None
        notes.append(f"{POOLED}: site(s) {', '.join(coarse)} sent microaggregated tables (their minimum cell count): the pooled AUC "
                     "is approximate with no bound from the tables; the meta-analysis's pooled AUC is built from the sites' exact "
                     "AUCs")  # fmt: skip
    if run.training:
        internal = score_rows(run.training, "aggregate")
        y = internal["label"].to_numpy(dtype=int)
        if 0 < y.sum() < len(y):
            dl = discrimination.delong(y, internal[list(models)].to_numpy(dtype=float))
            out["internal"] = {m: {"auc": float(dl.aucs[j]), "ci_low": dl.ci(j)[0], "ci_high": dl.ci(j)[1]} for j, m in enumerate(models)}
            out["internal"]["n"] = len(y)
    out["cutoffs"] = {s.fold or "all": s.cutoffs for s in external}
    out["meta"] = {**meta.meta_analysis(out["sites"], models, hartung_knapp), "layout": run.layout}
    out["subgroups"] = subgroups.subgroup_analysis(external, models)
    out["sample_size"] = samplesize.sample_size(out["sites"], models)
    out["exactness"] = exactness.exactness(out, None, {s.site_id: int(s.summary.get("min_cell_count", 0)) for s in external})
    return out


def _at_risk_times(t: np.ndarray) -> list[float]:
    top = float(t.max()) if len(t) else 0.0
    step = next((s for s in (30, 90, 180, 365, 730) if top / s <= 7), 1825)
    return [float(v) for v in np.arange(0, top + 1e-9, step)]


def _survival_block(df: pd.DataFrame, names: list[str], where: str, notes: list[str], grouping: str) -> dict[str, Any]:
    t, e, g = df["time"].to_numpy(float), df["event"].to_numpy(int), df["group"].to_numpy(int)
    block: dict[str, Any] = {"n": len(t), "events": int(e.sum()), "km": {}, "at_risk_times": _at_risk_times(t)}
    for lv in sorted(set(g.tolist())):
        m = g == lv
        block["km"][names[lv]] = survival.kaplan_meier(t[m], e[m], block["at_risk_times"])
    present = sorted(set(g.tolist()))
    if len(present) < 2:
        notes.append(f"{where}, {grouping}: every patient is in group '{names[present[0]] if present else '-'}'; no log-rank test or "
                     "hazard ratio (Kaplan-Meier still drawn)")  # fmt: skip
        return block
    if e.sum() == 0:
        notes.append(f"{where}, {grouping}: no progression events; no log-rank test or hazard ratio")
        return block
    block["logrank"] = survival.logrank(t, e, g)
    # The worst-predicted group is the reference: HRs < 1 mean the better-predicted group progresses later.
    cox = survival.cox_groups(t, e, g, names, reference=present[0])
    if "error" in cox:
        notes.append(f"{where}, {grouping}: hazard ratio not estimable: {cox['error']}")
    block["cox"] = cox
    try:
        block["c_index"] = survival.c_index(t, e, g)
    except ZeroDivisionError:
        notes.append(f"{where}, {grouping}: no C-index: no pair of patients is comparable")
    return block


def survival_analysis(run: RunData, source: str = "aggregate") -> dict[str, Any]:
    """PFS by predicted group (responders vs non-responders, and risk groups; every model) per external site,
    pooled, and pooled stratified by site."""
    external = run.external
    if not external:
        raise TaceError("this run has no external (holdout) site", "set holdout-sites, or use layout='loco'")
    with_tables = [s for s in external if s.summary.get("survival", {}).get("tables")]
    if not with_tables and any(s.summary.get("n_with_pfs", 0) and not s.cutoffs for s in external):
        raise TaceError(
            "no PFS event tables: no cut-offs could be fixed to group the external sites' patients (the training sites' "
            "validation splits were smaller than their minimum cell count, so they sent counts only, or held one class)",
            "training sites need at least min-cell-count labelled patients of both classes in their val splits",
        )
    if not any(s.summary.get("n_with_pfs", 0) for s in with_tables):
        raise TaceError(
            "no external site returned PFS data: the manifests' pfs_days and pfs_event columns are empty or absent",
            "fill in pfs_days and pfs_event at the external sites and rerun; the validation analysis does not need them",
        )
    notes: list[str] = []
    out: dict[str, Any] = {"source": source, "groupings": {}, "notes": notes}
    names_all = sorted({name for s in with_tables for name in s.summary["survival"]["tables"]})
    for grouping in names_all:
        df, names, more = survival_rows(external, grouping, source)
        notes.extend(more)
        entry: dict[str, Any] = {"groups": names, "sites": {}}
        for s in external:
            sub = df[df["site"] == s.site_id]
            if len(sub):
                entry["sites"][s.site_id] = _survival_block(sub, names, f"site {s.site_id}", notes, grouping)
                if source == "aggregate" and (exact_test := exactness.site_logrank(s.summary, grouping)) is not None:
                    entry["sites"][s.site_id]["logrank"] = exact_test
        if len(external) > 1 and len(df):
            entry["pooled"] = _survival_block(df, names, POOLED, notes, grouping)
            if df["group"].nunique() > 1 and df["event"].sum() > 0:
                entry["pooled"]["stratified_logrank"] = (
                    exactness.stratified_logrank([s.summary for s in external if s.site_id in entry["sites"]], grouping, len(names))
                    if source == "aggregate"
                    else None
                ) or survival.stratified_logrank(
                    df["time"].to_numpy(), df["event"].to_numpy(), df["group"].to_numpy(), df["site"].to_numpy()
                )
        elif len(df):
            entry["pooled"] = next(iter(entry["sites"].values()))
        out["groupings"][grouping] = entry
    if all(s.has_patients for s in external):
        for model in run.models:
            ps = patient_survival_scores(external, model)
            if len(ps) and ps["event"].sum():
                try:
                    c = survival.c_index(ps["time"].to_numpy(float), ps["event"].to_numpy(int), ps["score"].to_numpy(float))
                except ZeroDivisionError:
                    continue
                out.setdefault("c_index_continuous", {})[model] = c
    out["exactness"] = exactness.exactness(None, out, {s.site_id: int(s.summary.get("min_cell_count", 0)) for s in external})
    return out


def equivalence(run: RunData, reps: int = 200, seed: int = 0, computed: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Aggregate vs patient-level vs the reference libraries, on the external sites that shared patient-level data.

    `computed` holds aggregate sections ("validation", "survival") already computed for all external sites; they
    are reused when every external site shared its rows (the AUCs, DeLong SEs and p-values compared do not
    depend on the bootstrap).
    """
    from lifelines import CoxPHFitter
    from lifelines.statistics import logrank_test
    from sklearn.metrics import roc_auc_score

    sites = [s for s in run.external if s.has_patients]
    if not sites:
        return []
    sub = RunData(run.path, run.layout, run.models, sites, run.run_config)
    reuse = computed if computed is not None and len(sites) == len(run.external) else {}
    agg_all = reuse["validation"] if "validation" in reuse else validate(sub, "aggregate", reps, seed, curves=False)
    pat_all = validate(sub, "patient-level", reps, seed, curves=False, hartung_knapp=agg_all["meta"]["hartung_knapp"])
    agg, pat = agg_all["pooled"], pat_all["pooled"]
    rows: list[dict[str, Any]] = []

    def add(stat: str, a: float | None, p: float | None, ref: float | None, ref_name: str) -> None:
        rows.append({"statistic": stat, "aggregate": a, "patient_level": p, "reference": ref, "reference_from": ref_name,
                     "abs_difference": None if a is None or p is None else abs(a - p)})  # fmt: skip

    df = score_rows(sites, "patient-level")
    for m in run.models:
        if "auc" in agg["models"][m]:
            ref = float(roc_auc_score(df["label"], df[m])) if df["label"].nunique() == 2 else None
            add(f"AUC {MODEL_NAMES[m]}", agg["models"][m]["auc"], pat["models"][m]["auc"], ref, "sklearn roc_auc_score")
            add(f"DeLong SE {MODEL_NAMES[m]}", agg["models"][m]["delong_se"], pat["models"][m]["delong_se"], None, "")
    for key in agg["paired"]:
        add(f"DeLong p {key}", agg["paired"][key]["p"], pat["paired"][key]["p"], None, "")
    for m in run.models:
        ca, cp = agg["models"][m].get("calibration") or {}, pat["models"][m].get("calibration") or {}
        for key, words in CALIBRATION_STATISTICS.items():
            a, p = ca.get(key), cp.get(key)
            if isinstance(a, dict) and isinstance(p, dict):
                add(f"{words} {MODEL_NAMES[m]}", a["value"], p["value"], None, "")
            elif isinstance(a, float) and isinstance(p, float):
                add(f"{words} {MODEL_NAMES[m]}", a, p, None, "")
    for m in run.models:
        for measure, entry in agg_all["meta"]["models"][m].items():
            other = pat_all["meta"]["models"][m][measure]
            if "pooled" in entry and "pooled" in other:
                for key, words in (("pooled", "pooled"), ("pi_low", "95% PI low"), ("pi_high", "95% PI high"), ("tau2", "tau2")):
                    add(f"meta-analysis {entry['measure']} {words} {MODEL_NAMES[m]}", entry[key], other[key], None, "")
    if not any(s.summary.get("n_with_pfs", 0) for s in sites):
        return rows
    sa = reuse["survival"] if "survival" in reuse else survival_analysis(sub, "aggregate")
    sp = survival_analysis(sub, "patient-level")
    for grouping in ("dltrmlp:response", "dltrmlp:risk"):
        ga, gp = sa["groupings"].get(grouping, {}).get("pooled", {}), sp["groupings"].get(grouping, {}).get("pooled", {})
        if "logrank" not in ga or "logrank" not in gp:
            continue
        d, _, _ = survival_rows(sites, grouping, "patient-level")
        ref_stat = ref_p = None
        if grouping.endswith(":response") and d["group"].nunique() == 2:
            a, b = d[d["group"] == 0], d[d["group"] == 1]
            lr = logrank_test(a["time"], b["time"], a["event"], b["event"])
            ref_stat, ref_p = float(lr.test_statistic), float(lr.p_value)
        add(
            f"log-rank chi2 {grouping}",
            ga["logrank"]["statistic"],
            gp["logrank"]["statistic"],
            ref_stat,
            "lifelines logrank_test" if ref_stat else "",
        )
        add(f"log-rank p {grouping}", ga["logrank"]["p"], gp["logrank"]["p"], ref_p, "lifelines logrank_test" if ref_p else "")
        hra = next(iter(ga.get("cox", {}).get("hazard_ratios", {}).values()), None)
        hrp = next(iter(gp.get("cox", {}).get("hazard_ratios", {}).values()), None)
        if hra and hrp and grouping.endswith(":response"):
            cph = CoxPHFitter().fit(pd.DataFrame({"duration": d["time"], "observed": d["event"], "g": d["group"].astype(float)}),
                                    duration_col="duration", event_col="observed")  # fmt: skip
            add(f"Cox HR {grouping}", hra["hr"], hrp["hr"], float(np.exp(cph.params_["g"])), "lifelines CoxPHFitter")
    return rows


def equivalence_line(rows: list[dict[str, Any]], min_cell_count: int) -> str:
    """One line on the aggregate vs patient-level comparison (`equivalence`): how many statistics agree, and the
    largest difference with the statistic it belongs to. Under a minimum cell count (`min_cell_count` > 1) the pooled
    statistics computed from coarsened tables are approximate by design (docs/analysis.md), and the line says so."""
    compared = [r for r in rows if r["abs_difference"] is not None]
    if not compared:
        return f"aggregate vs patient-level analysis: {len(rows)} statistics, none computed both ways"
    worst = max(compared, key=lambda r: r["abs_difference"])
    equal = sum(r["abs_difference"] <= 1e-6 for r in compared)
    text = (f"aggregate vs patient-level analysis: {equal} of {len(compared)} statistics equal to 1e-6, largest difference "
            f"{worst['abs_difference']:.2g} ({worst['statistic']})")  # fmt: skip
    if min_cell_count > 1 and worst["abs_difference"] > 1e-6:
        text += (f"; the sites' minimum cell count ({min_cell_count}) coarsens the tables that pooled curves, calibration and "
                 "unstratified survival statistics come from, so those are approximate; per-site and stratified ones are exact")  # fmt: skip
    return text + " (tables/equivalence.csv)"


def headline(validation: dict[str, Any], surv: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per model: pooled external AUC with CI, each external site's AUC, DeLong p against DLTRMLP, the
    calibration slope (pooled external) with its CI, the meta-analytic AUC across the external centres with its CI
    and 95 % prediction interval, and the log-rank p / HR of the model's predicted responders vs non-responders."""
    rows = []
    for model in DISPLAY_ORDER:
        pooled = validation["pooled"]["models"].get(model, {})
        row: dict[str, Any] = {
            "model": MODEL_NAMES[model],
            "pooled_auc": pooled.get("auc"),
            "ci_low": pooled.get("ci_low"),
            "ci_high": pooled.get("ci_high"),
        }
        for site, block in validation["sites"].items():
            row[f"auc {site}"] = block["models"].get(model, {}).get("auc")
        if model != "dltrmlp":
            row["delong_p_vs_dltrmlp"] = validation["pooled"]["paired"].get(f"dltrmlp vs {model}", {}).get("p")
        slope = (pooled.get("calibration") or {}).get("slope") or {}
        row.update(calibration_slope=slope.get("value"), slope_ci_low=slope.get("low"), slope_ci_high=slope.get("high"))
        summary = validation.get("meta", {}).get("models", {}).get(model, {}).get("auc", {})
        row.update({f"meta_{k}": summary.get(k) for k in ("k", "pooled", "ci_low", "ci_high", "pi_low", "pi_high")})
        if surv:
            g = surv["groupings"].get(f"{model}:response", {}).get("pooled", {})
            row["logrank_p"] = g.get("logrank", {}).get("p")
            hr = next(iter(g.get("cox", {}).get("hazard_ratios", {}).values()), None)
            row["hr"] = hr["hr"] if hr else None
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.001 and v != 0 else f"{v:.3f}"
    return str(v)


def format_headline(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        parts = [f"{r['model']:<9} pooled external AUC {_fmt(r['pooled_auc'])} (95% CI {_fmt(r['ci_low'])}-{_fmt(r['ci_high'])})"]
        parts += [f"{k[4:]} {_fmt(v)}" for k, v in r.items() if k.startswith("auc ")]
        if "delong_p_vs_dltrmlp" in r:
            parts.append(f"DeLong p vs DLTRMLP {_fmt(r['delong_p_vs_dltrmlp'])}")
        if r.get("calibration_slope") is not None:
            parts.append(
                f"calibration slope {_fmt(r['calibration_slope'])} ({_fmt(r.get('slope_ci_low'))} to {_fmt(r.get('slope_ci_high'))})"
            )
        if r.get("meta_pooled") is not None:
            parts.append(f"meta-analytic AUC {_fmt(r['meta_pooled'])} (95% PI {_fmt(r['meta_pi_low'])}-{_fmt(r['meta_pi_high'])}, "
                         f"{r['meta_k']} centres)")  # fmt: skip
        if "logrank_p" in r:
            parts.append(f"PFS log-rank p {_fmt(r['logrank_p'])}, HR {_fmt(r.get('hr'))}")
        lines.append("  " + "; ".join(parts))
    return "\n".join(lines)


def _tables(analysis: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    v = analysis.get("validation")
    if v:
        rows = []
        for where, block in [*v["sites"].items(), (POOLED, v["pooled"])]:
            for m, e in block["models"].items():
                thr = e.get("threshold", {})
                rows.append({"population": where, "model": MODEL_NAMES[m], "n": block["n"], "n_pos": block["n_pos"], "auc": e.get("auc"),
                             "ci_low": e.get("ci_low"), "ci_high": e.get("ci_high"), "ci_method": e.get("ci_method"),
                             **{f"{k}": thr[k]["value"] for k in thr}, "brier": e["brier"], "hl_p": e["hosmer_lemeshow"]["p"]})  # fmt: skip
        pd.DataFrame(rows).to_csv(folder / "validation.csv", index=False)
        paired = [
            {"population": w, "comparison": k, **val}
            for w, b in [*v["sites"].items(), (POOLED, v["pooled"])]
            for k, val in b["paired"].items()
        ]
        pd.DataFrame(paired).to_csv(folder / "delong.csv", index=False)
        written += [folder / "validation.csv", folder / "delong.csv"]
    if v:
        written += _validation_tables(v, folder)
    s = analysis.get("survival")
    if s:
        rows = []
        for grouping, entry in s["groupings"].items():
            for where, block in [*entry["sites"].items(), *([(POOLED, entry["pooled"])] if "pooled" in entry else [])]:
                lr = block.get("logrank", {})
                for name, hr in block.get("cox", {}).get("hazard_ratios", {}).items():
                    rows.append({"grouping": grouping, "population": where, "group": name, "reference": block["cox"]["reference"], **hr,
                                 "logrank_chi2": lr.get("statistic"), "logrank_p": lr.get("p"), "c_index": block.get("c_index")})  # fmt: skip
        pd.DataFrame(rows).to_csv(folder / "survival.csv", index=False)
        written.append(folder / "survival.csv")
    if analysis.get("equivalence"):
        pd.DataFrame(analysis["equivalence"]).to_csv(folder / "equivalence.csv", index=False)
        written.append(folder / "equivalence.csv")
    return written


def _interval(prefix: str, e: dict[str, Any] | None, value: str = "value", low: str = "low", high: str = "high") -> dict[str, Any]:
    e = e or {}
    return {prefix: e.get(value), f"{prefix}_ci_low": e.get(low), f"{prefix}_ci_high": e.get(high)}


def _validation_tables(v: dict[str, Any], folder: Path) -> list[Path]:
    """tables/calibration.csv, meta_analysis.csv (pooled and per centre), subgroups.csv and sample_size.csv."""
    written = []
    rows = []
    for where, block in [*v["sites"].items(), (POOLED, v["pooled"])]:
        for m, e in block["models"].items():
            c = e.get("calibration") or {}
            rows.append({"population": where, "model": MODEL_NAMES[m], "n": block["n"], "observed": c.get("observed"),
                         "expected": c.get("expected"), **_interval("oe", c.get("oe")), **_interval("intercept", c.get("intercept")),
                         **_interval("slope", c.get("slope")), **{k: c.get(k) for k in ("ici", "e50", "e90", "emax")},
                         "flexible_curve": c.get("kind")})  # fmt: skip
    written.append(_csv(rows, folder / "calibration.csv"))
    pooled, centres = [], []
    meta_block = v.get("meta", {})
    for m, measures in meta_block.get("models", {}).items():
        for e in measures.values():
            pooled.append({"model": MODEL_NAMES[m], "measure": e["measure"], "scale": e["scale"], "k": e["k"],
                           **_interval("pooled", e, "pooled", "ci_low", "ci_high"), "pi_low": e.get("pi_low"), "pi_high": e.get("pi_high"),
                           "tau2": e.get("tau2"), "i2": e.get("i2"), "q": e.get("q"), "q_p": e.get("q_p"), "method": meta_block["method"],
                           "hartung_knapp": meta_block["hartung_knapp"], "excluded": ", ".join(e["excluded"])})  # fmt: skip
            centres += [{"model": MODEL_NAMES[m], "measure": e["measure"], **c} for c in e["centres"]]
    written += [_csv(pooled, folder / "meta_analysis.csv"), _csv(centres, folder / "meta_analysis_centres.csv")]
    rows = []
    for entry in v.get("subgroups", {}).get("variables", {}).values():
        for level, b in entry["levels"].items():
            for m in b["models"] or {"": {}}:
                e = b["models"].get(m, {})
                rows.append({"variable": entry["label"], "level": level, "status": b["status"], "model": MODEL_NAMES.get(m, ""),
                             "n": b["n"] if b["n"] else None, "n_pos": b["n_pos"] if b["n"] else None,
                             **_interval("auc", e, "auc", "ci_low", "ci_high"), **_interval("oe", e.get("oe")),
                             **_interval("slope", e.get("slope")), "sites": ", ".join(b["sites"]), "suppressed_at": ", ".join(b["suppressed_at"])})  # fmt: skip
    written.append(_csv(rows, folder / "subgroups.csv"))
    rows = []
    for site, per in v.get("sample_size", {}).get("sites", {}).items():
        for m, a in per.items():
            rows.append({"site": site, "model": MODEL_NAMES[m], "n": a["n"], "events": a["events"], "non_events": a["non_events"],
                         "rule_of_thumb_met": a["rule_of_thumb_met"],
                         **{f"{k}_ci_width": p["width"] for k, p in a["precision"].items()},
                         **{f"{k}_target_met": p["met"] for k, p in a["precision"].items()}})  # fmt: skip
    written.append(_csv(rows, folder / "sample_size.csv"))
    return written


def _csv(rows: list[dict[str, Any]], path: Path) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def analyse(
    run: RunData,
    parts: tuple[str, ...] = ("validation", "survival"),
    source: str = "aggregate",
    reps: int = 2000,
    seed: int = 0,
    figures: bool = True,
    hartung_knapp: bool = False,
) -> tuple[dict[str, Any], Path]:
    """Compute the requested sections (and, with validation from aggregates, the equivalence table when sites
    shared patient-level rows), write them with `write_analysis`; returns the whole analysis.json and its path."""
    sections: dict[str, Any] = {}
    if "validation" in parts:
        sections["validation"] = validate(run, source, reps, seed, hartung_knapp=hartung_knapp)
    if "survival" in parts:
        sections["survival"] = survival_analysis(run, source)
    if "validation" in parts and source == "aggregate":
        rows = equivalence(run, reps=200, seed=seed, computed=sections)
        if rows:
            sections["equivalence"] = rows
    path = write_analysis(run, sections, figures)
    return json.loads(path.read_text()), path


def write_analysis(run: RunData, sections: dict[str, Any], figures: bool = True) -> Path:
    """Merge `sections` into RUN/analysis.json (other sections kept), and write tables and figures; with a validation
    section, the model card (RUN/model_card.json and .md, packed into the run's model files)."""
    analysis = dict(sections)
    analysis["sharing"] = {
        s.site_id: {"role": s.role, "sharing": s.sharing, "min_cell_count": s.summary.get("min_cell_count", 0)} for s in run.sites
    }
    merged = read_analysis(run.path)
    merged.update(analysis)
    if "validation" in merged:
        from tace.analysis.modelcard import write_model_card

        merged["headline"] = headline(merged["validation"], merged.get("survival"))
        merged["model_card"] = write_model_card(run.path, merged["validation"]).name
    _tables(merged, run.path / "tables")
    if figures:
        from tace.analysis import plots

        merged["figures"] = plots.draw(merged, run.path / "figures")
    return _write_analysis_json(run.path, merged)


def read_analysis(run_dir: Path) -> dict[str, Any]:
    """RUN/analysis.json as a dict ({} before any analysis)."""
    path = run_dir / "analysis.json"
    if not path.exists():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError:
        raise TaceError(f"{path} is damaged (not JSON)", "delete it and rerun the analysis commands") from None


def merge_analysis(run_dir: Path, sections: dict[str, Any]) -> Path:
    """Merge `sections` into RUN/analysis.json (other sections kept), written atomically."""
    analysis = read_analysis(run_dir)
    analysis.update(sections)
    return _write_analysis_json(run_dir, analysis)


def _write_analysis_json(run_dir: Path, analysis: dict[str, Any]) -> Path:
    """Write RUN/analysis.json atomically (strict JSON: non-finite numbers become null)."""
    path = run_dir / "analysis.json"
    tmp = path.with_name(".analysis.json.tmp")
    tmp.write_text(json.dumps(jsonable(analysis, finite=True), indent=1, allow_nan=False), encoding="utf-8")
    tmp.replace(path)
    return path
