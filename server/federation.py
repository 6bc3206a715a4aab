"""The sites reached through a Flower Grid: `FlowerFederation` implements the workflow's `Federation` with Flower
messages built from `tace.common.protocol` requests, and decodes (checks) every reply on the way in.

Training sites get train messages, every site gets evaluate messages at the end, and the round's updates are
combined by `tace.server.aggregation`. A site that fails, vanishes or exceeds ``round-timeout`` is left out of that
round with its reason code (the workflow decides whether enough updates remain); it takes part again as soon as it
answers, also after a restart under a new node id.

Every reply is matched to the request it answers (its ``reply_to_message_id``), never to its sender field: errors the
SuperLink raises itself (a site that missed its heartbeats, an expired message) come from the SuperLink's own node
id and would otherwise be credited to a site that does not exist. A node counts as a joined site only once it
answered who it is: the SuperLink's stored state can list nodes of an earlier start as online for a minute.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from tace.common.cli import version_string
from tace.common.clinical import FEATURES
from tace.common.config import RunConfig
from tace.common.encoders import Encoders, SiteStatistics
from tace.common.errors import TaceError
from tace.common.models import model_signature
from tace.common.protocol import (
    STAGES,
    Arrays,
    EvaluateReply,
    EvaluateRequest,
    Failure,
    FinetuneReply,
    FinetuneRequest,
    InfoReply,
    InfoRequest,
    Reason,
    Records,
    Request,
    StatsReply,
    StatsRequest,
    TrainReply,
    TrainRequest,
    model_arrays,
    pack,
    unflatten_evaluation,
)
from tace.server.aggregation import Aggregator, array_record
from tace.server.messages import Evaluation, Finetune, SiteInfo, SiteUpdate, TrainRound
from tace.server.privacy import PrivacyLedger, planned_rounds

log = logging.getLogger("tace.server")

_RECORDS: dict[str, Callable[[Any], Any]] = {"arrays": array_record, "config": ConfigRecord, "metrics": MetricRecord}


def content(records: Records) -> RecordDict:
    """`records` as a Flower message's content."""
    return RecordDict({name: _RECORDS[kind](part) for name, (kind, part) in records.parts().items()})


def received(reply: Message) -> Records:
    """A Flower reply's content as `Records` (weights as numpy arrays)."""
    return Records.from_parts(
        {name: {k: a.numpy() for k, a in r.items()} if isinstance(r, ArrayRecord) else dict(r) for name, r in reply.content.items()}
    )


def clean_reason(reason: str | None) -> str:
    """The site's own message from a Flower error reason, without the traceback text Ray wraps around it."""
    text = (reason or "no reason given").strip()
    wrapped = re.fullmatch(r"<class '[^']*'>:<'(.*)'>", text, flags=re.DOTALL)  # Flower's format for a ClientApp exception
    if wrapped:
        text = wrapped.group(1)
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1]
    elif "Traceback" in text or 'File "' in text:
        text = [line for line in text.splitlines() if line.strip()][-1]
    return text.rstrip("'>\n ").strip()


#: Errors the SuperLink raises itself, for a site that did not answer: what happened, in words.
_UNAVAILABLE = {
    int(ErrorCode.NODE_UNAVAILABLE): "the site went offline (it missed its heartbeats to the SuperLink)",
    int(ErrorCode.REPLY_MESSAGE_UNAVAILABLE): "the site's reply expired before it was collected",
    int(ErrorCode.MESSAGE_UNAVAILABLE): "the message to the site expired before the site collected it",
}

#: Seconds between two polls of the SuperLink for replies (Flower's own `send_and_receive` waits 3 s). Each wait is
#: POLL_FRACTION of the time waited so far, at least POLL_MIN_S and at most POLL_S: a reply is seen at most about
#: an eighth later than it came (a round of a small model, a few hundred ms of work, is not held for a poll
#: interval), while a long round costs the SuperLink one poll a second.
POLL_S = 1.0
POLL_MIN_S = 0.02
POLL_FRACTION = 0.125


def _polls(deadline: float) -> Iterator[None]:
    """Sleeps between polls until `deadline` (monotonic): POLL_FRACTION of the time since the first poll, clamped to
    [POLL_MIN_S, POLL_S]."""
    start = time.monotonic()
    while (now := time.monotonic()) < deadline:
        wait = min(POLL_S, max(POLL_MIN_S, (now - start) * POLL_FRACTION))
        time.sleep(min(wait, max(0.0, deadline - now)))
        yield


#: Seconds a round waits for sites that connected since the last round to say who they are; a site that takes longer
#: is admitted at a later round (its answer is collected then).
ADMIT_WAIT_S = 15.0


