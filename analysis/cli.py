"""`tace-analysis`: statistics on a finished run (external validation, survival, radiogenomics, report)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tace.common.cli import add_version, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tace-analysis",
        description="TACE-FL analysis of a finished run: external validation, survival, radiogenomics and the "
        "study report. This release has no analysis commands yet; they arrive with federated training runs.",
    )
    add_version(parser)
    parser.add_subparsers(title="commands", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(lambda a: a.func(a), build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
