"""The exported model of a finished run (``tace-model.zip``): everything a hospital needs to predict, nothing about
any patient.

One zip file holding ``model.json`` (format, TACE-FL version, backbone, model signature, preprocessing parameters,
clinical standardisation, the cut-offs and where they were fixed, the score grid, the privacy the models were
trained under, a SHA-256 digest of all of it and of the weights) and ``weights.npz`` (the three models' weights as
plain arrays: no pickled code runs when a hospital loads it). `read_model` refuses a file another TACE-FL version
cannot reproduce predictions from, and says which version to use; it refuses a damaged or edited file too. The
digest shows integrity, not authorship: a file is as trustworthy as the channel it came through.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tace.common.errors import TaceError
from tace.common.preprocess import PIPELINE_VERSION, PreprocessConfig

FORMAT = "tace-model/1"
FILENAME = "tace-model.zip"
STAGES = ("dltr", "head", "clinical")
#: Run-config keys a model file carries for local fine-tuning at a hospital (nothing about any patient).
TRAINING_KEYS = ("lr", "head-lr", "weight-decay", "batch-size", "augment", "amp", "seed")
#: Run-config keys a model file carries about the privacy its models were trained under.
PRIVACY_KEYS = ("dp", "dp-mode", "dp-target-epsilon", "dp-delta", "secagg")
CUTOFFS_NOTE = "fixed on the training sites' pooled internal-validation scores"
Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class ModelArtefact:
    """A model file's content: the weights per stage and how to use them.

    Attributes
    ----------
    cutoffs : {model: {"youden_bin", "youden_threshold", "risk_bins", "risk_thresholds", "risk_groups", ...}}
        Fixed on the training sites (`tace.common.summaries.fix_cutoffs`); `bins` is their score grid.
    """

    arrays: dict[str, Arrays]
    backbone: str
    preprocess: PreprocessConfig
    encoder: dict[str, Any]
    cutoffs: dict[str, Any]
    bins: int
    version: str
    signature: str
    source: str = ""  # the run it came from (its folder name), for the record
    training: dict[str, Any] = field(default_factory=dict)  # run-config keys local fine-tuning starts from (lr, head-lr, ...)
    privacy: dict[str, Any] = field(default_factory=dict)  # dp, dp-mode, dp-target-epsilon, secagg of the run, or a note
    cutoffs_note: str = CUTOFFS_NOTE


def _digest(arrays: dict[str, Arrays]) -> str:
    h = hashlib.sha256()
    for stage in STAGES:
        for k in sorted(arrays[stage]):
            v = np.ascontiguousarray(arrays[stage][k])
            h.update(f"{stage}.{k}|{v.dtype}|{v.shape}".encode())
            h.update(v.tobytes())
    return h.hexdigest()


def _card_digest(card: dict[str, Any], arrays: dict[str, Arrays]) -> str:
    """SHA-256 over the card (every field but the digest itself, canonical JSON) and the weights."""
    h = hashlib.sha256(json.dumps({k: v for k, v in card.items() if k != "sha256"}, sort_keys=True).encode())
    h.update(_digest(arrays).encode())
    return h.hexdigest()


def write_model(
    path: Path, arrays: dict[str, Arrays], backbone: str, preprocess: PreprocessConfig, encoder: dict[str, Any], cutoffs: dict[str, Any],
    bins: int, source: str = "", training: dict[str, Any] | None = None, privacy: dict[str, Any] | None = None,
    cutoffs_note: str = CUTOFFS_NOTE,
) -> Path:  # fmt: skip
    """Write the model file atomically; returns its path."""
    from tace.common.cli import version_string
    from tace.common.clinical import FEATURES
    from tace.common.models import model_signature

    card: dict[str, Any] = {
        "format": FORMAT, "tace_fl_version": version_string(), "backbone": backbone,
        "model_signature": model_signature((backbone,), len(preprocess.sequences), len(FEATURES)),
        "preprocessing": {**preprocess.to_dict(), "pipeline_version": PIPELINE_VERSION}, "clinical_features": list(FEATURES),
        "clinical_encoder": encoder, "cutoffs": cutoffs, "cutoffs_note": cutoffs_note, "score_bins": int(bins), "source_run": source,
        "training": training or {}, "privacy": privacy or {},
        "outputs": "probability of objective response (mRECIST CR/PR) from DLTRMLP, DLTR and the clinical model",
    }  # fmt: skip
    card = json.loads(json.dumps(card))  # exactly what a reader will parse (tuples as lists), so the digest matches
    card["sha256"] = _card_digest(card, arrays)
    buffer = io.BytesIO()
    flat: dict[str, Any] = {f"{stage}.{k}": np.asarray(v) for stage in STAGES for k, v in arrays[stage].items()}
    np.savez(buffer, **flat)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("model.json", json.dumps(card, indent=2))
        z.writestr("weights.npz", buffer.getvalue())
    tmp.replace(path)
    return path


def locate(path: Path | str) -> Path:
    """The model file named by `path`: the file itself, or a run folder's ``models/tace-model.zip``."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "models" / FILENAME
        if candidate.is_file():
            return candidate
        raise TaceError(f"{path} holds no exported model ({candidate.relative_to(path)} is missing)",
                        "give the model file (tace-model.zip) of a finished run, or the folder of a run that finished")  # fmt: skip
    if not path.is_file():
        raise TaceError(f"model file {path} does not exist", "give the tace-model.zip a finished run wrote (RUN/models/tace-model.zip)")
    return path


