"""`tace-server`: what the study coordinator runs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tace.common.cli import command_parser, run


def build_parser() -> argparse.ArgumentParser:
    parser, _ = command_parser(
        "tace-server",
        "TACE-FL coordinator. It will create the study's certificates, register sites, and run the "
        "federated training on Flower's deployment engine. This release has no coordinator commands yet: use "
        "`tace-sim` to generate a cohort and `tace-client check` to validate a site's data.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
