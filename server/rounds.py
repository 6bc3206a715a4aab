"""The federated rounds of one stage: train, screen the updates, aggregate, validate, checkpoint, stop early.

The training sites validate round r's global weights at the start of round r + 1's train message (one message per
site and round instead of two: in a deployment every message starts a fresh process); the last round's weights are
validated with an evaluate message. A round is complete, checkpointed and saved in ``progress.json`` once its
validation is in, so an interrupted stage continues (``resume``) from its last completed round exactly as if it
had not been interrupted. When early stopping triggers, the next round's local training (already done) is
discarded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tace.common.config import RunConfig
from tace.common.encoders import Encoders
from tace.common.errors import TaceError
from tace.common.metrics import auc_from_histograms, logit_moments
from tace.common.protocol import STAGES, Arrays
from tace.server.messages import Evaluation, Federation, SiteUpdate, TrainRound
from tace.server.progress import Progress, StageProgress, load_arrays
from tace.server.rundir import RunDir

log = logging.getLogger("tace.server")

#: ``on_round(label, round, rounds, pooled AUC, {site: progress text})`` after every completed round.
OnRound = Callable[[str, int, int, "float | None", dict[str, str]], None]


def pooled_histograms(
    evaluation: dict[str, dict[str, Any]], roles: dict[str, str], model: str, role: str = "train"
) -> tuple[np.ndarray, np.ndarray] | None:
    """The summed score histograms ``(negatives, positives)`` of the evaluation sets of all sites of `role`."""
    neg: np.ndarray | None = None
    pos: np.ndarray | None = None
    for site, res in evaluation.items():
        if roles.get(site) != role or model not in res:
            continue
        n, p = np.asarray(res[model]["hist-neg"]), np.asarray(res[model]["hist-pos"])
        neg, pos = (n, p) if neg is None or pos is None else (neg + n, pos + p)
    return None if neg is None or pos is None else (neg, pos)


def pooled_auc(evaluation: dict[str, dict[str, Any]], roles: dict[str, str], model: str, role: str = "train") -> float | None:
    """AUC over the evaluation sets of all sites of `role`, from their summed score histograms."""
    pooled = pooled_histograms(evaluation, roles, model, role)
    return None if pooled is None else auc_from_histograms(*pooled)


def site_progress(
    replies: list[SiteUpdate], evaluation: dict[str, dict[str, Any]], model: str, excluded: dict[str, str] | None = None
) -> dict[str, str]:
    """Per training site: local training loss and internal-validation AUC of the round (for progress lines)."""
    loss = {r.site_id: r.metrics.get("train-loss") for r in replies}
    out = {}
    for site, res in sorted(evaluation.items()):
        auc = res.get(model, {}).get("auc")
        parts = [f"loss={loss[site]:.3f}" if loss.get(site) is not None else "", f"auc={auc:.3f}" if auc is not None else "auc=n/a"]
        out[site] = ",".join(p for p in parts if p)
    for site in sorted(excluded or {}):
        out[site] = "excluded" + (f",auc={out[site].rsplit('auc=', 1)[1]}" if site in out else "")
    return out


def update_norm(update: Arrays, current: Arrays) -> float:
    """Euclidean distance of a site's weights from the global weights they were trained from."""
    total = 0.0
    for k, v in current.items():
        if v.dtype.kind == "f":
            total += float(np.sum((update[k].astype(np.float64) - v.astype(np.float64)) ** 2))
    return float(np.sqrt(total))


