"""What a run has completed, saved after every round so that a coordinator that dies can resume.

``progress.json`` in the run folder holds, per stage label (``dltr``, ``dltr-resnet10``, ``head``, ``clinical``),
the next round to run, the best round so far with its pooled internal-validation AUC, the early-stopping counter
and whether the stage is finished. The weights themselves are the round checkpoints
(``checkpoints/<label>/round-NNN.npz``) and the strategy's state (``strategy-round-NNN.npz``, FedAdam's moments).
Nothing else on the coordinator draws random numbers: each round's seed and learning rate are functions of the
run seed, the stage and the round number, so a resumed run repeats exactly what the uninterrupted run would do.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tace.common.errors import TaceError
from tace.common.serialize import write_json

#: 2 since TACE-FL 0.3: the head stage trains last and the stages keep their best round's logit moments.
FORMAT = 2
Arrays = dict[str, np.ndarray]


@dataclass
class StageProgress:
    next_round: int = 1
    best_round: int = 0
    best_auc: float = -1.0
    since_best: int = 0
    done: bool = False
    #: Mean and standard deviation of the model's logit over the pooled internal-validation sets at the best round
    #: (from the score histograms the sites sent; empty when unknown): the linear fusion head's scale.
    best_logit: list[float] = field(default_factory=list)


@dataclass
class Progress:
    """The resumable state of one run folder (or one leave-one-centre-out fold)."""

    path: Path
    stages: dict[str, StageProgress] = field(default_factory=dict)

    @classmethod
    def start(cls, folder: Path, resume: bool) -> Progress:
        """A fresh record, or (with `resume`) the one the interrupted run left in `folder`."""
        path = folder / "progress.json"
        if not resume or not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError("format")
            stages = {k: StageProgress(**v) for k, v in data["stages"].items()}
        except (ValueError, KeyError, TypeError):
            raise TaceError(f"{path} is damaged or from another TACE-FL version: the run cannot resume from it",
                            "start a new run (without --resume) in a new run folder") from None  # fmt: skip
        return cls(path, stages)

    @property
    def resumed(self) -> bool:
        return any(s.next_round > 1 or s.done for s in self.stages.values())

    def stage(self, label: str) -> StageProgress:
        return self.stages.setdefault(label, StageProgress())

    def save(self) -> None:
        # Atomic: a crash leaves the previous round's record, never half a file.
        write_json(self.path, {"format": FORMAT, "stages": {k: dataclasses.asdict(v) for k, v in self.stages.items()}})

    def rounds_done(self) -> dict[str, int]:
        return {label: s.next_round - 1 for label, s in self.stages.items() if s.next_round > 1}


def load_arrays(path: Path) -> Arrays:
    if not path.exists():
        raise TaceError(f"the checkpoint {path} that progress.json refers to is missing",
                        "the run folder is incomplete; start a new run without --resume")  # fmt: skip
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def save_arrays(path: Path, arrays: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
