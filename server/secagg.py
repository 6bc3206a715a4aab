"""Secure aggregation of one training round with Flower's SecAgg+ protocol (run-config ``secagg``).

Flower's `SecAggPlusWorkflow` runs the protocol (setup, key sharing, masked vectors, unmasking) but drives a legacy
strategy through a `LegacyContext`. `secure_round` gives it a stand-in for one round that hands out our own train
messages in the masked-vectors stage and keeps the unmasked aggregate: the sample-weighted mean of the sites'
weights, computed without the coordinator ever seeing one site's weights. The sites' side is
`tace.client.app.secagg_mod` around Flower's `secaggplus_mod`.

Only the aggregate is visible: the per-site screening of updates (`tace.server.workflow.screen_updates`) cannot
look inside it, so a site whose training diverged shows as a non-finite aggregate, without its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.client_proxy import ClientProxy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

#: Parameters (already multiplied by the site's weight, at most 1) are clipped to this range before quantisation.
CLIPPING_RANGE = 8.0
#: 2^24 quantisation levels (a step of 1e-6 over the clipping range); the mask modulus 2^32 leaves room for 256 sites.
QUANTIZATION_RANGE = 2**24
MODULUS_RANGE = 2**32


@dataclass
class SecureRound:
    """What one secure round returned: the aggregate (None when the protocol halted), the train replies of the sites
    whose masked weights are in it (their metrics; their weights were cleared), and why the others are missing."""

    aggregate: dict[str, np.ndarray] | None
    replies: dict[int, Message] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)


class _Proxy(ClientProxy):
    """The legacy client handle the workflow keeps per node; only its node id is used."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - never called by the workflow
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


class _Round:
    """The LegacyContext the workflow's stages read, for one round: its number, the nodes, and a strategy that
    returns the unmasked aggregate instead of averaging again."""

    def __init__(self, server_round: int, nodes: list[int]) -> None:
        self.state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                                 MAIN_PARAMS_RECORD: ArrayRecord()})  # fmt: skip
        self.strategy = self.client_manager = self.history = self
        self.nodes = nodes
        self.aggregate: list[np.ndarray] | None = None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[tuple[ClientProxy, FitIns]]:
        return [(_Proxy(n), FitIns(parameters, {})) for n in self.nodes]

    def num_available(self) -> int:
        return len(self.nodes)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, Any]], failures: list[Any]) -> tuple[Any, dict[str, Any]]:
        # Every result carries the same unmasked aggregate (the workflow sets it on each one).
        if not results:
            return None, {}
        self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return results[0][1].parameters, {}

    def add_metrics_distributed_fit(self, server_round: int, metrics: Any) -> None:
        pass


class _Workflow(SecAggPlusWorkflow):
    """SecAgg+ whose masked-vectors stage sends each node our own train message (weights, stage, seed, ...)."""

    def __init__(self, contents: dict[int, RecordDict], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.contents = contents

    def setup_stage(self, grid: Grid, context: Any, state: Any) -> bool:
        ok = bool(super().setup_stage(grid, context, state))
        state.nid_to_fitins = {n: RecordDict(dict(self.contents[n].items())) for n in state.nid_to_fitins}
        return ok


class _RecordingGrid:
    """The Grid as the workflow sees it: keeps the masked-vectors stage's replies (metrics and site records) and
    the reason of every node that failed at any stage."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.collected: dict[int, Message] = {}
        self.errors: dict[int, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Any, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, "")) if messages else ""
        # A reply belongs to the node its request went to: errors the SuperLink raises itself carry its own node id.
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        answered = set()
        for reply in replies:
            node = sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node)
            if reply.has_error():
                self.errors.setdefault(node, reply.error.reason or "error")
            elif stage == Stage.COLLECT_MASKED_VECTORS:
                self.collected[node] = reply
        for msg in messages:
            if msg.metadata.dst_node_id not in answered:
                self.errors.setdefault(msg.metadata.dst_node_id, f"no reply in the secure-aggregation stage '{stage}'")
        return replies


def secure_round(
    grid: Grid, server_round: int, contents: dict[int, RecordDict], names: list[str], max_weight: float, timeout: float | None
) -> SecureRound:
    """Run one round of local training under SecAgg+: each node `n` trains on `contents[n]` and only the weighted
    mean of the weights (named `names`, in this order) is revealed.

    `max_weight` is the largest weight a site gives its update (its training samples, or 1 for unweighted means).
    At least two sites are needed; a site that drops out before the masked vectors are collected is left out of
    the aggregate, later drop-outs are recovered from the others' key shares (up to the reconstruction threshold).
    """
    nodes = sorted(contents)
    recording = _RecordingGrid(grid)
    round_ = _Round(server_round, nodes)
    workflow = _Workflow(
        contents, num_shares=1.0, reconstruction_threshold=0.67, max_weight=float(max_weight), clipping_range=CLIPPING_RANGE,
        quantization_range=QUANTIZATION_RANGE, modulus_range=MODULUS_RANGE, timeout=timeout,
    )  # fmt: skip
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

    state = WorkflowState()
    for stage in (workflow.setup_stage, workflow.share_keys_stage, workflow.collect_masked_vectors_stage, workflow.unmask_stage):
        try:
            ok = stage(recording, round_, state)  # type: ignore[arg-type]
        except ZeroDivisionError:  # every site that sent masked weights declined (weight 0): nothing to average
            return SecureRound(
                None, dict(recording.collected), {n: why for n, why in recording.errors.items() if n not in recording.collected}
            )
        if not ok:
            reason = "secure aggregation halted: too few sites took part in every step of the protocol"
            errors = {n: recording.errors.get(n, reason) for n in nodes}
            return SecureRound(None, {}, errors)
    if round_.aggregate is None or len(round_.aggregate) != len(names):
        return SecureRound(None, {}, {n: "secure aggregation returned no aggregate" for n in nodes})
    aggregate = {k: np.asarray(v) for k, v in zip(names, round_.aggregate, strict=True)}
    # The masked vectors collected are in the aggregate (a site failing afterwards is unmasked from key shares).
    errors = {n: why for n, why in recording.errors.items() if n not in recording.collected}
    return SecureRound(aggregate, dict(recording.collected), errors)
