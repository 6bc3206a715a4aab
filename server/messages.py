"""What the study workflow asks of a federation and what it gets back, whatever the transport.

`Federation` is how the workflow reaches the sites: `tace.server.federation.FlowerFederation` sends Flower
messages, `tace.simulation.inprocess.InProcessFederation` calls the site tasks directly. The requests here are the
workflow's (one per round or evaluation for all sites); the federation turns them into one
`tace.common.protocol` request per site.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from tace.common.encoders import Encoders, SiteStatistics
from tace.common.protocol import Arrays, Failure


@dataclass
class SiteUpdate:
    """One site's part of a training round, as the workflow screens and aggregates it.

    `failure` says why the site delivered no update this round (it failed, vanished, timed out, or declined under
    its privacy budget); `evaluation` is ``{site: validation of the weights it received}`` when asked for; with
    secure aggregation (`masked`) the update is inside the round's aggregate and `arrays` is empty.
    """

    site_id: str
    arrays: Arrays
    num_examples: int
    metrics: dict[str, float]
    raw: Any = None  # the transport's own reply (a Flower Message), for strategies that aggregate those
    failure: Failure | None = None
    evaluation: dict[str, dict[str, Any]] | None = None
    masked: bool = False

    @property
    def error(self) -> str:
        return "" if self.failure is None else self.failure.message

    @property
    def declined(self) -> bool:
        return self.failure is not None and self.failure.declined


@dataclass(frozen=True)
class TrainRound:
    """One round of local training: the stage, its learning rate and seed (the first training site's; the others
    get seed + their place in site order), the round, the backbone, and the models to validate first (if any)."""

    stage: str
    lr: float
    seed: int
    server_round: int
    backbone: str
    validate: tuple[str, ...] = ()


@dataclass(frozen=True)
class Evaluation:
    """What an evaluate call asks of the sites: the models; for the final evaluation also which sites (`role`,
    None: all), the tag of the prediction files they write, and the cut-offs that group their survival tables."""

    models: tuple[str, ...]
    backbone: str
    final: bool = False
    tag: str = ""
    role: str | None = None
    cutoffs: dict[str, Any] | None = None


@dataclass(frozen=True)
class Finetune:
    """What fine-tuning asks of the training sites: the mode ('head' or 'last-stage'), epochs (0: the default),
    the backbone, and the cut-offs the fine-tuned model keeps (the global model's)."""

    mode: str
    epochs: int
    backbone: str
    seed: int
    cutoffs: dict[str, Any] = field(default_factory=dict)
    tag: str = ""  # leave-one-centre-out: the fold, so each fold's fine-tuned model is kept apart at the site


@dataclass
class SiteInfo:
    """A site in the current layout: its role and its labelled patients (training split; evaluation set)."""

    site_id: str
    role: str
    n_train: int
    n_eval: int
    val_responders: int = 0


class Federation(Protocol):
    """How the workflow reaches the sites."""

    def sites(self) -> list[SiteInfo]: ...

    def statistics(self) -> list[SiteStatistics]:
        """The training sites' statistics for the encoders, in site order."""
        ...

    def train(self, arrays: dict[str, Arrays], encoder: Encoders | None, request: TrainRound) -> list[SiteUpdate]:
        """Local training of `request.stage` at every training site. With `request.validate`, each site first
        evaluates those models with the weights it received (its internal validation, as `evaluate` during rounds)
        and the replies carry it."""
        ...

    def aggregate(self, stage: str, server_round: int, replies: list[SiteUpdate], current: Arrays) -> Arrays: ...

    def strategy_state(self, stage: str) -> Arrays:
        """The aggregation strategy's own state for `stage` (FedAdam's moments; empty for FedAvg), for resuming."""
        ...

    def restore_strategy(self, stage: str, state: Arrays) -> None: ...

    def evaluate(self, arrays: dict[str, Arrays], encoder: Encoders | None, request: Evaluation) -> dict[str, dict[str, Any]]:
        """Aggregates per site. During rounds (`request.final` False) training sites only. The final evaluation
        reaches the sites of `request.role` (every site when None) and each result also holds the site's analysis
        summary under ``"summary"``, its survival event tables grouped with `request.cutoffs` when given."""
        ...

    def set_roles(self, holdout: tuple[str, ...]) -> None: ...

    def finetune(self, arrays: dict[str, Arrays], encoder: Encoders, request: Finetune) -> dict[str, dict[str, Any]]:
        """Local fine-tuning at every training site (`tace.client.finetune`): per site the global and the fine-tuned
        DLTRMLP AUC on its validation split, its counts, or ``{"error": why}``."""
        ...


@dataclass
class StudyResult:
    """The study on one layout: final weights per stage, the clinical encoder, every site's final evaluation,
    the roles, timings, the chosen backbone (and the comparison), the cut-offs and fine-tuning figures."""

    arrays: dict[str, Arrays]
    encoder: Encoders
    evaluation: dict[str, dict[str, Any]]
    roles: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)
    backbone: str = ""
    backbone_comparison: dict[str, float | None] = field(default_factory=dict)
    cutoffs: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
