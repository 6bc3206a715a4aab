"""Local fine-tuning (personalisation): adapt the study's model to one site's own data, and say whether it helped.

FLamby's and NVFlare's (Ditto's) anchor: start from the global model, train on the site's training split for a
fixed number of epochs (the fusion head on frozen deep features; optionally also the last stage of the DLTR
backbone on the images), and compare the global and the fine-tuned DLTRMLP on the site's validation split, which
neither saw. The fine-tuned model stays at the site. Used by `tace-client finetune` and, in a study run with the
run-config key ``finetune``, by every training site after federation (only the two AUCs leave the site).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tace.client.task import SiteTask
from tace.common.artifact import ModelArtefact, TrainedModels, write_model
from tace.common.encoders import Encoders
from tace.common.errors import TaceError
from tace.common.metrics import auc
from tace.common.models import StudyModels
from tace.common.training import TrainResult, TrainSettings, fit, image_loader, train_tabular_model

MODES = ("head", "last-stage")
#: What a fine-tuned model file says about its cut-offs and its privacy (written into its model.json).
FINETUNED_CUTOFFS = "of the global model, fixed on the training sites: not refitted after fine-tuning at this site"
FINETUNED_PRIVACY = "fine-tuned at this site without differential privacy: keep it at the site"
DEFAULT_EPOCHS = {"head": 20, "last-stage": 5}


@dataclass
class FinetuneResult:
    """Global vs fine-tuned DLTRMLP AUC on the site's validation split (None when it holds one class)."""

    site: str
    mode: str
    epochs: int
    lr: float
    n_train: int
    n_val: int
    global_auc: float | None
    finetuned_auc: float | None
    seconds: float
    models: StudyModels | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("site", "mode", "epochs", "lr", "n_train", "n_val", "global_auc", "finetuned_auc", "seconds")}


class _Fusion(nn.Module):
    """DLTRMLP end to end (image, clinical factors and radiomics features to the logit), to train the backbone's last
    stage with the head."""

    def __init__(self, models: StudyModels) -> None:
        super().__init__()
        self.dltr, self.head = models.dltr, models.head

    def forward(self, x: torch.Tensor, clinical: torch.Tensor, radiomics: torch.Tensor) -> torch.Tensor:
        return self.head(self.dltr.features(x), clinical, radiomics)


def _last_stage(backbone: str) -> str:
    from tace.common.saliency import CAM_LAYERS

    return CAM_LAYERS[backbone].removeprefix("dltr.") + "."


def finetune(
    task: SiteTask, models: StudyModels, encoder: Encoders, backbone: str, mode: str = "head", epochs: int = 0, lr: float = 0.0,
    seed: int = 0,
) -> FinetuneResult:  # fmt: skip
    """Fine-tune a copy of `models` on `task`'s training split and evaluate both on its validation split.

    `epochs` and `lr` default (0) to `DEFAULT_EPOCHS` and the run's head-lr (head) or lr (last stage).
    """
    if mode not in MODES:
        raise TaceError(f"fine-tuning mode must be one of {', '.join(MODES)}, not {mode!r}")
    task.require_enough_patients()
    train, val = task.train_records, task.eval_records
    if not val:
        raise TaceError(f"site {task.site.site_id} has no labelled patients in its val split to compare the models on",
                        "give the site's manifest a val split with responses")  # fmt: skip
    epochs = epochs or DEFAULT_EPOCHS[mode]
    lr = lr or (task.run.head_lr if mode == "head" else task.run.lr)
    start = time.perf_counter()
    y_val = np.array([r.response for r in val], dtype=float)
    global_auc = auc(y_val, task.predict(models, encoder, ("dltrmlp",), val)["dltrmlp"])
    tuned = copy.deepcopy(models)
    labels = torch.tensor([float(r.response) for r in train], dtype=torch.float32)  # type: ignore[arg-type]
    settings = TrainSettings(epochs=epochs, lr=lr, weight_decay=task.run.weight_decay, batch_size=32 if mode == "head" else task.run.batch_size,
                             seed=seed, device=task.device, amp=task.run.amp)  # fmt: skip
    _, clinical, radiomics = task.tabular_inputs("head", tuned, encoder, train)
    if mode == "head":
        train_tabular_model(tuned.head, task.tabular_inputs("head", tuned, encoder, train), labels, settings)
    else:
        _train_last_stage(task, tuned, backbone, (clinical, radiomics), settings)
    finetuned_auc = auc(y_val, task.predict(tuned, encoder, ("dltrmlp",), val)["dltrmlp"])
    return FinetuneResult(task.site.site_id, mode, epochs, lr, len(train), len(val), global_auc, finetuned_auc,
                          time.perf_counter() - start, tuned)  # fmt: skip


