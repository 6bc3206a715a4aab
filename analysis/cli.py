"""`tace-analysis`: statistics on a finished run (external validation, survival, radiogenomics, report)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tace.common.cli import command_parser, run


def build_parser() -> argparse.ArgumentParser:
    parser, _ = command_parser(
        "tace-analysis",
        "TACE-FL analysis of a finished run: external validation, survival, radiogenomics and the "
        "study report. This release has no analysis commands yet; they arrive with federated training runs.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
