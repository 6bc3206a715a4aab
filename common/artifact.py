"""The model file of a finished run (``tace-model.zip``): writing, reading, checking and loading it, and the
run folder's ``models/``. Everything a hospital needs to predict, nothing about any patient.

One zip file holding ``model.json`` (format, TACE-FL version, backbone, model signature, preprocessing parameters,
clinical standardisation, the cut-offs and where they were fixed, the score grid, the privacy the models were
trained under, a SHA-256 digest of all of it and of the weights) and ``weights.npz`` (the three models' weights as
plain arrays: no pickled code runs when a hospital loads it); after the run's analysis also ``model_card.json``
(`attach_model_card`: intended use, performance, calibration, limits), whose hash model.json records so that the
digest covers it too. `read_model` refuses a file another TACE-FL version
cannot reproduce predictions from, and says which version to use; it refuses a damaged or edited file too. The
digest shows integrity, not authorship: a file is as trustworthy as the channel it came through.

`TrainedModels` is a model file loaded for use (`tace-client predict`, `features`, `finetune`); `save_run_models`
writes a run's ``models/`` folder: the model file, state dicts and portable ``torch.export`` programs.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tace.common.errors import TaceError
from tace.common.preprocess import PIPELINE_VERSION, PreprocessConfig
from tace.common.protocol import DIGEST_ORDER, STAGES

if TYPE_CHECKING:
    from tace.common.config import RunConfig
    from tace.common.encoders import Encoders
    from tace.common.models import StudyModels

#: 2: the radiomics model, and DLTRMLP reads the radiomics features (encoders for clinical factors and radiomics).
#: 3 (TACE-FL 0.2): preprocessing pipeline 3 (each phase against the liver around the tumour).
FORMAT = "tace-model/3"
FILENAME = "tace-model.zip"
CARD_MEMBER = "model_card.json"
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
    source: str = ""  # the run it came from (its folder name), for the record
    training: dict[str, Any] = field(default_factory=dict)  # run-config keys local fine-tuning starts from (lr, head-lr, ...)
    privacy: dict[str, Any] = field(default_factory=dict)  # dp, dp-mode, dp-target-epsilon, secagg of the run, or a note
    cutoffs_note: str = CUTOFFS_NOTE
    version: str = ""  # the TACE-FL version that wrote it (set by `read_model`)
    signature: str = ""  # its model signature (set by `read_model`)
    model_card: dict[str, Any] = field(default_factory=dict)  # the run's model card, once its analysis packed it (`read_model`)

    @classmethod
    def of_run(
        cls, run: RunConfig, arrays: dict[str, Arrays], backbone: str, encoder: dict[str, Any], cutoffs: dict[str, Any], source: str
    ) -> ModelArtefact:
        """The models a run trained, with the run's preprocessing, score grid, training and privacy settings."""
        config = run.to_run_config()
        return cls(arrays, backbone, run.preprocess, encoder, cutoffs, run.analysis_bins, source,
                   {k: config[k] for k in TRAINING_KEYS}, {k: config[k] for k in PRIVACY_KEYS})  # fmt: skip


def _digest(arrays: dict[str, Arrays]) -> str:
    h = hashlib.sha256()
    for stage in DIGEST_ORDER:
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


