"""The run directory: config, per-round checkpoints and per-site metrics, final models, log and summary.json."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from tace.common.serialize import write_json
from tace.server.messages import SiteUpdate
from tace.server.progress import save_arrays

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
    ``models/`` (`tace.common.artifact.save_run_models`), ``summary.json``.
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
        self, stage: str, server_round: int, lr: float, replies: list[SiteUpdate], evaluation: dict[str, dict[str, Any]], model: str,
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
        path = self.checkpoint_path(stage, server_round)
        save_arrays(path, arrays)
        return path

    def prune_checkpoints(self, stage: str, last: int, best: int, keep: int) -> list[Path]:
        """Delete the round checkpoints of `stage` that are neither among the `keep` rounds up to `last` nor the
        `best` round (the strategy's state is kept for those `keep` rounds only); `keep` 0 deletes nothing. What a
        resume needs survives: the last completed round's weights and strategy state, and the best round's weights.
        Returns the files deleted."""
        if keep <= 0:
            return []
        kept = set(range(last - keep + 1, last + 1))
        deleted = []
        for path in sorted((self.path / "checkpoints" / stage).glob("*round-*.npz")):
            name = path.stem
            try:
                server_round = int(name.rsplit("-", 1)[1])
            except ValueError:
                continue
            strategy = name.startswith("strategy-round-")
            if server_round in kept or (not strategy and server_round == best) or not name.startswith(("round-", "strategy-round-")):
                continue
            path.unlink(missing_ok=True)
            deleted.append(path)
        return deleted

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

    def record_event(self, kind: str, stage: str, server_round: int, site: str, detail: str, sent: bool | None = None) -> None:
        """A fault the run survived (a site left out of a round and why), in events.jsonl and the log; `sent` says
        whether the site's update arrived (and was screened out) or never left the site."""
        import datetime as dt

        log = logging.getLogger("tace.server")
        log.warning("%s round %d: site %s %s: %s", stage, server_round, site, kind, detail)
        event = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "event": kind, "stage": stage,
                 "round": server_round, "site": site, "detail": detail}  # fmt: skip
        if sent is not None:
            event["sent"] = sent
        with open(self.path / "events.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")

    def rounds_sent(self) -> dict[str, dict[str, list[int]]]:
        """Per site and stage label, the rounds whose update the site sent: the updates aggregated (metrics.csv rows
        with training samples) and those that arrived but were screened out (events.jsonl). A round redone after a
        coordinator restart counts once."""
        sent: dict[str, dict[str, set[int]]] = {}
        with open(self._metrics, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row["site"] != "pooled" and row["num_examples"] not in ("", "0"):
                    sent.setdefault(row["site"], {}).setdefault(row["stage"], set()).add(int(row["round"]))
        events = self.path / "events.jsonl"
        for line in events.read_text(encoding="utf-8").splitlines() if events.exists() else []:
            event = json.loads(line)
            if event.get("sent"):
                sent.setdefault(event["site"], {}).setdefault(event["stage"], set()).add(int(event["round"]))
        return {site: {stage: sorted(rounds) for stage, rounds in stages.items()} for site, stages in sent.items()}


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return ""
    return f"{float(value):.6g}"
