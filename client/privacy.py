"""The site's privacy account for one study: what its DP-SGD training has spent, kept on its own disk.

Flower recreates the ClientApp for every message and the coordinator may restart, so the accountant lives in the
site's output folder, ``privacy/<study-id>.json``: the noise multiplier fixed for the study, δ, and every private
release (stage, round, Poisson sample rate, steps). ε is always computed from the whole history, so the ε a site
reports after round r covers everything it released up to round r, across stages, backbones, folds and coordinator
restarts; a repeated round (after a coordinator resume) is counted again, because its weights left the site too.

Before each training call the site projects the call's ε; when that would exceed its budget (the run's
``dp-target-epsilon``, or the site's own stricter ``max-epsilon``, which the coordinator cannot change) it
declines to train and says so (`BudgetExhausted`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tace.common.config import RunConfig, SiteConfig
from tace.common.errors import TaceError
from tace.common.privacy import DPSettings, calibrate_noise, epsilon, sample_rate, steps_per_epoch
from tace.common.protocol import Reason, SiteRefusal
from tace.common.serialize import write_json

FORMAT = 1


class BudgetExhausted(SiteRefusal):
    """The next training call would take the site past its privacy budget; the site declines to train."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(Reason.DECLINED_BUDGET, message, hint)


@dataclass(frozen=True)
class StagePlan:
    """What one stage of the study asks of this site: planned rounds, local epochs per round and batch size."""

    rounds: int
    epochs: int
    batch_size: int


@dataclass
class SitePrivacy:
    """The privacy account of one site in one study (``privacy/<study-id>.json`` in its output folder).

    Open it with `SitePrivacy.open`; `settings` gives a training call's DP-SGD settings after checking the budget,
    `record` adds the call's release once it is done.
    """

    path: Path
    study_id: str
    n_train: int
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    budget: float
    secure_rng: bool
    history: list[tuple[float, float, int]] = field(default_factory=list)
    releases: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def open(cls, site: SiteConfig, run: RunConfig, study_id: str, n_train: int, plan: dict[str, StagePlan]) -> SitePrivacy:
        """The site's account for `study_id`, created on first use.

        On creation δ is fixed (``dp-delta``, or 1/(10 n) for n training patients) and so is the noise multiplier:
        ``dp-noise-multiplier``, or in target-ε mode the smallest noise that keeps every planned round of every
        stage (`plan`) within the budget. Both stay fixed for the study, also when the site later raises its own
        budget to let an interrupted run continue.
        """
        if not study_id or not all(c.isalnum() or c == "-" for c in study_id):
            raise TaceError("the coordinator sent no valid study id for the privacy account", "update TACE-FL at the coordinator")
        path = site.output_dir / "privacy" / f"{study_id}.json"
        budget = min(run.dp_target_epsilon, site.max_epsilon) if site.max_epsilon else run.dp_target_epsilon
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("format") != FORMAT:
                    raise ValueError("format")
                # The budget the account was opened with binds: the coordinator alone cannot raise it (a larger
                # dp-target-epsilon later); only the site's own max-epsilon can.
                if not site.max_epsilon:
                    budget = min(budget, float(data["budget"]))
                return cls(path, study_id, int(data["n_train"]), float(data["delta"]), float(data["noise_multiplier"]),
                           float(data["max_grad_norm"]), budget, bool(data["secure_rng"]),
                           [(float(s), float(q), int(k)) for s, q, k in data["history"]], list(data["releases"]))  # fmt: skip
            except (OSError, ValueError, KeyError, TypeError):
                raise TaceError(
                    f"the site's privacy account {path} is damaged: the privacy spent in this study cannot be known",
                    "restore the file from the site's backup; without it the site must not train in this study again",
                ) from None
        delta = run.dp_delta or 1.0 / (10 * max(n_train, 1))
        sigma = run.dp_noise_multiplier or calibrate_noise(
            [(sample_rate(n_train, p.batch_size), p.rounds * p.epochs * steps_per_epoch(n_train, p.batch_size)) for p in plan.values()],
            budget,
            delta,
        )
        account = cls(path, study_id, n_train, delta, sigma, run.dp_max_grad_norm, budget, run.dp_secure_rng)
        account.save()
        return account

    @property
    def epsilon(self) -> float:
        """ε spent so far in this study, at δ."""
        return epsilon(self.history, self.delta)

    @property
    def steps(self) -> int:
        return sum(k for _, _, k in self.history)

    def settings(self, stage: str, server_round: int, epochs: int, batch_size: int) -> DPSettings:
        """DP-SGD settings of a training call, after checking that it keeps the site within its budget.

        Raises `BudgetExhausted` (the site declines to train) when it would not.
        """
        rate = sample_rate(self.n_train, batch_size)
        steps = epochs * steps_per_epoch(self.n_train, batch_size)
        projected = epsilon([*self.history, (self.noise_multiplier, rate, steps)], self.delta)
        if projected > self.budget * (1 + 1e-9):
            raise BudgetExhausted(
                f"declined to train {stage} round {server_round}: it would take this site's privacy spending from ε = "
                f"{self.epsilon:.3g} to {projected:.3g}, beyond its budget of ε = {self.budget:g} (δ = {self.delta:.3g})",
                "the site still evaluates; to train further, the site's ethics board must approve a larger budget, which the "
                "site sets itself ([privacy] max-epsilon in its site.toml; the run's dp-target-epsilon caps it too)",
            )
        return DPSettings(self.noise_multiplier, self.max_grad_norm, rate, self.secure_rng)

    def record(self, stage: str, server_round: int, dp: DPSettings, steps: int) -> None:
        """Add a finished training call's release to the account (saved at once, before the weights can leave)."""
        self.history.append((dp.noise_multiplier, dp.sample_rate, int(steps)))
        self.releases.append({"stage": stage, "round": int(server_round), "steps": int(steps), "sample_rate": dp.sample_rate,
                              "noise_multiplier": dp.noise_multiplier, "epsilon": self.epsilon})  # fmt: skip
        self.save()

    def report(self, trained: bool = True) -> dict[str, float]:
        """The privacy figures the site reports to the coordinator's ledger (numbers only; nothing about a patient):
        ε spent so far, δ, noise multiplier, and the last release's sample rate and steps (0 when `trained` is False:
        the site declined)."""
        last = self.releases[-1] if self.releases and trained else {}
        return {
            "dp-epsilon": self.epsilon,
            "dp-delta": self.delta,
            "dp-noise-multiplier": self.noise_multiplier,
            "dp-sample-rate": float(last.get("sample_rate", 0.0)),
            "dp-steps": int(last.get("steps", 0)),
            "dp-total-steps": self.steps,
            "dp-budget": self.budget,
        }

    def save(self) -> None:
        """Atomically: a crash leaves the previous account, never half a file."""
        write_json(self.path, {
            "format": FORMAT, "study_id": self.study_id, "n_train": self.n_train, "delta": self.delta,
            "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm, "secure_rng": self.secure_rng, "budget": self.budget,
            "accountant": "rdp (Opacus)", "history": [list(h) for h in self.history], "releases": self.releases,
        })  # fmt: skip
        os.chmod(self.path, 0o600)
