"""Run and site configuration, parsed once at the boundary into frozen dataclasses.

The run configuration comes from ``[tool.flwr.app.config]`` (hyphenated keys, overridable with
``--run-config "key=value ..."``); `RunConfig.from_run_config` is the only place that translates ``local-epochs``
into ``local_epochs``. A site's node configuration carries ``site-id`` and ``manifest-path`` (deployment) or
``partition-id`` (simulation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tace.common.errors import ConfigError
from tace.common.preprocess import PreprocessConfig
from tace.common.protocol import FUSION_HEADS

STRATEGIES = ("fedavg", "fedprox", "fedadam")
LAYOUTS = ("holdout", "loco")
#: Differential privacy: per-patient DP-SGD at every site (Opacus), or per-site (client-level) DP through Flower's
#: strategy wrappers with the update clipped to a fixed or an adaptive norm.
DP_MODES = ("sample", "client-fixed", "client-adaptive")
#: Local fine-tuning at every training site after federation: off, the fusion head, or the head and the backbone's last stage.
FINETUNE_MODES = ("", "head", "last-stage")


#: A site's minimum cell count by default: no table cell or event-table row it releases describes fewer patients.
#: 5 is the most common small-count rule of published health statistics (some use 10 or more), and what the analysis
#: can still afford: AUCs moved by at most 0.0006 and DeLong SEs by under 0.001 on the reference data
#: (docs/analysis.md), while per-site and stratified statistics stay exact because the sites compute them
#: (`tace.common.exact`).
MIN_CELL_COUNT = 5


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in str(text).split(",") if t.strip())


#: DLTRMLP's head forms, in words.
FUSION_HEAD_TEXT = {
    "mlp": "an MLP on DLTR's deep features, the clinical factors and the radiomics features",
    "linear": "a logistic model on the logits of DLTR, the clinical and the radiomics model (the head under differential privacy)",
}


def resolve_fusion_head(fusion_head: str, dp: bool) -> str:
    """The head form a run with run-config ``fusion-head`` `fusion_head` trains: "auto" is the linear head under
    differential privacy (few weights under the noise) and the MLP otherwise."""
    if fusion_head == "auto":
        return "linear" if dp else "mlp"
    return fusion_head


def fusion_head_text(run_config: Mapping[str, Any]) -> str:
    """In words, the head a run with `run_config` (hyphenated keys, as saved with the run) trained; runs from before
    the key trained the MLP."""
    return FUSION_HEAD_TEXT[resolve_fusion_head(str(run_config.get("fusion-head", "mlp")), bool(run_config.get("dp")))]


@dataclass(frozen=True)
class RunConfig:
    """Everything a study run is configured with (see docs/training.md for each key)."""

    seed: int = 0
    holdout_sites: str = "site-d,site-e"
    layout: str = "holdout"
    backbone: str = "small"
    compare_backbones: str = ""
    backbone_weights: str = ""  # a weights file DLTR starts from (tace.common.pretrained)
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    rounds: int = 20
    local_epochs: int = 1
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    weight_decay: float = 1e-4
    batch_size: int = 8
    patience: int = 6
    head_rounds: int = 15
    head_local_epochs: int = 5
    head_lr: float = 5e-3
    clinical_rounds: int = 15
    clinical_local_epochs: int = 5
    clinical_lr: float = 2e-2
    radiomics_rounds: int = 15
    radiomics_local_epochs: int = 5
    radiomics_lr: float = 2e-2
    radiomics_weight_decay: float = 0.1
    head_weight_decay: float = 0.01
    fusion_head: str = "auto"  # DLTRMLP's head: "mlp", "linear", or "auto" (linear under differential privacy)
    spacing_mm: str = "2,2,3"
    box_voxels: str = "48,48,32"
    sequences: str = "arterial,portal_venous,delayed"
    large_tumour: str = "crop"
    intensity_reference: str = "liver"
    augment: bool = True
    device: str = "auto"
    amp: bool = True
    threads: int = 1
    hist_bins: int = 1000
    analysis_bins: int = 100_000
    risk_groups: int = 3
    share_patient_level: str = ""
    min_cell_count: int = MIN_CELL_COUNT
    expected_sites: int = 0
    min_sites: int = 2
    max_update_norm_ratio: float = 10.0
    round_timeout: int = 3600
    join_timeout: int = 600
    keep_checkpoints: int = 3
    resume: bool = False
    dp: bool = False
    dp_mode: str = "sample"
    dp_target_epsilon: float = 8.0
    dp_delta: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_max_grad_norm: float = 1.0
    dp_clipping_norm: float = 0.1
    dp_secure_rng: bool = False
    secagg: bool = False
    finetune: str = ""
    finetune_epochs: int = 0
    cohort: str = ""
    run_dir: str = ""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, not {self.layout!r}")
        from tace.common.models import BACKBONES  # imported lazily: building the CLI parsers must not load torch

        for name in (self.backbone, *self.backbone_candidates):
            if name not in BACKBONES:
                raise ConfigError(f"unknown backbone {name!r}", f"valid backbones: {', '.join(BACKBONES)}")
        for key in ("rounds", "local_epochs", "batch_size", "head_local_epochs", "clinical_local_epochs", "threads", "hist_bins",
                    "head_rounds", "clinical_rounds", "radiomics_rounds", "radiomics_local_epochs", "min_sites", "round_timeout",
                    "join_timeout"):  # fmt: skip
            if getattr(self, key) < 1:
                raise ConfigError(f"{key.replace('_', '-')} must be at least 1")
        for key in ("lr", "head_lr", "clinical_lr", "radiomics_lr", "server_lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key.replace('_', '-')} must be positive")
        for key in (
            "patience",
            "expected_sites",
            "proximal_mu",
            "weight_decay",
            "head_weight_decay",
            "radiomics_weight_decay",
            "max_update_norm_ratio",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key.replace('_', '-')} must not be negative")
        if not 0 <= self.seed < 2**31:
            raise ConfigError("seed must be between 0 and 2147483647")
        if not 100 <= self.analysis_bins <= 1_000_000:
            raise ConfigError("analysis-bins must be between 100 and 1000000")
        if not 2 <= self.risk_groups <= 10:
            raise ConfigError("risk-groups must be between 2 and 10")
        if self.hist_bins > 100_000:
            raise ConfigError("hist-bins must be at most 100000")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(f"lr-schedule must be 'cosine' or 'constant', not {self.lr_schedule!r}")
        self._check_privacy()
        if self.fusion_head not in ("auto", *FUSION_HEADS):
            raise ConfigError(f"fusion-head must be 'auto', 'mlp' or 'linear', not {self.fusion_head!r}",
                              "'auto' (the default) trains the MLP head, or the linear head under differential privacy")  # fmt: skip
        if self.finetune not in FINETUNE_MODES:
            raise ConfigError(f"finetune must be one of {', '.join(repr(m) for m in FINETUNE_MODES)}, not {self.finetune!r}",
                              "'' (off), 'head' (the fusion head) or 'last-stage' (the head and the backbone's last stage)")  # fmt: skip
        if self.finetune_epochs < 0:
            raise ConfigError("finetune-epochs must not be negative (0: 20 for the head, 5 with the last stage)")
        if self.min_cell_count < 0:
            raise ConfigError("min-cell-count must not be negative (0 or 1: off)")
        if self.keep_checkpoints < 0:
            raise ConfigError("keep-checkpoints must not be negative (the last N rounds' checkpoints are kept; 0: every round's)")
        _ = self.preprocess  # validates the preprocessing keys

    def _check_privacy(self) -> None:
        if self.dp_mode not in DP_MODES:
            raise ConfigError(f"dp-mode must be one of {', '.join(DP_MODES)}, not {self.dp_mode!r}")
        if not self.dp_target_epsilon > 0:
            raise ConfigError("dp-target-epsilon must be positive (the whole run's privacy budget per site)")
        if not 0 <= self.dp_delta < 1:
            raise ConfigError("dp-delta must be at least 0 and below 1 (0: 1/(10 n) for a site with n training patients)")
        if self.dp_noise_multiplier < 0:
            raise ConfigError("dp-noise-multiplier must not be negative (0: derived from dp-target-epsilon)")
        for key in ("dp_max_grad_norm", "dp_clipping_norm"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key.replace('_', '-')} must be positive")
        if self.dp and self.client_dp and self.strategy == "fedadam":
            raise ConfigError(
                "client-level differential privacy (dp-mode client-fixed or client-adaptive) needs strategy fedavg or fedprox",
                "FedAdam's adaptive server step would see the updates before the noise; use strategy='fedavg', or dp-mode='sample'",
            )
        if self.dp and self.secagg and self.dp_mode == "client-adaptive":
            raise ConfigError(
                "secure aggregation cannot be combined with dp-mode client-adaptive",
                "adaptive clipping needs each site's update norm; use dp-mode='client-fixed' (the sites clip their own updates) "
                "or dp-mode='sample'",
            )

    @property
    def client_dp(self) -> bool:
        """Client-level (per-site) differential privacy through Flower's strategy wrappers."""
        return self.dp and self.dp_mode.startswith("client-")

    @property
    def sample_dp(self) -> bool:
        """Sample-level (per-patient) DP-SGD at every site."""
        return self.dp and self.dp_mode == "sample"

    @property
    def head_form(self) -> str:
        """The form of DLTRMLP's head this run trains (`FUSION_HEADS`): `fusion_head`, where "auto"
        is the linear head under differential privacy (few weights under DP-SGD's noise) and the MLP otherwise."""
        return resolve_fusion_head(self.fusion_head, self.dp)

    @property
    def holdout(self) -> tuple[str, ...]:
        return _csv(self.holdout_sites)

    def resolved(self, base: Path) -> RunConfig:
        """With a relative `backbone-weights` path made absolute against `base` (the ServerApp runs elsewhere)."""
        if not self.backbone_weights or Path(self.backbone_weights).is_absolute():
            return self
        return dataclasses.replace(self, backbone_weights=str((base / self.backbone_weights).resolve()))

    @property
    def backbone_candidates(self) -> tuple[str, ...]:
        return _csv(self.compare_backbones)

    @property
    def preprocess(self) -> PreprocessConfig:
        try:
            spacing = tuple(float(v) for v in _csv(self.spacing_mm))
            box = tuple(int(v) for v in _csv(self.box_voxels))
        except ValueError:
            raise ConfigError("spacing-mm and box-voxels must be comma-separated numbers 'x,y,z'") from None
        try:
            return PreprocessConfig(
                sequences=_csv(self.sequences), spacing_mm=spacing, box_voxels=box,  # type: ignore[arg-type]
                large_tumour=self.large_tumour, intensity_reference=self.intensity_reference,  # type: ignore[arg-type]
            )  # fmt: skip
        except ConfigError as exc:
            raise ConfigError(
                "run-config preprocessing keys (spacing-mm, box-voxels, sequences, large-tumour, intensity-reference): "
                f"{exc.message}", exc.hint,
            ) from None  # fmt: skip

    def lr_at(self, server_round: int, total_rounds: int, base: float) -> float:
        """Learning rate of a round (1-based): cosine decay to 5 % of `base` over the stage, or constant."""
        if self.lr_schedule == "constant" or total_rounds <= 1:
            return base
        import math

        frac = (server_round - 1) / (total_rounds - 1)
        return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in dataclasses.fields(cls)]

    @classmethod
    def from_run_config(cls, mapping: Mapping[str, Any]) -> RunConfig:
        """Parse Flower's run config (hyphenated keys); unknown keys and wrong types are errors listing the valid keys."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in mapping.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ConfigError(f"unknown run-config key {key!r}", "valid keys: " + ", ".join(cls.keys()))
            kwargs[name] = _coerce(key, value, type(fields[name].default))
        return cls(**kwargs)

    def to_run_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}


def _coerce(key: str, value: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"run-config key {key!r} must be of type {kind.__name__}") from None


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse Flower-style ``"key=value key2='text'"`` overrides into a mapping (values as TOML scalars)."""
    import shlex

    import tomllib

    out: dict[str, Any] = {}
    try:
        items = shlex.split(text or "")
    except ValueError as exc:
        raise ConfigError(f"cannot read the run-config overrides ({exc})", "write them as \"key=value key2='text'\"") from None
    for item in items:
        if "=" not in item:
            raise ConfigError(f"run-config override {item!r} is not key=value")
        key, _, raw = item.partition("=")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    return out