def read_model(path: Path | str) -> ModelArtefact:
    """Read and check a model file (or a run folder's); raises `TaceError` saying what is wrong and what to do."""
    from tace.common.cli import version_string
    from tace.common.clinical import FEATURES
    from tace.common.models import BACKBONES, model_signature

    path = locate(path)
    try:
        with zipfile.ZipFile(path) as z:
            card = json.loads(z.read("model.json").decode("utf-8"))
            with np.load(io.BytesIO(z.read("weights.npz")), allow_pickle=False) as npz:
                flat = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, KeyError, OSError, ValueError, UnicodeDecodeError):
        raise TaceError(f"{path} is not a TACE-FL model file, or it is damaged",
                        "copy the tace-model.zip of the run again (compare its size with the coordinator's)") from None  # fmt: skip
    made_by = card.get("tace_fl_version", "unknown")
    if card.get("format") != FORMAT:
        raise TaceError(f"{path} has model format {card.get('format')!r}, which TACE-FL {version_string()} cannot read "
                        f"(it reads {FORMAT}); it was made by TACE-FL {made_by}", f"install TACE-FL {made_by} to use it")  # fmt: skip
    arrays: dict[str, Arrays] = {s: {} for s in STAGES}
    for key, value in flat.items():
        stage, _, name = key.partition(".")
        if stage not in arrays:
            raise TaceError(f"{path} holds an unexpected weight {key!r}", "the file was modified; copy the run's model file again")
        arrays[stage][name] = value
    if _card_digest(card, arrays) != card.get("sha256"):
        raise TaceError(f"{path}: its content does not match the digest recorded with it",
                        "the file was damaged or edited; copy the run's model file again")  # fmt: skip
    try:
        pre = dict(card["preprocessing"])
        pipeline = pre.pop("pipeline_version", None)
        backbone = str(card["backbone"])
        if pipeline != PIPELINE_VERSION or list(card["clinical_features"]) != list(FEATURES) or backbone not in BACKBONES:
            raise TaceError(f"{path} was made by TACE-FL {made_by}, whose preprocessing or clinical factors differ from this "
                            f"version's ({version_string()}): its predictions could not be reproduced", f"install TACE-FL {made_by} to use it")  # fmt: skip
        preprocess = PreprocessConfig.from_mapping(pre)
        ours = model_signature((backbone,), len(preprocess.sequences), len(FEATURES))
        if card["model_signature"] != ours:
            raise TaceError(f"{path} was made by TACE-FL {made_by}, whose {backbone} model differs from this version's "
                            f"({version_string()}; signature {card['model_signature']} vs {ours})", f"install TACE-FL {made_by} to use it")  # fmt: skip
        return ModelArtefact(arrays, backbone, preprocess, dict(card["clinical_encoder"]), dict(card["cutoffs"]), int(card["score_bins"]),
                             str(made_by), ours, str(card["source_run"]), dict(card["training"]), dict(card["privacy"]),
                             str(card["cutoffs_note"]))  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise TaceError(f"{path}: model.json lacks or garbles a field ({type(exc).__name__}: {exc})",
                        "the file is not one TACE-FL wrote; copy the run's model file again") from None  # fmt: skip