def write_model(path: Path, model: ModelArtefact) -> Path:
    """Write the model file atomically (with this TACE-FL version and the model's signature); returns its path."""
    from tace.common.cli import version_string
    from tace.common.clinical import FEATURES
    from tace.common.models import fusion_form, model_signature

    m, arrays = model, model.arrays
    card: dict[str, Any] = {
        "format": FORMAT, "tace_fl_version": version_string(), "backbone": m.backbone,
        "model_signature": model_signature((m.backbone,), len(m.preprocess.sequences), len(FEATURES), fusion_form(arrays["head"])),
        "preprocessing": {**m.preprocess.to_dict(), "pipeline_version": PIPELINE_VERSION}, "clinical_features": list(FEATURES),
        "encoders": m.encoder, "cutoffs": m.cutoffs, "cutoffs_note": m.cutoffs_note, "score_bins": int(m.bins),
        "source_run": m.source, "training": m.training, "privacy": m.privacy,
        "outputs": "probability of objective response (mRECIST CR/PR) from DLTRMLP, DLTR, the radiomics and the clinical model",
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
    from tace.common.models import BACKBONES, fusion_form, model_signature

    path = locate(path)
    try:
        with zipfile.ZipFile(path) as z:
            card = json.loads(z.read("model.json").decode("utf-8"))
            with np.load(io.BytesIO(z.read("weights.npz")), allow_pickle=False) as npz:
                flat = {k: npz[k] for k in npz.files}
            model_card = z.read(CARD_MEMBER) if CARD_MEMBER in z.namelist() else None
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
    if (
        _card_digest(card, arrays) != card.get("sha256")
        or (model_card is not None) != ("model_card_sha256" in card)
        or (model_card is not None and hashlib.sha256(model_card).hexdigest() != card["model_card_sha256"])
    ):
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
        ours = model_signature((backbone,), len(preprocess.sequences), len(FEATURES), fusion_form(arrays["head"]))
        if card["model_signature"] != ours:
            raise TaceError(f"{path} was made by TACE-FL {made_by}, whose {backbone} model differs from this version's "
                            f"({version_string()}; signature {card['model_signature']} vs {ours})", f"install TACE-FL {made_by} to use it")  # fmt: skip
        return ModelArtefact(arrays, backbone, preprocess, dict(card["encoders"]), dict(card["cutoffs"]), int(card["score_bins"]),
                             str(card["source_run"]), dict(card["training"]), dict(card["privacy"]), str(card["cutoffs_note"]),
                             str(made_by), ours, dict(json.loads(model_card)) if model_card is not None else {})  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise TaceError(f"{path}: model.json lacks or garbles a field ({type(exc).__name__}: {exc})",
                        "the file is not one TACE-FL wrote; copy the run's model file again") from None  # fmt: skip


def attach_model_card(path: Path, model_card: dict[str, Any]) -> Path:
    """Pack `model_card` (the run's model card, written by its analysis) into the model file at `path`, replacing one
    packed before; model.json records the card's SHA-256 and its digest is renewed, so the card is covered as the
    weights are. Neither the weights nor any setting change. Atomic; needs numpy only (the analysis never loads torch)."""
    try:
        with zipfile.ZipFile(path) as z:
            card = json.loads(z.read("model.json").decode("utf-8"))
            weights = z.read("weights.npz")
            with np.load(io.BytesIO(weights), allow_pickle=False) as npz:
                flat = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, KeyError, OSError, ValueError, UnicodeDecodeError):
        raise TaceError(f"{path} is not a TACE-FL model file, or it is damaged", "rerun the study to write it again") from None
    arrays: dict[str, Arrays] = {s: {} for s in STAGES}
    for key, value in flat.items():
        stage, _, name = key.partition(".")
        arrays.setdefault(stage, {})[name] = value
    if _card_digest(card, arrays) != card.get("sha256"):
        raise TaceError(f"{path}: its content does not match the digest recorded with it", "rerun the study to write it again")
    body = json.dumps(model_card, indent=2, sort_keys=True).encode("utf-8")
    card["model_card_sha256"] = hashlib.sha256(body).hexdigest()
    card["sha256"] = _card_digest(card, arrays)
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("model.json", json.dumps(card, indent=2))
        z.writestr("weights.npz", weights)
        z.writestr(CARD_MEMBER, body)
    tmp.replace(path)
    return path


