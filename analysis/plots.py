"""Figures of the analysis (matplotlib, no display needed), each written as PNG and SVG.

ROC curves with 95 % bootstrap bands per external site and pooled; calibration curves (grouped, and flexible with
their 95 % band); decision curves; forest plots of the meta-analysis across centres and of the subgroups;
Kaplan-Meier curves with the numbers at risk below, log-rank p and hazard ratio; the radiogenomics volcano and
enrichment plots; the report's training curves and privacy spent over the rounds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tace.analysis.data import MODEL_NAMES as NAMES  # noqa: E402

COLORS = {"dltrmlp": "#c0392b", "dltr": "#2471a3", "radiomics": "#27ae60", "clinical": "#7f8c8d"}
GROUP_COLORS = ["#c0392b", "#f39c12", "#27ae60", "#2471a3", "#8e44ad", "#16a085", "#7f8c8d", "#d35400", "#2c3e50", "#e84393"]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def save(fig: Any, folder: Path, name: str) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("png", "svg"):
        path = folder / f"{name}.{ext}"
        fig.savefig(path, dpi=130, bbox_inches="tight", metadata={"Date": None} if ext == "svg" else None)
        out.append(path.name)
    plt.close(fig)
    return out


def _p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def roc(block: dict[str, Any], title: str) -> Any:
    fig, ax = plt.subplots(figsize=(5, 5))
    for model, e in block["models"].items():
        if "roc" not in e:
            continue
        r = e["roc"]
        ax.fill_between(r["band_fpr"], r["band_low"], r["band_high"], color=COLORS[model], alpha=0.15, linewidth=0)
        ax.plot(r["fpr"], r["tpr"], color=COLORS[model], lw=2,
                label=f"{NAMES[model]}  AUC {e['auc']:.3f} ({e['ci_low']:.3f}-{e['ci_high']:.3f})")  # fmt: skip
    ax.plot([0, 1], [0, 1], ls="--", color="#999", lw=1)
    ax.set(
        xlabel="1 - specificity",
        ylabel="sensitivity",
        title=f"{title} (n={block['n']}, responders {block['n_pos']})",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right", fontsize=8)
    return fig


def calibration(block: dict[str, Any], title: str) -> Any:
    fig, ax = plt.subplots(figsize=(5, 5))
    for model, e in block["models"].items():
        c = e["calibration_curve"]
        xs = [g["predicted"] for g in c]
        ys = [g["observed"] for g in c]
        err = [[y - g["observed_low"] for y, g in zip(ys, c, strict=True)], [g["observed_high"] - y for y, g in zip(ys, c, strict=True)]]
        hl = e["hosmer_lemeshow"]
        ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, color=COLORS[model], capsize=2, lw=1.5,
                    label=f"{NAMES[model]}  Brier {e['brier']:.3f}, HL p {_p(hl['p'])}")  # fmt: skip
    ax.plot([0, 1], [0, 1], ls="--", color="#999", lw=1)
    ax.set(
        xlabel="predicted probability of response", ylabel="observed response rate", title=f"Calibration: {title}", xlim=(0, 1), ylim=(0, 1)
    )
    ax.legend(loc="upper left", fontsize=8)
    return fig


def _ci(e: dict[str, Any] | None) -> str:
    if not e:
        return "n/a"
    return f"{e['value']:.2f} ({e['low']:.2f} to {e['high']:.2f})"


def calibration_flexible(block: dict[str, Any], title: str) -> Any:
    """The flexible calibration curve of every model with its 95 % band, against the diagonal; the legend gives
    the calibration slope and intercept (95 % CI) and the ICI."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    for model, e in block["models"].items():
        curve, c = e.get("calibration_flexible"), e.get("calibration") or {}
        if not curve:
            continue
        ax.fill_between(curve["predicted"], curve["low"], curve["high"], color=COLORS[model], alpha=0.15, linewidth=0)
        ici = f", ICI {c['ici']:.3f}" if c.get("ici") is not None else ""
        ax.plot(curve["predicted"], curve["observed"], color=COLORS[model], lw=2,
                label=f"{NAMES[model]}  slope {_ci(c.get('slope'))}\nintercept {_ci(c.get('intercept'))}{ici}")  # fmt: skip
    ax.plot([0, 1], [0, 1], ls="--", color="#999", lw=1)
    ax.set(xlabel="predicted probability of response", ylabel="observed response (flexible calibration)",
           title=f"Flexible calibration: {title}", xlim=(0, 1), ylim=(0, 1))  # fmt: skip
    ax.legend(loc="upper left", fontsize=7)
    return fig


