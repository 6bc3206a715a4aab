"""`tace-server`: what the study coordinator runs (docs/deployment.md)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tace.common.cli import EXIT_OK, command, command_parser, run, shared_options


def build_parser() -> argparse.ArgumentParser:
    parser, sub = command_parser(
        "tace-server",
        "TACE-FL coordinator: creates the study's certificates, registers sites, and runs the federated training on "
        "Flower's deployment engine with TLS and site authentication. See docs/deployment.md.",
    )
    init = command(
        sub, "init", cmd_init, "create a study folder: certificate authority, server certificate, run config, instructions for sites",
        "Create a study folder with the study's certificate authority, the coordinator's TLS certificate (valid for every "
        "--host given, plus localhost), a run configuration to edit, and FOR-SITES.md with what each site needs (including "
        "the CA fingerprint they should confirm with you).",
    )  # fmt: skip
    init.add_argument("folder", type=Path, help="the new study folder")
    init.add_argument("--name", default="TACE study", help="study name, shown in the CA certificate (default %(default)r)")
    init.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                      help="a DNS name or IP address sites use to reach this machine (repeat for several; default: this machine's name)")  # fmt: skip
    init.add_argument("--port", type=int, default=9092, help="TCP port sites connect to (default %(default)s)")
    init.add_argument("--expected-sites", type=int, default=0, help="number of sites taking part (written to run_config.toml)")
    _site_commands(sub.add_parser("sites", help="register and list the sites allowed to join", description="Manage the registered sites."))
    _run_commands(sub)
    return parser


def _study() -> argparse.ArgumentParser:
    """The option of every command that works in an existing study folder."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--study", type=Path, default=Path("."), help="the study folder (default: the current folder)")
    return parser


def _site_commands(sites: argparse.ArgumentParser) -> None:
    """sites add and sites list."""
    site_sub = sites.add_subparsers(title="commands", metavar="COMMAND")
    add = command(
        site_sub, "add", cmd_sites_add, "register a site's public key",
        "Register a site's public key (the .pub file `tace-client keygen` wrote). Only registered sites can connect. Confirm "
        "the printed fingerprint with the site before the first run.",
        [_study()],
    )  # fmt: skip
    add.add_argument("site", help="the site's id (the same as site.toml's [site] id)")
    add.add_argument("key", type=Path, help="the site's public key file (SITE.pub)")
    command(site_sub, "list", cmd_sites_list, "list registered sites and their key fingerprints",
            "List the registered sites with the SHA-256 fingerprints of their keys and when they were added.", [_study()])  # fmt: skip


def _run_commands(sub: Any) -> None:
    """start, status and stop: the study run."""
    start = command(
        sub, "start", cmd_start, "start the SuperLink and the study run (foreground)",
        "Start Flower's SuperLink with TLS and site authentication, register the site keys, and run the study (the same "
        "ServerApp as in simulation). Runs in the foreground until the run ends; Ctrl-C or `tace-server stop` stops it, and "
        "`start --resume` continues from the last completed round.",
        [_study(), shared_options("run-config", run_config="override keys of run_config.toml for this run")],
    )  # fmt: skip
    start.add_argument("--resume", action="store_true", help="continue the latest interrupted run from its last completed round")
    start.add_argument("--insecure", action="store_true", help="no TLS and no site authentication (tests on a private network only)")
    stat = command(
        sub, "status", cmd_status, "show the coordinator, the current round, sites online and per-site metrics",
        "Show whether the coordinator runs, the current run's stage, round and pooled validation AUC, every site's role, "
        "whether it is online and its last metrics, and the last faults the run survived.",
        [_study()],
    )  # fmt: skip
    stat.add_argument("--json", action="store_true", help="print the status as JSON")
    command(
        sub, "stop", cmd_stop, "stop the running coordinator (the run can be resumed)",
        "Stop the running coordinator and its SuperLink (SIGTERM, then SIGKILL after a minute). The run keeps everything up "
        "to its last completed round: continue it with `tace-server start --resume`.",
        [_study()],
    )  # fmt: skip


