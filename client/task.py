"""What a site does for the study, as plain functions of its data: statistics, local training, evaluation.

The site's answers to the coordinator (`tace.client.service`, behind the Flower ClientApp) call these; the
single-machine references (centralised and local training) call them directly. Per-patient predictions are written
to the site's own output folder; what these functions return for the coordinator is weights and aggregates only.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tace.client.cache import PreprocessCache
from tace.client.data import SiteDataset
from tace.common.clinical import ClinicalStats
from tace.common.config import RunConfig, SiteConfig
from tace.common.encoders import Encoders
from tace.common.errors import ManifestError, TaceError
from tace.common.manifest import PatientRecord, parse_manifest
from tace.common.metrics import auc, merge_small_cells, score_histograms
from tace.common.models import DLTR, StudyModels
from tace.common.protocol import MODELS, STAGES, SiteCounts
from tace.common.subgroups import subgroup_levels
from tace.common.summaries import EvaluatedPatients, SharingRules, site_summary
from tace.common.training import (
    TrainResult,
    TrainSettings,
    predict_images,
    predict_tabular,
    select_device,
    train_image_model,
    train_tabular_model,
)
from tace.common.validate import check_site

if TYPE_CHECKING:
    from tace.client.privacy import SitePrivacy
    from tace.common.encoders import RadiomicsStats


class SiteTask:
    """One site's data for one run: manifest, cache, role (train or holdout), and the stage operations.

    Parameters
    ----------
    site : SiteConfig
    run : RunConfig
    role : "train" or "holdout"
    validate : bool
        Run the full site check (every image header) and raise `ManifestError` listing every problem.
    """

    def __init__(self, site: SiteConfig, run: RunConfig, role: str, validate: bool = False) -> None:
        self.site = site
        self.run = run
        self.role = role
        manifest = parse_manifest(site.manifest)
        # check_site reports the CSV's problems and every image's, all at once.
        problems = check_site(manifest).problems if validate else list(manifest.problems)
        if problems:
            raise ManifestError(problems, f"{site.manifest} (site {site.site_id})")
        self.manifest = manifest
        self.cache = PreprocessCache(site.cache_dir, run.preprocess)
        self.device = select_device(site.device or run.device)
        torch.set_num_threads(site.threads or run.threads)

    # -- records ---------------------------------------------------------------------------------------------
    @property
    def train_records(self) -> list[PatientRecord]:
        if self.role != "train":
            return []
        return [r for r in self.manifest.records if r.split == "train" and r.response is not None]

    @property
    def eval_records(self) -> list[PatientRecord]:
        """Internal validation (val split) at a training site; the whole labelled cohort at a holdout site."""
        if self.role == "train":
            return [r for r in self.manifest.records if r.split == "val" and r.response is not None]
        return [r for r in self.manifest.records if r.response is not None]

    def counts(self) -> SiteCounts:
        """Counts only: patients per split and labelled patients per split (what the coordinator needs to plan)."""
        recs = self.manifest.records

        def count(split: str, labelled: bool = False) -> int:
            return sum(r.split == split and (not labelled or r.response is not None) for r in recs)

        return SiteCounts(len(recs), count("train"), count("val"), count("test"), count("train", True), count("val", True),
                          count("test", True), sum(r.response is not None for r in recs),
                          sum(r.split == "val" and r.response == 1 for r in recs))  # fmt: skip

    def require_enough_patients(self) -> None:
        """A training site with very few patients would reveal individuals through its statistics and updates."""
        n = len(self.train_records)
        if n < self.site.min_patients:
            raise TaceError(
                f"site {self.site.site_id} has {n} labelled training patients, fewer than its minimum of {self.site.min_patients}",
                "add patients to the train split, or run the site as a holdout site (node-config min-patients sets the minimum)",
            )

    def clinical_stats(self) -> ClinicalStats:
        self.require_enough_patients()
        return ClinicalStats.from_records(self.train_records, self.site.min_cell_count)

    def dataset(self, records: list[PatientRecord], augment: bool, seed: int) -> SiteDataset:
        transform = None
        if augment:
            from tace.common.augment import train_transforms

            transform = train_transforms(seed)
        return SiteDataset(records, self.manifest.root, self.cache, transform)

    def settings(self, stage: str, lr: float, seed: int) -> TrainSettings:
        spec = STAGES[stage]
        mu = self.run.proximal_mu if self.run.strategy == "fedprox" else 0.0
        return TrainSettings(epochs=spec.local_epochs(self.run), lr=lr, weight_decay=spec.weight_decay(self.run),
                             batch_size=spec.local_batch_size(self.run), proximal_mu=mu, seed=seed, device=self.device, amp=self.run.amp)  # fmt: skip

    # -- training --------------------------------------------------------------------------------------------
    def deep_features(self, dltr: DLTR, records: list[PatientRecord]) -> np.ndarray:
        """Frozen-backbone features of `records`, cached on the site's disk per backbone weights."""
        digest = hashlib.sha256()
        for k, v in dltr.state_dict().items():
            digest.update(k.encode())
            digest.update(v.detach().cpu().numpy().tobytes())
        digest.update("|".join(r.patient_id for r in records).encode())
        path = self.site.cache_dir / "features" / f"{digest.hexdigest()[:32]}.npy"
        if path.exists():
            return np.load(path)
        _, feats = predict_images(dltr, self.dataset(records, augment=False, seed=0), device=self.device, amp=self.run.amp)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{id(self)}.tmp.npy")
        np.save(tmp, feats)
        tmp.replace(path)
        return feats

    def radiomics(self, records: list[PatientRecord]) -> np.ndarray:
        """Signed-log radiomics model features ``(N, R)`` of `records` (`tace.common.radiomics.model_inputs`); a row is
        NaN where the tumour gives none. Each patient's features are computed once and kept in the site's cache."""
        from tace.common.radiomics import feature_names, model_inputs

        channels = len(self.run.preprocess.sequences)
        full = np.array([self.cache.radiomics(r, self.manifest.root) for r in records]).reshape(len(records), len(feature_names(channels)))
        return model_inputs(full, channels)

    def radiomics_stats(self) -> RadiomicsStats:
        """Sums of the training patients' radiomics model features (aggregates: `RadiomicsStats`)."""
        from tace.common.encoders import RadiomicsStats

        self.require_enough_patients()
        return RadiomicsStats.from_matrix(self.radiomics(self.train_records), self.site.min_cell_count)

    def privacy_account(self, study_id: str, planned_rounds: dict[str, int]) -> SitePrivacy:
        """The site's privacy account for a study run with sample-level differential privacy; `planned_rounds` (per
        stage, from the coordinator) sizes the noise in target-ε mode."""
        from tace.client.privacy import SitePrivacy, StagePlan

        plan = {}
        for stage, rounds in planned_rounds.items():
            s = self.settings(stage, 1.0, 0)
            plan[stage] = StagePlan(int(rounds), s.epochs, s.batch_size)
        return SitePrivacy.open(self.site, self.run, study_id, len(self.train_records), plan)

    def train(
        self,
        stage: str,
        models: StudyModels,
        encoder: Encoders | None,
        lr: float,
        seed: int,
        privacy: SitePrivacy | None = None,
        server_round: int = 0,
    ) -> TrainResult:
        """One local training call of `stage` (`tace.common.protocol.STAGES`) on the site's training split.

        With `privacy` the call trains by DP-SGD after the account confirmed the budget allows it (raising
        `BudgetExhausted` otherwise), and the release is recorded in the account before the weights can leave.
        """
        self.require_enough_patients()
        records = self.train_records
        settings = self.settings(stage, lr, seed)
        dp = privacy.settings(stage, server_round, settings.epochs, settings.batch_size) if privacy else None
        if dp is not None:
            # Under DP the augmentation and dropout draws come from the site's own entropy too: from a seed the
            # coordinator knows, their order would tell it which patients a step sampled.
            import secrets

            seed = secrets.randbits(31)
            settings = dataclasses.replace(settings, seed=seed)
        labels = torch.tensor([float(r.response) for r in records], dtype=torch.float32)  # type: ignore[arg-type]
        if stage == "dltr":
            result = train_image_model(models.dltr, self.dataset(records, augment=self.run.augment, seed=seed), settings, dp)
        else:
            assert encoder is not None
            result = train_tabular_model(models.module(stage), self.tabular_inputs(stage, models, encoder, records), labels, settings, dp)
        if privacy is not None and dp is not None:
            privacy.record(stage, server_round, dp, result.steps)
        return result

    def tabular_inputs(
        self, stage: str, models: StudyModels, encoder: Encoders, records: list[PatientRecord], deep: np.ndarray | None = None
    ) -> list[torch.Tensor]:
        """The inputs of a tabular stage's model: the clinical factors (clinical), the radiomics features
        (radiomics), or DLTR's deep features (`deep` when already computed), the clinical factors and the radiomics
        features (head)."""
        if stage == "clinical":
            return [torch.from_numpy(encoder.clinical.encode(records))]
        radiomics = torch.from_numpy(encoder.radiomics.encode(self.radiomics(records)))
        if stage == "radiomics":
            return [radiomics]
        features = self.deep_features(models.dltr, records) if deep is None else deep
        return [torch.from_numpy(features), torch.from_numpy(encoder.clinical.encode(records)), radiomics]

    # -- evaluation ------------------------------------------------------------------------------------------
    def predict(
        self, models: StudyModels, encoder: Encoders | None, wanted: tuple[str, ...], records: list[PatientRecord]
    ) -> dict[str, np.ndarray]:
        """Per-patient probabilities of the requested models (site-local; never sent)."""
        out: dict[str, np.ndarray] = {}
        feats = None
        if "dltr" in wanted or "dltrmlp" in wanted:
            probs, feats = predict_images(models.dltr, self.dataset(records, augment=False, seed=0), device=self.device, amp=self.run.amp)
            if "dltr" in wanted:
                out["dltr"] = probs
        if encoder is not None:
            for model, stage in (("clinical", "clinical"), ("radiomics", "radiomics"), ("dltrmlp", "head")):
                if model in wanted:
                    inputs = self.tabular_inputs(stage, models, encoder, records, feats)
                    out[model] = predict_tabular(models.module(stage), inputs, self.device)
        return out

    def evaluate(
        self,
        models: StudyModels,
        encoder: Encoders | None,
        stages: tuple[str, ...],
        write_predictions: bool = False,
        tag: str = "",
        summary: bool = False,
        cutoffs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Aggregates of the requested models on the site's evaluation set: AUC, n, score histograms per class.

        With `summary` (the final evaluation) the result also holds the site's analysis summary under
        ``"summary"`` (`tace.common.summaries.site_summary`): the joint score table, PFS event tables grouped with
        the coordinator's `cutoffs` when given, subgroup score tables at an external site, and patient-level rows
        only if this site opted in.
        """
        records = self.eval_records
        y = np.array([r.response for r in records], dtype=float)
        scores = self.predict(models, encoder, stages, records)
        result: dict[str, Any] = {"n": len(records), "n-pos": int(y.sum())}
        for name, s in scores.items():
            neg, pos = merge_small_cells(*score_histograms(y, s, self.run.hist_bins), self.site.min_cell_count)
            # An evaluation set smaller than the site's minimum cell count releases no AUC either (nor histograms).
            withheld = self.site.min_cell_count > 1 and len(y) < self.site.min_cell_count
            result[name] = {"auc": None if withheld else auc(y, s), "hist-neg": neg, "hist-pos": pos}
        if write_predictions:
            self.write_predictions(records, scores, tag)
        if summary:
            patients = EvaluatedPatients([r.patient_id for r in records], y, scores, [r.pfs_days for r in records],
                                         [r.pfs_event for r in records], subgroup_levels(records))  # fmt: skip
            rules = SharingRules(self.site.min_cell_count, self.site.share_patient_level,
                                 self.pseudonym_key() if self.site.share_patient_level else b"")  # fmt: skip
            result["summary"] = site_summary(self.site.site_id, self.role, patients, self.run.analysis_bins, rules, cutoffs).encode()
        return result

    def pseudonym_key(self) -> bytes:
        """The site's secret key for pseudonyms (created once in its output folder; it never leaves the site)."""
        import os
        import secrets

        path = self.site.output_dir / "pseudonym.key"
        if not path.exists():
            self.site.output_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(secrets.token_hex(32).encode())
            tmp.chmod(0o600)
            try:
                os.link(tmp, path)  # atomic: never overwrite a key another process created first
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return path.read_bytes().strip()

    def write_predictions(self, records: list[PatientRecord], scores: dict[str, np.ndarray], tag: str = "") -> Path:
        """Per-patient predictions into the site's own output folder (they stay at the site); `tag` names the fold
        or local model in layouts that evaluate a site more than once."""
        self.site.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.site.output_dir / (f"predictions-{tag}.csv" if tag else "predictions.csv")
        names = [m for m in MODELS if m in scores]
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["patient_id", "split", "response", *names])
            for i, r in enumerate(records):
                w.writerow([r.patient_id, r.split, r.response, *(f"{scores[n][i]:.6f}" for n in names)])
        return path


def with_role(task: SiteTask, role: str) -> SiteTask:
    """The same site under another role (leave-one-centre-out reuses parsed manifests and caches)."""
    clone = copy.copy(task)
    clone.role = role
    return clone