def failure_of(reason: str | None, code: int | None = None) -> Failure:
    """A Flower error as the site's failure: its reason code and message (`TRANSPORT` when Flower's own, `NO_REPLY`
    when the SuperLink reports the site or its reply unavailable)."""
    if code is not None and int(code) in _UNAVAILABLE:
        return Failure(Reason.NO_REPLY, _UNAVAILABLE[int(code)])
    return Failure.decode(clean_reason(reason))


class FlowerFederation:
    """Reaches the sites through a Flower Grid.

    Sites are found at the start (``expected_sites`` must connect within ``join-timeout``) and asked who they are;
    a site whose TACE-FL version or model definition differs from the coordinator's stops the run before any
    training.
    """

    def __init__(
        self, grid: Grid, run: RunConfig, expected_sites: int, wait_s: float | None = None, timeout_s: float | None = None,
        ledger: PrivacyLedger | None = None, on_refused: Callable[[str, Failure], None] | None = None,
    ) -> None:  # fmt: skip
        self.grid = grid
        self.run = run
        self.timeout_s = float(run.round_timeout if timeout_s is None else timeout_s)
        self.on_event: Callable[[str, str, int, str, str], None] | None = None
        self.on_refused = on_refused
        self.ledger = ledger
        self.aggregator = Aggregator(run, ledger)
        self.signature = model_signature(
            run.backbone_candidates or (run.backbone,), len(run.preprocess.sequences), len(FEATURES), run.head_form
        )
        self.nodes: dict[int, str] = {}
        self.info: dict[str, InfoReply] = {}
        self.roles: dict[str, str] = {}
        self.refused: dict[str, Failure] = {}  # sites that answered but were not admitted, and why
        self._asking: dict[str, int] = {}  # info requests awaiting an answer: message id -> node
        self._join(expected_sites, float(run.join_timeout if wait_s is None else wait_s))
        self.set_roles(() if run.layout == "loco" else run.holdout)

    def _info_request(self) -> Records:
        return InfoRequest(coordinator_version=version_string(), model_signature=self.signature,
                           backbones=self.run.backbone_candidates or (self.run.backbone,)).records()  # fmt: skip

    def _join(self, expected: int, wait_s: float) -> None:
        """Wait until `expected` sites said who they are, asking every node that connects. A node that never answers
        (a stale entry of the SuperLink's state from an earlier start, or a site still validating its data when
        join-timeout ends) does not count. Any site refused at the start stops the run before training, once every
        expected site answered (so that every site's problems are listed at once)."""
        deadline = time.monotonic() + wait_s
        while True:
            self._admit(strict=True)
            if len(self.info) + len(self.refused) >= expected or time.monotonic() >= deadline:
                break
            time.sleep(POLL_S / 2)
        if self.refused:
            lines = [f"site {site}: {why.message}" for site, why in sorted(self.refused.items())]
            raise TaceError("sites not ready; no training was started\n" + "\n".join(lines), _refusal_hint(self.refused.values()))
        if len(self.info) < expected:
            joined = ", ".join(sorted(self.info)) or "none"
            silent = len(self._asking)
            also = (f"; {silent} other connection(s) did not say who they are (stale entries from an earlier start, or sites still "
                    "starting or validating their data)") if silent else ""  # fmt: skip
            raise TaceError(f"only {len(self.info)} of {expected} sites joined within {wait_s:.0f} s (joined: {joined}){also}",
                            "start the missing sites' clients (`tace-client start`) and check their logs; then start the coordinator "
                            "again")  # fmt: skip

    def _admit(self, strict: bool, wait_s: float = 0.0) -> None:
        """Ask nodes that connected since the last call who they are, and admit those that answered (waiting up to
        `wait_s` for their answers; later answers are collected at the next call). At the start (`strict`) a site
        that is not ready is kept in `refused` and stops the run; later (a site rejoining) it is only left out."""
        asked = set(self._asking.values())
        new = [n for n in self.grid.get_node_ids() if n not in self.nodes and n not in asked]
        if new:
            messages = [Message(content=content(self._info_request()), message_type="query", dst_node_id=n) for n in new]
            self._asking.update(_pushed(self.grid, messages, new))
        polls = _polls(time.monotonic() + wait_s)
        while self._asking:
            for reply in self.grid.pull_messages(list(self._asking)):
                node = self._asking.pop(reply.metadata.reply_to_message_id, None)
                if node is not None and not reply.has_error():
                    self._admit_reply(node, InfoReply.from_records(received(reply)), strict)
                elif node is not None and int(reply.error.code) not in _UNAVAILABLE:
                    log.warning("a connecting node failed to say who it is: %s", failure_of(reply.error.reason))
            if not self._asking or next(polls, True):
                break

    def _admit_reply(self, node_id: int, info: InfoReply, strict: bool) -> None:
        failure = info.failure
        if failure is None and (info.version != version_string() or (info.model_signature or self.signature) != self.signature):
            failure = Failure(Reason.VERSION_MISMATCH,
                              f"runs TACE-FL {info.version} with model signature {info.model_signature}, the coordinator "
                              f"{version_string()} with {self.signature}: install the coordinator's version at the site")  # fmt: skip
        if failure is None and info.site_id in self.info and strict:
            raise TaceError(f"two connected sites both call themselves {info.site_id!r}",
                            "give every site its own site-id in its node configuration")  # fmt: skip
        if failure is not None:
            self.refused[info.site_id] = failure
            log.warning("site %s was not admitted: [%s] %s", info.site_id, failure.reason.value, failure.message)
            if self.on_refused:
                self.on_refused(info.site_id, failure)
            return
        for old in [n for n, s in self.nodes.items() if s == info.site_id and n != node_id]:
            del self.nodes[old]  # the site restarted under a new node id
        self.nodes[node_id] = info.site_id
        self.info[info.site_id] = info
        self.refused.pop(info.site_id, None)

    def _refresh(self) -> None:
        """Admit nodes that connected since the last round (a site restarted without registered keys)."""
        self._admit(strict=False, wait_s=min(ADMIT_WAIT_S, self.timeout_s))

    def online(self) -> list[str]:
        """The sites whose nodes the SuperLink currently counts as connected."""
        ids = set(self.grid.get_node_ids())
        return sorted(s for n, s in self.nodes.items() if n in ids)

    def _nodes(self, role: str | None = None) -> list[int]:
        return [n for n, s in sorted(self.nodes.items(), key=lambda kv: kv[1]) if role is None or self.roles.get(s) == role]

    def _send(self, node_ids: list[int], kind: str, requests: Mapping[int, Records]) -> tuple[dict[int, Message], dict[int, Failure]]:
        """Send each node its request and wait up to `timeout_s`; returns the replies and, per node that failed or
        did not answer in time, why. A reply belongs to the node its request went to (see the module docstring)."""
        messages = [Message(content=content(requests[n]), message_type=kind, dst_node_id=n) for n in node_ids]
        pending = _pushed(self.grid, messages, node_ids)
        out: dict[int, Message] = {}
        errors: dict[int, Failure] = {n: Failure(Reason.TRANSPORT, "the SuperLink did not accept the message")
                                      for n in node_ids if n not in pending.values()}  # fmt: skip
        polls = _polls(time.monotonic() + self.timeout_s)
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                if reply.has_error():
                    errors[node] = failure_of(reply.error.reason, reply.error.code)
                else:
                    out[node] = reply
            if not pending or next(polls, True):
                break
        for n in pending.values():
            errors[n] = Failure(Reason.NO_REPLY, f"no reply (the site went offline, or did not answer within round-timeout, "
                                                 f"{self.timeout_s:.0f} s)")  # fmt: skip
        return out, errors

    def _site(self, node: int) -> str:
        return self.nodes.get(node, "(a connection that never said which site it is)")

    def _event(self, kind: str, stage: str, server_round: int, node: int, detail: str) -> None:
        if self.on_event:
            self.on_event(kind, stage, server_round, self._site(node), detail)
        else:
            log.warning("%s round %d: site %s %s: %s", stage, server_round, self._site(node), kind, detail)

    def _request(self, node: int, request: Request, arrays: Arrays | None = None) -> Records:
        """`request` (with the node's role) as a message's records."""
        return dataclasses.replace(request, role=self.roles[self.nodes[node]]).records(arrays)

    # -- the Federation interface ----------------------------------------------------------------------------
    def set_roles(self, holdout: tuple[str, ...]) -> None:
        unknown = [s for s in holdout if s not in self.info]
        if unknown:
            raise TaceError(f"holdout-sites names unknown site(s) {', '.join(unknown)}", f"connected sites: {', '.join(sorted(self.info))}")
        self.roles = {s: ("holdout" if s in holdout else "train") for s in self.info}
        self.aggregator.reset(len(self.info), sum(r == "train" for r in self.roles.values()))

    def sites(self) -> list[SiteInfo]:
        out = []
        for site, info in sorted(self.info.items()):
            c, train = info.counts, self.roles[site] == "train"
            out.append(SiteInfo(site, self.roles[site], c.labelled_train if train else 0, c.labelled_val if train else c.labelled_all,
                                c.val_responders if train else 0))  # fmt: skip
        return out

    def statistics(self) -> list[SiteStatistics]:
        nodes = self._nodes("train")
        replies, errors = self._send(nodes, "query", {n: StatsRequest().records() for n in nodes})
        if errors:
            lines = "\n".join(f"site {self._site(n)}: {why}" for n, why in errors.items())
            raise TaceError(f"{len(errors)} site(s) failed during 'query':\n{lines}", "see the site's client log for details")
        # Merge in site order: float sums depend on the order, and the encoder feeds training.
        ordered = sorted(replies.items(), key=lambda kv: self.nodes[kv[0]])
        return [SiteStatistics.from_flat(StatsReply.from_records(received(r)).stats) for _, r in ordered]

    def train(self, arrays: dict[str, Arrays], encoder: Encoders | None, request: TrainRound) -> list[SiteUpdate]:
        self._refresh()
        nodes, q = self._nodes("train"), request
        weights = pack({k: arrays[k] for k in STAGES[q.stage].arrays})
        base = TrainRequest(stage=q.stage, lr=q.lr, seed=q.seed, server_round=q.server_round, backbone=q.backbone, validate=q.validate,
                            encoder=encoder.to_dict() if encoder else {})  # fmt: skip
        if self.run.sample_dp:
            assert self.ledger is not None
            base = dataclasses.replace(base, study_id=self.ledger.study_id, dp_plan=planned_rounds(self.run, len(self.info)))
        if self.run.client_dp and self.run.secagg:
            base = dataclasses.replace(base, clipping_norm=self.run.dp_clipping_norm)
        # Seeds follow the site's place in the (sorted) list of training sites, not its node id.
        per = {n: self._request(n, dataclasses.replace(base, seed=q.seed + i), weights) for i, n in enumerate(nodes)}
        if self.run.secagg:
            replies, errors = self._train_secure(q, nodes, per, arrays[q.stage])
        else:
            replies, errors = self._send(nodes, "train", per)
        # Aggregate in a fixed (site) order: replies arrive in any order and float sums depend on it.
        return [self._update(node, q, replies.get(node), errors.get(node)) for node in sorted(nodes, key=lambda n: self.nodes[n])]

    def _update(self, node: int, q: TrainRound, reply: Message | None, error: Failure | None) -> SiteUpdate:
        """One site's part of the round from its reply (or its failure); its privacy report goes to the ledger."""
        site = self.nodes[node]
        if reply is None:
            return SiteUpdate(site, {}, 0, {}, failure=error or Failure(Reason.NO_REPLY, "no reply"))
        try:
            answer = TrainReply.from_records(received(reply))
        except (TaceError, KeyError, TypeError, ValueError) as exc:
            return SiteUpdate(site, {}, 0, {}, failure=Failure(Reason.MALFORMED, f"malformed reply ({type(exc).__name__})"))
        metrics = {k: float(v) for k, v in answer.metrics.items()}  # type: ignore[arg-type]
        if self.ledger is not None:
            self.ledger.record_site(site, q.stage, q.server_round, metrics, answer.declined.message if answer.declined else "")
        validation = self._validation(node, answer)
        if answer.declined is not None:
            return SiteUpdate(site, {}, 0, metrics, failure=answer.declined, evaluation=validation)
        if not self.run.secagg and answer.arrays is None:
            return SiteUpdate(site, {}, 0, {}, failure=Failure(Reason.MALFORMED, "malformed reply (no weights)"))
        return SiteUpdate(site, answer.arrays or {}, answer.num_examples, metrics, raw=reply, evaluation=validation, masked=self.run.secagg)

    def _validation(self, node: int, answer: TrainReply) -> dict[str, dict[str, Any]] | None:
        """The site's validation of the weights it received, carried by its train reply."""
        if answer.validation is None:
            return None
        site = self.nodes[node]
        return {site: {**unflatten_evaluation(answer.validation), "role": self.roles[site]}}

    def _train_secure(
        self, q: TrainRound, nodes: list[int], per: dict[int, Records], current: Arrays
    ) -> tuple[dict[int, Message], dict[int, Failure]]:
        """A training round under SecAgg+ (`tace.server.secagg`): the replies carry the sites' metrics, and the
        aggregate waits in the aggregator."""
        from tace.server.secagg import secure_round

        weights = {n: 1 if self.run.client_dp else self.info[self.nodes[n]].counts.labelled_train for n in nodes}
        contents = {n: content(per[n]) for n in nodes}
        result = secure_round(self.grid, q.server_round, contents, sorted(current), max(weights.values(), default=1), self.timeout_s)
        errors = {n: failure_of(why) for n, why in result.errors.items()}
        # A site that declined (privacy budget) took part with weight 0: its reply carries its validation and privacy.
        trained = [n for n, m in sorted(result.replies.items()) if TrainReply.from_records(received(m)).declined is None]
        self.aggregator.hold_secure(q.stage, result.aggregate, [weights[n] for n in trained])
        return {n: m for n, m in result.replies.items() if n not in errors}, errors

    def aggregate(self, stage: str, server_round: int, replies: list[SiteUpdate], current: Arrays) -> Arrays:
        return self.aggregator.aggregate(stage, server_round, replies, current)

    def strategy_state(self, stage: str) -> Arrays:
        return self.aggregator.state(stage)

    def restore_strategy(self, stage: str, state: Arrays) -> None:
        self.aggregator.restore(stage, state)

    def evaluate(self, arrays: dict[str, Arrays], encoder: Encoders | None, request: Evaluation) -> dict[str, dict[str, Any]]:
        # During rounds only the training sites' internal validation is needed: holdout sites are touched once, at
        # the end, so they can never influence model selection.
        q = request
        nodes = self._nodes(q.role) if q.final else self._nodes("train")
        weights = pack({k: arrays[k] for k in model_arrays(q.models)})
        base = EvaluateRequest(models=q.models, backbone=q.backbone, final=q.final, tag=q.tag, cutoffs=q.cutoffs or {},
                               encoder=encoder.to_dict() if encoder else {})  # fmt: skip
        per = {n: self._request(n, base, weights) for n in nodes}
        replies, errors = self._send(nodes, "evaluate", per)
        if q.final and errors:
            # A site restarting at the very end: one more try before its results are missing from the study.
            retried, errors = self._send(list(errors), "evaluate", per)
            replies.update(retried)
        for node, why in errors.items():
            self._event("missing-evaluation" if q.final else "no-validation", "final" if q.final else ",".join(q.models), 0, node, str(why))
        out: dict[str, dict[str, Any]] = {}
        for node, reply in replies.items():
            answer = EvaluateReply.from_records(received(reply))
            res = {**unflatten_evaluation(answer.evaluation), "role": self.roles[self.nodes[node]]}
            if q.final:
                res["summary"] = answer.summary
            out[self.nodes[node]] = res
        return out

    def finetune(self, arrays: dict[str, Arrays], encoder: Encoders, request: Finetune) -> dict[str, dict[str, Any]]:
        nodes, q = self._nodes("train"), request
        weights = pack({k: arrays[k] for k in STAGES})
        base = FinetuneRequest(mode=q.mode, epochs=q.epochs, backbone=q.backbone, seed=q.seed, cutoffs=q.cutoffs, tag=q.tag,
                               bins=self.run.analysis_bins, encoder=encoder.to_dict())  # fmt: skip
        replies, errors = self._send(nodes, "query", {n: self._request(n, base, weights) for n in nodes})
        out: dict[str, dict[str, Any]] = {self.nodes[n]: {"error": str(why)} for n, why in errors.items()}
        for node, reply in replies.items():
            try:
                out[self.nodes[node]] = FinetuneReply.from_records(received(reply)).to_entry()
            except (TaceError, KeyError, TypeError, ValueError) as exc:
                out[self.nodes[node]] = {"error": f"malformed reply ({type(exc).__name__})"}
        return dict(sorted(out.items()))


def _pushed(grid: Grid, messages: list[Message], node_ids: list[int]) -> dict[str, int]:
    """Push `messages` (one per node of `node_ids`, in order); returns {message id: node} of those the SuperLink took."""
    ids = list(grid.push_messages(messages))
    return {mid: n for mid, n in zip(ids, node_ids, strict=False) if mid}


def _refusal_hint(failures: Any) -> str:
    """What the refused sites (and the coordinator) do, from the refusals' reason codes."""
    reasons = {f.reason for f in failures}
    hints = []
    if Reason.DATA_PROBLEMS in reasons:
        hints.append("a site with data problems runs `tace-client check --manifest ...`, fixes what it lists and restarts its client")
    if reasons & {Reason.VERSION_MISMATCH, Reason.SIGNATURE_MISMATCH}:
        hints.append("a site on another TACE-FL version installs the coordinator's (`tace-server --version`) and restarts its client")
    if reasons & {Reason.REQUIRES_DP, Reason.REQUIRES_SECAGG}:
        hints.append("a site whose own rules refuse this run's privacy settings needs run-config dp/secagg set as it says, or "
                     "leaves the study")  # fmt: skip
    if not hints:
        hints.append("see each site's client log")
    return "; ".join(hints) + "; then start the coordinator again"