@dataclass
class TrainedModels:
    """A model file loaded for use: the three models built and loaded, the clinical standardisation, and how they
    were made (preprocessing, the cut-offs fixed on the training sites, version, training and privacy settings)."""

    models: StudyModels
    encoder: Encoders
    preprocess: PreprocessConfig
    path: Path
    cutoffs: dict[str, Any] = field(default_factory=dict)
    bins: int = 100_000
    backbone: str = "small"
    version: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    privacy: dict[str, Any] = field(default_factory=dict)
    cutoffs_note: str = ""
    model_card: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | str) -> TrainedModels:
        """From a model file (tace-model.zip) or a finished run folder; an incompatible file is a clear error."""
        from tace.common.clinical import FEATURES
        from tace.common.encoders import Encoders
        from tace.common.models import StudyModels, fusion_form

        art = read_model(path)
        models = StudyModels.build(art.backbone, len(art.preprocess.sequences), len(FEATURES), fusion_head=fusion_form(art.arrays["head"]))
        models.load(art.arrays)
        return cls(models, Encoders.from_dict(art.encoder), art.preprocess, locate(path), art.cutoffs, art.bins, art.backbone,
                   art.version, art.training, art.source, art.privacy, art.cutoffs_note, art.model_card)  # fmt: skip

    def artefact(self) -> ModelArtefact:
        """What a model file of these models holds (for a derived file, e.g. fine-tuned at a site)."""
        return ModelArtefact(self.models.arrays(), self.backbone, self.preprocess, self.encoder.to_dict(), self.cutoffs, self.bins,
                             self.source, self.training, self.privacy, self.cutoffs_note)  # fmt: skip


def save_run_models(folder: Path, model: ModelArtefact) -> None:
    """A run's ``models/`` folder: the model file hospitals predict with (`FILENAME`), the state dicts (``.pt``), the
    portable programs (``.pt2``, loadable with ``torch.export.load`` without TACE-FL) and ``model.json``."""
    import torch

    from tace.common.clinical import FEATURES
    from tace.common.models import StudyModels, fusion_form, radiomics_dim
    from tace.common.radiomics import model_feature_names
    from tace.common.serialize import write_json

    write_model(folder / FILENAME, model)
    in_channels, shape = len(model.preprocess.sequences), model.preprocess.shape
    models = StudyModels.build(model.backbone, in_channels, len(FEATURES), fusion_head=fusion_form(model.arrays["head"]))
    models.load(model.arrays)
    for name in STAGES:
        torch.save(models.module(name).state_dict(), folder / f"{name}.pt")
    exports = _exportable(models.dltr.eval(), models.head.eval())
    batch = torch.export.Dim("batch", min=1, max=4096)
    image = torch.zeros(2, *shape)
    clin = torch.zeros(2, len(FEATURES))
    radiomics = torch.zeros(2, radiomics_dim(in_channels))
    for name, module, inputs in (("dltr", exports[0], (image,)), ("dltrmlp", exports[1], (image, clin, radiomics)),
                                 ("clinical", exports[2](models.clinical.eval()), (clin,)),
                                 ("radiomics", exports[2](models.radiomics.eval()), (radiomics,))):  # fmt: skip
        program = torch.export.export(module, inputs, dynamic_shapes=tuple({0: batch} for _ in inputs))
        torch.export.save(program, folder / f"{name}.pt2")
    write_json(folder / "model.json", {
        "backbone": model.backbone, "in_channels": in_channels, "input_shape": list(shape), "clinical_features": list(FEATURES),
        "radiomics_features": model_feature_names(model.preprocess.sequences),
        "outputs": "probability of objective response (mRECIST CR/PR)",
        "portable": {"dltr.pt2": "image (B, C, D, H, W) -> p",
                     "dltrmlp.pt2": "image, clinical (B, K) standardised, radiomics (B, R) standardised -> p",
                     "clinical.pt2": "clinical (B, K) standardised -> p", "radiomics.pt2": "radiomics (B, R) standardised -> p"},
        "encoders": model.encoder,
    })  # fmt: skip


def _exportable(dltr: Any, head: Any) -> tuple[Any, Any, Any]:
    """DLTR, DLTRMLP and a maker of the tabular models' modules, from inputs to probabilities, for `torch.export`."""
    import torch

    class Image(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dltr = dltr

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.dltr(x))

    class Fusion(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dltr, self.head = dltr, head

        def forward(self, x: torch.Tensor, c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.head(self.dltr.features(x), c, r))

    class Tabular(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, c: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.model(c))

    return Image(), Fusion(), Tabular
