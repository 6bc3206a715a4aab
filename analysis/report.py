"""The study report: one self-contained HTML file (figures embedded) a clinician or reviewer reads top to bottom.

Built from the run folder only: run_config.json, metrics.csv, site_returns/ (counts), data_sharing.json,
analysis.json with its figures, and privacy_ledger.json when differential privacy was on. Aggregates only: no
patient value appears in it.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tace.analysis import plots
from tace.analysis.plots import NAMES, slug
from tace.common.cli import software_versions
from tace.common.errors import TaceError

STAGES = {"dltr": "DLTR backbone", "head": "DLTRMLP fusion head", "clinical": "clinical model"}
#: Run-config keys shown in the training section (the rest are listed in full in the appendix).
KEY_SETTINGS = ("layout", "holdout-sites", "backbone", "strategy", "rounds", "local-epochs", "lr", "lr-schedule", "batch-size",
                "head-rounds", "clinical-rounds", "spacing-mm", "box-voxels", "sequences", "augment", "dp", "seed")  # fmt: skip

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1.5em;color:#222;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em} h2{border-bottom:2px solid #c0392b;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.4em} .sub{color:#666;margin-top:0} nav{background:#f6f6f6;padding:.6em 1em;border-radius:6px}
nav a{margin-right:1em;color:#2471a3;text-decoration:none} table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right} th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
figure{margin:1em 0;display:inline-block;vertical-align:top} figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555} .grid figure{width:48%} .note{background:#fff8e1;border-left:4px solid #f39c12;padding:.5em 1em}
.small{font-size:.85em;color:#555} code{background:#f3f3f3;padding:0 3px}
"""

# Marks the page once every image has decoded, so a headless browser (and the tests) can check nothing is broken.
CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.alt; });
  document.body.setAttribute('data-images', String(imgs.length));
  document.body.setAttribute('data-broken', JSON.stringify(broken));
});
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any, digits: int = 3) -> str:
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
    return _esc(value)


