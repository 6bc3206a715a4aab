"""An in-process Flower Grid for coordinator tests: each message goes to the real ClientApp handlers with the
node's context, as Flower does, without Ray or network. `FaultyGrid` adds the faults of a real deployment."""

from __future__ import annotations

import copy
import random
import uuid

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.server.superlink.linkstate.utils import NODE_UNAVAILABLE_ERROR_REASON

from tace.client import app as client_app
from tace.common.config import RunConfig
from tace.common.protocol import ARRAYS, CONFIG


@pytest.fixture(autouse=True)
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class InProcessGrid:
    """A Flower Grid whose nodes are the ClientApp (with its mods) called in this process (node i = partition i).

    Each node keeps its Context across messages, as a SuperNode does within a run; `node_config` adds a site's own
    settings (by partition). `stale` nodes are listed as connected but never answer, like the entries an earlier
    start leaves in the SuperLink's state. Messages get ids when pushed and replies name the message they answer, as
    with Flower's SuperLink."""

    def __init__(self, run: RunConfig, partitions: list[int], node_config: dict[int, dict] | None = None, seed: int = 0,
                 stale: int = 0) -> None:  # fmt: skip
        self.run_config = run.to_run_config()
        self.order = random.Random(seed)  # replies arrive in any order: each batch is shuffled, reproducibly
        self.nodes = {100 + i: pid for i, pid in enumerate(partitions)}
        self.stale = [900 + i for i in range(stale)]
        self._waiting: dict[str, Message] = {}  # replies not yet pulled, by the id of the message they answer
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config={"partition-id": pid, **(node_config or {}).get(pid, {})},
                          state=RecordDict(), run_config=self.run_config)
            for node, pid in self.nodes.items()
        }  # fmt: skip
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.arrivals: list[list[int]] = []  # per send_and_receive, the nodes in the order their replies arrived

    def get_node_ids(self) -> list[int]:
        return list(self.nodes) + self.stale

    def handle(self, msg: Message) -> Message | None:
        try:
            # A copy, as the wire gives each node its own: Flower's mods modify what they receive.
            return client_app.app(copy.deepcopy(msg), self.contexts[msg.metadata.dst_node_id])
        except Exception as exc:  # what Flower does with an exception in a ClientApp (its reason format included)
            return Message(Error(code=1, reason=str(type(exc)) + ":<'" + str(exc) + "'>"), reply_to=msg)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's in-memory Grid does when it pushes
            ids.append(msg.metadata.message_id)
            self.sent.append(msg)
            if msg.metadata.dst_node_id in self.stale:
                continue
            reply = self.handle(msg)
            if reply is not None:
                self._waiting[msg.metadata.message_id] = reply
                self.replies.append(reply)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        replies = [self._waiting.pop(m) for m in message_ids if m in self._waiting]
        self.order.shuffle(replies)
        if replies:
            self.arrivals.append([r.metadata.src_node_id for r in replies])
        return replies

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


class Crash(BaseException):
    """The coordinator process dying (not an error the ServerApp could handle)."""


class FaultyGrid(InProcessGrid):
    """Faults keyed by (site letter, stage, round) for train messages: ``fail`` (the site errors or vanished),
    ``silent`` (no reply: a timeout), ``nan``, ``shape`` (a mis-shaped weight), ``scale`` (an update 1000x too
    far from the global weights). ``crash_after`` raises `Crash` when that many train messages were answered."""

    def __init__(self, run: RunConfig, partitions: list[int], faults: dict[tuple[str, str, int], str] | None = None,
                 crash_after: int | None = None) -> None:  # fmt: skip
        super().__init__(run, partitions)
        self.faults = faults or {}
        self.crash_after = crash_after
        self.trained = 0

    def handle(self, msg: Message) -> Message | None:
        if msg.metadata.message_type != "train":
            return super().handle(msg)
        if self.crash_after is not None and self.trained >= self.crash_after:
            raise Crash()
        config = msg.content.config_records[CONFIG]
        site = "abcde"[self.nodes[msg.metadata.dst_node_id]]
        fault = self.faults.get((site, str(config["stage"]), int(config["server-round"])))
        if fault == "silent":
            return None
        if fault == "fail":
            # What the SuperLink itself answers for a site that stopped sending heartbeats: an error from its own
            # node id (1), naming the message it answers.
            error = Message(Error(code=int(ErrorCode.NODE_UNAVAILABLE), reason=NODE_UNAVAILABLE_ERROR_REASON), reply_to=msg)
            error.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            return error
        reply = super().handle(msg)
        self.trained += 1
        if fault is None or reply is None or reply.has_error():
            return reply
        arrays = {k: v.numpy() for k, v in reply.content.array_records[ARRAYS].items()}
        sent = {k.split(".", 1)[1]: v.numpy() for k, v in msg.content.array_records[ARRAYS].items() if k.startswith(f"{config['stage']}.")}
        first = sorted(arrays)[0]
        if fault == "nan":
            arrays[first] = np.full_like(arrays[first], np.nan)
        elif fault == "shape":
            arrays[first] = arrays[first].reshape(-1)[:-1].copy()
        elif fault == "scale":
            arrays = {k: (sent[k] + 1000.0 * (v - sent[k])).astype(v.dtype) for k, v in arrays.items()}
        reply.content.array_records[ARRAYS] = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        return reply


def study(grid: InProcessGrid, run: RunConfig) -> dict:
    """The ServerApp's study (as `tace.server.app.main` runs it, privacy ledger included) on an in-process grid."""
    from functools import partial
    from pathlib import Path

    from tace.common.pretrained import initial_arrays
    from tace.server.federation import FlowerFederation
    from tace.server.privacy import PrivacyLedger
    from tace.server.rundir import RunDir
    from tace.server.workflow import run_layouts

    out = Path(run.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    ledger = PrivacyLedger(out / "privacy_ledger.json", run) if run.dp else None
    federation = FlowerFederation(grid, run, expected_sites=len(grid.nodes), wait_s=1, ledger=ledger)
    rundir = RunDir(out, run.to_run_config(), "federated")
    federation.on_event = rundir.record_event
    try:
        return run_layouts(federation, run, rundir, partial(initial_arrays, run),
                           "federated")  # fmt: skip
    finally:
        rundir.close()
