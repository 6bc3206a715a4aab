"""The study's models: DLTR (3D CNN backbones), the DLTRMLP fusion head (an MLP, or a linear head under noise), and
the clinical and radiomics models.

Every model uses GroupNorm (never BatchNorm: FedAvg averages BatchNorm statistics badly and Opacus cannot train
it) and non-in-place activations and residual additions, so differential privacy can wrap the same modules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn

from tace.common.protocol import DIGEST_ORDER, FUSION_HEADS, STAGES, Arrays

BACKBONES = ("small", "resnet10", "resnet18", "densenet121")


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups (a divisor of `channels`)."""
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def _conv_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False), group_norm(cout), nn.ReLU(inplace=False))


class SmallNet(nn.Module):
    """A CPU-friendly 3D CNN: four stages of two 3x3x3 convolutions (the first strided), global average pool."""

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for w in widths:
            layers += [_conv_block(cin, w, 2), _conv_block(w, w, 1)]
            cin = w
        self.body = nn.Sequential(*layers)
        self.out_features = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3, 4))


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm and an out-of-place residual add.

    Written here rather than taken from MONAI because MONAI 1.6's `resnet*(norm=...)` keeps BatchNorm in the
    residual blocks and adds the residual in place, which Opacus' hooks reject.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = group_norm(cout)
        self.act = nn.ReLU(inplace=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), group_norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet3D(nn.Module):
    """3D ResNet-10/18 (layers per stage (1,1,1,1) / (2,2,2,2)); a strided 3x3x3 stem instead of 7x7x7 (CPU cost)."""

    def __init__(self, in_channels: int, blocks: tuple[int, int, int, int], widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        self.stem = _conv_block(in_channels, widths[0], 2)
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            for j in range(n):
                stages.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.stages = nn.Sequential(*stages)
        self.out_features = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3, 4))


