"""Plain training and prediction loops; they never know whether they run federated, centralised or locally.

FedProx's proximal term is an option of the loop (`proximal_mu` with the round's starting weights), because it
changes the local objective; everything else federated lives in the client and server apps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

Forward = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TrainSettings:
    """One local training call: epochs over the data, optimiser settings, FedProx term, device and seed."""

    epochs: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 8
    proximal_mu: float = 0.0
    seed: int = 0
    device: str = "cpu"
    amp: bool = True


@dataclass(frozen=True)
class TrainResult:
    """Mean training loss, training samples (the FedAvg weight), samples processed over all epochs, wall time,
    optimiser steps."""

    loss: float
    num_examples: int
    samples_seen: int
    seconds: float
    steps: int = 0

    @property
    def samples_per_second(self) -> float:
        return self.samples_seen / self.seconds if self.seconds > 0 else 0.0


class PrivateTraining(Protocol):
    """Differentially private training in place of `fit` (`tace.common.privacy.DPSettings` is one): this module
    hands it the model, the items and the forward pass, and never needs to know how DP-SGD works."""

    def fit(self, model: nn.Module, dataset: Dataset[Any], forward: Forward, settings: TrainSettings) -> TrainResult: ...


def select_device(preference: str = "auto") -> str:
    """'cuda' when asked for ('auto' or 'cuda[:i]') and available, else 'cpu'."""
    if preference == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return preference if preference.startswith("cuda") else "cuda"
    return "cpu"


def _autocast(device: str, amp: bool) -> Any:
    if amp and device.startswith("cuda"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)


def _proximal(model: nn.Module, reference: Sequence[torch.Tensor] | None, mu: float) -> torch.Tensor | float:
    if not mu or reference is None:
        return 0.0
    return (mu / 2) * sum(((p - r) ** 2).sum() for p, r in zip(model.parameters(), reference, strict=True))


def fit(
    model: nn.Module,
    batches: Callable[[int], Any],
    forward: Forward,
    num_examples: int,
    settings: TrainSettings,
) -> TrainResult:
    """Minimise binary cross-entropy with AdamW for `settings.epochs` passes.

    Parameters
    ----------
    batches : callable
        ``batches(epoch)`` returns an iterable of batches for that epoch.
    forward : callable
        ``forward(model, batch) -> (logits (B,), labels (B,))`` on the training device.
    num_examples : int
        Training samples (FedAvg's weight: samples, not batches).
    """
    torch.manual_seed(settings.seed)
    model.to(settings.device).train()
    reference = [p.detach().clone() for p in model.parameters()] if settings.proximal_mu else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    total, count, steps = 0.0, 0, 0
    start = time.perf_counter()
    for epoch in range(settings.epochs):
        for batch in batches(epoch):
            steps += 1
            optimiser.zero_grad(set_to_none=True)
            with _autocast(settings.device, settings.amp):
                logits, labels = forward(model, batch)
                loss = loss_fn(logits.float(), labels)
            objective = loss + _proximal(model, reference, settings.proximal_mu)
            objective.backward()
            optimiser.step()
            total += float(loss.detach()) * len(labels)
            count += len(labels)
    seconds = time.perf_counter() - start
    return TrainResult(loss=total / max(count, 1), num_examples=num_examples, samples_seen=count, seconds=seconds, steps=steps)


def image_loader(dataset: Dataset[Any], batch_size: int, shuffle: bool, seed: int) -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0, drop_last=False)


def train_image_model(model: nn.Module, dataset: Dataset[Any], settings: TrainSettings, dp: PrivateTraining | None = None) -> TrainResult:
    """Train DLTR on a dataset of ``{"image", "label"}`` items (unlabelled items must be excluded beforehand); with
    `dp` (a `tace.common.privacy.DPSettings`), by DP-SGD."""

    def batches(epoch: int) -> DataLoader[Any]:
        return image_loader(dataset, settings.batch_size, shuffle=True, seed=settings.seed * 1000 + epoch)

    def forward(m: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return m(batch["image"].to(settings.device)), batch["label"].to(settings.device)

    if dp is not None:
        return dp.fit(model, dataset, forward, settings)
    return fit(model, batches, forward, len(dataset), settings)  # type: ignore[arg-type]


def train_tabular_model(
    model: nn.Module, inputs: Sequence[torch.Tensor], labels: torch.Tensor, settings: TrainSettings, dp: PrivateTraining | None = None
) -> TrainResult:
    """Train a model on in-memory tensors (the fusion head on deep features + clinical, or the clinical model); with
    `dp` (a `tace.common.privacy.DPSettings`), by DP-SGD."""
    n = len(labels)
    if dp is not None:
        from torch.utils.data import TensorDataset

        def forward_dp(m: nn.Module, batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            *xs, y = batch
            return m(*[x.to(settings.device) for x in xs]), y.to(settings.device)

        return dp.fit(model, TensorDataset(*inputs, labels), forward_dp, settings)

    def batches(epoch: int) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        g = torch.Generator().manual_seed(settings.seed * 1000 + epoch)
        order = torch.randperm(n, generator=g)
        return [
            ([x[order[i : i + settings.batch_size]] for x in inputs], labels[order[i : i + settings.batch_size]])
            for i in range(0, n, settings.batch_size)
        ]

    def forward(m: nn.Module, batch: tuple[list[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, y = batch
        return m(*[x.to(settings.device) for x in xs]), y.to(settings.device)

    return fit(model, batches, forward, n, settings)


@torch.no_grad()
def predict_images(
    model: nn.Module, dataset: Dataset[Any], batch_size: int = 16, device: str = "cpu", amp: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """DLTR probabilities ``(N,)`` and deep features ``(N, F)`` for every item, in dataset order (no augmentation)."""
    model.to(device).eval()
    probs, feats = [], []
    for batch in image_loader(dataset, batch_size, shuffle=False, seed=0):
        with _autocast(device, amp):
            features = model.features(batch["image"].to(device))  # type: ignore[operator]
            logits = model.head(features).squeeze(-1)  # type: ignore[operator]
        probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        feats.append(features.float().cpu().numpy())
    if not probs:
        return np.zeros(0, dtype=np.float32), np.zeros((0, int(getattr(model, "feature_dim", 0))), dtype=np.float32)
    return np.concatenate(probs), np.concatenate(feats)


@torch.no_grad()
def predict_tabular(model: nn.Module, inputs: Sequence[torch.Tensor], device: str = "cpu") -> np.ndarray:
    model.to(device).eval()
    if len(inputs[0]) == 0:
        return np.zeros(0, dtype=np.float32)
    return torch.sigmoid(model(*[x.to(device) for x in inputs]).float()).cpu().numpy()