@dataclass(frozen=True)
class SiteConfig:
    """Where a site's data and working folders are (node configuration)."""

    site_id: str
    manifest: Path
    cache_dir: Path
    output_dir: Path
    min_patients: int = 5
    min_cell_count: int = MIN_CELL_COUNT
    share_patient_level: bool = False
    device: str = ""  # the site's own choice (node config); empty: the run config's
    threads: int = 0  # idem; 0: the run config's
    max_epsilon: float = 0.0  # the site's own privacy budget (node config); 0: the run's dp-target-epsilon
    require_dp: bool = False  # the site trains only in runs with sample-level differential privacy
    require_secagg: bool = False  # the site sends its weights only masked by secure aggregation

    @classmethod
    def from_node_config(cls, node: Mapping[str, Any], run: RunConfig) -> SiteConfig:
        """Deployment: ``site-id`` and ``manifest-path`` (+ optional ``cache-dir``, ``output-dir``).
        Simulation: ``partition-id`` indexes the sites of the run's cohort (``cohort.json``)."""
        import json

        if "manifest-path" in node:
            site_id = str(node.get("site-id", "")) or Path(str(node["manifest-path"])).parent.name
            manifest = Path(str(node["manifest-path"]))
            cache = Path(str(node.get("cache-dir", manifest.parent / ".tace-cache")))
            output = Path(str(node.get("output-dir", manifest.parent / "tace-output")))
            device, threads = _compute(node)
            return cls(site_id, manifest, cache, output, *_privacy(node), flag(node.get("share-patient-level", False)), device, threads,
                       **_budget(node))  # fmt: skip
        if "partition-id" in node:
            if not run.cohort:
                raise ConfigError("simulation needs the run-config key 'cohort' (absolute path of a cohort folder)")
            cohort = Path(run.cohort)
            sites = json.loads((cohort / "cohort.json").read_text())["sites"]
            pid = int(node["partition-id"])
            if pid >= len(sites):
                raise ConfigError(f"partition {pid} has no site: the cohort has {len(sites)} sites", "run with as many supernodes as sites")
            site = sites[pid]
            run_dir = Path(run.run_dir) if run.run_dir else cohort / "runs"
            # In simulation the researcher stands in for every site: the run config says which sites opt in.
            share = run.share_patient_level.strip() == "all" or site["site_id"] in _csv(run.share_patient_level)
            return cls(
                site["site_id"],
                cohort / site["manifest"],
                Path(site["cache"]) if site.get("cache") else cohort / "cache" / site["site_id"],
                run_dir / "sites" / site["site_id"],
                *_privacy(node, run.min_cell_count),
                share,
                **_budget(node),
            )
        raise ConfigError(
            "node configuration has neither 'manifest-path' (a hospital's site) nor 'partition-id' (simulation)",
            "start the site with --node-config \"site-id='...' manifest-path='...'\"",
        )