class DenseNetFeatures(nn.Module):
    """MONAI's DenseNet121 feature extractor with GroupNorm and non-in-place ReLU, then global average pool."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        from monai.networks.nets import DenseNet121

        net = DenseNet121(
            spatial_dims=3, in_channels=in_channels, out_channels=1, norm=("group", {"num_groups": 8}), act=("relu", {"inplace": False})
        )
        self.features = net.features
        self.act = nn.ReLU(inplace=False)
        self.out_features = int(cast(nn.Linear, net.class_layers.out).in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.features(x)).mean(dim=(2, 3, 4))


_FACTORIES: dict[str, Callable[[int], nn.Module]] = {
    "small": SmallNet,
    "resnet10": lambda c: ResNet3D(c, (1, 1, 1, 1)),
    "resnet18": lambda c: ResNet3D(c, (2, 2, 2, 2)),
    "densenet121": DenseNetFeatures,
}


class DLTR(nn.Module):
    """Deep-learning TACE-response model: backbone -> deep features (B, F) -> dropout -> response logit (B,).

    Parameters
    ----------
    backbone : str
        One of `BACKBONES`.
    in_channels : int
        Number of MRI sequences stacked as channels.
    dropout : float
    """

    def __init__(self, backbone: str = "small", in_channels: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        if backbone not in _FACTORIES:
            raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
        self.backbone = _FACTORIES[backbone](in_channels)
        self.feature_dim = int(self.backbone.out_features)  # type: ignore[arg-type]
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.feature_dim, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Deep features ``(B, F)`` of images ``(B, C, D, H, W)``."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x))).squeeze(-1)


class FusionHead(nn.Module):
    """DLTRMLP's head: [layer-normalised deep features, standardised clinical factors, standardised radiomics
    features] -> MLP -> logit (B,)."""

    def __init__(self, feature_dim: int, clinical_dim: int, radiomics_dim: int = 0, hidden: int = 32, dropout: float = 0.2) -> None:
        super().__init__()
        self.radiomics_dim = radiomics_dim
        self.feature_norm = nn.LayerNorm(feature_dim)
        self.mlp = nn.Sequential(
            nn.Linear(feature_dim + clinical_dim + radiomics_dim, hidden), nn.ReLU(inplace=False), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )

    def forward(self, features: torch.Tensor, clinical: torch.Tensor, radiomics: torch.Tensor | None = None) -> torch.Tensor:
        """Without `radiomics` every radiomics feature sits at its standardised mean (0), as for a patient whose
        features could not be computed."""
        if radiomics is None:
            radiomics = clinical.new_zeros(len(clinical), self.radiomics_dim)
        parts = [self.feature_norm(features), clinical, radiomics]
        return self.mlp(torch.cat(parts, dim=1)).squeeze(-1)


class LinearFusionHead(nn.Module):
    """DLTRMLP's head for training under noise (differential privacy): a logistic model on the logits of DLTR, the
    clinical model and the radiomics model -> logit (B,).

    The three logits come from frozen copies of the trained models' output layers (`start_fusion_head`), so the
    head trains three weights and an intercept instead of the MLP's thousands: DP-SGD's noise is the same per
    weight, and a model with four weights keeps what the three models learnt under it. The head stage therefore
    trains after the clinical and radiomics stages. The weights start at zero and drawing them uses no random
    numbers.
    """

    def __init__(self, feature_dim: int, clinical_dim: int, radiomics_dim: int = 0) -> None:
        super().__init__()
        self.radiomics_dim = radiomics_dim
        self.dltr_head = nn.utils.skip_init(nn.Linear, feature_dim, 1)
        self.clinical_head = nn.utils.skip_init(nn.Linear, clinical_dim, 1)
        self.radiomics_head = nn.utils.skip_init(nn.Linear, radiomics_dim, 1)
        self.score = nn.utils.skip_init(nn.Linear, 3, 1)
        for p in self.parameters():
            nn.init.zeros_(p)
        for copy in (self.dltr_head, self.clinical_head, self.radiomics_head):
            copy.requires_grad_(False)
        # The three logits' means (row 0) and spreads (row 1), set at the head stage's start (`start_fusion_head`).
        self.register_buffer("logit_scale", torch.stack([torch.zeros(3), torch.ones(3)]))

    def forward(self, features: torch.Tensor, clinical: torch.Tensor, radiomics: torch.Tensor | None = None) -> torch.Tensor:
        if radiomics is None:
            radiomics = clinical.new_zeros(len(clinical), self.radiomics_dim)
        logits = torch.cat([self.dltr_head(features), self.clinical_head(clinical), self.radiomics_head(radiomics)], dim=1)
        scale = cast(torch.Tensor, self.logit_scale)
        return self.score((logits - scale[0]) / scale[1]).squeeze(-1)


#: The linear head's frozen copies: its layer, the stage it copies, and that stage's output layer.
_COPIES = (("dltr_head", "dltr", "head"), ("clinical_head", "clinical", "linear"), ("radiomics_head", "radiomics", "linear"))

#: The linear head's weights that no site trains (set at the head stage's start): the aggregate keeps them as they
#: were, so neither FedAvg's rounding nor client-level DP's noise moves them.
FROZEN_HEAD_KEYS = (*(f"{layer}.{k}" for layer, _, _ in _COPIES for k in ("weight", "bias")), "logit_scale")


def fusion_form(head: Arrays) -> str:
    """The form of a DLTRMLP head's weights `head` (`FUSION_HEADS`): their names tell it."""
    return "linear" if "score.weight" in head else "mlp"


def start_fusion_head(arrays: dict[str, Arrays], logits: Mapping[str, Sequence[float]] | None = None) -> Arrays:
    """The head stage's starting weights, from every stage's current `arrays`: for the linear head, its copies of
    DLTR's, the clinical model's and the radiomics model's trained output layers; the MLP head as it is.

    `logits` gives, per stage, the mean and standard deviation of its model's logit on the pooled internal-validation
    sets; the head then reads each logit centred and on unit scale, so that its three weights start alike (the
    clinical model's logit spreads some five times as wide as the radiomics model's, and under DP-SGD's noise the
    head otherwise leans on the widest). A stage without them (or with a spread of 0) is read as it is. The scale
    is kept beside the copies (`LinearFusionHead.logit_scale`), not folded into them: weights of 1/spread would not
    fit secure aggregation's range.
    """
    head = arrays["head"]
    if fusion_form(head) != "linear":
        return head
    out = dict(head)
    scale = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=np.float32)
    for i, (layer, stage, source) in enumerate(_COPIES):
        out[f"{layer}.weight"], out[f"{layer}.bias"] = (
            np.array(arrays[stage][f"{source}.weight"]),
            np.array(arrays[stage][f"{source}.bias"]),
        )
        moments = tuple((logits or {}).get(stage, ()))
        if len(moments) == 2 and moments[1] > 1e-6:
            scale[:, i] = moments
    out["logit_scale"] = scale
    return out


