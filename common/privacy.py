"""Differential privacy of local training: DP-SGD with Opacus and the RDP accounting of what a run has spent.

`dp_fit` is the training loop of `tace.common.training.fit` with per-sample gradient clipping, Gaussian noise and
Poisson sampling (Opacus' `GradSampleModule` and `DPOptimizer` on the caller's own module, so the weights keep
their names); `DPSettings.fit` hands it to `tace.common.training`'s loops, which take it in place of their plain
loop without knowing DP-SGD. The accounting functions work on a *history* of ``(noise multiplier, sample rate, steps)`` entries,
the form Opacus' RDP accountant keeps, so a site can store it between rounds and a coordinator can replay it.

Privacy argument, in short: the mechanism's randomness (which patients a step samples, and the noise) is drawn
from the site's own entropy, never from the run seed the coordinator sends; a coordinator that knew it could
subtract the noise. The run seed still drives augmentation and dropout, which are part of the per-patient
gradient function and need no secrecy.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tace.common.errors import ConfigError
from tace.common.training import Forward, TrainResult, TrainSettings

#: RDP orders: Opacus' defaults and larger ones, which strong privacy (much noise, few steps) needs for a tight bound.
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [80, 96, 128, 160, 192, 256, 384, 512]


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD settings of one local training call.

    Parameters
    ----------
    noise_multiplier : float
        Gaussian noise standard deviation as a multiple of `max_grad_norm`.
    max_grad_norm : float
        Per-patient gradient clipping norm (L2 over all trainable parameters).
    sample_rate : float
        Poisson sampling probability of each patient per step (1 / steps per epoch).
    secure_rng : bool
        Reseed the noise generator from the operating system's CSPRNG before every step and draw the noise in
        Opacus' secure mode (robust to the floating-point attack on Gaussian sampling).
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    secure_rng: bool = False

    def fit(self, model: nn.Module, dataset: Dataset[Any], forward: Forward, settings: TrainSettings) -> TrainResult:
        """`dp_fit` with these settings (`tace.common.training.PrivateTraining`)."""
        return dp_fit(model, dataset, forward, settings, self)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """DP-SGD steps in one epoch over `n` patients: as many as non-private batches (Opacus' convention)."""
    return max(1, math.ceil(n / batch_size))


def sample_rate(n: int, batch_size: int) -> float:
    """Poisson sampling rate giving an expected batch of about `batch_size` patients."""
    return 1.0 / steps_per_epoch(n, batch_size)


def epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε at `delta` of the composition of every entry of `history` (Opacus' RDP accountant); 0 when empty."""
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(k)) for s, q, k in history]
    with warnings.catch_warnings():
        # At the edge of the orders the bound is still valid, only looser (conservative): nothing to warn a site about.
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha", category=UserWarning)
        return float(accountant.get_epsilon(delta=delta, alphas=ORDERS))


def calibrate_noise(
    plan: Sequence[tuple[float, int]], target_epsilon: float, delta: float, spent: Sequence[tuple[float, float, int]] = ()
) -> float:
    """The smallest noise multiplier (within 0.5 %) for which `spent` plus every planned ``(sample rate, steps)``
    stays within `target_epsilon` at `delta`.

    Raises `ConfigError` when no reasonable noise fits (the budget is already spent or far too small).
    """
    planned = [(q, int(k)) for q, k in plan if k > 0]
    if not planned:
        return 1.0

    def eps(sigma: float) -> float:
        return epsilon([*spent, *((sigma, q, k) for q, k in planned)], delta)

    low, high = 0.3, 200.0
    if eps(high) > target_epsilon:
        raise ConfigError(
            f"no noise multiplier up to {high:g} keeps the planned training within dp-target-epsilon {target_epsilon:g} (δ {delta:.3g})",
            "raise dp-target-epsilon, or plan fewer rounds and local epochs",
        )
    if eps(low) <= target_epsilon:
        return low
    while high / low > 1.005:
        mid = math.sqrt(low * high)
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