def screen_updates(replies: list[SiteUpdate], current: Arrays, max_norm_ratio: float) -> tuple[list[SiteUpdate], dict[str, str]]:
    """Split a round's replies into usable updates and excluded ones (site -> reason).

    Excluded: sites that failed, declined or did not answer; updates whose names or shapes differ from the global
    model's; non-finite updates; and (when `max_norm_ratio` > 0 and at least two updates are left) updates farther
    from the global weights than `max_norm_ratio` times the median distance of the other sites' updates. Masked
    updates (secure aggregation) cannot be looked into: they are accepted, and the federation checks their aggregate.
    """
    accepted: list[SiteUpdate] = []
    excluded: dict[str, str] = {}
    for r in replies:
        if r.failure is not None:
            excluded[r.site_id] = r.error
        elif r.masked:
            accepted.append(r)
        elif set(r.arrays) != set(current):
            excluded[r.site_id] = "update with unexpected weight names (another TACE-FL version or model definition?)"
        elif bad := [k for k, v in r.arrays.items() if v.shape != current[k].shape]:
            excluded[r.site_id] = f"update of the wrong shape ({bad[0]}: {r.arrays[bad[0]].shape}, expected {current[bad[0]].shape})"
        elif not all(np.isfinite(v).all() for v in r.arrays.values() if v.dtype.kind == "f"):
            excluded[r.site_id] = "non-finite update (NaN or infinity): training diverged at the site"
        else:
            accepted.append(r)
    if max_norm_ratio > 0 and sum(not r.masked for r in accepted) >= 2:
        norms = {r.site_id: update_norm(r.arrays, current) for r in accepted if not r.masked}
        far = {}
        for site, norm in norms.items():
            others = float(np.median([n for s, n in norms.items() if s != site]))
            if norm > max_norm_ratio * others and norm > 0:
                far[site] = (
                    f"update norm {norm:.3g} is {norm / max(others, 1e-12):.1f} x the median of the other sites' ({others:.3g}); bound {max_norm_ratio:g} x"
                )
        excluded.update(far)
        accepted = [r for r in accepted if r.site_id not in far]
    return accepted, excluded


@dataclass
class _Pending:
    """A round trained and aggregated, awaiting its validation."""

    round: int
    lr: float
    accepted: list[SiteUpdate]
    excluded: dict[str, str]
    train_s: float
    weights: Arrays


@dataclass
class _Stage:
    """One stage being trained: what it trains, with what, and where it stands."""

    name: str
    label: str
    arrays: dict[str, Arrays]
    encoder: Encoders | None
    backbone: str
    state: StageProgress
    best: Arrays

    @property
    def model(self) -> str:
        return STAGES[self.name].model