def cmd_init(args: argparse.Namespace) -> int:
    from tace.common import pki
    from tace.server.study import Study, local_host_names

    hosts = args.host or local_host_names()
    study = Study.init(args.folder, args.name, hosts, args.port, args.expected_sites)
    settings = study.settings()
    print(f"created study {args.name!r} in {args.folder}")
    print(f"  CA certificate (send to sites): {study.ca_cert}")
    print(f"  CA fingerprint (sites confirm it with you): {pki.certificate_fingerprint(study.ca_cert)}")
    print(f"  server certificate valid for: {', '.join(pki.certificate_names(study.server_cert))}; port {settings['port']}")
    print(f"  keep private: {study.path / 'pki' / 'ca.key'} and {study.server_key}")
    print(f"next: edit {args.folder / 'run_config.toml'} (expected-sites, holdout-sites), send FOR-SITES.md and ca.crt to each site,")
    print("      register their keys with `tace-server sites add SITE SITE.pub`, then `tace-server start`")
    return EXIT_OK


def cmd_sites_add(args: argparse.Namespace) -> int:
    from tace.server.study import Study

    info = Study.open(args.study).add_site(args.site, args.key)
    print(f"registered site {args.site}: key {info.fingerprint}")
    print("confirm this fingerprint with the site (they see it in `tace-client keygen`'s output); it takes effect at the next start")
    return EXIT_OK


def cmd_sites_list(args: argparse.Namespace) -> int:
    from tace.server.study import Study

    sites = Study.open(args.study).sites()
    if not sites:
        print("no site registered yet: `tace-server sites add SITE SITE.pub`")
    for site, entry in sorted(sites.items()):
        print(f"{site:20s} {entry['fingerprint']}  added {entry['added']}")
    return EXIT_OK


def cmd_start(args: argparse.Namespace) -> int:
    from tace.server.coordinator import start
    from tace.server.study import Study

    return start(Study.open(args.study), resume=args.resume, insecure=args.insecure, run_config=args.run_config)


def cmd_status(args: argparse.Namespace) -> int:
    from tace.server.coordinator import status
    from tace.server.study import Study

    info = status(Study.open(args.study))
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    coordinator = {"died": "NOT RUNNING (it was killed without stopping; `tace-server stop` cleans up, `start --resume` continues)",
                   "stopped": "stopped"}.get(info["coordinator"], info["coordinator"])  # fmt: skip
    print(f"coordinator: {coordinator}; registered sites: {', '.join(info['registered_sites']) or 'none'}")
    if info.get("leftover_processes"):
        print(f"  WARNING: {len(info['leftover_processes'])} Flower process(es) of this study still run without a coordinator "
              f"(pids {', '.join(map(str, info['leftover_processes']))}): `tace-server stop` ends them")  # fmt: skip
    for fingerprint, entry in info.get("refused_keys", {}).items():
        who = f"site {entry['site']}'s key" if entry.get("site") else "an unregistered key"
        print(f"  REFUSED by the SuperLink: {who} {fingerprint} ({entry['attempts']} attempt(s), last {entry['last']})")
    if info["run"] is None:
        print("no run yet")
        return EXIT_OK
    st = info.get("status", {})
    state = "finished" if info.get("finished") else st.get("state", "not started")
    if state == "interrupted":
        state += " (no coordinator runs it; `tace-server start --resume` continues from its last completed round)"
    print(f"run {info['run']}: {state}")
    if "stage" in st:
        auc = st.get("pooled_val_auc")
        print(f"  stage {st['stage']} round {st['round']}/{st['rounds']}, pooled validation AUC {'n/a' if auc is None else f'{auc:.3f}'}"
              f" (updated {st['updated']})")  # fmt: skip
    if "sites" in st:
        online = set(st.get("sites_online", []))
        for site, role in st["sites"].items():
            metrics = st.get("site_metrics", {}).get(site, "")
            connection = ("online" if site in online else "OFFLINE") if info["coordinator"] == "running" else "-"
            print(f"  {site:16s} {role:8s} {connection:8s} {metrics}")
    for site, entry in st.get("refused", {}).items():
        print(f"  {site:16s} REFUSED  [{entry['reason']}] {entry['message']}")
    if "error" in st:
        print(f"  error: {st['error']}")
    for event in info.get("events", []):
        print(f"  {event['time']} {event['stage']} round {event['round']}: site {event['site']} {event['event']}: {event['detail']}")
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    from tace.server.coordinator import stop
    from tace.server.study import Study

    if stop(Study.open(args.study)):
        print("coordinator stopped; continue the run with `tace-server start --resume`")
    else:
        print("the coordinator was not running", file=sys.stderr)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