#: Per meta-analysed measure: axis label, the value of no effect (perfect performance for calibration), log axis.
FOREST = {"auc": ("AUC (c-statistic)", 0.5, False), "slope": ("calibration slope", 1.0, False), "oe": ("O/E ratio", 1.0, True)}


def forest(meta: dict[str, Any], measure: str) -> Any:
    """Forest plot of one measure across centres, one panel per model: each centre's estimate with its 95 % CI
    (square sized by its random-effects weight), the pooled estimate (diamond: its 95 % CI) and the 95 % prediction
    interval (line through the diamond)."""
    label, ref, log = FOREST[measure]
    models = [m for m in NAMES if meta["models"].get(m, {}).get(measure)]
    centres = list(meta["centres"])
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models) + 1.2, 0.42 * len(centres) + 2.0), squeeze=False, sharey=True)
    for ax, model in zip(axes[0], models, strict=True):
        e = meta["models"][model][measure]
        by_centre = {c["centre"]: c for c in e["centres"]}
        for i, centre in enumerate(centres):
            y = len(centres) + 1 - i
            c = by_centre.get(centre)
            if c is None:
                ax.text(ref, y, "not estimable here", ha="center", va="center", fontsize=7, color="#777")
                continue
            ax.plot([c["low"], c["high"]], [y, y], color=COLORS[model], lw=1.2)
            ax.plot([c["value"]], [y], "s", color=COLORS[model], ms=4 + 8 * c.get("weight", 1 / max(len(centres), 1)))
        if "pooled" in e:
            ax.fill([e["ci_low"], e["pooled"], e["ci_high"], e["pooled"]], [0.5, 0.75, 0.5, 0.25], color=COLORS[model])
            ax.plot([e["pi_low"], e["pi_high"]], [0.5, 0.5], color=COLORS[model], lw=1, ls=":")
            ax.set_title(f"{NAMES[model]}: {e['pooled']:.2f} ({e['ci_low']:.2f}-{e['ci_high']:.2f})\n"
                         f"95% PI {e['pi_low']:.2f}-{e['pi_high']:.2f}; I² {100 * e['i2']:.0f} %", fontsize=8)  # fmt: skip
        else:
            ax.set_title(f"{NAMES[model]}: no pooled estimate (k = {e['k']})", fontsize=8)
        ax.axvline(ref, color="#999", lw=1, ls="--")
        if log:
            from matplotlib.ticker import FixedLocator, NullFormatter, StrMethodFormatter

            ax.set_xscale("log")
            lo, hi = ax.get_xlim()
            ax.xaxis.set_major_locator(FixedLocator([t for t in (0.01, 0.1, 0.25, 0.5, 1, 2, 4, 10, 100) if lo <= t <= hi]))
            ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        elif measure == "auc":
            ax.set_xlim(0, 1)
        ax.set_xlabel(label)
    axes[0][0].set_yticks([len(centres) + 1 - i for i in range(len(centres))] + [0.5], centres + ["pooled (PI dotted)"], fontsize=8)
    axes[0][0].set_ylim(0, len(centres) + 1.7)
    fig.tight_layout()
    return fig


