"""The study report: one self-contained HTML file (figures embedded) a clinician or reviewer reads top to bottom.

Built from the run folder only: run_config.json, metrics.csv, site_returns/ (counts), data_sharing.json,
analysis.json with its figures, model_card.json, and privacy_ledger.json when differential privacy was on.
Aggregates only: no patient value appears in it. The page is rendered from the Jinja2 templates in
analysis/templates/ with autoescaping, so a site id, a file name or any other value is shown as text and can never
inject markup. Every table carries its CSV and every figure its SVG as an embedded download (data: URIs), so the
file stays self-contained; the print style sheet keeps figures and table rows whole on A4 pages.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from tace.analysis import checklists, plots
from tace.analysis.plots import NAMES, slug
from tace.common.cli import software_versions
from tace.common.config import fusion_head_text, resolve_fusion_head
from tace.common.errors import TaceError
from tace.common.protocol import DISPLAY_ORDER
from tace.common.protocol import STAGES as PROTOCOL_STAGES

STAGES = {name: stage.label for name, stage in PROTOCOL_STAGES.items()}  # in the order they train
#: Run-config keys shown in the training section (the rest are listed in full in the appendix).
KEY_SETTINGS = ("layout", "holdout-sites", "backbone", "strategy", "rounds", "local-epochs", "lr", "lr-schedule", "batch-size",
                "head-rounds", "fusion-head", "clinical-rounds", "spacing-mm", "box-voxels", "sequences", "intensity-reference", "augment", "dp", "seed")  # fmt: skip
DP_MODES = {"sample": "sample-level DP-SGD at every site (Opacus)", "client-fixed": "client-level DP, fixed clipping (Flower)",
            "client-adaptive": "client-level DP, adaptive clipping (Flower)"}  # fmt: skip


def num(value: Any, digits: int = 3) -> str:
    """A table value as text: numbers to `digits` decimals (small ones in two significant digits), n/a for none."""
    if value is None or value == "":
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        if value != 0 and abs(value) < 10 ** (-digits):
            return f"{value:.2g}"
        return f"{value:.{digits}f}"
    return str(value)


def p_value(value: Any) -> str:
    """A P value as text: three decimals, or < 0.001."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


@dataclass(frozen=True)
class Interval:
    """A table cell: an estimate with its 95 % confidence interval."""

    value: Any
    low: Any
    high: Any
    digits: int = 3


@dataclass(frozen=True)
class Figure:
    """A figure of the run folder to embed: its name, caption, PNG and SVG (base64), or no PNG when it was not drawn."""

    name: str
    caption: str
    png: str | None
    svg: str | None = None


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return repr(value) if isinstance(value, float) else value


def csv_uri(header: list[Any], rows: list[list[Any]]) -> str:
    """A table as an embedded CSV file (a data: URI): numbers at full precision, an interval column as three (the
    value, its 95 % CI low and high)."""
    intervals = {j for row in rows for j, c in enumerate(row) if isinstance(c, Interval)}
    buffer = io.StringIO()
    out = csv.writer(buffer, lineterminator="\n")
    out.writerow([x for j, h in enumerate(header) for x in ([h, f"{h} 95% CI low", f"{h} 95% CI high"] if j in intervals else [h])])
    for row in rows:
        cells: list[Any] = []
        for j, c in enumerate(row):
            if isinstance(c, Interval):
                cells += [_csv_value(c.value), _csv_value(c.low), _csv_value(c.high)]
            else:
                cells += [_csv_value(c), "", ""] if j in intervals else [_csv_value(c)]
        out.writerow(cells)
    return "data:text/csv;charset=utf-8;base64," + base64.b64encode(buffer.getvalue().encode("utf-8")).decode("ascii")


def environment() -> Environment:
    """The report's templates (analysis/templates/), autoescaped, with the filters `num` and `p_value`."""
    env = Environment(
        loader=PackageLoader("tace.analysis", "templates"), autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True
    )
    env.filters.update(num=num, p_value=p_value)
    env.globals["csv_uri"] = csv_uri
    env.tests["interval"] = lambda value: isinstance(value, Interval)
    return env


