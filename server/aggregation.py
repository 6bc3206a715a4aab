"""How the coordinator combines the sites' updates: a Flower strategy per stage (FedAvg, FedProx or FedAdam), in
Flower's differential-privacy wrappers for client-level DP, fed the secure aggregate under SecAgg+; its state is
saved with every round and restored on resume.

Our ServerApp sends its own messages (only to training sites) instead of letting a strategy configure the rounds,
so the strategies are used for what they compute: `aggregate_train` over the round's replies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from tace.common.config import RunConfig
from tace.common.errors import TaceError
from tace.common.models import FROZEN_HEAD_KEYS
from tace.common.protocol import ARRAYS, METRICS, STAGES, Arrays
from tace.server.messages import SiteUpdate
from tace.server.privacy import PrivacyLedger


def build_strategy(run: RunConfig, noise_multiplier: float = 0.0, n_sites: int = 1) -> Any:
    """The aggregation strategy of a stage; with client-level differential privacy wrapped in Flower's DP wrapper
    (an unweighted mean: its sensitivity is one site's clipped update divided by the number of sites)."""
    common: dict[str, Any] = {"min_train_nodes": 1, "min_evaluate_nodes": 1, "min_available_nodes": 1}
    if run.client_dp:
        common["weighted_by_key"] = "site-weight"
    if run.strategy == "fedprox":
        inner: FedAvg = FedProx(proximal_mu=run.proximal_mu, **common)
    elif run.strategy == "fedadam":
        inner = FedAdam(eta=run.server_lr, **common)
    else:
        inner = FedAvg(**common)
    if not run.client_dp:
        return inner
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, DifferentialPrivacyServerSideFixedClipping

    n = max(n_sites, 1)
    if run.dp_mode == "client-adaptive":
        # Flower's default noise on the clipped-update count (n / 20) suits hundreds of sites; with a handful it
        # cannot reach the requested noise multiplier. This choice costs the updates about 5 % more noise.
        from tace.server.privacy import adaptive_clipping

        return adaptive_clipping(inner, noise_multiplier, n, run.dp_clipping_norm, max(n / 20, 1.6 * noise_multiplier))
    if run.secagg:  # the coordinator cannot see the updates: the sites clip them (tace.client.service)
        return DifferentialPrivacyClientSideFixedClipping(inner, noise_multiplier, run.dp_clipping_norm, n)
    return DifferentialPrivacyServerSideFixedClipping(inner, noise_multiplier, run.dp_clipping_norm, n)


def array_record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def synthetic_replies(aggregate: Arrays, weights: list[int], key: str) -> list[Message]:
    """Stand-in train replies holding an already aggregated mean (secure aggregation), one per weight: a strategy
    averaging them returns that mean (and a DP wrapper counts as many sites as contributed to it)."""
    record = array_record(aggregate)
    return [
        Message(RecordDict({ARRAYS: record, METRICS: MetricRecord({"num-examples": w, key: w})}), dst_node_id=0, message_type="train")
        for w in weights
    ]


class Aggregator:
    """One strategy per stage for the current layout, with the client-level privacy ledger when DP is on."""

    def __init__(self, run: RunConfig, ledger: PrivacyLedger | None = None) -> None:
        if run.dp and ledger is None:
            raise TaceError("a run with differential privacy needs its privacy ledger", "report this as a bug")
        self.run, self.ledger = run, ledger
        self.n_sites = self.n_train = 0
        self.strategies: dict[str, Any] = {}
        self._secure: dict[str, tuple[Arrays, list[int]]] = {}  # stage -> (secure aggregate, its sites' weights)

    def reset(self, n_sites: int, n_train: int) -> None:
        """New strategies for a layout of `n_sites` sites, `n_train` of them training."""
        self.n_sites, self.n_train = n_sites, n_train
        self.strategies = {stage: self._new() for stage in STAGES}

    def _new(self) -> Any:
        noise = 0.0
        if self.run.client_dp:
            assert self.ledger is not None
            noise = float(self.ledger.central(self.n_sites, self.n_train)["noise_multiplier"])
        return build_strategy(self.run, noise, self.n_train)

    def hold_secure(self, stage: str, aggregate: Arrays | None, weights: list[int]) -> None:
        """The round's secure aggregate and the weights of the sites in it, until `aggregate` is called."""
        if aggregate is not None and weights:
            self._secure[stage] = (aggregate, weights)
        else:
            self._secure.pop(stage, None)

    def aggregate(self, stage: str, server_round: int, replies: list[SiteUpdate], current: Arrays) -> Arrays:
        """The new global weights of `stage` from the round's accepted updates."""
        if server_round == 1:
            # A new stage (or a new candidate backbone): FedAdam's moments must not carry over.
            self.strategies[stage] = self._new()
        strategy = self.strategies[stage]
        raws = self._secure_replies(stage, server_round, current) if self.run.secagg else [r.raw for r in replies]
        if self.run.client_dp:
            assert self.ledger is not None
            self.ledger.check_central(stage, server_round)
            strategy.num_sampled_clients = len(raws)  # the sites in this mean: the noise is sized for them
            if hasattr(strategy, "current_arrays"):  # server-side clipping needs the global weights, in the replies' order
                names = list(raws[0].content.array_records[ARRAYS].keys())
                strategy.current_arrays = array_record({k: current[k] for k in names})
        elif hasattr(strategy, "current_arrays"):
            # FedOpt strategies keep the global weights they set in configure_train; our server sends its own
            # messages (only to training sites), so hand them the weights directly.
            strategy.current_arrays = {k: np.asarray(v) for k, v in current.items()}
        aggregated, _ = strategy.aggregate_train(server_round, raws)
        if aggregated is None:
            raise TaceError(f"aggregation of stage {stage} failed in round {server_round}", "see run.log")
        if self.run.client_dp:
            assert self.ledger is not None
            self.ledger.record_central(stage, server_round, len(raws), float(getattr(strategy, "round_norm", strategy.clipping_norm)))
        out = {k: v.numpy().astype(current[k].dtype) for k, v in aggregated.items()}
        if stage == "head":  # the linear head's frozen copies and scale: no site trains them
            out.update({k: np.array(current[k]) for k in FROZEN_HEAD_KEYS if k in current})
        return out

    def _secure_replies(self, stage: str, server_round: int, current: Arrays) -> list[Message]:
        """The round's secure aggregate as replies a strategy can average (see `synthetic_replies`)."""
        if stage not in self._secure:
            raise TaceError(f"round {server_round} of stage {stage}: secure aggregation gave no aggregate", "see run.log")
        aggregate, weights = self._secure.pop(stage)
        bad = [k for k, v in aggregate.items() if k not in current or v.shape != current[k].shape or not np.isfinite(v).all()]
        if bad or set(aggregate) != set(current):
            raise TaceError(
                f"round {server_round} of stage {stage}: the securely aggregated weights are not finite or not of the model's shapes "
                f"({(bad or ['names'])[0]}); secure aggregation hides which site sent the bad update",
                "a site's training diverged: lower the learning rate (run-config lr), then `tace-server start --resume`",
            )
        aggregate = {k: aggregate[k].astype(current[k].dtype) for k in current}
        key = "site-weight" if self.run.client_dp else "num-examples"
        # Client-level DP: one stand-in per site (weight 1) so the wrapper sizes its noise for them; else one.
        return synthetic_replies(aggregate, weights if self.run.client_dp else [sum(weights)], key)

    def state(self, stage: str) -> Arrays:
        """The strategy's own state (FedAdam's moments, an adaptive clipping norm), saved with every round."""
        strategy = self.strategies[stage]
        out: Arrays = {}
        for name in ("m_t", "v_t"):
            for k, v in (getattr(strategy, name, None) or {}).items():
                out[f"{name}/{k}"] = np.asarray(v)
        if self.run.dp_mode == "client-adaptive" and self.run.client_dp:
            out["dp/clipping_norm"] = np.asarray(float(strategy.clipping_norm))  # adapted every round
        return out

    def restore(self, stage: str, state: Arrays) -> None:
        strategy = self.strategies[stage] = self._new()
        for name in ("m_t", "v_t"):
            values = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{name}/")}
            if values:
                setattr(strategy, name, values)
        if "dp/clipping_norm" in state:
            strategy.clipping_norm = float(state["dp/clipping_norm"])
