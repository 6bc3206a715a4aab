"""What travels between coordinator and sites: the study's stages, typed requests and replies, reason codes.

Every message's content is a `Records` (weights, a config record, metrics and the site's own record) that the
Flower adapters (`tace.client.app`, `tace.server.federation`) turn into Flower records and back; nothing here
imports Flower. Each request and reply is a dataclass that encodes itself into `Records` and decodes (checking
what it reads) on the way in. A site that does not do what it was asked says why with a `Reason` code, so the
coordinator acts on the code, never on the wording.

Weights of several models travel in one flat mapping whose keys are ``<stage>.<state-dict key>``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Protocol, TypeVar, cast

import numpy as np

from tace.common.errors import TaceError

Arrays = dict[str, np.ndarray]
Scalar = int | float | str | bool
Metric = int | float | list[int] | list[float]

# Record names inside a message.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"

MODELS = ("clinical", "dltr", "dltrmlp", "radiomics")
#: The models as tables list them: the fusion first, then the image-only, radiomics and clinical models.
DISPLAY_ORDER = ("dltrmlp", "dltr", "radiomics", "clinical")


# -- the stages -------------------------------------------------------------------------------------------------
class RunSettings(Protocol):
    """What the stage table reads of a run: a `tace.common.config.RunConfig` (typed by its shape, so that this
    module needs nothing above it)."""

    @property
    def seed(self) -> int: ...

    @property
    def batch_size(self) -> int: ...


@dataclass(frozen=True)
class Stage:
    """One training stage of the study, in the order the workflow runs them.

    Attributes
    ----------
    name : the stage's weight prefix and progress label (``dltr``, ``head``, ``clinical``)
    model : the model whose pooled internal-validation AUC selects the stage's rounds
    arrays : the stages whose weights a train message carries (the fusion head trains on the backbone's features)
    label : the stage in words, for reports
    seed_offset : added to a round's seed, so stages never share a random stream
    rounds_key, lr_key, epochs_key, weight_decay_key : the `RunConfig` fields giving its rounds, base learning rate,
        local epochs and AdamW weight decay
    batch_size : fixed local batch size (0: the run's ``batch-size``)
    """

    name: str
    model: str
    arrays: tuple[str, ...]
    label: str
    seed_offset: int
    rounds_key: str
    lr_key: str
    epochs_key: str
    weight_decay_key: str = "weight_decay"
    batch_size: int = 0

    def rounds(self, run: RunSettings) -> int:
        return int(getattr(run, self.rounds_key))

    def base_lr(self, run: RunSettings) -> float:
        return float(getattr(run, self.lr_key))

    def local_epochs(self, run: RunSettings) -> int:
        return int(getattr(run, self.epochs_key))

    def weight_decay(self, run: RunSettings) -> float:
        return float(getattr(run, self.weight_decay_key))

    def local_batch_size(self, run: RunSettings) -> int:
        return self.batch_size or run.batch_size

    def round_seed(self, run: RunSettings, server_round: int) -> int:
        """The seed of round `server_round` (the first training site's; the others add their place in site order)."""
        return run.seed * 100_003 + server_round * 101 + self.seed_offset


#: The study's stages, in the order they train: the DLTR backbone, the clinical model, the radiomics model, then
#: DLTRMLP's fusion head on DLTR's frozen features (last: the linear head reads the other models' logits).
STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("dltr", "dltr", ("dltr",), "DLTR backbone", 1, "rounds", "lr", "local_epochs"),
        Stage(
            "clinical",
            "clinical",
            ("clinical",),
            "clinical model",
            3,
            "clinical_rounds",
            "clinical_lr",
            "clinical_local_epochs",
            batch_size=32,
        ),
        Stage(
            "radiomics",
            "radiomics",
            ("radiomics",),
            "radiomics model",
            4,
            "radiomics_rounds",
            "radiomics_lr",
            "radiomics_local_epochs",
            "radiomics_weight_decay",
            32,
        ),
        Stage(
            "head",
            "dltrmlp",
            ("dltr", "head"),
            "DLTRMLP fusion head",
            2,
            "head_rounds",
            "head_lr",
            "head_local_epochs",
            "head_weight_decay",
            32,
        ),
    )
}


#: The forms of DLTRMLP's head (`tace.common.models`; run-config ``fusion-head`` also takes "auto").
FUSION_HEADS = ("mlp", "linear")

#: The stages in the order digests and signatures read their weights (fixed, so that model files written before the
#: training order changed still verify).
DIGEST_ORDER = ("dltr", "head", "clinical", "radiomics")


def model_arrays(models: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The stages whose weights are needed to run `models` (in stage order)."""
    needed = {name for s in STAGES.values() if s.model in models for name in s.arrays}
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}")
    return tuple(name for name in STAGES if name in needed)


def pack(arrays: Mapping[str, Arrays]) -> Arrays:
    """Flatten ``{stage: {key: array}}`` into ``{"stage.key": array}``."""
    return {f"{stage}.{k}": v for stage, values in arrays.items() for k, v in values.items()}


def unpack(flat: Arrays) -> dict[str, Arrays]:
    out: dict[str, Arrays] = {}
    for key, value in flat.items():
        stage, _, name = key.partition(".")
        if stage not in STAGES or not name:
            raise ValueError(f"unexpected weight name {key!r}")
        out.setdefault(stage, {})[name] = value
    return out


# -- why a site did not do what it was asked ------------------------------------------------------------------
class Reason(str, Enum):
    """Why a site did not do what the coordinator asked (or why the coordinator has no answer from it)."""

    DECLINED_BUDGET = "declined-budget"  # training would take the site past its privacy budget; it still validates
    REQUIRES_DP = "requires-dp"  # the site takes part only with sample-level differential privacy (its require-dp)
    REQUIRES_SECAGG = "requires-secagg"  # the site sends weights only masked by secure aggregation (its require-secagg)
    NOT_UNDER_DP = "not-under-dp"  # a release outside the privacy account (statistics, fine-tuning AUCs) under DP
    DATA_PROBLEMS = "data-problems"  # the site's manifest or images fail `tace-client check`
    VERSION_MISMATCH = "version-mismatch"  # the site runs another TACE-FL version
    SIGNATURE_MISMATCH = "signature-mismatch"  # same version, different model definition: a modified install
    SITE_ERROR = "site-error"  # a TACE-FL error at the site (its message says what)
    INTERNAL_ERROR = "internal-error"  # an unexpected error at the site (its log has the details)
    NO_REPLY = "no-reply"  # the site went offline or did not answer in time
    TRANSPORT = "transport-error"  # Flower reported an error that did not come from TACE-FL's code
    MALFORMED = "malformed-reply"  # the reply does not decode (another version?)


@dataclass(frozen=True)
class Failure:
    """A site's reason code with its message for people (never patient values)."""

    reason: Reason
    message: str

    def __str__(self) -> str:
        return self.message

    @property
    def declined(self) -> bool:
        return self.reason is Reason.DECLINED_BUDGET

    def encode(self) -> str:
        """As the text of a Flower error: the code in brackets, then the message."""
        return f"[tace:{self.reason.value}] {self.message}"

    @classmethod
    def decode(cls, text: str) -> Failure:
        """The failure in a Flower error's text (which Flower and Ray may wrap); `TRANSPORT` when no code is in it."""
        match = _CODE.search(text)
        if match is None:
            return cls(Reason.TRANSPORT, text)
        try:
            reason = Reason(match.group(1))
        except ValueError:
            reason = Reason.SITE_ERROR
        return cls(reason, text[match.end() :].strip())


_CODE = re.compile(r"\[tace:([a-z-]+)\] ?")


class SiteRefusal(TaceError):
    """A site declining a request under its own rules (`tace.client.policy`), with the reason code."""

    def __init__(self, reason: Reason, message: str, hint: str = "") -> None:
        super().__init__(message, hint)
        self.reason = reason

    @property
    def failure(self) -> Failure:
        return Failure(self.reason, f"{self.message}" + (f" ({self.hint})" if self.hint else ""))


# -- message content ------------------------------------------------------------------------------------------
@dataclass
class Records:
    """One message's content without its transport: weights, the request's config, metrics, the site's record."""

    arrays: Arrays | None = None
    config: dict[str, Scalar] = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=dict)
    site: dict[str, Scalar] = field(default_factory=dict)

    def parts(self) -> dict[str, tuple[str, Mapping[str, Any]]]:
        """{record name: (kind, content)} of the records to send; kind is "arrays", "config" or "metrics". Weights
        are sent when present (also empty), the other records when not empty."""
        out: dict[str, tuple[str, Mapping[str, Any]]] = {} if self.arrays is None else {ARRAYS: ("arrays", self.arrays)}
        for name, kind, content in ((CONFIG, "config", self.config), (METRICS, "metrics", self.metrics), (SITE, "config", self.site)):
            if content:
                out[name] = (kind, content)
        return out

    @classmethod
    def from_parts(cls, parts: Mapping[str, Mapping[str, Any]]) -> Records:
        """From {record name: content} as received (weights as numpy arrays); records of other names are ignored."""
        arrays = parts.get(ARRAYS)
        return cls(None if arrays is None else dict(arrays), *(dict(parts.get(name, {})) for name in (CONFIG, METRICS, SITE)))


R = TypeVar("R", bound="Request")


def _malformed(what: str, exc: Exception | str) -> TaceError:
    detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return TaceError(f"malformed {what} ({detail})", "the coordinator and the site must run the same TACE-FL version")


@dataclass(frozen=True, kw_only=True)
class Request:
    """The config record of a request: every field travels under its hyphenated name; tuples as comma-separated
    text, mappings as JSON (empty: none). `role` is the site's role in the current layout; `encoder` the clinical
    standardisation (`ClinicalEncoder.to_dict`) when the call needs it."""

    QUERY: ClassVar[str] = ""  # the query kind, for requests sent as Flower "query" messages
    role: str = "holdout"
    encoder: dict[str, Any] = field(default_factory=dict)

    def to_config(self) -> dict[str, Scalar]:
        out: dict[str, Scalar] = {"query": self.QUERY} if self.QUERY else {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = ",".join(value)
            elif isinstance(value, dict):
                value = json.dumps(value) if value else ""
            out[f.name.replace("_", "-")] = value
        return out

    def records(self, arrays: Arrays | None = None) -> Records:
        return Records(arrays=arrays, config=self.to_config())

    @classmethod
    def from_config(cls: type[R], config: Mapping[str, Any]) -> R:
        kwargs: dict[str, Any] = {}
        try:
            for f in dataclasses.fields(cls):
                key = f.name.replace("_", "-")
                if key not in config:
                    continue
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
                raw = config[key]
                if isinstance(default, tuple):
                    kwargs[f.name] = tuple(t for t in str(raw).split(",") if t)
                elif isinstance(default, dict):
                    kwargs[f.name] = dict(json.loads(str(raw))) if raw else {}
                elif isinstance(default, bool):
                    kwargs[f.name] = raw if isinstance(raw, bool) else str(raw).lower() in ("true", "1")
                else:
                    kwargs[f.name] = type(default)(raw)
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise _malformed(f"{cls.__name__} from the coordinator", exc) from None


@dataclass(frozen=True, kw_only=True)
class InfoRequest(Request):
    """Who are you, are your data ready, and do you build the same models (for these backbones)?"""

    QUERY: ClassVar[str] = "info"
    coordinator_version: str = ""
    model_signature: str = ""
    backbones: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class StatsRequest(Request):
    """The clinical statistics of the training split (counts, sums, sums of squares)."""

    QUERY: ClassVar[str] = "stats"
    role: str = "train"


@dataclass(frozen=True, kw_only=True)
class TrainRequest(Request):
    """One local training call of `stage`; with `validate`, the site first evaluates those models with the weights
    it received. Under sample-level DP: the study id of the site's privacy account and the planned rounds per stage;
    with client-level DP under secure aggregation: the clipping norm the site clips its own update to."""

    stage: str = ""
    lr: float = 0.0
    seed: int = 0
    server_round: int = 0
    backbone: str = ""
    validate: tuple[str, ...] = ()
    study_id: str = ""
    dp_plan: dict[str, Any] = field(default_factory=dict)
    clipping_norm: float = 0.0


@dataclass(frozen=True, kw_only=True)
class EvaluateRequest(Request):
    """Aggregates of `models` on the site's evaluation set; `final` adds the analysis summary (event tables grouped
    with `cutoffs`) and writes the predictions, tagged `tag`, at the site."""

    models: tuple[str, ...] = ()
    backbone: str = ""
    final: bool = False
    tag: str = ""
    cutoffs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class FinetuneRequest(Request):
    """Fine-tune the final models on the site's training split (`mode`: 'head' or 'last-stage'); the fine-tuned
    model, with the global model's `cutoffs` on its `bins` grid, stays at the site under `tag`."""

    QUERY: ClassVar[str] = "finetune"
    role: str = "train"
    mode: str = "head"
    epochs: int = 0
    backbone: str = ""
    seed: int = 0
    cutoffs: dict[str, Any] = field(default_factory=dict)
    bins: int = 100_000
    tag: str = ""


QUERIES: dict[str, type[Request]] = {q.QUERY: q for q in (InfoRequest, StatsRequest, FinetuneRequest)}


def _get(mapping: Mapping[str, Any], key: str, kind: type, what: str) -> Any:
    try:
        value = mapping[key]
        return kind(value) if kind is not str or isinstance(value, str) else str(value)
    except (KeyError, TypeError, ValueError) as exc:
        raise _malformed(what, exc) from None


@dataclass(frozen=True)
class SiteCounts:
    """How many patients a site has per split, and how many of them are labelled (what the coordinator plans with)."""

    n: int = 0
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    labelled_train: int = 0
    labelled_val: int = 0
    labelled_test: int = 0
    labelled_all: int = 0
    val_responders: int = 0

    def to_site(self) -> dict[str, Scalar]:
        return {f.name.replace("_", "-"): int(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_site(cls, site: Mapping[str, Any]) -> SiteCounts:
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: _get(site, n.replace("_", "-"), int, "site counts") for n in names})


@dataclass(frozen=True)
class InfoReply:
    """A site's answer to `InfoRequest`: ready (with its counts, version and model signature) or not, and why."""

    site_id: str
    failure: Failure | None = None
    counts: SiteCounts = field(default_factory=SiteCounts)
    version: str = ""
    model_signature: str = ""

    @property
    def ok(self) -> bool:
        return self.failure is None

    def records(self) -> Records:
        site: dict[str, Scalar] = {"site-id": self.site_id, "ok": self.ok}
        if self.failure is not None:
            site.update({"reason": self.failure.reason.value, "problems": self.failure.message})
        else:
            site.update({**self.counts.to_site(), "version": self.version, "model-signature": self.model_signature})
        return Records(site=site)

    @classmethod
    def from_records(cls, records: Records) -> InfoReply:
        site = records.site
        site_id = _get(site, "site-id", str, "site information")
        if not site.get("ok", False):
            try:
                reason = Reason(str(site.get("reason", Reason.SITE_ERROR.value)))
            except ValueError:
                reason = Reason.SITE_ERROR
            return cls(site_id, Failure(reason, str(site.get("problems", ""))))
        return cls(site_id, None, SiteCounts.from_site(site), str(site.get("version", "")), str(site.get("model-signature", "")))


@dataclass(frozen=True)
class StatsReply:
    """A training site's statistics for the encoders (`tace.common.encoders.SiteStatistics.to_flat`: counts and sums
    only)."""

    site_id: str
    stats: dict[str, Metric]

    def records(self) -> Records:
        return Records(metrics=dict(self.stats), site={"site-id": self.site_id})

    @classmethod
    def from_records(cls, records: Records) -> StatsReply:
        try:
            stats = {k: [float(x) for x in v] if isinstance(v, list) else float(v) for k, v in records.metrics.items()}
            return cls(_get(records.site, "site-id", str, "statistics"), stats)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise _malformed("clinical statistics", exc) from None


@dataclass(frozen=True)
class TrainReply:
    """A site's answer to `TrainRequest`: the stage's weights (None when it declined or they left masked), the
    number of training samples (FedAvg's weight), numeric metrics, the validation of the weights it received (a
    flattened evaluation, `flatten_evaluation`) and, when it declined, why."""

    site_id: str
    num_examples: int
    arrays: Arrays | None = None
    metrics: dict[str, Metric] = field(default_factory=dict)
    validation: dict[str, Metric] | None = None
    declined: Failure | None = None

    def records(self) -> Records:
        site: dict[str, Scalar] = {"site-id": self.site_id}
        if self.validation is not None:
            site["validation"] = json.dumps(self.validation)
        if self.declined is not None:
            site.update({"reason": self.declined.reason.value, "declined": self.declined.message})
        return Records(arrays=self.arrays, metrics={"num-examples": int(self.num_examples), **self.metrics}, site=site)

    @classmethod
    def from_records(cls, records: Records) -> TrainReply:
        site_id = _get(records.site, "site-id", str, "training reply")
        num = _get(records.metrics, "num-examples", int, "training reply")
        metrics = {k: float(cast(float, v)) for k, v in records.metrics.items() if k != "num-examples"}
        validation: dict[str, Metric] | None = None
        text = str(records.site.get("validation", ""))
        if text:
            try:
                validation = dict(json.loads(text))
                unflatten_evaluation(validation)  # checks it decodes
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                validation = None  # a garbled validation only costs the round this site's AUC
        declined = None
        if records.site.get("declined"):
            declined = Failure(Reason.DECLINED_BUDGET, str(records.site["declined"]))
        return cls(site_id, num, records.arrays, metrics, validation, declined)  # type: ignore[arg-type]


@dataclass(frozen=True)
class EvaluateReply:
    """A site's answer to `EvaluateRequest`: its evaluation (flattened, `flatten_evaluation`) and, for the final
    evaluation, its analysis summary (`tace.common.summaries.SiteSummary`, encoded)."""

    site_id: str
    role: str
    evaluation: dict[str, Metric]
    summary: dict[str, Any] | None = None

    def records(self) -> Records:
        site: dict[str, Scalar] = {"site-id": self.site_id, "role": self.role}
        if self.summary is not None:
            site["summary"] = json.dumps(self.summary)
        return Records(metrics=dict(self.evaluation), site=site)

    @classmethod
    def from_records(cls, records: Records) -> EvaluateReply:
        site_id = _get(records.site, "site-id", str, "evaluation reply")
        summary = None
        if "summary" in records.site:
            try:
                summary = json.loads(str(records.site["summary"]))
            except json.JSONDecodeError:
                raise TaceError(f"site {site_id} sent an analysis summary that is not valid JSON",
                                "the site may run another TACE-FL version; ask it to update") from None  # fmt: skip
        try:
            unflatten_evaluation(records.metrics)
        except (KeyError, TypeError, ValueError) as exc:
            raise _malformed(f"evaluation from site {site_id}", exc) from None
        return cls(site_id, str(records.site.get("role", "")), dict(records.metrics), summary)


@dataclass(frozen=True)
class FinetuneReply:
    """A site's fine-tuning figures: the global and the fine-tuned DLTRMLP AUC on its validation split (None:
    undefined, a single-class split), its counts, epochs and seconds."""

    site_id: str
    global_auc: float | None
    finetuned_auc: float | None
    n_train: int
    n_val: int
    epochs: int
    seconds: float

    def records(self) -> Records:
        metrics: dict[str, Metric] = {"global-auc": -1.0 if self.global_auc is None else self.global_auc,
                                      "finetuned-auc": -1.0 if self.finetuned_auc is None else self.finetuned_auc,
                                      "n-train": self.n_train, "n-val": self.n_val, "epochs": self.epochs, "seconds": self.seconds}  # fmt: skip
        return Records(metrics=metrics, site={"site-id": self.site_id})

    @classmethod
    def from_records(cls, records: Records) -> FinetuneReply:
        m, what = records.metrics, "fine-tuning reply"

        def auc(key: str) -> float | None:
            value = _get(m, key, float, what)
            return None if value < 0 else value

        return cls(_get(records.site, "site-id", str, what), auc("global-auc"), auc("finetuned-auc"), _get(m, "n-train", int, what),
                   _get(m, "n-val", int, what), _get(m, "epochs", int, what), _get(m, "seconds", float, what))  # fmt: skip

    def to_entry(self) -> dict[str, Any]:
        """As finetune.json and summary.json list it."""
        return {"global_auc": self.global_auc, "finetuned_auc": self.finetuned_auc, "n_train": self.n_train, "n_val": self.n_val,
                "epochs": self.epochs, "seconds": round(self.seconds, 2)}  # fmt: skip


# -- evaluations ----------------------------------------------------------------------------------------------
def flatten_evaluation(result: Mapping[str, Any]) -> dict[str, Metric]:
    """A site's evaluation aggregates as a flat metric mapping (``auc.<model>`` is -1 when undefined)."""
    flat: dict[str, Metric] = {"num-examples": int(result["n"]), "n-pos": int(result["n-pos"])}
    for model in MODELS:
        if model in result:
            res = result[model]
            flat[f"auc.{model}"] = -1.0 if res["auc"] is None else float(res["auc"])
            flat[f"hist-neg.{model}"] = [int(v) for v in res["hist-neg"]]
            flat[f"hist-pos.{model}"] = [int(v) for v in res["hist-pos"]]
    return flat


def unflatten_evaluation(flat: Mapping[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"n": int(flat["num-examples"]), "n-pos": int(flat["n-pos"])}
    for model in MODELS:
        if f"auc.{model}" in flat:
            value = float(flat[f"auc.{model}"])
            result[model] = {
                "auc": None if value < 0 else value,
                "hist-neg": [int(v) for v in flat[f"hist-neg.{model}"]],
                "hist-pos": [int(v) for v in flat[f"hist-pos.{model}"]],
            }
    return result
