"""What the coordinator shows while a study runs: ``status.json`` (read by `tace-server status`) and a progress
line per round on standard output (read by `tace-sim` and `tace-server start`)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Protocol

from tace.common.protocol import Failure
from tace.server.rundir import RunDir


class Sites(Protocol):
    """The part of a federation the status shows: its sites, their roles, and which are online."""

    roles: dict[str, str]

    def online(self) -> list[str]: ...


class Status:
    """``status.json`` in the run folder: state, stage, round, sites online, per-site metrics of the last round.
    Rewritten atomically after every round."""

    def __init__(self, rundir: RunDir) -> None:
        self.rundir = rundir
        self.sites: Sites | None = None
        self.last: dict[str, Any] = {}
        self.refused: dict[str, dict[str, str]] = {}
        self._state: tuple[str, dict[str, Any]] = ("starting", {})

    def write(self, state: str, **extra: Any) -> None:
        self._state = (state, extra)
        data = {"state": state, "updated": _now(), **self.last, **extra}
        if self.sites is not None:
            data["sites_online"] = self.sites.online()
            data["sites"] = dict(sorted(self.sites.roles.items()))
        if self.refused:
            data["refused"] = self.refused
        self.rundir.write_json("status.json", data)

    def refuse(self, site: str, failure: Failure) -> None:
        """A site that answered but was not admitted (its data, version or own rules): on the console and in the
        status, with its reason code (`tace.server.federation.FlowerFederation.on_refused`)."""
        print(f"TACE-REFUSED site {site} [{failure.reason.value}]: {failure.message}", flush=True)
        self.refused[site] = {"reason": failure.reason.value, "message": failure.message, "time": _now()}
        self.write(self._state[0], **self._state[1])

    def round(self, stage: str, server_round: int, total: int, val_auc: float | None, sites: dict[str, str] | None = None) -> None:
        """A completed round (`tace.server.rounds.OnRound`): its progress line, and the status."""
        print_round(stage, server_round, total, val_auc, sites)
        self.last = {"stage": stage, "round": server_round, "rounds": total, "pooled_val_auc": val_auc, "site_metrics": sites or {}}
        self.write("training")


def print_round(stage: str, server_round: int, total: int, val_auc: float | None, sites: dict[str, str] | None = None) -> None:
    """``TACE-ROUND <stage> <round>/<rounds> pooled-val-auc=<auc> <site>:<metrics> ...`` (parsed by the runners)."""
    auc = "n/a" if val_auc is None else f"{val_auc:.3f}"
    detail = " ".join(f"{s}:{v}" for s, v in (sites or {}).items())
    print(f"TACE-ROUND {stage} {server_round}/{total} pooled-val-auc={auc} {detail}".rstrip(), flush=True)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