def subgroup_forest(subgroups: dict[str, Any], model: str, overall: float | None = None) -> Any:
    """Forest plot of one model's AUC (95 % DeLong CI) in every subgroup level, pooled over the external sites;
    suppressed levels are named as such, levels with one class marked as having no AUC."""
    rows: list[tuple[str, dict[str, Any] | None, str]] = []
    for entry in subgroups["variables"].values():
        rows.append((entry["label"], None, "header"))
        for level, b in entry["levels"].items():
            rows.append((f"  {level} (n={b['n']})" if b["n"] else f"  {level}", b, b["status"]))
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.2))
    for i, (_, b, status) in enumerate(rows):
        y = len(rows) - i
        if b is None:
            continue
        e = b["models"].get(model, {})
        if status == "suppressed":
            ax.text(0.5, y, "suppressed (minimum cell count)", ha="center", va="center", fontsize=7, color="#777")
        elif "auc" not in e:
            ax.text(0.5, y, "one class: no AUC", ha="center", va="center", fontsize=7, color="#777")
        else:
            ax.plot([e["ci_low"], e["ci_high"]], [y, y], color=COLORS[model], lw=1.2)
            ax.plot([e["auc"]], [y], "s", color=COLORS[model], ms=5, mfc="white" if status == "partly suppressed" else COLORS[model])
    ax.set_yticks([len(rows) - i for i in range(len(rows))], [r[0] for r in rows], fontsize=7)
    for label in ax.get_yticklabels():
        if not label.get_text().startswith("  "):
            label.set_fontweight("bold")
    ax.axvline(0.5, color="#999", lw=1, ls="--")
    if overall is not None:
        ax.axvline(overall, color=COLORS[model], lw=1, ls=":")
    ax.set(xlim=(0, 1), ylim=(0.3, len(rows) + 0.7), xlabel=f"{NAMES[model]} AUC (95 % CI), external sites pooled",
           title=f"{NAMES[model]} by subgroup (open square: some sites suppressed the level)")  # fmt: skip
    fig.tight_layout()
    return fig


def decision(block: dict[str, Any], title: str) -> Any:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    first = next(iter(block["models"].values()))["decision_curve"]
    ax.plot(first["threshold"], first["treat_all"], color="#555", lw=1, ls="--", label="treat all")
    ax.plot(first["threshold"], first["treat_none"], color="#000", lw=1, label="treat none")
    top = max(max(first["treat_all"]), 0.05)
    for model, e in block["models"].items():
        d = e["decision_curve"]
        ax.plot(d["threshold"], d["model"], color=COLORS[model], lw=2, label=NAMES[model])
        top = max(top, max(d["model"]))
    ax.set(xlabel="threshold probability", ylabel="net benefit", title=f"Decision curve: {title}", xlim=(0, 1), ylim=(-0.05, top * 1.1))
    ax.legend(fontsize=8)
    return fig


def kaplan_meier(block: dict[str, Any], title: str) -> Any:
    fig, (ax, table) = plt.subplots(2, 1, figsize=(6.5, 5.5), gridspec_kw={"height_ratios": [4, 1.2]}, sharex=True)
    times = block["at_risk_times"]
    names = list(block["km"])
    for i, (name, km) in enumerate(block["km"].items()):
        color = GROUP_COLORS[i % len(GROUP_COLORS)]
        ax.step([0, *km["time"]], [1.0, *km["survival"]], where="post", color=color, lw=2,
                label=f"{name} (n={km['n']}, events {km['events']})")  # fmt: skip
        ax.fill_between([0, *km["time"]], [1.0, *km["low"]], [1.0, *km["high"]], step="post", color=color, alpha=0.12, linewidth=0)
    text = []
    if "logrank" in block:
        text.append(f"log-rank p {_p(block['logrank']['p'])}")
    for name, hr in block.get("cox", {}).get("hazard_ratios", {}).items():
        text.append(f"HR {name} vs {block['cox']['reference']}: {hr['hr']:.2f} ({hr['low']:.2f}-{hr['high']:.2f})")
    if text:
        ax.text(0.98, 0.97, "\n".join(text), transform=ax.transAxes, ha="right", va="top", fontsize=8,
                bbox={"boxstyle": "round", "fc": "white", "ec": "#ccc"})  # fmt: skip
    ax.set(ylabel="progression-free survival", ylim=(0, 1.02), title=title)
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, 0.8), fontsize=8)
    table.set_ylim(-0.5, len(names) - 0.5)
    for i, name in enumerate(names):
        row = len(names) - 1 - i
        for t in times:
            table.text(t, row, str(block["km"][name]["at_risk"].get(str(t), "")), ha="center", va="center", fontsize=7,
                       color=GROUP_COLORS[i % len(GROUP_COLORS)])  # fmt: skip
    table.set_yticks(range(len(names)), [n[:26] for n in reversed(names)], fontsize=7)
    table.set_xticks(times)
    table.set_xlabel("days since first TACE  (numbers at risk)")
    table.tick_params(axis="y", length=0)
    for side in ("top", "right", "left"):
        table.spines[side].set_visible(False)
    fig.tight_layout()
    return fig


