"""The run directory: config, per-round checkpoints and per-site metrics, final models, log and summary.json."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tace.common.serialize import write_json

if TYPE_CHECKING:
    from tace.server.workflow import TrainReply

METRIC_COLUMNS = (
    "stage",
    "round",
    "site",
    "role",
    "lr",
    "train_loss",
    "num_examples",
    "samples_per_s",
    "local_s",
    "val_auc",
    "n_eval",
    "round_s",
)


class RunDir:
    """Writes everything a run leaves behind under one folder.

    Layout: ``run_config.json``, ``run.log``, ``metrics.csv`` (one row per stage, round and site, plus a
    ``pooled`` row), ``checkpoints/<stage>/round-NNN.npz`` and ``best.npz``, ``clinical_encoder.json``,
    ``models/`` (state dicts, portable ``torch.export`` programs, ``model.json``), ``summary.json``.
    """

    def __init__(self, path: Path | str, run_config: dict[str, Any], mode: str) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        from tace.common.cli import software_versions

        self.write_json("run_config.json", {"mode": mode, "run_config": run_config, "software": software_versions()})
        self._metrics = self.path / "metrics.csv"
        if not self._metrics.exists():
            with open(self._metrics, "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerow(METRIC_COLUMNS)
        self._handler = logging.FileHandler(self.path / "run.log")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger = logging.getLogger("tace")
        logger.addHandler(self._handler)
        logger.setLevel(logging.INFO)

    def close(self) -> None:
        logging.getLogger("tace").removeHandler(self._handler)
        self._handler.close()

    def write_json(self, name: str, obj: Any) -> Path:
        return write_json(self.path / name, obj)

    def record_round(
        self, stage: str, server_round: int, lr: float, replies: list[TrainReply], evaluation: dict[str, dict[str, Any]], model: str,
        pooled_auc: float | None, round_s: float,
    ) -> None:  # fmt: skip
        by_site = {r.site_id: r for r in replies}
        rows = []
        for site in sorted(set(evaluation) | set(by_site)):
            res = evaluation.get(site, {"role": "train"})
            reply = by_site.get(site)
            m = reply.metrics if reply else {}
            rows.append([
                stage, server_round, site, res.get("role", ""), f"{lr:.6g}", _fmt(m.get("train-loss")), reply.num_examples if reply else "",
                _fmt(m.get("samples-per-s")), _fmt(m.get("local-s")), _fmt(res.get(model, {}).get("auc")), res.get("n", ""), "",
            ])  # fmt: skip
        total = sum(r.num_examples for r in replies)
        loss = sum(r.metrics.get("train-loss", 0.0) * r.num_examples for r in replies) / total if total else None
        rows.append(
            [stage, server_round, "pooled", "train", f"{lr:.6g}", _fmt(loss), total, "", "", _fmt(pooled_auc), "", f"{round_s:.3f}"]
        )
        with open(self._metrics, "a", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows(rows)

    def checkpoint_path(self, stage: str, server_round: int | str) -> Path:
        name = f"round-{server_round:03d}.npz" if isinstance(server_round, int) else f"{server_round}.npz"
        return self.path / "checkpoints" / stage / name

    def checkpoint(self, stage: str, server_round: int | str, arrays: dict[str, np.ndarray]) -> Path:
        from tace.server.progress import save_arrays

        path = self.checkpoint_path(stage, server_round)
        save_arrays(path, arrays)
        return path

    def rounds_recorded(self) -> dict[str, int]:
        """The last round recorded in metrics.csv per stage label (including rounds before a resume)."""
        out: dict[str, int] = {}
        with open(self._metrics, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                out[row["stage"]] = max(out.get(row["stage"], 0), int(row["round"]))
        return out

    def trim_metrics(self, rounds_done: dict[str, int]) -> None:
        """Resuming: drop metric rows of rounds that were recorded but not completed before the interruption."""
        with open(self._metrics, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        keep = [rows[0]] + [r for r in rows[1:] if int(r[1]) <= rounds_done.get(r[0], 0)]
        if len(keep) != len(rows):
            with open(self._metrics, "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerows(keep)

    def record_event(self, kind: str, stage: str, server_round: int, site: str, detail: str) -> None:
        """A fault the run survived (a site left out of a round and why), in events.jsonl and the log."""
        import datetime as dt

        log = logging.getLogger("tace.server")
        log.warning("%s round %d: site %s %s: %s", stage, server_round, site, kind, detail)
        event = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "event": kind, "stage": stage,
                 "round": server_round, "site": site, "detail": detail}  # fmt: skip
        with open(self.path / "events.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")

    def save_models(
        self, arrays: dict[str, dict[str, np.ndarray]], backbone: str, in_channels: int, shape: tuple[int, ...], encoder: dict[str, Any]
    ) -> None:
        """State dicts (``.pt``), portable programs (``.pt2``, loadable with ``torch.export.load`` without TACE-FL) and a model card."""
        import torch

        from tace.common.clinical import FEATURES
        from tace.common.models import StudyModels

        folder = self.path / "models"
        folder.mkdir(parents=True, exist_ok=True)
        models = StudyModels.build(backbone, in_channels, len(FEATURES))
        models.load(arrays)
        for name in ("dltr", "head", "clinical"):
            torch.save(models.module(name).state_dict(), folder / f"{name}.pt")
        exports = _exportable(models.dltr.eval(), models.head.eval(), models.clinical.eval())
        batch = torch.export.Dim("batch", min=1, max=4096)
        image = torch.zeros(2, *shape)
        clin = torch.zeros(2, len(FEATURES))
        for name, module, inputs in (
            ("dltr", exports[0], (image,)),
            ("dltrmlp", exports[1], (image, clin)),
            ("clinical", exports[2], (clin,)),
        ):
            program = torch.export.export(module, inputs, dynamic_shapes=tuple({0: batch} for _ in inputs))
            torch.export.save(program, folder / f"{name}.pt2")
        self.write_json("models/model.json", {
            "backbone": backbone, "in_channels": in_channels, "input_shape": list(shape), "clinical_features": list(FEATURES),
            "outputs": "probability of objective response (mRECIST CR/PR)",
            "portable": {"dltr.pt2": "image (B, C, D, H, W) -> p", "dltrmlp.pt2": "image, clinical (B, K) standardised -> p",
                         "clinical.pt2": "clinical (B, K) standardised -> p"},
            "clinical_encoder": encoder,
        })  # fmt: skip


def _exportable(dltr: Any, head: Any, clinical: Any) -> tuple[Any, Any, Any]:
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

        def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.head(self.dltr.features(x), c))

    class Clinical(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clinical = clinical

        def forward(self, c: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.clinical(c))

    return Image(), Fusion(), Clinical()


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return ""
    return f"{float(value):.6g}"
