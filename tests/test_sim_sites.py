"""`tace-sim run` on a researcher's own sites: --site options or a study file, each site validated first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tace.common.config import RunConfig, SiteConfig
from tace.common.errors import ConfigError
from tace.simulation.cli import main as sim
from tace.simulation.sites import parse_site_options, read_study_file, write_cohort

TINY = "spacing-mm='8,8,8' box-voxels='8,8,8' rounds=2 head-rounds=2 clinical-rounds=2 radiomics-rounds=2"


@pytest.fixture
def own_sites(site_copy) -> dict[str, Path]:
    """Three of the tiny cohort's sites copied out of it, as a researcher's own manifests."""
    return {site: site_copy(site) for site in ("site-a", "site-b", "site-d")}


def test_site_options_and_study_file_become_the_run_s_sites(own_sites, tmp_path):
    spec = parse_site_options([f"{s}={m}" for s, m in own_sites.items()], "site-d")
    folder = write_cohort(spec, tmp_path / "study")
    run = RunConfig.from_run_config({"cohort": str(folder), "holdout-sites": "site-d"})
    configs = [SiteConfig.from_node_config({"partition-id": i}, run) for i in range(3)]
    assert [(c.site_id, c.manifest, c.cache_dir) for c in configs] == [
        (s, m.resolve(), m.resolve().parent / ".tace-cache") for s, m in own_sites.items()
    ]
    study = tmp_path / "study.toml"
    rel = {s: Path(m).relative_to(tmp_path) for s, m in own_sites.items()}
    study.write_text(
        'holdout = ["site-d"]\n[sites]\n'
        + "".join(f'{s} = {{ manifest = "{p}", cache = "caches/{s}" }}\n' for s, p in rel.items())
        + "[run-config]\nrounds = 3\n"
    )
    spec = read_study_file(study)
    assert spec.holdout == ("site-d",) and spec.run_config == {"rounds": 3}
    assert [s.cache for s in spec.sites] == [tmp_path / "caches" / s for s in own_sites]
    assert read_study_file(study, holdout="site-b").holdout == ("site-b",)


@pytest.mark.parametrize(
    ("options", "holdout", "words"),
    [(["site-a"], "", "is not SITE=MANIFEST"), (["site-a=A", "site-a=A"], "", "given twice"), (["site-a=A"], "", "at least two sites"),
     (["site-a=A", "site-b=B"], "site-x", "not among the sites"), (["site-a=A", "site-b=B"], "site-a,site-b", "no site would train"),
     (["bad id=A", "site-b=B"], "", "must be 1-64 letters")],
)  # fmt: skip
def test_site_option_errors(own_sites, options, holdout, words):
    real = {"A": own_sites["site-a"], "B": own_sites["site-b"]}
    options = [o.split("=")[0] + "=" + str(real[o.split("=")[1]]) if "=" in o else o for o in options]
    with pytest.raises(ConfigError, match=words):
        parse_site_options(options, holdout)


def test_every_site_is_validated_first_and_problems_are_listed_per_site(own_sites, tmp_path, capsys):
    (own_sites["site-b"].parent / "images/site-b-0002/arterial.nii.gz").unlink()
    args = [a for s, m in own_sites.items() for a in ("--site", f"{s}={m}")]
    assert sim(["run", *args, "--holdout", "site-d", "--out", str(tmp_path / "run"), "--mode", "centralized"]) == 1
    err = capsys.readouterr().err
    assert "1 problem(s) at 1 site(s); the study was not run" in err and "site site-b (1 problem(s)):" in err
    assert "row 3, column arterial_path" in err and "[missing-file]" in err
    assert not (tmp_path / "run" / "summary.json").exists()
    assert sim(["run", "--cohort", str(tmp_path), *args, "--out", str(tmp_path / "r2")]) == 2
    assert "exactly one of --cohort, --site" in capsys.readouterr().err


def test_centralized_study_on_own_sites(own_sites, tmp_path, capsys):
    args = [a for s, m in own_sites.items() for a in ("--site", f"{s}={m}")]
    out = tmp_path / "run"
    assert sim(["run", *args, "--holdout", "site-d", "--out", str(out), "--mode", "centralized", "--run-config", TINY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    sites = summary["models"]["dltrmlp"]["sites"]
    assert {s: e["role"] for s, e in sites.items()} == {"site-a": "train", "site-b": "train", "site-d": "holdout"}
    assert "oracle" not in summary  # a researcher's sites have no generator truth
    assert json.loads((out / "run_config.json").read_text())["run_config"]["holdout-sites"] == "site-d"
    assert any((own_sites["site-a"].parent / ".tace-cache").rglob("*.npz"))  # the site's own cache, as a deployment's


@pytest.mark.slow
def test_federated_study_file_through_flower(own_sites, tmp_path):
    study = tmp_path / "study.toml"
    study.write_text('holdout = ["site-d"]\n[sites]\n' + "".join(f'{s} = "{m}"\n' for s, m in own_sites.items())
                     + "[run-config]\n" + "\n".join(TINY.replace("'", '"').split(" ")) + "\n")  # fmt: skip
    out = tmp_path / "fed"
    result = subprocess.run([sys.executable, "-m", "tace.simulation.cli", "run", "--study", str(study), "--out", str(out)],
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "federated" and set(summary["models"]["dltrmlp"]["sites"]) == set(own_sites)
    analysed = subprocess.run(
        [sys.executable, "-m", "tace.analysis.cli", "validate", str(out)], capture_output=True, text=True, timeout=300
    )
    assert analysed.returncode == 0, analysed.stderr[-2000:]