def flag(value: Any, key: str = "share-patient-level") -> bool:
    """A node-config true/false value (TOML booleans, or text as Flower's --node-config passes it)."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no", ""):
        return False
    raise ConfigError(f"node-config key {key} must be true or false, not {value!r}")


def _compute(node: Mapping[str, Any]) -> tuple[str, int]:
    """The site's own device and thread count from its node configuration (empty / 0: the run config's)."""
    try:
        threads = int(node.get("threads", 0))
    except (TypeError, ValueError):
        raise ConfigError("node-config key threads must be an integer") from None
    if threads < 0:
        raise ConfigError("node-config key threads must not be negative")
    return str(node.get("device", "")), threads


def _budget(node: Mapping[str, Any]) -> dict[str, Any]:
    """The site's own privacy settings: `max-epsilon` (0: none of its own; the site never spends more than the
    smaller of this and the run's dp-target-epsilon), `require-dp` (refuse to train without sample-level DP) and
    `require-secagg` (refuse to send weights unmasked). The coordinator cannot change them."""
    try:
        max_epsilon = float(node.get("max-epsilon", 0.0))
    except (TypeError, ValueError):
        raise ConfigError("node-config key max-epsilon must be a number") from None
    if max_epsilon < 0:
        raise ConfigError("node-config key max-epsilon must not be negative (0: the run's dp-target-epsilon)")
    return {"max_epsilon": max_epsilon, "require_dp": flag(node.get("require-dp", False), "require-dp"),
            "require_secagg": flag(node.get("require-secagg", False), "require-secagg")}  # fmt: skip


def _privacy(node: Mapping[str, Any], cells: int = MIN_CELL_COUNT) -> tuple[int, int]:
    """The site's own privacy minimums from its node configuration: `min-patients` (default 5: a site with fewer
    labelled training patients does not train, since its statistics and updates would reveal individuals) and
    `min-cell-count` (default `cells`: `MIN_CELL_COUNT` at a hospital, the run config's in simulation; 0 or 1 is
    off): no table cell or event-table row with fewer patients leaves the site (docs/analysis.md)."""
    try:
        return int(node.get("min-patients", 5)), int(node.get("min-cell-count", cells))
    except (TypeError, ValueError):
        raise ConfigError("node-config keys min-patients and min-cell-count must be integers") from None


SITE_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def check_site_id(site: str) -> str:
    if not site or not set(site) <= SITE_ID_CHARS or len(site) > 64:
        raise ConfigError(f"site id {site!r} must be 1-64 letters, digits, '-' or '_'", "for example: site-a, hospital_3")
    return site
