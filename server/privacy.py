"""The coordinator's privacy ledger (``privacy_ledger.json``) and client-level differential privacy.

Sample-level DP (``dp-mode = "sample"``): every site trains by DP-SGD and keeps its own accountant
(`tace.client.privacy`); after every training call it reports ε spent so far, δ, noise multiplier, sample rate and
steps, and the ledger records each report per site, stage and round, declined rounds included.

Client-level DP (``dp-mode = "client-fixed"`` or ``"client-adaptive"``): the coordinator wraps the aggregation
with Flower's DP strategy wrappers (each site's update clipped, by the coordinator or, under secure aggregation, by
the site itself; Gaussian noise on the mean) and accounts for it here, which Flower's wrappers leave to the user:
each round is one Gaussian release of the unweighted mean of the sites' clipped updates, with every training site
taking part (no amplification by subsampling), composed with Opacus' RDP accountant over every round of every
stage. The unit protected is a whole hospital.

The ledger is rewritten atomically after every report and is never trimmed on resume: privacy spent in a round
that was later repeated was spent all the same.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

from tace.common.config import RunConfig
from tace.common.errors import TaceError
from tace.common.privacy import calibrate_noise, epsilon
from tace.common.protocol import STAGES
from tace.common.serialize import write_json

FORMAT = 1
CENTRAL = "all sites (client-level)"


#: Rounds per stage the plan adds for resuming: a coordinator that stops mid-stage repeats up to two rounds (the
#: one awaiting its validation and the one in flight), and their weights left the sites all the same.
RESUME_HEADROOM = 2


def planned_rounds(run: RunConfig, n_sites: int, central: bool = False) -> dict[str, int]:
    """Rounds each stage may run over the whole run (every candidate backbone, every leave-one-centre-out fold a
    training site trains in, or with `central` every fold), plus `RESUME_HEADROOM`: what target-ε mode sizes the
    noise for."""
    folds = (n_sites if central else max(n_sites - 1, 1)) if run.layout == "loco" else 1
    candidates = len(run.backbone_candidates) or 1
    # Every candidate backbone trains its own DLTR stage.
    plan = {name: stage.rounds(run) * (candidates if name == "dltr" else 1) for name, stage in STAGES.items()}
    return {stage: (rounds + RESUME_HEADROOM) * folds for stage, rounds in plan.items()}


class PrivacyLedger:
    """What every site (sample-level) or the federation (client-level) has spent, in the run folder."""

    def __init__(self, path: Path, run: RunConfig) -> None:
        self.path = path
        self.run = run
        if path.exists():
            try:
                self.data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
                if self.data.get("format") != FORMAT or not self.data.get("study_id"):
                    raise ValueError("format")
            except (OSError, ValueError):
                raise TaceError(f"{path} is damaged: the privacy spent in this run cannot be known",
                                "restore it from a backup; a run without its ledger must not continue") from None  # fmt: skip
        else:
            self.data = {
                "format": FORMAT, "study_id": uuid.uuid4().hex, "mode": run.dp_mode,
                "unit": "patient" if run.sample_dp else "hospital", "accountant": "RDP (Opacus)",
                "target_epsilon": run.dp_target_epsilon, "secure_rng": run.dp_secure_rng, "secagg": run.secagg,
                "sites": {}, "releases": [],
            }  # fmt: skip
            self.save()

    @property
    def study_id(self) -> str:
        """The study's id: names each site's privacy account, so one account spans every round, fold and resume."""
        return str(self.data["study_id"])

    def save(self) -> None:
        write_json(self.path, self.data)

    def _release(self, site: str, stage: str, server_round: int, values: dict[str, Any], declined: str = "") -> None:
        row = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "site": site, "stage": stage,
               "round": int(server_round), **values}  # fmt: skip
        if declined:
            row["declined"] = declined
        self.data["releases"].append(row)
        entry = self.data["sites"].setdefault(site, {"rounds": 0, "steps": 0, "declined": []})
        entry.update({k: values[k] for k in ("epsilon", "delta", "noise_multiplier") if k in values})
        if declined:
            entry["declined"].append(f"{stage} round {server_round}")
        else:
            entry["rounds"] += 1
            entry["steps"] += int(values.get("steps", 0))
            entry["sample_rate"] = values.get("sample_rate")
        if "budget" in values:
            entry["budget"] = values["budget"]
        self.save()

    # -- sample-level: the sites' own reports ----------------------------------------------------------------
    def record_site(self, site: str, stage: str, server_round: int, metrics: dict[str, Any], declined: str = "") -> None:
        """A site's report after a training call (or a declined one); ignored when the reply carried none."""
        if "dp-epsilon" not in metrics:
            return
        values = {"epsilon": float(metrics["dp-epsilon"]), "delta": float(metrics["dp-delta"]),
                  "noise_multiplier": float(metrics["dp-noise-multiplier"]), "sample_rate": float(metrics["dp-sample-rate"]),
                  "steps": int(metrics["dp-steps"]), "budget": float(metrics["dp-budget"])}  # fmt: skip
        self._release(site, stage, server_round, values, declined)

    # -- client-level: the coordinator's own accounting ------------------------------------------------------
    def central(self, n_sites: int, n_training: int) -> dict[str, Any]:
        """The client-level accounting state, created on first use: δ (``dp-delta``, or 1/(10 x training sites))
        and the noise multiplier (``dp-noise-multiplier``, or sized for every planned round)."""
        state = self.data.get("central")
        if state is None:
            delta = self.run.dp_delta or 1.0 / (10 * max(n_training, 1))
            total = sum(planned_rounds(self.run, n_sites, central=True).values())
            sigma = self.run.dp_noise_multiplier or calibrate_noise([(1.0, total)], self.run.dp_target_epsilon, delta)
            state = self.data["central"] = {"delta": delta, "noise_multiplier": sigma, "history": []}
            self.save()
        return state

    def check_central(self, stage: str, server_round: int) -> None:
        """Refuse a client-level release that would take the federation past dp-target-epsilon."""
        state = self.data["central"]
        sigma, delta = float(state["noise_multiplier"]), float(state["delta"])
        history = [tuple(h) for h in state["history"]]
        projected = epsilon([*history, (sigma, 1.0, 1)], delta)
        if projected > self.run.dp_target_epsilon * (1 + 1e-9):
            spent = epsilon(history, delta)
            raise TaceError(
                f"round {server_round} of stage {stage}: releasing its aggregate would take the federation's client-level "
                f"privacy spending from ε = {spent:.3g} to {projected:.3g}, beyond dp-target-epsilon {self.run.dp_target_epsilon:g} "
                f"(δ = {delta:.3g}); the run stops here",
                "the completed rounds are kept; a larger budget needs the sites' approval (run-config dp-target-epsilon), then "
                "continue with `tace-server start --resume`",
            )

    def record_central(self, stage: str, server_round: int, n_sites: int, clipping_norm: float) -> float:
        """One client-level release (a round's noisy mean); returns ε spent so far."""
        state = self.data["central"]
        state["history"].append([float(state["noise_multiplier"]), 1.0, 1])
        eps = epsilon([tuple(h) for h in state["history"]], float(state["delta"]))
        self._release(CENTRAL, stage, server_round, {
            "epsilon": eps, "delta": state["delta"], "noise_multiplier": state["noise_multiplier"], "sample_rate": 1.0,
            "steps": 1, "budget": self.run.dp_target_epsilon, "sites": n_sites, "clipping_norm": clipping_norm,
        })  # fmt: skip
        return eps