def _train_last_stage(
    task: SiteTask, models: StudyModels, backbone: str, tabular: tuple[torch.Tensor, torch.Tensor], settings: TrainSettings
) -> TrainResult:
    """Train the backbone's last stage and the head together on the images; everything else stays frozen."""
    prefix = _last_stage(backbone)
    for name, p in models.dltr.named_parameters():
        p.requires_grad_(name.startswith(prefix))
    model = _Fusion(models)
    records = task.train_records
    dataset = task.dataset(records, augment=task.run.augment, seed=settings.seed)

    def batches(epoch: int) -> Any:
        return image_loader(dataset, settings.batch_size, shuffle=True, seed=settings.seed * 1000 + epoch)

    def forward(m: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        x, index = batch["image"].to(settings.device), batch["index"]
        clinical, radiomics = (t[index].to(settings.device) for t in tabular)
        return m(x, clinical, radiomics), batch["label"].to(settings.device)

    try:
        return fit(model, batches, forward, len(records), settings)
    finally:
        for p in models.dltr.parameters():
            p.requires_grad_(True)


@dataclass(frozen=True)
class FinetuneOptions:
    """How `tace-client finetune` adapts the model: `mode` 'head' or 'last-stage'; `epochs` and `lr` 0 for the
    defaults (`DEFAULT_EPOCHS`; the study's head-lr, or its lr for the last stage); the seed; the device."""

    mode: str = "head"
    epochs: int = 0
    lr: float = 0.0
    seed: int = 0
    device: str = "auto"


def finetune_site(trained: TrainedModels, manifest: Path, out: Path, cache_dir: Path, options: FinetuneOptions) -> FinetuneResult:
    """`tace-client finetune`: fine-tune an exported model on a site's manifest; writes OUT/finetune.json and
    OUT/tace-model-finetuned.zip (cut-offs: the global model's, fixed on the training sites)."""
    from tace.common.config import RunConfig, SiteConfig
    from tace.common.serialize import write_json

    pre = trained.preprocess
    run = RunConfig.from_run_config({
        "spacing-mm": ",".join(f"{v:g}" for v in pre.spacing_mm), "box-voxels": ",".join(str(v) for v in pre.box_voxels),
        "sequences": ",".join(pre.sequences), "large-tumour": pre.large_tumour, "intensity-reference": pre.intensity_reference,
        "device": options.device, **trained.training,
    })  # fmt: skip
    site = SiteConfig("local", Path(manifest), Path(cache_dir), Path(out))
    task = SiteTask(site, run, "train", validate=False)
    o = options
    result = finetune(task, trained.models, trained.encoder, trained.backbone, o.mode, o.epochs, o.lr, o.seed)
    write_json(Path(out) / "finetune.json", {**result.to_dict(), "model": str(trained.path), "manifest": str(manifest)})
    save_finetuned(
        Path(out) / "tace-model-finetuned.zip", result, trained.artefact(), f"{trained.path.name} fine-tuned ({result.mode}) at this site"
    )
    return result


def save_finetuned(path: Path, result: FinetuneResult, base: ModelArtefact, source: str) -> Path:
    """The fine-tuned models as a model file that says what they are: derived from `base` (the global model, whose
    cut-offs are kept, not refitted), fine-tuned without differential privacy."""
    assert result.models is not None
    model = dataclasses.replace(base, arrays=result.models.arrays(), source=source, privacy={"note": FINETUNED_PRIVACY},
                                cutoffs_note=FINETUNED_CUTOFFS)  # fmt: skip
    return write_model(path, model)