def _p(value: Any) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return "&lt; 0.001" if value < 0.001 else f"{value:.3f}"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else _num(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Raw(str):
    """Cell content that is already HTML."""


def _image(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(path.stem)}"><figcaption>{_esc(caption)}</figcaption></figure>'


class Report:
    """Reads a run folder and renders the report's sections; `render()` returns the HTML."""

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

    def figure(self, name: str, caption: str) -> str:
        path = self.figures / f"{name}.png"
        if not path.exists():
            self.missing_figures.append(name)
            return f'<p class="note">Figure {_esc(name)} was not drawn (run the analysis without --no-figures).</p>'
        return _image(path, caption)

    # -- sections ------------------------------------------------------------------------------------------------
    def question(self) -> str:
        rows = []
        trained = {r["site"]: int(r["num_examples"]) for r in self.metrics if r["stage"] == "dltr" and r["num_examples"]}
        for site, ret in self.returns.items():
            n, pos = int(ret.get("n", 0)), int(ret.get("n_pos", 0))
            role = "training" if ret.get("role") == "train" else "external validation"
            what = "internal-validation split" if ret.get("role") == "train" else "whole cohort"
            rows.append((site, role, trained.get(site, ""), _Raw(f"{n} ({what})"), pos, f"{100 * pos / n:.0f} %" if n else "n/a",
                         ret.get("n_with_pfs", "")))  # fmt: skip
        return (
            "<h2 id='question'>1. The question and the cohort</h2>"
            "<p>Can pretreatment MRI and clinical factors predict which patients with hepatocellular carcinoma respond "
            "(mRECIST complete or partial response) to their first transarterial chemoembolization? Three models are "
            "compared on hospitals that took no part in training: <b>DLTR</b>, a 3D CNN on tumour-centred MRI; "
            "<b>DLTRMLP</b>, an MLP fusing DLTR's deep features with clinical factors; and a <b>clinical</b> logistic "
            "model. Each hospital kept its images; models were trained by federated averaging.</p>"
            + table(["site", "role", "training patients", "evaluated patients", "responders", "responder rate", "with PFS"], rows)
            + "<p class='small'>Counts as the sites reported them (aggregates only).</p>"
        )

    def training(self) -> str:
        settings = [(k, self.config[k]) for k in KEY_SETTINGS if k in self.config]
        stages = []
        for stage, label in STAGES.items():
            rounds = sorted({int(r["round"]) for r in self.metrics if r["stage"] == stage})
            if rounds:
                stages.append((label, len(rounds)))
        parts = [
            "<h2 id='training'>2. How the models were trained</h2>",
            f"<p>Mode <b>{_esc(self.config_file.get('mode', 'n/a'))}</b>; seed <b>{_esc(self.config.get('seed', 'n/a'))}</b>. "
            "The DLTR backbone is trained first, then the fusion head on its frozen features, and the clinical model; "
            "each stage keeps the round with the best pooled internal-validation AUC.</p>",
            "<div style='display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start'>",
            table(["setting", "value"], settings),
            table(["stage", "rounds run"], stages),
            "</div>",
        ]
        curves = self.training_curves()
        if curves:
            parts.append(curves)
        return "".join(parts)

    def training_curves(self) -> str:
        if not self.metrics:
            return ""
        plots.save(plots.training_curves(self.metrics, STAGES), self.figures, "training-curves")
        return self.figure(
            "training-curves", "Per-site training loss and internal-validation AUC per round, for each stage (pooled in black)."
        )

    def comparison(self) -> str:
        v = self.analysis.get("validation")
        if not v:
            return "<h2 id='comparison'>3. Model comparison</h2><p class='note'>No validation section in analysis.json.</p>"
        sites = list(v["sites"])
        rows = []
        for model in ("dltrmlp", "dltr", "clinical"):
            pooled = v["pooled"]["models"].get(model)
            if pooled is None:
                continue
            row: list[Any] = [NAMES[model]]
            for block in [*(v["sites"][s] for s in sites), v["pooled"]]:
                e = block["models"].get(model, {})
                row.append(_Raw(f"{_num(e.get('auc'))} <span class='small'>({_num(e.get('ci_low'))}-{_num(e.get('ci_high'))})</span>"))
            paired = v["pooled"]["paired"].get(f"dltrmlp vs {model}", {})
            row.append(_Raw(_p(paired.get("p"))) if model != "dltrmlp" else "—")
            rows.append(row)
        thr = []
        for model, e in v["pooled"]["models"].items():
            t = e.get("threshold", {})
            thr.append([NAMES[model], *(_Raw(f"{_num(t[k]['value'])} <span class='small'>({_num(t[k].get('low'))}-{_num(t[k].get('high'))})</span>")
                                         if k in t else "n/a" for k in ("accuracy", "sensitivity", "specificity", "ppv", "npv")),
                        e.get("brier"), _Raw(_p(e.get("hosmer_lemeshow", {}).get("p")))])  # fmt: skip
        notes = "".join(f"<li>{_esc(n)}</li>" for n in v.get("notes", []))
        drawn = self.analysis.get("figures", {})
        figs = [
            self.figure(f"roc-{slug(s)}", f"ROC curves with 95 % bootstrap bands: {s}")
            for s in [*sites, "pooled external"]
            if f"roc-{slug(s)}" in drawn
        ]
        return (
            "<h2 id='comparison'>3. Model comparison on the external sites</h2>"
            "<p>AUC with 95 % DeLong confidence interval per external site and pooled; paired DeLong test of DLTRMLP "
            "against each other model on the pooled external patients.</p>"
            + table(["model", *sites, "pooled external", "DeLong p vs DLTRMLP"], rows)
            + "<h3>At the cut-off fixed on the training sites (Youden), pooled external</h3>"
            + table(["model", "accuracy", "sensitivity", "specificity", "PPV", "NPV", "Brier", "Hosmer-Lemeshow p"], thr)
            + (f"<ul class='small'>{notes}</ul>" if notes else "")
            + "<h3>ROC curves</h3><div class='grid'>" + "".join(figs) + "</div>"
            + "<h3>Calibration and decision curves (pooled external)</h3><div class='grid'>"
            + self.figure("calibration-pooled-external", "Calibration: observed response rate by decile of predicted probability")
            + self.figure("decision-pooled-external", "Decision curves: net benefit against treat-all and treat-none")
            + "</div>"
            + self.finetuning()
        )  # fmt: skip

    def finetuning(self) -> str:
        """Global vs locally fine-tuned DLTRMLP per training site (run-config finetune), when the run did it."""
        tuned = self._json("finetune.json")
        if not tuned.get("sites"):
            return ""
        rows = [
            [site, e.get("n_val"), e.get("global_auc"), e.get("finetuned_auc"), e.get("error", "")] for site, e in tuned["sites"].items()
        ]
        return (
            f"<h3>Local fine-tuning at the training sites ({_esc(tuned.get('mode'))})</h3><p class='small'>Each training site adapted "
            "the final model to its own training split and compared both on its validation split, which neither saw; the "
            "fine-tuned models stayed at the sites (docs/prediction.md).</p>"
            + table(["site", "validation patients", "DLTRMLP AUC, global", "fine-tuned", "error"], rows)
        )

    def survival(self) -> str:
        s = self.analysis.get("survival")
        if not s:
            return "<h2 id='survival'>4. Progression-free survival</h2><p class='note'>No survival section in analysis.json.</p>"
        rows = []
        for grouping, entry in s["groupings"].items():
            pooled = entry.get("pooled", {})
            lr = pooled.get("logrank", {})
            for name, hr in pooled.get("cox", {}).get("hazard_ratios", {}).items():
                rows.append([grouping, pooled.get("n"), pooled.get("events"), _Raw(_p(lr.get("p"))),
                             f"{name} vs {pooled['cox']['reference']}", _Raw(f"{_num(hr['hr'], 2)} ({_num(hr['low'], 2)}-{_num(hr['high'], 2)})"),
                             pooled.get("c_index")])  # fmt: skip
        figs = [
            self.figure("km-dltrmlp-response-pooled-external", "PFS by DLTRMLP predicted response, pooled external sites"),
            self.figure("km-dltrmlp-risk-pooled-external", "PFS by DLTRMLP risk group, pooled external sites"),
        ]
        return (
            "<h2 id='survival'>4. Progression-free survival</h2>"
            "<p>Kaplan-Meier curves by predicted group (cut-offs fixed on the training sites), log-rank test and Cox "
            "hazard ratio, pooled over the external sites.</p>"
            + table(["grouping", "patients", "events", "log-rank p", "comparison", "HR (95 % CI)", "C-index"], rows)
            + "<div class='grid'>"
            + "".join(figs)
            + "</div>"
        )

    def radiogenomics(self) -> str:
        g = self.analysis.get("radiogenomics")
        if not g:
            return ("<h2 id='radiogenomics'>5. Radiogenomics</h2><p class='small'>Not run for this study "
                    "(<code>tace-analysis radiogenomics RUN --cohort ... --expression ... --gene-sets ...</code>).</p>")  # fmt: skip
        s, p, genes = g["settings"], g["patients"], g["genes"]
        thresholds = [[r["p_below"], r["abs_r_at_least"], r["fdr_below"] if r["fdr_below"] is not None else "off", r["genes"], r["positive"]]
                      for r in g["thresholds"] if r["abs_r_at_least"] in (0.0, 0.3)]  # fmt: skip
        ora = [[r["term"], f"{r['overlap']}/{r['set_size']}", r["odds_ratio"], _Raw(_p(r["p"])), _Raw(_p(r["fdr"]))] for r in g["top_ora"]]
        pre = [
            [r["term"], r["set_size"], r["nes"], _Raw(_p(r["p"])), _Raw(_p(r["fdr"])), _Raw(_p(r["fdr_gene"]))] for r in g["top_prerank"]
        ]
        fdr_text = "" if s["fdr_threshold"] >= 1 else f", FDR &lt; {s['fdr_threshold']}"
        control = g.get("negative_control")
        control_text = ""
        if control:
            n = len(control["enriched"]["ora"]) + len(control["enriched"]["prerank"])
            control_text = (f"<p>Negative control ({_esc(control['what'])}): <b>{n}</b> gene set(s) pass FDR &lt; "
                            f"{s['enrichment_fdr']}.</p>")  # fmt: skip
        return (
            "<h2 id='radiogenomics'>5. Radiogenomics</h2>"
            f"<p>The final models were applied to the radiogenomics cohort: <b>{p['matched']}</b> patients with both "
            f"imaging and expression ({p['image_only']} imaging only and {p['expression_only']} expression only were "
            f"left out and are listed in <code>radiogenomics/unmatched.csv</code>). {genes['genes_tested']} of "
            f"{genes['genes_in_matrix']} genes were tested ({_esc(s['transform'])}, expressed at or above "
            f"{s['min_expression']} in at least {s['min_fraction']:.0%} of samples), by {_esc(s['method'])} correlation "
            f"with <b>{_esc(s['target'])}</b>. Kept for over-representation (P &lt; {s['p_threshold']}, |r| &ge; "
            f"{s['r_threshold']}{fdr_text}): "
            f"<b>{genes['kept']}</b> genes ({genes['kept_positive']} positive). Gene sets: "
            f"<code>{_esc(Path(g['inputs']['gene_sets']).name)}</code>.</p>"
            "<h3>How many genes each threshold keeps</h3>"
            + table(["P below", "|r| at least", "FDR below", "genes", "positive"], thresholds)
            + "<h3>Over-representation of the kept genes (hypergeometric; background = the genes tested)</h3>"
            + table(["gene set", "overlap", "odds ratio", "P", "FDR"], ora)
            + "<h3>GSEA pre-ranked on r</h3><p class='small'>P and FDR from sample permutation (the target permuted "
            "across patients); the gene-permutation FDR of the usual pre-ranked GSEA alongside.</p>"
            + table(["gene set", "size", "NES", "P", "FDR", "FDR (gene permutation)"], pre)
            + control_text
            + "<div>" + self.figure("radiogenomics-enrichment", "Enriched gene sets: over-representation and GSEA pre-ranked")
            + self.figure("radiogenomics-volcano", "Correlation of every gene tested with the target") + "</div>"
        )  # fmt: skip

    def privacy(self) -> str:
        dp = str(self.config.get("dp", "false")).lower() in ("true", "1")
        parts = ["<h2 id='privacy'>6. Privacy: what left each site</h2>"]
        if self.ledger:
            parts.append(self.privacy_ledger())
        elif dp:
            parts.append("<p class='note'>Differential privacy was on, but the run folder holds no privacy_ledger.json.</p>")
        else:
            parts.append("<p>Differential privacy was <b>off</b> for this run (run-config key <code>dp</code>).</p>")
        for site, entry in self.sharing.items():
            items = "".join(f"<li>{_esc(x)}</li>" for x in entry.get("sent", []))
            parts.append(f"<h3>{_esc(site)} <span class='small'>({_esc(entry.get('role', ''))}; {_esc(entry.get('sharing', ''))}"
                         f"{'; min cell count ' + str(entry['min_cell_count']) if entry.get('min_cell_count') else ''})</span></h3><ul>{items}</ul>")  # fmt: skip
        return "".join(parts)

    def privacy_ledger(self) -> str:
        """The ledger as a table (one row per site, or one for the federation with client-level DP) and ε over rounds."""
        led = self.ledger
        unit = "each patient of a site's training split" if led.get("unit") == "patient" else "each hospital's whole contribution"
        mode = {"sample": "sample-level DP-SGD at every site (Opacus)", "client-fixed": "client-level DP, fixed clipping (Flower)",
                "client-adaptive": "client-level DP, adaptive clipping (Flower)"}.get(str(led.get("mode")), str(led.get("mode")))  # fmt: skip
        rows = [
            [site, e.get("epsilon"), e.get("delta"), e.get("budget"), e.get("rounds"), e.get("steps"), e.get("noise_multiplier"),
             e.get("sample_rate"), ", ".join(e.get("declined", [])) or "none"]
            for site, e in led.get("sites", {}).items()
        ]  # fmt: skip
        text = (
            "<h3>Differential-privacy ledger</h3>"
            f"<p>{_esc(mode)}; the unit protected is {unit}. ε is the whole run's, accounted with {_esc(led.get('accountant', 'RDP'))} "
            f"over every release (also rounds repeated after an interruption); budget ε = {_num(led.get('target_epsilon'))}"
            f"{'; secure aggregation on' if led.get('secagg') else ''}.</p>"
            + table(["site", "ε spent", "δ", "budget", "training rounds", "steps", "noise multiplier", "sample rate", "declined"], rows)
        )
        releases = led.get("releases", [])
        if not releases:
            return text
        plots.save(plots.privacy_epsilon(led), self.figures, "privacy-epsilon")
        return text + self.figure(
            "privacy-epsilon", "Privacy spent over the run: ε after each training round, per site (× a declined round)."
        )

    def software(self) -> str:
        run_versions = self.config_file.get("software", {})
        now = software_versions()
        names = list(dict.fromkeys([*run_versions, *now]))
        rows = [[n, run_versions.get(n, "not recorded"), now.get(n, "")] for n in names]
        config = [[k, v] for k, v in sorted(self.config.items()) if k not in ("cohort", "run-dir")]
        return (
            "<h2 id='software'>7. Software and settings</h2>"
            f"<p>Seed <b>{_esc(self.config.get('seed', 'n/a'))}</b>. Versions that ran the study and that wrote this report:</p>"
            + table(["package", "run", "report"], rows)
            + "<h3>Full run configuration</h3>"
            + table(["key", "value"], config)
        )

    def render(self) -> str:
        sections = [
            self.question(),
            self.training(),
            self.comparison(),
            self.survival(),
            self.radiogenomics(),
            self.privacy(),
            self.software(),
        ]
        toc = "".join(f"<a href='#{a}'>{t}</a>" for a, t in (("question", "Cohort"), ("training", "Training"), ("comparison", "Comparison"),
                      ("survival", "Survival"), ("radiogenomics", "Radiogenomics"), ("privacy", "Privacy"), ("software", "Software")))  # fmt: skip
        headline = self.analysis.get("headline", [])
        lead = ""
        if headline:
            best = headline[0]
            lead = (f"<p><b>In one line:</b> on {len(self.analysis.get('validation', {}).get('sites', {}))} external site(s), "
                    f"{_esc(best['model'])} reached a pooled AUC of {_num(best.get('pooled_auc'))} "
                    f"(95 % CI {_num(best.get('ci_low'))}-{_num(best.get('ci_high'))}).</p>")  # fmt: skip
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return (
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>TACE-FL study report: {_esc(self.run.name)}</title><style>{CSS}</style><script>{CHECK_SCRIPT}</script></head><body>"
            f"<h1>TACE response prediction: federated study report</h1><p class='sub'>Run <code>{_esc(self.run.name)}</code>, "
            f"report written {stamp} by TACE-FL {_esc(software_versions()['tace-fl'])}</p>{lead}<nav>{toc}</nav>"
            + "".join(sections)
            + "</body></html>"
        )


def write_report(run_dir: Path, out: Path | None = None) -> tuple[Path, list[str]]:
    """Write the report (default RUN/report.html); returns its path and the figures it could not embed."""
    report = Report(run_dir)
    text = report.render()
    out = out or Path(run_dir) / "report.html"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out, report.missing_figures