def draw(analysis: dict[str, Any], folder: Path) -> dict[str, list[str]]:
    """Every figure of the analysis; returns {figure: [file names]} (relative to `folder`)."""
    out: dict[str, list[str]] = {}
    v = analysis.get("validation")
    if v:
        populations = [*v["sites"].items()]
        if len(v["sites"]) > 1:
            populations.append(("pooled external", v["pooled"]))
        for where, block in populations:
            if any("roc" in e for e in block["models"].values()):
                out[f"roc-{slug(where)}"] = save(roc(block, f"ROC: {where}"), folder, f"roc-{slug(where)}")
            out[f"calibration-{slug(where)}"] = save(calibration(block, where), folder, f"calibration-{slug(where)}")
            if any(e.get("calibration_flexible") for e in block["models"].values()):
                name = f"calibration-flexible-{slug(where)}"
                out[name] = save(calibration_flexible(block, where), folder, name)
            out[f"decision-{slug(where)}"] = save(decision(block, where), folder, f"decision-{slug(where)}")
        meta = v.get("meta", {})
        for measure in FOREST:
            if any(e.get(measure, {}).get("centres") for e in meta.get("models", {}).values()):
                out[f"forest-{measure}"] = save(forest(meta, measure), folder, f"forest-{measure}")
        if v.get("subgroups", {}).get("variables"):
            for model in [m for m in NAMES if m in v["pooled"]["models"]]:
                name = f"subgroups-{model}"
                out[name] = save(subgroup_forest(v["subgroups"], model, v["pooled"]["models"][model].get("auc")), folder, name)
    s = analysis.get("survival")
    if s:
        for grouping, entry in s["groupings"].items():
            model, _, kind = grouping.partition(":")
            populations = [("pooled external", entry["pooled"])] if "pooled" in entry else []
            if model == "dltrmlp" and len(entry["sites"]) > 1:
                populations += list(entry["sites"].items())
            for where, block in populations:
                name = f"km-{slug(model)}-{kind}-{slug(where)}"
                title = f"PFS by {NAMES.get(model, model)} {'predicted response' if kind == 'response' else 'risk group'}: {where}"
                out[name] = save(kaplan_meier(block, title), folder, name)
    return out


