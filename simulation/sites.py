"""A researcher's own sites on one machine: `--site SITE=MANIFEST` options or a study file (TOML), each site validated
as a deployment validates it, written as the cohort folder (`cohort.json`) a single-machine run reads.

A study file::

    holdout = ["site-d"]                          # external sites (the others train)

    [sites]                                       # manifests, relative to this file's folder
    site-a = "data/a/manifest.csv"
    site-b = { manifest = "data/b/manifest.csv", cache = "/scratch/tace-cache/b" }
    site-d = "data/d/manifest.csv"

    [run-config]                                  # optional: any run-config key (docs/training.md)
    rounds = 10
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tace.common.config import check_site_id
from tace.common.errors import ConfigError, Problem, TaceError


@dataclass(frozen=True)
class SiteSpec:
    site_id: str
    manifest: Path
    cache: Path | None = None


@dataclass
class StudySpec:
    """The sites of a study, which of them are held out, and run-config keys the study file sets."""

    sites: list[SiteSpec]
    holdout: tuple[str, ...] = ()
    run_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = [s.site_id for s in self.sites]
        for site in ids:
            check_site_id(site)
        twice = sorted({s for s in ids if ids.count(s) > 1})
        if twice:
            raise ConfigError(f"site id(s) given twice: {', '.join(twice)}", "give each site once, with its own id")
        if len(ids) < 2:
            raise ConfigError(f"a study needs at least two sites ({len(ids)} given)", "add sites with --site SITE=MANIFEST")
        unknown = [h for h in self.holdout if h not in ids]
        if unknown:
            raise ConfigError(f"holdout site(s) {', '.join(unknown)} are not among the sites", "sites: " + ", ".join(ids))
        if len(set(self.holdout)) >= len(ids):
            raise ConfigError("every site is held out: no site would train", "hold out fewer sites")
        for s in self.sites:
            if not s.manifest.is_file():
                raise ConfigError(f"site {s.site_id}: manifest {s.manifest} not found", "check the path (a site's manifest.csv)")


def parse_site_options(values: Sequence[str], holdout: str = "") -> StudySpec:
    """`--site SITE=MANIFEST` options (paths relative to the current folder) and `--holdout A,B`."""
    sites = []
    for value in values:
        site, sep, path = value.partition("=")
        if not sep or not site.strip() or not path.strip():
            raise ConfigError(f"--site {value!r} is not SITE=MANIFEST", "for example: --site site-a=/data/site-a/manifest.csv")
        sites.append(SiteSpec(site.strip(), Path(path.strip()).expanduser().resolve()))
    return StudySpec(sites, tuple(h.strip() for h in holdout.split(",") if h.strip()))


def read_study_file(path: Path, holdout: str = "") -> StudySpec:
    """A study file (module docstring); `holdout` (from --holdout), when given, replaces the file's."""
    import tomllib

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"study file {path} not found", "check the path given to --study") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"study file {path} is not valid TOML ({exc})", "see docs/training.md for its format") from None
    unknown = sorted(set(raw) - {"sites", "holdout", "run-config"})
    if unknown:
        raise ConfigError(f"study file {path}: unknown key(s) {', '.join(unknown)}", "valid keys: sites, holdout, run-config")
    if not isinstance(raw.get("sites"), Mapping):
        raise ConfigError(f"study file {path} has no [sites] table", 'add one line per site: site-a = "path/to/manifest.csv"')
    base = path.resolve().parent
    sites = []
    for site, entry in raw["sites"].items():
        entry = {"manifest": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, Mapping) or not isinstance(entry.get("manifest"), str) or set(entry) - {"manifest", "cache"}:
            raise ConfigError(f"study file {path}: site {site} needs a manifest path (and optionally a cache folder)",
                              'write site-a = "path/manifest.csv" or site-a = { manifest = "...", cache = "..." }')  # fmt: skip
        cache = (base / str(entry["cache"])).resolve() if entry.get("cache") else None
        sites.append(SiteSpec(str(site), (base / entry["manifest"]).resolve(), cache))
    listed = raw.get("holdout", [])
    if isinstance(listed, str):
        listed = [h for h in listed.split(",") if h.strip()]
    if not isinstance(listed, list) or not all(isinstance(h, str) for h in listed):
        raise ConfigError(f"study file {path}: holdout must be a list of site ids")
    chosen = tuple(h.strip() for h in holdout.split(",") if h.strip()) or tuple(h.strip() for h in listed)
    run_config = raw.get("run-config", {})
    if not isinstance(run_config, Mapping):
        raise ConfigError(f"study file {path}: [run-config] must be a table of run-config keys")
    return StudySpec(sites, chosen, dict(run_config))


def validate_sites(spec: StudySpec, progress: Callable[..., Iterable[Any]] | None = None) -> dict[str, list[Problem]]:
    """Every site checked as `tace-client check` (and a deployment's start) checks it: {site: its problems}."""
    from tace.common.validate import check_site

    out = {}
    for s in spec.sites:
        wrap = (lambda rs, site=s.site_id: progress(rs, desc=f"checking {site}", unit="patient")) if progress else None
        out[s.site_id] = check_site(s.manifest, progress=wrap).problems
    return out


def write_cohort(spec: StudySpec, folder: Path) -> Path:
    """The cohort folder a single-machine run reads (`cohort.json`: sites with absolute manifest paths, roles, each
    site's cache folder, the study file's run-config keys); returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    sites = [
        {"site_id": s.site_id, "manifest": str(s.manifest), "suggested_role": "holdout" if s.site_id in spec.holdout else "train",
         "cache": str(s.cache or s.manifest.parent / ".tace-cache"), "image_format": "site's own"}
        for s in spec.sites
    ]  # fmt: skip
    meta = {"kind": "sites", "sites": sites, "run_config": spec.run_config}
    (folder / "cohort.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return folder


def prepare(spec: StudySpec, folder: Path, progress: Callable[..., Iterable[Any]] | None = None) -> Path:
    """Validate every site, then write the cohort folder; raise listing every problem per site when any has one."""
    problems = validate_sites(spec, progress)
    bad = {site: found for site, found in problems.items() if found}
    if bad:
        lines = []
        for site, found in bad.items():
            lines.append(f"site {site} ({len(found)} problem(s)):")
            lines += ["  " + p.format().replace("\n", "\n  ") for p in found[:20]]
            if len(found) > 20:
                lines.append(
                    f"  ... and {len(found) - 20} more: tace-client check --manifest {next(s.manifest for s in spec.sites if s.site_id == site)}"
                )
        raise SitesError("\n".join(lines), sum(len(f) for f in bad.values()), len(bad))
    return write_cohort(spec, folder)


class SitesError(TaceError):
    """Some sites failed validation; the message lists every problem, per site."""

    def __init__(self, listing: str, n_problems: int, n_sites: int) -> None:
        super().__init__(f"{n_problems} problem(s) at {n_sites} site(s); the study was not run:\n{listing}",
                         "fix them (tace-client check --manifest M lists them for one site) and run again")  # fmt: skip
