"""The Flower ServerApp: finds the sites, then runs the study workflow over Flower messages.

`FlowerFederation` implements the workflow's `Federation` with a Flower `Grid`: training sites get train
messages, every site gets evaluate messages, and replies are aggregated by a Flower strategy (FedAvg, FedProx or
FedAdam). Weights arriving from sites are checked (names, shapes, finite) before aggregation.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from tace.common.cli import version_string
from tace.common.clinical import FEATURES, ClinicalEncoder, ClinicalStats
from tace.common.config import RunConfig
from tace.common.errors import TaceError
from tace.common.models import StudyModels, model_signature
from tace.common.protocol import ARRAYS, CONFIG, METRICS, QUERY_FINETUNE, QUERY_INFO, QUERY_STATS, SITE, pack, unflatten_evaluation
from tace.server.privacy import PrivacyLedger, planned_rounds
from tace.server.rundir import RunDir
from tace.server.workflow import Arrays, Evaluation, Finetune, SiteInfo, TrainReply, TrainRound, run_layouts

log = logging.getLogger("tace.server")
app = ServerApp()

STAGE_ARRAYS = {"dltr": ("dltr",), "head": ("dltr", "head"), "clinical": ("clinical",)}


def _record(arrays: Arrays) -> ArrayRecord:
    import torch

    return ArrayRecord(torch_state_dict={k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _strategy(run: RunConfig, noise_multiplier: float = 0.0, n_sites: int = 1) -> Any:
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
    if run.secagg:  # the coordinator cannot see the updates: the sites clip them (tace.client.app)
        return DifferentialPrivacyClientSideFixedClipping(inner, noise_multiplier, run.dp_clipping_norm, n)
    return DifferentialPrivacyServerSideFixedClipping(inner, noise_multiplier, run.dp_clipping_norm, n)


def _synthetic_replies(aggregate: Arrays, weights: list[int], key: str) -> list[Message]:
    """Stand-in train replies holding an already aggregated mean (secure aggregation), one per weight: a strategy
    averaging them returns that mean (and a DP wrapper counts as many sites as contributed to it)."""
    record = _record(aggregate)
    return [
        Message(RecordDict({ARRAYS: record, METRICS: MetricRecord({"num-examples": w, key: w})}), dst_node_id=0, message_type="train")
        for w in weights
    ]


class FlowerFederation:
    """Reaches the sites through a Flower Grid.

    Sites are found at the start (``expected_sites`` must connect within ``join-timeout``) and asked who they are;
    a site whose TACE-FL version or model definition differs from the coordinator's stops the run before any
    training. During rounds a site that fails, vanishes or exceeds ``round-timeout`` is left out of that round
    (the workflow decides whether enough updates remain); it takes part again as soon as it answers, also after
    a restart under a new node id.
    """

    def __init__(
        self,
        grid: Grid,
        run: RunConfig,
        expected_sites: int,
        wait_s: float | None = None,
        timeout_s: float | None = None,
        ledger: PrivacyLedger | None = None,
    ) -> None:
        self.grid = grid
        self.run = run
        self.timeout_s = float(run.round_timeout if timeout_s is None else timeout_s)
        self.on_event: Callable[[str, str, int, str, str], None] | None = None
        if run.dp and ledger is None:
            raise TaceError("a run with differential privacy needs its privacy ledger", "report this as a bug")
        self.ledger = ledger
        self._secure: dict[str, tuple[Arrays, list[int]]] = {}  # stage -> (secure aggregate, its sites' weights)
        self.signature = model_signature(run.backbone_candidates or (run.backbone,), len(run.preprocess.sequences), len(FEATURES))
        wait_s = float(run.join_timeout if wait_s is None else wait_s)
        deadline = time.monotonic() + wait_s
        node_ids = list(grid.get_node_ids())
        while len(node_ids) < expected_sites and time.monotonic() < deadline:
            time.sleep(0.5)
            node_ids = list(grid.get_node_ids())
        if len(node_ids) < expected_sites:
            raise TaceError(
                f"only {len(node_ids)} of {expected_sites} sites connected within {wait_s:.0f} s", "start the missing sites' clients"
            )
        self.nodes: dict[int, str] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self._discover(node_ids, strict=True)
        self.set_roles(() if run.layout == "loco" else run.holdout)

    def _info_query(self) -> RecordDict:
        return RecordDict({CONFIG: ConfigRecord({"query": QUERY_INFO, "coordinator-version": version_string(),
                                                 "model-signature": self.signature,
                                                 "backbones": ",".join(self.run.backbone_candidates or (self.run.backbone,))})})  # fmt: skip

    def _discover(self, node_ids: list[int], strict: bool) -> None:
        """Ask `node_ids` who they are and whether their data and software are ready. At the start (`strict`)
        every problem stops the run; later (a site rejoining) the site is only left out and logged."""
        replies, errors = self._send(node_ids, "query", self._info_query())
        failed = [f"site {self.nodes.get(n, n)}: {why}" for n, why in errors.items()]
        found: dict[int, dict[str, Any]] = {}
        for node_id, reply in replies.items():
            site = dict(reply.content.config_records[SITE])
            site_id = str(site["site-id"])
            if not site.get("ok", False):
                failed.append(f"site {site_id}:\n{site.get('problems', '')!s}")
            elif site.get("version") != version_string() or site.get("model-signature", self.signature) != self.signature:
                failed.append(f"site {site_id} runs TACE-FL {site.get('version')!s} with model signature {site.get('model-signature')!s}, the "
                              f"coordinator {version_string()} with {self.signature}: install the coordinator's version at the site")  # fmt: skip
            elif any(str(s["site-id"]) == site_id for s in found.values()) or (strict and site_id in self.info):
                raise TaceError(
                    f"two connected sites both call themselves {site_id!r}", "give every site its own site-id in its node configuration"
                )
            else:
                found[node_id] = site
        if failed and strict:
            raise TaceError("sites not ready; no training was started\n" + "\n".join(failed),
                            "each site runs `tace-client check --manifest ...` and installs the coordinator's TACE-FL version, "
                            "fixes what is listed, and rejoins")  # fmt: skip
        for line in failed:
            log.warning("a connecting site was not admitted: %s", line)
        for node_id, site in found.items():
            site_id = str(site["site-id"])
            for old in [n for n, s in self.nodes.items() if s == site_id and n != node_id]:
                del self.nodes[old]  # the site restarted under a new node id
            self.nodes[node_id] = site_id
            self.info[site_id] = site

    def _refresh(self) -> None:
        """Admit nodes that connected since the last round (a site restarted without registered keys)."""
        new = [n for n in self.grid.get_node_ids() if n not in self.nodes]
        if new:
            self._discover(new, strict=False)

    def online(self) -> list[str]:
        """The sites whose nodes the SuperLink currently counts as connected."""
        ids = set(self.grid.get_node_ids())
        return sorted(s for n, s in self.nodes.items() if n in ids)

    def set_roles(self, holdout: tuple[str, ...]) -> None:
        unknown = [s for s in holdout if s not in self.info]
        if unknown:
            raise TaceError(f"holdout-sites names unknown site(s) {', '.join(unknown)}", f"connected sites: {', '.join(sorted(self.info))}")
        self.roles = {s: ("holdout" if s in holdout else "train") for s in self.info}
        self.strategies = {stage: self._strategy() for stage in STAGE_ARRAYS}

    def _strategy(self) -> Any:
        noise = 0.0
        if self.run.client_dp:
            assert self.ledger is not None
            n_train = sum(r == "train" for r in self.roles.values())
            noise = float(self.ledger.central(len(self.info), n_train)["noise_multiplier"])
        return _strategy(self.run, noise, sum(r == "train" for r in self.roles.values()))

    def _nodes(self, role: str | None = None) -> list[int]:
        return [n for n, s in sorted(self.nodes.items(), key=lambda kv: kv[1]) if role is None or self.roles.get(s) == role]

    def _send(
        self, node_ids: list[int], kind: str, content: RecordDict, per_node: dict[int, ConfigRecord] | None = None
    ) -> tuple[dict[int, Message], dict[int, str]]:
        """Send one message per node and wait up to `timeout_s`; returns the replies and, per node that failed or
        did not answer in time, the reason."""
        messages = []
        for n in node_ids:
            rd = RecordDict(dict(content.items()))
            if per_node:
                rd[CONFIG] = per_node[n]
            messages.append(Message(content=rd, message_type=kind, dst_node_id=n))
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout_s))
        out: dict[int, Message] = {}
        errors: dict[int, str] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                errors[node] = clean_reason(reply.error.reason)
            else:
                out[node] = reply
        for n in node_ids:
            if n not in out and n not in errors:
                errors[n] = f"no reply (the site went offline, or did not answer within round-timeout, {self.timeout_s:.0f} s)"
        return out, errors

    def _send_all(
        self, node_ids: list[int], kind: str, content: RecordDict, per_node: dict[int, ConfigRecord] | None = None
    ) -> dict[int, Message]:
        """`_send` where every site must answer (statistics at the start)."""
        out, errors = self._send(node_ids, kind, content, per_node)
        if errors:
            lines = "\n".join(f"site {self.nodes.get(n, n)}: {why}" for n, why in errors.items())
            raise TaceError(f"{len(errors)} site(s) failed during '{kind}':\n{lines}", "see the site's client log for details")
        return out

    def _event(self, kind: str, stage: str, server_round: int, node: int, detail: str) -> None:
        if self.on_event:
            self.on_event(kind, stage, server_round, self.nodes.get(node, str(node)), detail)
        else:
            log.warning("%s round %d: site %s %s: %s", stage, server_round, self.nodes.get(node, node), kind, detail)

    # -- the Federation interface ----------------------------------------------------------------------------
    def sites(self) -> list[SiteInfo]:
        out = []
        for site, info in sorted(self.info.items()):
            role = self.roles[site]
            n_train = int(info["labelled-train"]) if role == "train" else 0
            n_eval = int(info["labelled-val"]) if role == "train" else int(info["labelled-all"])
            pos = int(info["val-responders"]) if role == "train" else 0
            out.append(SiteInfo(site, role, n_train, n_eval, pos))
        return out

    def clinical_stats(self) -> list[ClinicalStats]:
        nodes = self._nodes("train")
        per = {n: ConfigRecord({"query": QUERY_STATS, "role": "train"}) for n in nodes}
        replies = self._send_all(nodes, "query", RecordDict(), per)
        # Merge in site order: float sums depend on the order, and the encoder feeds training.
        ordered = sorted(replies.items(), key=lambda kv: self.nodes[kv[0]])
        return [ClinicalStats.from_flat(dict(r.content.metric_records[METRICS])) for _, r in ordered]

    def _config(self, node: int, extra: dict[str, Any], encoder: ClinicalEncoder | None) -> ConfigRecord:
        return ConfigRecord({**extra, "role": self.roles[self.nodes[node]], "encoder": json.dumps(encoder.to_dict()) if encoder else ""})

    def train(self, arrays: dict[str, Arrays], encoder: ClinicalEncoder | None, request: TrainRound) -> list[TrainReply]:
        self._refresh()
        nodes = self._nodes("train")
        q = request
        content = RecordDict({ARRAYS: _record(pack({k: arrays[k] for k in STAGE_ARRAYS[q.stage]}))})
        # Seeds follow the site's place in the (sorted) list of training sites, not its node id.
        settings: dict[str, Any] = {"stage": q.stage, "lr": q.lr, "backbone": q.backbone, "server-round": q.server_round,
                                    "validate": ",".join(q.validate)}  # fmt: skip
        if self.run.sample_dp:
            assert self.ledger is not None
            settings["study-id"] = self.ledger.study_id
            settings["dp-plan"] = json.dumps(planned_rounds(self.run, len(self.info)))  # this site's rounds
        if self.run.client_dp and self.run.secagg:
            settings["clipping-norm"] = self.run.dp_clipping_norm
        per = {n: self._config(n, {**settings, "seed": q.seed + i}, encoder) for i, n in enumerate(nodes)}
        if self.run.secagg:
            replies, errors = self._train_secure(q, nodes, content, per, arrays[q.stage])
        else:
            replies, errors = self._send(nodes, "train", content, per)
        out = []
        # Aggregate in a fixed (site) order: replies arrive in any order and float sums depend on it.
        for node in sorted(nodes, key=lambda n: self.nodes[n]):
            site = self.nodes[node]
            if node in errors:
                out.append(TrainReply(site, {}, 0, {}, error=errors[node], declined="declined to train" in errors[node]))
                continue
            reply = replies[node]
            try:
                metrics = dict(reply.content.metric_records[METRICS])
                values = {k: float(cast(float, v)) for k, v in metrics.items()}
                num = int(cast(int, metrics["num-examples"]))
                declined = str(reply.content.config_records[SITE].get("declined", "")) if SITE in reply.content.config_records else ""
                if self.ledger is not None:
                    self.ledger.record_site(site, q.stage, q.server_round, values, declined)
                if declined:
                    out.append(TrainReply(site, {}, 0, values, error=declined, evaluation=self._validation(reply, node), declined=True))
                    continue
                received = {} if self.run.secagg else {k: v.numpy() for k, v in reply.content.array_records[ARRAYS].items()}
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                out.append(TrainReply(site, {}, 0, {}, error=f"malformed reply ({type(exc).__name__})"))
                continue
            out.append(TrainReply(site, received, num, values, raw=reply, evaluation=self._validation(reply, node), masked=self.run.secagg))
        return out

    def _train_secure(
        self, q: TrainRound, nodes: list[int], content: RecordDict, per: dict[int, ConfigRecord], current: Arrays
    ) -> tuple[dict[int, Message], dict[int, str]]:
        """A training round under SecAgg+ (`tace.server.secagg`): the replies carry the sites' metrics, and the
        aggregate waits for `aggregate`."""
        from tace.server.secagg import secure_round

        contents = {n: RecordDict({**dict(content.items()), CONFIG: per[n]}) for n in nodes}
        weights = {n: 1 if self.run.client_dp else int(self.info[self.nodes[n]]["labelled-train"]) for n in nodes}
        result = secure_round(self.grid, q.server_round, contents, sorted(current), max(weights.values(), default=1), self.timeout_s)
        errors = {n: clean_reason(why) for n, why in result.errors.items()}
        # A site that declined (privacy budget) took part with weight 0: its reply carries its validation and privacy.
        trained = [
            n
            for n, m in sorted(result.replies.items())
            if not (SITE in m.content.config_records and m.content.config_records[SITE].get("declined"))
        ]
        if result.aggregate is not None and trained:
            self._secure[q.stage] = (result.aggregate, [weights[n] for n in trained])
        else:
            self._secure.pop(q.stage, None)
        return {n: m for n, m in result.replies.items() if n not in errors}, errors

    def _validation(self, reply: Message, node: int) -> dict[str, dict[str, Any]] | None:
        """The site's validation of the weights it received, carried by its train reply."""
        text = str(reply.content.config_records[SITE].get("validation", "")) if SITE in reply.content.config_records else ""
        if not text:
            return None
        try:
            res = unflatten_evaluation(json.loads(text))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        res["role"] = self.roles[self.nodes[node]]
        return {self.nodes[node]: res}

    def aggregate(self, stage: str, server_round: int, replies: list[TrainReply], current: Arrays) -> Arrays:
        if server_round == 1:
            # A new stage (or a new candidate backbone): FedAdam's moments must not carry over.
            self.strategies[stage] = self._strategy()
        strategy = self.strategies[stage]
        raws = self._secure_replies(stage, server_round, current) if self.run.secagg else [r.raw for r in replies]
        if self.run.client_dp:
            assert self.ledger is not None
            self.ledger.check_central(stage, server_round)
            strategy.num_sampled_clients = len(raws)  # the sites in this mean: the noise is sized for them
            if hasattr(strategy, "current_arrays"):  # server-side clipping needs the global weights, in the replies' order
                names = list(raws[0].content.array_records[ARRAYS].keys())
                strategy.current_arrays = ArrayRecord({k: Array(np.ascontiguousarray(current[k])) for k in names})
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
        return {k: v.numpy().astype(current[k].dtype) for k, v in aggregated.items()}

    def _secure_replies(self, stage: str, server_round: int, current: Arrays) -> list[Message]:
        """The round's secure aggregate as replies a strategy can average (see `_synthetic_replies`)."""
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
        return _synthetic_replies(aggregate, weights if self.run.client_dp else [sum(weights)], key)

    def strategy_state(self, stage: str) -> Arrays:
        strategy = self.strategies[stage]
        out: Arrays = {}
        for name in ("m_t", "v_t"):
            for k, v in (getattr(strategy, name, None) or {}).items():
                out[f"{name}/{k}"] = np.asarray(v)
        if self.run.dp_mode == "client-adaptive" and self.run.client_dp:
            out["dp/clipping_norm"] = np.asarray(float(strategy.clipping_norm))  # adapted every round
        return out

    def restore_strategy(self, stage: str, state: Arrays) -> None:
        strategy = self.strategies[stage] = self._strategy()
        for name in ("m_t", "v_t"):
            values = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{name}/")}
            if values:
                setattr(strategy, name, values)
        if "dp/clipping_norm" in state:
            strategy.clipping_norm = float(state["dp/clipping_norm"])

    def evaluate(self, arrays: dict[str, Arrays], encoder: ClinicalEncoder | None, request: Evaluation) -> dict[str, dict[str, Any]]:
        # During rounds only the training sites' internal validation is needed: holdout sites are touched once, at
        # the end, so they can never influence model selection.
        q = request
        final = q.final
        nodes = self._nodes(q.role) if final else self._nodes("train")
        needed = {"dltr": ("dltr",), "dltrmlp": ("dltr", "head"), "clinical": ("clinical",)}
        stages = sorted({s for m in q.models for s in needed[m]})
        content = RecordDict({ARRAYS: _record(pack({k: arrays[k] for k in stages}))})
        extra = {"models": ",".join(q.models), "final": final, "backbone": q.backbone, "tag": q.tag, "cutoffs": json.dumps(q.cutoffs or {})}
        per = {n: self._config(n, extra, encoder) for n in nodes}
        replies, errors = self._send(nodes, "evaluate", content, per)
        if final and errors:
            # A site restarting at the very end: one more try before its results are missing from the study.
            retried, errors = self._send(list(errors), "evaluate", content, per)
            replies.update(retried)
        for node, why in errors.items():
            self._event("missing-evaluation" if final else "no-validation", "final" if final else ",".join(q.models), 0, node, why)
        out: dict[str, dict[str, Any]] = {}
        for node, reply in replies.items():
            res = unflatten_evaluation(dict(reply.content.metric_records[METRICS]))
            res["role"] = self.roles[self.nodes[node]]
            if final:
                res["summary"] = _summary(reply, self.nodes[node])
            out[self.nodes[node]] = res
        return out

    def finetune(self, arrays: dict[str, Arrays], encoder: ClinicalEncoder, request: Finetune) -> dict[str, dict[str, Any]]:
        nodes = self._nodes("train")
        content = RecordDict({ARRAYS: _record(pack({k: arrays[k] for k in ("dltr", "head", "clinical")}))})
        q = request
        extra = {"query": QUERY_FINETUNE, "mode": q.mode, "epochs": q.epochs, "backbone": q.backbone, "seed": q.seed,
                 "cutoffs": json.dumps(q.cutoffs), "bins": self.run.analysis_bins, "tag": q.tag}  # fmt: skip
        replies, errors = self._send(nodes, "query", content, {n: self._config(n, extra, encoder) for n in nodes})
        out: dict[str, dict[str, Any]] = {self.nodes[n]: {"error": why} for n, why in errors.items()}
        for node, reply in replies.items():
            try:
                out[self.nodes[node]] = _finetune_entry(reply)
            except (KeyError, TypeError, ValueError) as exc:
                out[self.nodes[node]] = {"error": f"malformed reply ({type(exc).__name__})"}
        return dict(sorted(out.items()))


