"""The study report: one self-contained HTML file (figures embedded) a clinician or reviewer reads top to bottom.

Built from the run folder only: run_config.json, metrics.csv, site_returns/ (counts), data_sharing.json,
analysis.json with its figures, and privacy_ledger.json when differential privacy was on. Aggregates only: no
patient value appears in it. The page is rendered from the Jinja2 templates in analysis/templates/ with
autoescaping, so a site id, a file name or any other value is shown as text and can never inject markup.
"""

from __future__ import annotations

import base64
import csv
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from tace.analysis import plots
from tace.analysis.plots import NAMES, slug
from tace.common.cli import software_versions
from tace.common.errors import TaceError

STAGES = {"dltr": "DLTR backbone", "head": "DLTRMLP fusion head", "clinical": "clinical model"}
#: Run-config keys shown in the training section (the rest are listed in full in the appendix).
KEY_SETTINGS = ("layout", "holdout-sites", "backbone", "strategy", "rounds", "local-epochs", "lr", "lr-schedule", "batch-size",
                "head-rounds", "clinical-rounds", "spacing-mm", "box-voxels", "sequences", "augment", "dp", "seed")  # fmt: skip
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
    """A figure of the run folder to embed: its name, caption and PNG (base64), or no PNG when it was not drawn."""

    name: str
    caption: str
    png: str | None


def environment() -> Environment:
    """The report's templates (analysis/templates/), autoescaped, with the filters `num` and `p_value`."""
    env = Environment(
        loader=PackageLoader("tace.analysis", "templates"), autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True
    )
    env.filters.update(num=num, p_value=p_value)
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
        return Figure(name, caption, base64.b64encode(path.read_bytes()).decode("ascii"))

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
            "settings": [(k, self.config[k]) for k in KEY_SETTINGS if k in self.config],
            "stages": stages,
            "curves": curves,
        }

    def comparison(self) -> dict[str, Any] | None:
        v = self.analysis.get("validation")
        if not v:
            return None
        sites = list(v["sites"])
        auc = []
        for model in ("dltrmlp", "dltr", "clinical"):
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
        return {
            "sites": sites,
            "auc": auc,
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
        return {
            "ledger": self.privacy_ledger() if self.ledger else None,
            "dp": str(self.config.get("dp", "false")).lower() in ("true", "1"),
            "sites": sites,
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
                    "auc": best.get("pooled_auc"), "low": best.get("ci_low"), "high": best.get("ci_high")}  # fmt: skip
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return {"run": self.run.name, "stamp": stamp, "version": software_versions()["tace-fl"], "lead": lead}

    def render(self) -> str:
        # Gathered in the page's order, so that missing figures are listed in the order a reader meets them.
        sections = {
            "question": self.question(),
            "training": self.training(),
            "comparison": self.comparison(),
            "survival": self.survival(),
            "radiogenomics": self.radiogenomics(),
            "privacy": self.privacy(),
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