def conv3d_grad_sample(layer: nn.Conv3d, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[Any, torch.Tensor]:
    """Per-sample gradients of a 3D convolution as one grouped convolution over the batch (each sample its own
    group), instead of Opacus' unfold of every 3x3x3 neighbourhood, which dominates DP-SGD's cost on 3D CNNs.

    Registered for `nn.Conv3d` with Opacus by `use_fast_conv3d`; tests compare it with Opacus' own sampler.
    """
    from opacus.grad_sample.conv import compute_conv_grad_sample

    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    if n == 0 or isinstance(layer.padding, str):
        return dict(compute_conv_grad_sample(layer, activations, backprops))
    out: dict[Any, torch.Tensor] = {}
    if layer.weight.requires_grad:
        cin, cout, groups = layer.in_channels, layer.out_channels, layer.groups
        from torch.nn.grad import conv3d_weight

        grad = conv3d_weight(
            x.reshape(1, n * cin, *x.shape[2:]), (n * cout, cin // groups, *layer.kernel_size), backprops.reshape(1, n * cout, *backprops.shape[2:]),
            stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=n * groups,
        )  # fmt: skip
        out[layer.weight] = grad.view(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=(2, 3, 4))
    return out


def use_fast_conv3d() -> None:
    """Make Opacus compute 3D convolutions' per-sample gradients with `conv3d_grad_sample` (idempotent)."""
    from opacus import GradSampleModule

    GradSampleModule.GRAD_SAMPLERS[nn.Conv3d] = conv3d_grad_sample


def poisson_loader(dataset: Dataset[Any], rate: float, steps: int, generator: torch.Generator) -> DataLoader[Any]:
    """`steps` batches, each holding every item independently with probability `rate`; an empty batch is None."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    from torch.utils.data import default_collate

    def collate(items: list[Any]) -> Any:
        return default_collate(items) if items else None

    sampler = UniformWithReplacementSampler(num_samples=len(dataset), sample_rate=rate, generator=generator, steps=steps)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=0)


def _entropy_seed() -> int:
    return secrets.randbits(63)


def dp_fit(model: nn.Module, dataset: Dataset[Any], forward: Forward, settings: TrainSettings, dp: DPSettings) -> TrainResult:
    """DP-SGD: minimise binary cross-entropy with AdamW for `settings.epochs` passes of Poisson-sampled steps.

    Every step clips each patient's gradient to `dp.max_grad_norm`, sums, adds Gaussian noise of standard deviation
    ``noise_multiplier x max_grad_norm`` and divides by the expected batch size; a step whose Poisson batch is
    empty still adds the noise (skipping it would reveal that the batch was empty). FedProx's proximal gradient,
    which does not depend on the data, is added after the noise. Runs in float32 (no autocast: Opacus' per-sample
    gradient hooks are not validated under mixed precision).

    Returns
    -------
    TrainResult whose `steps` is the number of noisy steps taken (what the accountant must record).
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    use_fast_conv3d()
    n = len(dataset)  # type: ignore[arg-type]
    steps = round(1 / dp.sample_rate)
    torch.manual_seed(settings.seed)  # dropout and augmentation: the run's seed
    model.to(settings.device).train()
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    params = [p for p in model.parameters() if p.requires_grad]
    reference = [p.detach().clone() for p in params] if settings.proximal_mu else None
    optimiser = DPOptimizer(
        torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay),
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=max(1, round(dp.sample_rate * n)),
        loss_reduction="mean",
        generator=torch.Generator(device=settings.device).manual_seed(_entropy_seed()),
        secure_mode=dp.secure_rng,
    )
    sampling = torch.Generator().manual_seed(_entropy_seed())  # the site's own entropy: see the module docstring
    loss_fn = nn.BCEWithLogitsLoss()
    total, count, taken = 0.0, 0, 0
    start = time.perf_counter()
    try:
        for _ in range(settings.epochs):
            for batch in poisson_loader(dataset, dp.sample_rate, steps, sampling):
                optimiser.zero_grad(set_to_none=True)
                if batch is None:
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)  # type: ignore[attr-defined]
                else:
                    logits, labels = forward(wrapped, batch)
                    loss = loss_fn(logits.float(), labels)
                    with warnings.catch_warnings():
                        # Opacus' hooks on the first layer, whose input (the image) needs no gradient: expected.
                        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                        loss.backward()
                    total += float(loss.detach()) * len(labels)
                    count += len(labels)
                if dp.secure_rng:
                    optimiser.generator.manual_seed(_entropy_seed())
                if optimiser.pre_step():  # clip, noise, scale: p.grad is now the private gradient
                    if reference is not None:
                        for p, r in zip(params, reference, strict=True):
                            p.grad.add_(settings.proximal_mu * (p.detach() - r))  # type: ignore[union-attr]
                    optimiser.original_optimizer.step()
                taken += 1
    finally:
        wrapped._close()  # removes the hooks and per-sample gradients: the module is plain again
    seconds = time.perf_counter() - start
    return TrainResult(loss=total / max(count, 1), num_examples=n, samples_seen=count, seconds=seconds, steps=taken)