def _finetune_entry(reply: Message) -> dict[str, Any]:
    """A site's fine-tuning figures (an AUC of -1 means undefined: a single-class validation split)."""
    m = dict(reply.content.metric_records[METRICS])

    def number(key: str) -> float:
        return float(cast(float, m[key]))

    aucs = {
        name: (None if number(key) < 0 else number(key)) for name, key in (("global_auc", "global-auc"), ("finetuned_auc", "finetuned-auc"))
    }
    return {**aucs, "n_train": int(number("n-train")), "n_val": int(number("n-val")), "epochs": int(number("epochs")),
            "seconds": round(number("seconds"), 2)}  # fmt: skip


def _summary(reply: Message, site: str) -> Any:
    text = reply.content.config_records[SITE].get("summary", "") if SITE in reply.content.config_records else ""
    try:
        return json.loads(str(text))
    except json.JSONDecodeError:
        raise TaceError(f"site {site} sent an analysis summary that is not valid JSON",
                        "the site may run another TACE-FL version; ask it to update") from None  # fmt: skip


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


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = RunConfig.from_run_config(context.run_config)
    if not run.run_dir:
        raise TaceError("run-config key 'run-dir' (absolute path of the run folder) is required")
    rundir = RunDir(Path(run.run_dir), run.to_run_config(), mode="federated")
    (rundir.path / "error.txt").unlink(missing_ok=True)  # a resumed run starts without the interruption's error
    expected = _expected_sites(run)
    status = Status(rundir)
    try:
        status.write("waiting for sites", expected_sites=expected)
        ledger = PrivacyLedger(rundir.path / "privacy_ledger.json", run) if run.dp else None
        federation = FlowerFederation(grid, run, expected, ledger=ledger)
        federation.on_event = rundir.record_event
        status.federation = federation
        status.write("training" if not run.resume else "resuming")

        def initial(backbone: str | None) -> dict[str, Arrays]:
            return StudyModels.build(backbone or run.backbone, len(run.preprocess.sequences), len(FEATURES), seed=run.seed).arrays()

        summary = run_layouts(federation, run, rundir, initial, mode="federated", on_round=status.round)
        status.write("finished")
        print(f"TACE-SUMMARY {rundir.path / 'summary.json'}", flush=True)
        log.info("summary: %s", json.dumps(summary.get("models", {}))[:2000])
    except TaceError as exc:
        # The run's own account of what went wrong, for `tace-sim` and the coordinator's operator.
        (rundir.path / "error.txt").write_text(str(exc) + "\n", encoding="utf-8")
        status.write("failed", error=str(exc))
        log.error("%s", exc)
        raise
    finally:
        rundir.close()