class ClinicalModel(nn.Module):
    """Logistic regression on standardised tabular inputs (the clinical factors; the radiomics model is one too):
    logit (B,)."""

    def __init__(self, clinical_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(clinical_dim, 1)

    def forward(self, clinical: torch.Tensor) -> torch.Tensor:
        return self.linear(clinical).squeeze(-1)


def radiomics_dim(in_channels: int) -> int:
    """How many radiomics features the models read for `in_channels` phases (`tace.common.radiomics`)."""
    from tace.common.radiomics import model_feature_index

    return len(model_feature_index(in_channels))


def state_dict_numpy(module: nn.Module) -> Arrays:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def load_numpy(module: nn.Module, arrays: Arrays) -> None:
    """Load weights given as numpy arrays; names and shapes must match exactly."""
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, strict=True)


@dataclass
class StudyModels:
    """The study's models: DLTR, the DLTRMLP fusion head (on DLTR's features, the clinical factors and the radiomics
    features), the clinical model, and the radiomics model (logistic regression on the radiomics features)."""

    dltr: DLTR
    head: FusionHead | LinearFusionHead
    clinical: ClinicalModel
    radiomics: ClinicalModel

    @classmethod
    def build(cls, backbone: str, in_channels: int, clinical_dim: int, seed: int = 0, fusion_head: str = "mlp") -> StudyModels:
        """The models for `backbone`, with DLTRMLP's head in the form `fusion_head` (`FUSION_HEADS`)."""
        if fusion_head not in FUSION_HEADS:
            raise ValueError(f"unknown fusion head {fusion_head!r}; valid: {', '.join(FUSION_HEADS)}")
        torch.manual_seed(seed)
        dltr = DLTR(backbone, in_channels=in_channels)
        n_radiomics = radiomics_dim(in_channels)
        # The MLP head is drawn in both forms, so the models after it start from the same weights (paired comparisons).
        head: FusionHead | LinearFusionHead = FusionHead(dltr.feature_dim, clinical_dim, n_radiomics)
        if fusion_head == "linear":
            head = LinearFusionHead(dltr.feature_dim, clinical_dim, n_radiomics)
        return cls(dltr, head, ClinicalModel(clinical_dim), ClinicalModel(n_radiomics))

    def module(self, stage: str) -> nn.Module:
        """The model a stage trains (`tace.common.protocol.STAGES`)."""
        if stage not in STAGES:
            raise KeyError(f"no stage {stage!r}")
        return cast(nn.Module, getattr(self, stage))

    def arrays(self) -> dict[str, Arrays]:
        return {stage: state_dict_numpy(self.module(stage)) for stage in STAGES}

    def load(self, arrays: dict[str, Arrays]) -> None:
        for stage, values in arrays.items():
            load_numpy(self.module(stage), values)


def model_signature(backbones: tuple[str, ...], in_channels: int, clinical_dim: int, fusion_head: str = "mlp") -> str:
    """A short digest of the three models' parameter names, shapes and types for the given backbones.

    Coordinator and sites compare it before training: a site whose TACE-FL builds different models (another
    version, a modified definition) is told so before any weights are exchanged.
    """
    import hashlib

    digest = hashlib.sha256()
    for backbone in backbones:
        arrays = StudyModels.build(backbone, in_channels, clinical_dim, fusion_head=fusion_head).arrays()
        for stage in DIGEST_ORDER:
            for k, v in sorted(arrays[stage].items()):
                digest.update(f"{backbone}|{stage}.{k}|{tuple(v.shape)}|{v.dtype}\n".encode())
    return digest.hexdigest()[:16]