class Report:
    """Reads a run folder and gathers what each section of the report shows; `render()` returns the HTML."""

    def __init__(self, run_dir: Path) -> None:
        self.run = Path(run_dir)
        self.figures = self.run / "figures"
        self.config_file = self._json("run_config.json", required=True)
        self.config: dict[str, Any] = self.config_file.get("run_config", {})
        self.analysis = self._json("analysis.json", required=True)
        self.sharing = self._json("data_sharing.json")
        self.ledger = self._json("privacy_ledger.json")
        self.returns = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted((self.run / "site_returns").glob("*.json"))}
        self.card = self._json("model_card.json")
        self.metrics = self._metrics()
        self.missing_figures: list[str] = []

    def _json(self, name: str, required: bool = False) -> dict[str, Any]:
        path = self.run / name
        if not path.exists():
            if required:
                raise TaceError(f"{path} not found", "run the study to the end, then `tace-analysis validate` and `survival` on its folder")
            return {}
        try:
            return dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError:
            raise TaceError(f"{path} is damaged (not JSON)", "restore it or rerun the step that writes it") from None

    def _metrics(self) -> list[dict[str, str]]:
        path = self.run / "metrics.csv"
        if not path.exists():
            return []
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    def figure(self, name: str, caption: str) -> Figure:
        path = self.figures / f"{name}.png"
        if not path.exists():
            self.missing_figures.append(name)
            return Figure(name, caption, None)
        svg = path.with_suffix(".svg")
        return Figure(name, caption, base64.b64encode(path.read_bytes()).decode("ascii"),
                      base64.b64encode(svg.read_bytes()).decode("ascii") if svg.exists() else None)  # fmt: skip

    # -- sections: what each template of analysis/templates/ shows -----------------------------------------------
    def question(self) -> dict[str, Any]:
        rows = []
        trained = {r["site"]: int(r["num_examples"]) for r in self.metrics if r["stage"] == "dltr" and r["num_examples"]}
        for site, ret in self.returns.items():
            n, pos = int(ret.get("n", 0)), int(ret.get("n_pos", 0))
            role = "training" if ret.get("role") == "train" else "external validation"
            what = "internal-validation split" if ret.get("role") == "train" else "whole cohort"
            rows.append((site, role, trained.get(site, ""), f"{n} ({what})", pos, f"{100 * pos / n:.0f} %" if n else "n/a",
                         ret.get("n_with_pfs", "")))  # fmt: skip
        return {"rows": rows}

    def training(self) -> dict[str, Any]:
        stages = []
        for stage, label in STAGES.items():
            rounds = {int(r["round"]) for r in self.metrics if r["stage"] == stage}
            if rounds:
                stages.append((label, len(rounds)))
        curves = None
        if self.metrics:
            plots.save(plots.training_curves(self.metrics, STAGES), self.figures, "training-curves")
            curves = self.figure(
                "training-curves", "Per-site training loss and internal-validation AUC per round, for each stage (pooled in black)."
            )
        return {
            "mode": self.config_file.get("mode", "n/a"),
            "seed": self.config.get("seed", "n/a"),
            "settings": [(k, self._setting(k)) for k in KEY_SETTINGS if k in self.config],
            "head": fusion_head_text(self.config),
            "stages": stages,
            "curves": curves,
        }

    def _setting(self, key: str) -> Any:
        """A run-config value for the settings table; "auto" for the fusion head says which head the run trained."""
        value = self.config[key]
        if key == "fusion-head" and value == "auto":
            return f"auto: {resolve_fusion_head(value, bool(self.config.get('dp')))}"
        return value

    def comparison(self) -> dict[str, Any] | None:
        v = self.analysis.get("validation")
        if not v:
            return None
        sites = list(v["sites"])
        auc = []
        for model in DISPLAY_ORDER:
            if v["pooled"]["models"].get(model) is None:
                continue
            row: list[Any] = [NAMES[model]]
            for block in [*(v["sites"][s] for s in sites), v["pooled"]]:
                e = block["models"].get(model, {})
                row.append(Interval(e.get("auc"), e.get("ci_low"), e.get("ci_high")))
            paired = v["pooled"]["paired"].get(f"dltrmlp vs {model}", {})
            row.append(p_value(paired.get("p")) if model != "dltrmlp" else "—")
            auc.append(row)
        thresholds = []
        for model, e in v["pooled"]["models"].items():
            t = e.get("threshold", {})
            cells = [Interval(t[k]["value"], t[k].get("low"), t[k].get("high")) if k in t else "n/a"
                     for k in ("accuracy", "sensitivity", "specificity", "ppv", "npv")]  # fmt: skip
            thresholds.append([NAMES[model], *cells, e.get("brier"), p_value(e.get("hosmer_lemeshow", {}).get("p"))])
        drawn = self.analysis.get("figures", {})
        internal = v.get("internal", {})
        internal_rows = [[NAMES[m], Interval(internal[m]["auc"], internal[m]["ci_low"], internal[m]["ci_high"])]
                         for m in DISPLAY_ORDER if m in internal]  # fmt: skip
        return {
            "sites": sites,
            "auc": auc,
            "internal": {"n": internal.get("n"), "rows": internal_rows} if internal_rows else None,
            "thresholds": thresholds,
            "notes": v.get("notes", []),
            "roc": [
                self.figure(f"roc-{slug(s)}", f"ROC curves with 95 % bootstrap bands: {s}")
                for s in [*sites, "pooled external"]
                if f"roc-{slug(s)}" in drawn
            ],
            "calibration": self.figure(
                "calibration-pooled-external", "Calibration: observed response rate by decile of predicted probability"
            ),
            "decision": self.figure("decision-pooled-external", "Decision curves: net benefit against treat-all and treat-none"),
            "finetuning": self.finetuning(),
        }

    def _populations(self, v: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        return [*v["sites"].items(), *([("pooled external", v["pooled"])] if len(v["sites"]) > 1 else [])]

    def calibration(self) -> dict[str, Any] | None:
        """Calibration intercept and slope, O/E and ICI/E50/E90/Emax per population and model; flexible curves."""
        v = self.analysis.get("validation")
        if not v:
            return None
        rows = []
        for where, block in self._populations(v):
            for model in DISPLAY_ORDER:
                c = (block["models"].get(model) or {}).get("calibration") or {}
                if not c:
                    continue
                rows.append([where, NAMES[model], block["n"], c.get("observed"), c.get("expected"), *(
                    Interval(e["value"], e["low"], e["high"], 2) if e else "n/a" for e in (c.get("oe"), c.get("intercept"), c.get("slope"))),
                    *(c.get(k) for k in ("ici", "e50", "e90", "emax"))])  # fmt: skip
        drawn = self.analysis.get("figures", {})
        if not rows:
            return None  # an analysis.json from before these statistics
        figures = [self.figure(f"calibration-flexible-{slug(w)}", f"Flexible calibration curves with 95 % bands: {w}")
                   for w, _ in reversed(self._populations(v)) if f"calibration-flexible-{slug(w)}" in drawn]  # fmt: skip
        return {"rows": rows, "figures": figures}

    def heterogeneity(self) -> dict[str, Any] | None:
        """The random-effects meta-analysis across the external centres (internal-external cross-validation in a
        leave-one-centre-out run), with its forest plots."""
        meta = (self.analysis.get("validation") or {}).get("meta")
        if not meta:
            return None
        rows = []
        for model in DISPLAY_ORDER:
            for e in meta["models"].get(model, {}).values():
                if "pooled" not in e:
                    rows.append([NAMES[model], e["measure"], e["k"], "n/a", "n/a", None, None, None])
                    continue
                rows.append([NAMES[model], e["measure"], e["k"], Interval(e["pooled"], e["ci_low"], e["ci_high"]),
                             Interval(e["pooled"], e["pi_low"], e["pi_high"]), e["tau2"], 100 * e["i2"], p_value(e["q_p"])])  # fmt: skip
        drawn = self.analysis.get("figures", {})
        figures = [self.figure(f"forest-{m}", f"Forest plot: {words} per centre, pooled (diamond) and 95 % prediction interval (dotted)")
                   for m, words in (("auc", "AUC"), ("slope", "calibration slope"), ("oe", "O/E")) if f"forest-{m}" in drawn]  # fmt: skip
        return {"loco": meta.get("layout") == "loco", "method": meta["method"], "hartung_knapp": meta["hartung_knapp"],
                "centres": meta["centres"], "rows": rows, "notes": meta.get("notes", []), "figures": figures}  # fmt: skip

    def subgroups(self) -> dict[str, Any] | None:
        """Per subgroup level (external sites pooled): counts, each model's AUC, DLTRMLP's O/E, and what was suppressed."""
        sub = (self.analysis.get("validation") or {}).get("subgroups")
        if not sub or not sub.get("variables"):
            return None
        rows = []
        for entry in sub["variables"].values():
            for level, b in entry["levels"].items():
                aucs = [Interval(e["auc"], e["ci_low"], e["ci_high"]) if "auc" in e else "n/a"
                        for e in (b["models"].get(m, {}) for m in DISPLAY_ORDER)]  # fmt: skip
                oe = (b["models"].get("dltrmlp") or {}).get("oe")
                status = "suppressed at every site" if b["status"] == "suppressed" else (
                    f"suppressed at {', '.join(b['suppressed_at'])}" if b["suppressed_at"] else "")  # fmt: skip
                rows.append([entry["label"], level, b["n"] if b["n"] else "suppressed", b["n_pos"] if b["n"] else "",
                             *aucs, Interval(oe["value"], oe["low"], oe["high"], 2) if oe else "n/a", status])  # fmt: skip
        figure = self.figure("subgroups-dltrmlp", "DLTRMLP AUC (95 % CI) by subgroup, external sites pooled; dotted: overall AUC")
        return {"rows": rows, "notes": sub.get("notes", []), "figure": figure}

    def sample_size(self) -> dict[str, Any] | None:
        """Each external site's events against the rule of thumb, and the precision its data gave DLTRMLP's estimates."""
        size = (self.analysis.get("validation") or {}).get("sample_size")
        if not size:
            return None
        rows = []
        for site, per in size["sites"].items():
            a = per.get("dltrmlp")
            if not a:
                continue
            cells = [f"{num(p['width'], 2)} ({'meets' if p['met'] else 'wider than'} {p['target']})" if p["width"] is not None else "n/a"
                     for p in (a["precision"][k] for k in ("auc", "slope", "oe"))]  # fmt: skip
            rows.append([site, a["n"], a["events"], a["non_events"], "yes" if a["rule_of_thumb_met"] else "no", *cells])
        return {"rows": rows, "rule": size["rule_of_thumb"], "targets": size["targets"]}

    def model_card(self) -> dict[str, Any] | None:
        """The run's model card (model_card.json, written by the analysis and packed into the model file)."""
        c = self.card
        if not c:
            return None
        rows = []
        for model in DISPLAY_ORDER:
            e = c.get("performance", {}).get("external_pooled", {}).get(model)
            meta = c.get("performance", {}).get("meta_analysis", {}).get(model, {})
            cal = c.get("calibration", {}).get(model, {})

            def iv(x: dict[str, Any] | None) -> Any:
                return Interval(x["value"], x["low"], x["high"]) if x and x.get("value") is not None else "n/a"

            pi = Interval(meta.get("value"), meta["pi_low"], meta["pi_high"]) if meta.get("pi_low") is not None else "n/a"
            rows.append([NAMES[model], iv(e), pi, iv(cal.get("slope")), iv(cal.get("oe")), cal.get("ici")])
        m, data, privacy = c.get("model", {}), c.get("data", {}), c.get("privacy", {})
        facts = [
            ["model", f"{m.get('name')} (TACE-FL {m.get('tace_fl_version')}, backbone {m.get('backbone')}, {m.get('layout')} layout, "
                      f"{m.get('training')} training)"],
            ["intended use", c.get("intended_use")], ["not intended for", c.get("not_intended_use")], ["inputs", c.get("inputs")],
            ["data", "training sites: " + ", ".join(str(t["site"]) for t in data.get("training_sites", [])) + "; external sites: "
                     + ", ".join(f"{e['site']} ({e['patients']} patients, {e['responders']} responders)" for e in data.get("external_sites", []))
                     + f"; outcome: {data.get('outcome')}"],
            *(["limit", x] for x in c.get("limits", [])),
            ["privacy", f"differential privacy {privacy.get('differential_privacy')}; secure aggregation {privacy.get('secure_aggregation')}; "
                        f"{privacy.get('what_left_the_sites')}"],
        ]  # fmt: skip
        return {"written": c.get("written"), "facts": facts, "rows": rows}

    def checklists(self) -> dict[str, Any]:
        """TRIPOD+AI and CLAIM 2024, item by item: where the report or the run folder answers it, or that it is the
        authors'."""

        def items(table: tuple[checklists.Item, ...]) -> list[dict[str, Any]]:
            return [{"item": i.item, "topic": i.topic, "status": i.status, "status_words": checklists.STATUS_WORDS[i.status],
                     "where": i.where, "section": checklists.SECTIONS.get(i.where, i.where), "note": i.note} for i in table]  # fmt: skip

        header = ["item", "topic", "status", "where", "note"]

        def csv_rows(table: list[dict[str, Any]]) -> list[list[Any]]:
            return [[i["item"], i["topic"], i["status_words"], i["section"], i["note"]] for i in table]

        tripod, claim = items(checklists.TRIPOD_AI), items(checklists.CLAIM_2024)
        return {"header": header, "tripod": tripod, "claim": claim, "tripod_csv": csv_rows(tripod), "claim_csv": csv_rows(claim),
                "authors": sum(i["status"] == checklists.AUTHORS for i in tripod + claim)}  # fmt: skip

    def finetuning(self) -> dict[str, Any] | None:
        """Global vs locally fine-tuned DLTRMLP per training site (run-config finetune), when the run did it."""
        tuned = self._json("finetune.json")
        if not tuned.get("sites"):
            return None
        rows = [
            [site, e.get("n_val"), e.get("global_auc"), e.get("finetuned_auc"), e.get("error", "")] for site, e in tuned["sites"].items()
        ]
        return {"mode": tuned.get("mode"), "rows": rows}

    def survival(self) -> dict[str, Any] | None:
        s = self.analysis.get("survival")
        if not s:
            return None
        rows = []
        for grouping, entry in s["groupings"].items():
            pooled = entry.get("pooled", {})
            lr = pooled.get("logrank", {})
            for name, hr in pooled.get("cox", {}).get("hazard_ratios", {}).items():
                rows.append([grouping, pooled.get("n"), pooled.get("events"), p_value(lr.get("p")), f"{name} vs {pooled['cox']['reference']}",
                             f"{num(hr['hr'], 2)} ({num(hr['low'], 2)}-{num(hr['high'], 2)})", pooled.get("c_index")])  # fmt: skip
        figures = [
            self.figure("km-dltrmlp-response-pooled-external", "PFS by DLTRMLP predicted response, pooled external sites"),
            self.figure("km-dltrmlp-risk-pooled-external", "PFS by DLTRMLP risk group, pooled external sites"),
        ]
        return {"rows": rows, "figures": figures}

    def radiogenomics(self) -> dict[str, Any] | None:
        g = self.analysis.get("radiogenomics")
        if not g:
            return None
        s, control = g["settings"], g.get("negative_control")
        thresholds = [[r["p_below"], r["abs_r_at_least"], r["fdr_below"] if r["fdr_below"] is not None else "off", r["genes"], r["positive"]]
                      for r in g["thresholds"] if r["abs_r_at_least"] in (0.0, 0.3)]  # fmt: skip
        ora = [[r["term"], f"{r['overlap']}/{r['set_size']}", r["odds_ratio"], p_value(r["p"]), p_value(r["fdr"])] for r in g["top_ora"]]
        prerank = [
            [r["term"], r["set_size"], r["nes"], p_value(r["p"]), p_value(r["fdr"]), p_value(r["fdr_gene"])] for r in g["top_prerank"]
        ]
        return {
            "settings": s,
            "patients": g["patients"],
            "genes": g["genes"],
            "min_fraction": f"{s['min_fraction']:.0%}",
            "gene_sets": Path(g["inputs"]["gene_sets"]).name,
            "thresholds": thresholds,
            "ora": ora,
            "prerank": prerank,
            "control": {"what": control["what"], "enriched": len(control["enriched"]["ora"]) + len(control["enriched"]["prerank"])}
            if control
            else None,
            "figures": [
                self.figure("radiogenomics-enrichment", "Enriched gene sets: over-representation and GSEA pre-ranked"),
                self.figure("radiogenomics-volcano", "Correlation of every gene tested with the target"),
            ],
        }

    def privacy(self) -> dict[str, Any]:
        sites = [
            {"id": site, "role": e.get("role", ""), "sharing": e.get("sharing", ""), "min_cell_count": e.get("min_cell_count"),
             "sent": e.get("sent", [])}
            for site, e in self.sharing.items()
        ]  # fmt: skip
        exactness = [
            *(self.analysis.get("validation") or {}).get("exactness", []),
            *(self.analysis.get("survival") or {}).get("exactness", []),
        ]
        return {
            "ledger": self.privacy_ledger() if self.ledger else None,
            "dp": str(self.config.get("dp", "false")).lower() in ("true", "1"),
            "sites": sites,
            "exactness": [[r["population"], r["statistics"], r["status"], "n/a" if r["bound"] is None else r["bound"]] for r in exactness],
        }

    def privacy_ledger(self) -> dict[str, Any]:
        """The ledger as a table (one row per site, or one for the federation with client-level DP) and ε over rounds."""
        led = self.ledger
        rows = [
            [site, e.get("epsilon"), e.get("delta"), e.get("budget"), e.get("rounds"), e.get("steps"), e.get("noise_multiplier"),
             e.get("sample_rate"), ", ".join(e.get("declined", [])) or "none"]
            for site, e in led.get("sites", {}).items()
        ]  # fmt: skip
        figure = None
        if led.get("releases"):
            plots.save(plots.privacy_epsilon(led), self.figures, "privacy-epsilon")
            figure = self.figure(
                "privacy-epsilon", "Privacy spent over the run: ε after each training round, per site (× a declined round)."
            )
        return {
            "mode": DP_MODES.get(str(led.get("mode")), str(led.get("mode"))),
            "unit": "each patient of a site's training split" if led.get("unit") == "patient" else "each hospital's whole contribution",
            "accountant": led.get("accountant", "RDP"),
            "budget": led.get("target_epsilon"),
            "secagg": bool(led.get("secagg")),
            "rows": rows,
            "figure": figure,
        }

    def software(self) -> dict[str, Any]:
        run_versions = self.config_file.get("software", {})
        now = software_versions()
        names = list(dict.fromkeys([*run_versions, *now]))
        return {
            "seed": self.config.get("seed", "n/a"),
            "versions": [[n, run_versions.get(n, "not recorded"), now.get(n, "")] for n in names],
            "config": [[k, v] for k, v in sorted(self.config.items()) if k not in ("cohort", "run-dir")],
        }

    def page(self) -> dict[str, Any]:
        """The page's head: the run, when and by which version it was written, and the headline result."""
        headline = self.analysis.get("headline", [])
        lead = None
        if headline:
            best = headline[0]
            lead = {"sites": len(self.analysis.get("validation", {}).get("sites", {})), "model": best["model"],
                    "auc": best.get("pooled_auc"), "low": best.get("ci_low"), "high": best.get("ci_high"),
                    "slope": best.get("calibration_slope"), "pi_low": best.get("meta_pi_low"), "pi_high": best.get("meta_pi_high"),
                    "k": best.get("meta_k")}  # fmt: skip
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return {"run": self.run.name, "stamp": stamp, "version": software_versions()["tace-fl"], "lead": lead}

    def render(self) -> str:
        # Gathered in the page's order, so that missing figures are listed in the order a reader meets them.
        sections = {
            "question": self.question(),
            "training": self.training(),
            "comparison": self.comparison(),
            "calibration": self.calibration(),
            "heterogeneity": self.heterogeneity(),
            "subgroups": self.subgroups(),
            "samplesize": self.sample_size(),
            "survival": self.survival(),
            "radiogenomics": self.radiogenomics(),
            "privacy": self.privacy(),
            "modelcard": self.model_card(),
            "checklists": self.checklists(),
            "software": self.software(),
        }
        return environment().get_template("report.html.j2").render(page=self.page(), **sections)


def write_report(run_dir: Path, out: Path | None = None) -> tuple[Path, list[str]]:
    """Write the report (default RUN/report.html); returns its path and the figures it could not embed."""
    report = Report(run_dir)
    text = report.render()
    out = out or Path(run_dir) / "report.html"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out, report.missing_figures
