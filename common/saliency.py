"""What the model looked at: saliency of the DLTRMLP prediction over the tumour box (MONAI's visualisers).

Both methods explain the predicted class (the responder logit when DLTRMLP predicts response, its negative
otherwise), so the map shows what drove the decision on the patient card, with the patient's clinical factors held:

- ``gradient`` (default): the magnitude of the gradient of that logit with respect to every input voxel (MONAI's
  `VanillaGrad`), per phase, smoothed with a Gaussian of 1.5 voxels;
- ``gradcam``: Grad-CAM (MONAI's `GradCAM`) at the last convolutional stage of the backbone (`CAM_LAYERS`),
  upsampled to the box; one map for all phases.

Measured on the demo cohort's external patients (docs/prediction.md), Grad-CAM put as much of its mass in and
around the tumour as a map blind to it would (the last stage's cells each see the whole box), while the gradient
map put about twice that share there: hence the default. Maps are scaled to [0, 1] per patient.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from tace.common.models import StudyModels

#: The last convolutional stage of each backbone, named within `DLTRMLPImage` (what Grad-CAM differentiates).
CAM_LAYERS = {
    "small": "dltr.backbone.body.7",
    "resnet10": "dltr.backbone.stages.3",
    "resnet18": "dltr.backbone.stages.7",
    "densenet121": "dltr.backbone.features.denseblock4",
}


class DLTRMLPImage(nn.Module):
    """DLTRMLP as a function of the image alone (the patient's clinical factors and radiomics features held fixed),
    with two class logits ``[-z, z]`` so that Grad-CAM's "predicted class" is responder when z > 0 and
    non-responder otherwise."""

    def __init__(self, models: StudyModels, clinical: torch.Tensor, radiomics: torch.Tensor | None = None) -> None:
        super().__init__()
        self.dltr = models.dltr
        self.head = models.head
        self.clinical = clinical
        self.radiomics = radiomics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        radiomics = None if self.radiomics is None else self.radiomics.expand(len(x), -1)
        z = self.head(self.dltr.features(x), self.clinical.expand(len(x), -1), radiomics)
        return torch.stack([-z, z], dim=1)


METHODS = ("gradient", "gradcam")


class Explainer:
    """Saliency of DLTRMLP for one patient at a time, on a private copy of the models (MONAI leaves its hooks on
    the modules it explains)."""

    def __init__(self, models: StudyModels, backbone: str, device: str = "cpu", method: str = "gradient") -> None:
        from monai.visualize import GradCAM, VanillaGrad

        if method not in METHODS:
            raise ValueError(f"saliency method must be one of {', '.join(METHODS)}, not {method!r}")
        self.device = device
        self.method = method
        self.models = copy.deepcopy(models)
        for module in (self.models.dltr, self.models.head):
            module.to(device).eval()
        self.wrapper = DLTRMLPImage(self.models, torch.zeros(1, 1))
        self.explain = (
            GradCAM(nn_module=self.wrapper, target_layers=CAM_LAYERS[backbone]) if method == "gradcam" else VanillaGrad(self.wrapper)
        )

    def __call__(
        self, image: np.ndarray | torch.Tensor, clinical: np.ndarray | torch.Tensor, responder: bool | None = None,
        radiomics: np.ndarray | torch.Tensor | None = None,
    ) -> np.ndarray:  # fmt: skip
        """Saliency ``(C, D, H, W)`` (one map per phase; Grad-CAM's one map repeated) in [0, 1] for one image
        ``(C, D, H, W)``, its encoded clinical factors ``(K,)`` and radiomics features ``(R,)``, explaining
        `responder` (the group the card shows, at the study's cut-off; None: the sign of the logit). `total` sums it
        over the phases."""
        from scipy.ndimage import gaussian_filter

        self.wrapper.clinical = torch.as_tensor(clinical, dtype=torch.float32).reshape(1, -1).to(self.device)
        if radiomics is not None:
            self.wrapper.radiomics = torch.as_tensor(radiomics, dtype=torch.float32).reshape(1, -1).to(self.device)
        x = torch.as_tensor(image, dtype=torch.float32)[None].to(self.device)
        index = None if responder is None else int(responder)
        if self.method == "gradcam":
            cam = np.nan_to_num(self.explain(x, class_idx=index)[0, 0].detach().float().cpu().numpy(), nan=0.0)  # (D, H, W), in [0, 1]
            return np.repeat(cam[None], x.shape[1], axis=0)
        grad = np.abs(self.explain(x, index=index)[0].detach().float().cpu().numpy())  # (C, D, H, W)
        maps = np.stack([gaussian_filter(g, 1.5) for g in grad])
        peak = float(maps.max())
        return maps / peak if peak > 0 else maps


def total(saliency: np.ndarray) -> np.ndarray:
    """One map ``(D, H, W)`` over all phases of a saliency ``(C, D, H, W)``."""
    return saliency.sum(axis=0)


def tumour_region(mask: np.ndarray, margin_voxels: tuple[int, int, int] = (0, 0, 0)) -> tuple[slice, slice, slice]:
    """The bounding box of the tumour in a box mask ``(D, H, W)``, widened by `margin_voxels` (z, y, x) and
    clipped to the box."""
    idx = np.argwhere(mask > 0)
    if not len(idx):
        raise ValueError("the tumour mask is empty inside the box")
    lo = np.maximum(idx.min(axis=0) - np.array(margin_voxels), 0)
    hi = np.minimum(idx.max(axis=0) + 1 + np.array(margin_voxels), mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def mass_fraction(saliency: np.ndarray, region: tuple[slice, slice, slice]) -> tuple[float, float]:
    """(share of the saliency mass inside `region`, share of the volume it occupies: what chance would give)."""
    total = float(saliency.sum())
    inside = float(saliency[region].sum())
    volume = float(np.prod([s.stop - s.start for s in region]) / saliency.size)
    return (inside / total if total > 0 else float("nan")), volume
