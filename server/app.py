"""The Flower ServerApp: finds the sites (`tace.server.federation`), then runs the study workflow over them.

The workflow (`tace.server.workflow`) does not know its transport; this module only connects it to Flower's Grid,
the run folder, the privacy ledger and the status the operator reads.
"""

from __future__ import annotations

import json
import logging
import os
from functools import partial
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from tace.common.config import RunConfig
from tace.common.errors import TaceError
from tace.common.launch import COORDINATOR_ENV, exit_with
from tace.common.pretrained import initial_arrays
from tace.server.federation import FlowerFederation
from tace.server.privacy import PrivacyLedger
from tace.server.rundir import RunDir
from tace.server.status import Status
from tace.server.workflow import run_layouts

log = logging.getLogger("tace.server")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # In a deployment: end with `tace-server start` however it ends (Flower's SuperExec would keep this process
    # running for a while after its SuperLink is gone). Simulation sets no coordinator: nothing is watched.
    exit_with(os.environ.get(COORDINATOR_ENV, ""))
    run = RunConfig.from_run_config(context.run_config)
    if not run.run_dir:
        raise TaceError("run-config key 'run-dir' (absolute path of the run folder) is required")
    rundir = RunDir(Path(run.run_dir), run.to_run_config(), mode="federated")
    (rundir.path / "error.txt").unlink(missing_ok=True)  # a resumed run starts without the interruption's error
    expected = expected_sites(run)
    status = Status(rundir)
    try:
        status.write("waiting for sites", expected_sites=expected)
        ledger = PrivacyLedger(rundir.path / "privacy_ledger.json", run) if run.dp else None
        federation = FlowerFederation(grid, run, expected, ledger=ledger, on_refused=status.refuse)
        federation.on_event = rundir.record_event
        status.sites = federation
        status.write("training" if not run.resume else "resuming")

        summary = run_layouts(federation, run, rundir, partial(initial_arrays, run), mode="federated", on_round=status.round)
        status.write("finished")
        print(f"TACE-SUMMARY {rundir.path / 'summary.json'}", flush=True)
        log.info("summary: %s", json.dumps(summary.get("models", {}))[:2000])
    except TaceError as exc:
        # The run's own account of what went wrong, for `tace-sim` and the coordinator's operator.
        (rundir.path / "error.txt").write_text(str(exc) + "\n", encoding="utf-8")
        status.write("failed", error=str(exc))
        log.error("%s", exc)
        raise
    finally:
        rundir.close()


def expected_sites(run: RunConfig) -> int:
    """How many sites to wait for: `expected-sites`, or in simulation every site of the cohort."""
    if run.expected_sites:
        return run.expected_sites
    if run.cohort:
        return len(json.loads((Path(run.cohort) / "cohort.json").read_text())["sites"])
    raise TaceError("run-config key 'expected-sites' is required outside simulation", "set it to the number of sites in the study")