class StageRunner:
    """Runs stages of the study on a federation, recording every round in the run folder and its progress."""

    def __init__(
        self, federation: Federation, run: RunConfig, rundir: RunDir, roles: dict[str, str], progress: Progress | None = None,
        on_round: OnRound | None = None,
    ) -> None:  # fmt: skip
        self.federation, self.run, self.rundir, self.roles = federation, run, rundir, roles
        self.progress = progress or Progress(rundir.path / "progress.json")
        self.on_round = on_round

    def run_stage(
        self, stage: str, arrays: dict[str, Arrays], encoder: Encoders | None, backbone: str, label: str | None = None
    ) -> tuple[Arrays, float | None]:
        """Federated rounds of `stage` with early stopping on pooled internal-validation AUC, starting from
        ``arrays[stage]`` (or where an interrupted run stopped); returns the best weights and their AUC."""
        label = label or stage
        state = self.progress.stage(label)
        if state.done:
            return load_arrays(self.rundir.path / "checkpoints" / label / "best.npz"), (state.best_auc if state.best_auc >= 0 else None)
        s = _Stage(stage, label, arrays, encoder, backbone, state, arrays[stage])
        current = self._resume(s)
        rounds = STAGES[stage].rounds(self.run)
        pending: _Pending | None = None
        r = state.next_round
        while r <= rounds and not self._stop_early(state):
            lr = self.run.lr_at(r, rounds, STAGES[stage].base_lr(self.run))
            start = time.perf_counter()
            request = TrainRound(stage, lr, STAGES[stage].round_seed(self.run, r), r, backbone, (s.model,) if pending else ())
            replies = self.federation.train({**arrays, stage: current}, encoder, request)
            if pending is not None:
                self._complete(s, pending, {site: res for rep in replies for site, res in (rep.evaluation or {}).items()})
                pending = None
                if self._stop_early(state):
                    break  # this round's local training is discarded
            accepted, excluded = self._screen(s, r, replies, current)
            current = self.federation.aggregate(stage, r, accepted, current)
            pending = _Pending(r, lr, accepted, excluded, time.perf_counter() - start, current)
            r += 1
        if self._stop_early(state):
            log.info("%s: early stop after round %d (no improvement for %d rounds)", label, state.next_round - 1, self.run.patience)
        elif pending is not None:
            evaluation = self.federation.evaluate({**arrays, stage: pending.weights}, encoder, Evaluation((s.model,), backbone))
            self._complete(s, pending, evaluation)
        self.rundir.checkpoint(label, "best", s.best)
        state.done = True
        self.progress.save()
        return s.best, (state.best_auc if state.best_auc >= 0 else None)

    def _resume(self, s: _Stage) -> Arrays:
        """The weights to continue from: the stage's start, or those of the last round an interrupted run completed."""
        if s.state.next_round <= 1:
            return s.best
        done = s.state.next_round - 1
        current = load_arrays(self.rundir.checkpoint_path(s.label, done))
        s.best = load_arrays(self.rundir.checkpoint_path(s.label, s.state.best_round)) if s.state.best_round else current
        self.federation.restore_strategy(s.name, load_arrays(self.rundir.checkpoint_path(s.label, f"strategy-round-{done:03d}")))
        log.info("%s: resuming after round %d of %d", s.label, done, STAGES[s.name].rounds(self.run))
        return current

    def _stop_early(self, state: StageProgress) -> bool:
        return bool(self.run.patience) and state.since_best >= self.run.patience

    def _screen(self, s: _Stage, r: int, replies: list[SiteUpdate], current: Arrays) -> tuple[list[SiteUpdate], dict[str, str]]:
        """The round's usable updates (and why the others are left out, in events.jsonl); stops the run cleanly when
        fewer than min-sites remain."""
        accepted, excluded = screen_updates(replies, current, self.run.max_update_norm_ratio)
        declined = {rep.site_id for rep in replies if rep.declined}
        arrived = {rep.site_id for rep in replies if rep.failure is None}  # an update that left the site, screened out here
        for site, reason in sorted(excluded.items()):
            self.rundir.record_event("declined" if site in declined else "excluded", s.label, r, site, reason, sent=site in arrived)
        required = min(self.run.min_sites, len(replies))
        if len(accepted) >= max(required, 1):
            return accepted, excluded
        hint = (
            "bring the missing sites back online, then continue the run with `tace-server start --resume` (progress up to the "
            "previous round is kept); or lower run-config min-sites"
        )
        if declined:
            hint = (
                "the run stops cleanly: the completed rounds and each site's privacy account are kept. Sites out of privacy "
                "budget can train again only with their ethics boards' approval of a larger budget (run-config "
                "dp-target-epsilon, the site's own max-epsilon), then `tace-server start --resume`; or start a new run "
                "with fewer rounds or more noise"
            )
        raise TaceError(
            f"round {r} of stage {s.label}: {len(accepted)} usable update(s), fewer than min-sites ({required}); "
            + "; ".join(f"{site}: {why}" for site, why in sorted(excluded.items())),
            hint,
        )

    def _complete(self, s: _Stage, p: _Pending, evaluation: dict[str, dict[str, Any]]) -> None:
        """Record a validated round: metrics, checkpoints, best weights, early-stopping count, progress."""
        state, rundir = s.state, self.rundir
        pooled = pooled_histograms(evaluation, self.roles, s.model, "train")
        val_auc = None if pooled is None else auc_from_histograms(*pooled)
        rundir.record_round(s.label, p.round, p.lr, p.accepted, evaluation, s.model, val_auc, p.train_s)
        rundir.checkpoint(s.label, p.round, p.weights)
        rundir.checkpoint(s.label, f"strategy-round-{p.round:03d}", self.federation.strategy_state(s.name))
        if val_auc is None:
            # Nothing to select on (a single-class validation set, allowed only for the local reference): keep the
            # latest weights and do not stop early.
            s.best, state.best_round = p.weights, p.round
        elif val_auc > state.best_auc + 1e-9 or p.round == 1:
            s.best, state.best_auc, state.best_round, state.since_best = p.weights, val_auc, p.round, 0
        else:
            state.since_best += 1
        if state.best_round == p.round:
            state.best_logit = list(logit_moments(*pooled) or ()) if pooled is not None else []
        state.next_round = p.round + 1
        self.progress.save()
        # Only after progress.json names this round: a crash in between leaves a checkpoint too many, never one too few.
        rundir.prune_checkpoints(s.label, p.round, state.best_round, self.run.keep_checkpoints)
        rounds = STAGES[s.name].rounds(self.run)
        if self.on_round:
            self.on_round(s.label, p.round, rounds, val_auc, site_progress(p.accepted, evaluation, s.model, p.excluded))
        log.info(
            "%s round %d/%d: pooled internal-validation AUC %s", s.label, p.round, rounds, "n/a" if val_auc is None else f"{val_auc:.3f}"
        )