def adaptive_clipping(strategy: Any, noise_multiplier: float, n_sites: int, initial_norm: float, count_stddev: float) -> Any:
    """Flower's server-side adaptive-clipping wrapper with two corrections, so that what is accounted is what happens.

    Flower 1.42's `DifferentialPrivacyServerSideAdaptiveClipping` (1) moves the norm with the share of updates that
    *were* clipped where Andrew et al.'s rule uses the share that were *not*, which drives the norm away from the
    target quantile, and (2) sizes the round's noise with the norm already updated for the next round, while the
    updates were clipped to the current one: whenever the norm shrinks, less noise than the noise multiplier says.
    """
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping

    class AdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            self.round_norm = self.clipping_norm  # the norm this round's updates are clipped to
            return super().aggregate_train(server_round, replies)

        def _geometric_update(self, clipped_fraction: float) -> None:
            super()._geometric_update(1.0 - clipped_fraction)  # Andrew et al.: the share of updates not clipped

        def _add_noise_to_aggregated_arrays(self, aggregated: Any) -> Any:
            updated, self.clipping_norm = self.clipping_norm, self.round_norm
            try:
                return super()._add_noise_to_aggregated_arrays(aggregated)
            finally:
                self.clipping_norm = updated

    wrapper = AdaptiveClipping(strategy, noise_multiplier, n_sites, initial_clipping_norm=initial_norm, clipped_count_stddev=count_stddev)
    wrapper.round_norm = initial_norm
    return wrapper