class Status:
    """``status.json`` in the run folder: what `tace-server status` shows (state, stage, round, sites online,
    per-site metrics of the last round). Rewritten atomically after every round."""

    def __init__(self, rundir: RunDir) -> None:
        self.rundir = rundir
        self.federation: FlowerFederation | None = None
        self.last: dict[str, Any] = {}

    def write(self, state: str, **extra: Any) -> None:
        import datetime as dt

        data = {"state": state, "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **self.last, **extra}
        if self.federation is not None:
            data["sites_online"] = self.federation.online()
            data["sites"] = {s: self.federation.roles.get(s, "") for s in sorted(self.federation.info)}
        self.rundir.write_json("status.json", data)

    def round(self, stage: str, server_round: int, total: int, val_auc: float | None, sites: dict[str, str] | None = None) -> None:
        _print_round(stage, server_round, total, val_auc, sites)
        self.last = {"stage": stage, "round": server_round, "rounds": total, "pooled_val_auc": val_auc, "site_metrics": sites or {}}
        self.write("training")


def _expected_sites(run: RunConfig) -> int:
    """How many sites to wait for: `expected-sites`, or in simulation every site of the cohort."""
    if run.expected_sites:
        return run.expected_sites
    if run.cohort:
        return len(json.loads((Path(run.cohort) / "cohort.json").read_text())["sites"])
    raise TaceError("run-config key 'expected-sites' is required outside simulation", "set it to the number of sites in the study")


def _print_round(stage: str, server_round: int, total: int, val_auc: float | None, sites: dict[str, str] | None = None) -> None:
    auc = "n/a" if val_auc is None else f"{val_auc:.3f}"
    detail = " ".join(f"{s}:{v}" for s, v in (sites or {}).items())
    print(f"TACE-ROUND {stage} {server_round}/{total} pooled-val-auc={auc} {detail}".rstrip(), flush=True)
