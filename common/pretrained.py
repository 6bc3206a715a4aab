"""A run's starting weights: seeded random initialisation, or DLTR from a weights file the user supplies.

`backbone-weights = "path"` names a file on the coordinator (never downloaded): a PyTorch state dict (``.pt``,
``.pth``; read with ``weights_only=True``, so no pickled code runs), a ``.npz`` of arrays, or a TACE-FL model
file (``tace-model.zip``: start a new study from an earlier study's DLTR). Its keys may be DLTR's
(``backbone.*`` and optionally ``head.*``), the backbone's alone, or either behind a ``dltr.`` or ``module.``
prefix. Every backbone parameter must be in the file with the model's shape; anything else is refused with the
names that do not fit, before any site is contacted.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tace.common.errors import TaceError
from tace.common.protocol import Arrays

if TYPE_CHECKING:
    from tace.common.config import RunConfig
    from tace.common.models import DLTR

log = logging.getLogger(__name__)
SUFFIXES = (".pt", ".pth", ".npz", ".zip")
_PREFIXES = ("module.", "dltr.")


def initial_arrays(run: RunConfig, backbone: str | None = None) -> dict[str, Arrays]:
    """The starting weights of every stage for `backbone` (default: the run's), seeded by `run.seed`; DLTR from
    `run.backbone_weights` when it is set and `backbone` is the run's own (other `compare-backbones` candidates
    start from random initialisation)."""
    from tace.common.clinical import FEATURES
    from tace.common.models import StudyModels

    name = backbone or run.backbone
    models = StudyModels.build(name, len(run.preprocess.sequences), len(FEATURES), seed=run.seed, fusion_head=run.head_form)
    if run.backbone_weights and name == run.backbone:
        digest = load_backbone_weights(models.dltr, Path(run.backbone_weights), name)
        log.info("DLTR (%s) starts from %s (sha256 %s)", name, run.backbone_weights, digest)
    return models.arrays()


def load_backbone_weights(dltr: DLTR, path: Path, backbone: str) -> str:
    """Load `path` into `dltr` (all backbone parameters; DLTR's output layer too when the file has it) and return
    the file's SHA-256. A file that does not fit is a `TaceError` naming what differs."""
    import torch

    weights = read_weight_file(path, backbone)
    keys = _normalise(weights)
    ours = {k: tuple(v.shape) for k, v in dltr.state_dict().items()}
    fix = (f"give a weights file of the {backbone!r} backbone with {len(ours)} tensors (a TACE-FL model file or run's models/dltr.pt "
           "of the same backbone and phases, or a state dict saved from it), or set backbone to the file's architecture")  # fmt: skip
    unknown = sorted(set(keys) - set(ours))
    if unknown:
        raise TaceError(f"backbone-weights: {path} has {len(unknown)} tensors the {backbone!r} DLTR does not: {_few(unknown)}", fix)
    wrong = [f"{k} {tuple(v.shape)} (the model's {ours[k]})" for k, v in keys.items() if tuple(v.shape) != ours[k]]
    if wrong:
        raise TaceError(f"backbone-weights: {len(wrong)} tensors of {path} differ in shape from the {backbone!r} DLTR: {_few(wrong)}", fix)
    missing = sorted(k for k in ours if k.startswith("backbone.") and k not in keys)
    if missing:
        raise TaceError(f"backbone-weights: {path} lacks {len(missing)} of the {backbone!r} backbone's tensors: {_few(missing)}", fix)
    dltr.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in keys.items()}, strict=False)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_weight_file(path: Path, backbone: str) -> dict[str, np.ndarray]:
    """The named arrays of a weights file (see the module's docstring for the formats)."""
    where = "an absolute path, or relative to the folder of run_config.toml (tace-server) or the current folder (tace-sim)"
    if not path.is_file():
        raise TaceError(f"backbone-weights: {path} does not exist", f"give the path of the weights file on the coordinator: {where}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise TaceError(f"backbone-weights: {path} is not a weights file TACE-FL reads", f"give a {', '.join(SUFFIXES)} file")
    try:
        if suffix == ".zip":
            return _from_model_file(path, backbone)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        return _from_state_dict(path)
    except TaceError:
        raise
    except (OSError, ValueError, RuntimeError, zipfile.BadZipFile, EOFError) as exc:
        raise TaceError(f"backbone-weights: cannot read {path} ({type(exc).__name__}: {str(exc)[:200]})",
                        "check the file is complete (compare its size or hash with the original)") from None  # fmt: skip


def _from_model_file(path: Path, backbone: str) -> dict[str, np.ndarray]:
    from tace.common.artifact import read_model

    model = read_model(path)
    if model.backbone != backbone:
        raise TaceError(f"backbone-weights: {path} holds a {model.backbone!r} DLTR, the run's backbone is {backbone!r}",
                        f"set backbone = {model.backbone!r}, or give weights of the {backbone!r} backbone")  # fmt: skip
    return dict(model.arrays["dltr"])


def _from_state_dict(path: Path) -> dict[str, np.ndarray]:
    import torch

    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for files it refuses
        raise TaceError(f"backbone-weights: torch cannot load {path} as plain tensors ({type(exc).__name__}: {str(exc)[:200]})",
                        "save a state dict (torch.save(model.state_dict(), path)), not a whole model object") from None  # fmt: skip
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint layouts
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TaceError(f"backbone-weights: {path} is not a state dict (names to tensors)",
                        "save one with torch.save(model.state_dict(), path)")  # fmt: skip
    return {str(k): v.detach().cpu().numpy() for k, v in state.items()}


def _normalise(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """DLTR's own key names: prefixes stripped, a bare backbone's keys under ``backbone.``; counters dropped."""
    out = {}
    for key, value in weights.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key.endswith("num_batches_tracked"):
            continue
        out[key] = value
    if not any(k.startswith(("backbone.", "head.")) for k in out):
        out = {f"backbone.{k}": v for k, v in out.items()}
    return out


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