def volcano(genes: Any, p_threshold: float, r_threshold: float, method: str, target: str, highlight: dict[str, set[str]]) -> Any:
    """Gene correlations: r against -log10 P; kept genes darker, genes of up to four enriched sets coloured."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.5, 5))
    logp = -np.log10(np.maximum(genes["p"].to_numpy(dtype=float), 1e-300))
    r = genes["r"].to_numpy(dtype=float)
    kept = genes["kept"].to_numpy(dtype=bool)
    ax.scatter(r[~kept], logp[~kept], s=3, color="#c8c8c8", linewidths=0, rasterized=True, label=f"not kept ({int((~kept).sum())})")
    ax.scatter(r[kept], logp[kept], s=4, color="#555", linewidths=0, rasterized=True, label=f"kept ({int(kept.sum())})")
    names = genes["gene"].to_numpy()
    for i, (term, members) in enumerate(list(highlight.items())[:4]):
        m = np.isin(names, list(members)) & kept
        ax.scatter(r[m], logp[m], s=10, color=GROUP_COLORS[i], linewidths=0, label=f"{term[:38]} ({int(m.sum())})")
    ax.axhline(-np.log10(p_threshold), color="#999", lw=1, ls="--")
    for x in (-r_threshold, r_threshold) if r_threshold > 0 else ():
        ax.axvline(x, color="#999", lw=1, ls="--")
    ax.set(
        xlabel=f"{method.capitalize()} r with {target}",
        ylabel="-log10 P",
        title=f"Gene correlations with {target} (n genes = {len(genes)})",
    )
    ax.legend(fontsize=7, loc="upper center", markerscale=2)
    return fig


def enrichment(ora: Any, prerank: Any, fdr: float, top: int = 12) -> Any:
    """Left: over-representation of the kept genes (bars of -log10 FDR, overlap / set size). Right: GSEA pre-ranked
    (dots at NES, size = set size, colour = -log10 FDR). Top sets by FDR; the dashed line marks the FDR threshold."""
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.32 * top + 1.8))
    o = ora.head(top).iloc[::-1]
    y = np.arange(len(o))
    left.barh(y, -np.log10(np.maximum(o["fdr"].to_numpy(dtype=float), 1e-300)),
              color=["#c0392b" if q < fdr else "#bbb" for q in o["fdr"]])  # fmt: skip
    left.set_yticks(y, [f"{t[:40]}  {k}/{n}" for t, k, n in zip(o["term"], o["overlap"], o["set_size"], strict=True)], fontsize=7)
    left.axvline(-np.log10(fdr), color="#555", lw=1, ls="--")
    left.set(xlabel="-log10 FDR", title="Over-representation of kept genes")
    g = prerank.head(top).iloc[::-1]
    y = np.arange(len(g))
    q = -np.log10(np.maximum(g["fdr"].to_numpy(dtype=float), 1e-4))
    points = right.scatter(g["nes"], y, s=8 + 0.8 * g["set_size"].to_numpy(dtype=float), c=q, cmap="Reds", vmin=0, vmax=4,
                           edgecolors=["#000" if v < fdr else "none" for v in g["fdr"]])  # fmt: skip
    right.set_yticks(y, [t[:40] for t in g["term"]], fontsize=7)
    right.axvline(0, color="#999", lw=1)
    right.set(xlabel="normalised enrichment score (NES)", title="GSEA pre-ranked on r (outlined: FDR below threshold)")
    fig.colorbar(points, ax=right, label="-log10 FDR (capped at 4)", shrink=0.8)
    fig.tight_layout()
    return fig


def training_curves(metrics: list[dict[str, str]], stages: dict[str, str]) -> Any:
    """Per-site training loss (top row) and internal-validation AUC (bottom row) per round, one column per stage.

    `metrics` are the rows of a run's metrics.csv (``stage``, ``site``, ``round``, ``train_loss``, ``val_auc``);
    `stages` maps each stage to its title, in the order drawn (stages without rows are left out). Pooled in black.
    """
    drawn = [s for s in stages if any(r["stage"] == s for r in metrics)]
    fig, axes = plt.subplots(2, len(drawn), figsize=(4.2 * len(drawn), 6.5), squeeze=False)
    sites = sorted({r["site"] for r in metrics})
    for j, stage in enumerate(drawn):
        for i, site in enumerate(sites):
            rows = [r for r in metrics if r["stage"] == stage and r["site"] == site]
            color = "#000" if site == "pooled" else GROUP_COLORS[i % len(GROUP_COLORS)]
            for k, key in enumerate(("train_loss", "val_auc")):
                pts = [(int(r["round"]), float(r[key])) for r in rows if r.get(key)]
                if pts:
                    axes[k][j].plot(*zip(*pts, strict=True), marker=".", color=color, lw=2.2 if site == "pooled" else 1.2, label=site)
        axes[0][j].set(title=stages[stage], ylabel="training loss")
        axes[1][j].set(xlabel="round", ylabel="internal-validation AUC", ylim=(0, 1))
    axes[1][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def privacy_epsilon(ledger: dict[str, Any]) -> Any:
    """ε spent after each training round of the run, per site (× a round the site declined), with the budget.

    `ledger` is privacy_ledger.json: ``sites`` (the order of the colours), ``releases`` (``site``, ``epsilon``,
    ``declined``, in the run's order) and ``target_epsilon``.
    """
    releases = ledger.get("releases", [])
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for i, site in enumerate(ledger.get("sites", {})):
        rows = [r for r in releases if r["site"] == site]
        color = GROUP_COLORS[i % len(GROUP_COLORS)]
        trained = [(j + 1, float(r["epsilon"])) for j, r in enumerate(rows) if not r.get("declined")]
        if trained:
            ax.plot(*zip(*trained, strict=True), marker=".", color=color, label=site)
        declined = [(j + 1, float(r["epsilon"])) for j, r in enumerate(rows) if r.get("declined")]
        if declined:
            ax.plot(*zip(*declined, strict=True), "x", color=color, ms=9, label=f"{site}: declined")
    if ledger.get("target_epsilon"):
        ax.axhline(float(ledger["target_epsilon"]), color="#c0392b", ls="--", lw=1, label="budget")
    ax.set(xlabel="training round of the run (all stages, in order)", ylabel="ε spent", ylim=(0, None))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
