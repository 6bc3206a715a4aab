"""The Flower ClientApp a site runs: each handler receives a Flower message, calls `tace.client.service`, replies.

Flower recreates the ClientApp for every message, so nothing here keeps state between rounds. Errors raised at
the site are logged there in full and reach the coordinator as a reason code and a message without file names
(`tace.common.protocol.Failure`). With secure aggregation (`secagg_mod`) the weights leave only masked.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE

from tace.client.policy import SitePolicy
from tace.client.service import SiteService, failure_of
from tace.common.config import RunConfig, SiteConfig
from tace.common.errors import TaceError
from tace.common.protocol import QUERIES, EvaluateRequest, Records, TrainReply, TrainRequest, unpack

_RECORDS: dict[str, Callable[[Any], Any]] = {
    "arrays": lambda arrays: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
    "config": ConfigRecord,
    "metrics": MetricRecord,
}


def received(msg: Message) -> Records:
    """A Flower message's content as `Records` (weights as numpy arrays)."""
    return Records.from_parts(
        {name: {k: a.numpy() for k, a in r.items()} if isinstance(r, ArrayRecord) else dict(r) for name, r in msg.content.items()}
    )


def reply(msg: Message, records: Records) -> Message:
    """The reply to `msg` holding `records` (a train reply: exactly one ArrayRecord and one MetricRecord, as Flower's
    strategies expect; the site's own record is a ConfigRecord)."""
    return Message(RecordDict({name: _RECORDS[kind](content) for name, (kind, content) in records.parts().items()}), reply_to=msg)


def site_errors(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """An error at the site reaches the coordinator as its reason code and a message without file names."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            raise RuntimeError(failure_of(exc).encode()) from None

    return wrapped


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Secure aggregation (run-config secagg) for the train messages that carry a SecAgg+ protocol stage: Flower's
    `secaggplus_mod` masks the weights our train handler returns; every other message passes unchanged."""
    if msg.metadata.message_type != "train":
        return call_next(msg, context)
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        try:
            run = RunConfig.from_run_config(context.run_config)
            SitePolicy(SiteConfig.from_node_config(context.node_config, run), run).allow_weights_in_clear()
        except TaceError as exc:
            raise RuntimeError(failure_of(exc).encode()) from None
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(msg, context, functools.partial(_masked_reply, call_next))


def _masked_reply(call_next: ClientAppCallable, msg: Message, context: Context) -> Message:
    """Our train reply in the form `secaggplus_mod` masks (Flower's legacy FitRes records), without our own weight
    record, so the weights leave only masked. The metrics and site records travel as usual."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    answer = call_next(msg, context)
    if answer.has_error():
        raise RuntimeError(answer.error.reason)  # the site's own failure, for the coordinator's log
    records = received(answer)
    train = TrainReply.from_records(records)
    if train.declined is None and train.arrays is not None:
        arrays, weight = train.arrays, 1 if RunConfig.from_run_config(context.run_config).client_dp else train.num_examples
    else:
        # The site declined to train (its privacy budget): it takes part with weight 0, so its validation and privacy
        # figures still reach the coordinator and the protocol keeps its neighbours' masks balanced.
        request = received(msg)
        sent = unpack(request.arrays or {}).get(TrainRequest.from_config(request.config).stage, {})
        arrays, weight = {k: np.zeros_like(v) for k, v in sent.items()}, 0
    state = context.state.config_records[RECORD_KEY_STATE]
    largest = max((float(np.abs(v).max()) for v in arrays.values() if v.size), default=0.0) * weight / float(state["max_weight"])  # type: ignore[arg-type]
    bound = float(state["clipping_range"])  # type: ignore[arg-type]
    if largest > bound:
        raise RuntimeError(failure_of(TaceError(f"a weight of this site's update ({largest:.3g} after weighting) is beyond the "
                                                f"secure-aggregation range (±{bound:g})",
                                                "training diverged at this site: lower the learning rate (run-config lr)")).encode())  # fmt: skip
    records.arrays = None
    out = reply(msg, records)
    # The order of the arrays is the order of the names the coordinator unmasks into: sorted.
    legacy = FitRes(Status(Code.OK, "Success"), ndarrays_to_parameters([arrays[k] for k in sorted(arrays)]), weight, {})
    for name, record in fitres_to_recorddict(legacy, keep_input=True).items():
        out.content[name] = record
    return out


app = ClientApp(mods=[secagg_mod])


@app.query()
@site_errors
def query(msg: Message, context: Context) -> Message:
    """`info`: who this site is, its counts, and whether its data pass validation; `stats`: clinical statistics;
    `finetune`: local fine-tuning of the final models."""
    records = received(msg)
    kind = QUERIES.get(str(records.config.get("query", "")))
    if kind is None:
        raise TaceError(f"unknown query {records.config.get('query')!r}", "the coordinator and the site must run the same version")
    answer = SiteService(context.node_config, context.run_config).answer(kind.from_config(records.config), records.arrays)  # type: ignore[arg-type]
    return reply(msg, answer.records())


@app.train()
@site_errors
def train(msg: Message, context: Context) -> Message:
    """One local training call of the stage named in the request; replies with that stage's weights."""
    records = received(msg)
    answer = SiteService(context.node_config, context.run_config).train(TrainRequest.from_config(records.config), records.arrays)
    return reply(msg, answer.records())


@app.evaluate()
@site_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Aggregates (AUC, class-conditional score histograms) of the requested models on the site's evaluation set."""
    records = received(msg)
    answer = SiteService(context.node_config, context.run_config).evaluate(EvaluateRequest.from_config(records.config), records.arrays)
    return reply(msg, answer.records())
