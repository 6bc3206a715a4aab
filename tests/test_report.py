"""The HTML report is rendered from templates with autoescaping: values from the run folder are text, never markup."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

from tace.analysis.radiogenomics import Settings
from tace.analysis.report import write_report

SCRIPT = "<script>alert(1)</script>"
MARKUP = "a&b<i>"


class _Tags(HTMLParser):
    """The start tags of a page and its text, as a browser would parse them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _hostile_run(root: Path) -> Path:
    """A run folder whose site ids, file names and recorded values carry HTML."""
    run = root / f"run-{MARKUP}"
    (run / "site_returns").mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps({"mode": f"federated {MARKUP}", "run_config": {"seed": 0, "dp": False}}))
    (run / "site_returns" / f"{MARKUP}.json").write_text(json.dumps({"n": 10, "n_pos": 3, "role": "holdout"}))
    sharing = {SCRIPT: {"role": "holdout", "sharing": "aggregate", "sent": ['<img src="x" onerror="alert(1)">']}}
    (run / "data_sharing.json").write_text(json.dumps(sharing))
    radiogenomics = {
        "settings": Settings(target=MARKUP).as_dict(),
        "patients": {"matched": 20, "image_only": 0, "expression_only": 0},
        "genes": {"genes_in_matrix": 200, "genes_tested": 150, "kept": 10, "kept_positive": 4},
        "thresholds": [],
        "top_ora": [{"term": SCRIPT, "overlap": 2, "set_size": 20, "odds_ratio": 1.5, "p": 0.01, "fdr": 0.2}],
        "top_prerank": [],
        "inputs": {"gene_sets": f"/data/{MARKUP}.gmt"},
    }
    (run / "analysis.json").write_text(json.dumps({"radiogenomics": radiogenomics}))
    return run


def test_html_in_site_ids_and_file_names_is_shown_as_text(tmp_path):
    path, missing = write_report(_hostile_run(tmp_path))
    text = path.read_text(encoding="utf-8")
    page = _Tags()
    page.feed(text)
    assert page.tags.count("script") == 1  # the page's own image check, nothing injected
    assert "i" not in page.tags and "img" not in page.tags  # no figures were drawn, and none was injected
    assert SCRIPT not in text and MARKUP not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "a&amp;b&lt;i&gt;" in text
    shown = "".join(page.text)
    for value in (SCRIPT, f"run-{MARKUP}", f"{MARKUP}.gmt", f"federated {MARKUP}", '<img src="x" onerror="alert(1)">'):
        assert value in shown, value  # shown to the reader as it was written
    assert missing == ["radiogenomics-enrichment", "radiogenomics-volcano"]
    assert "Figure radiogenomics-volcano was not drawn" in shown and "No validation section in analysis.json." in shown
