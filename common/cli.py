"""Shared command-line plumbing: error handling without tracebacks, progress bars, argument parsers."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tace.common.errors import TaceError

T = TypeVar("T")

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


def version_string() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tace-fl")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without an install
        return "unknown"


#: Packages whose versions a run and a report record (read from installed metadata; nothing is imported).
RECORDED_PACKAGES = ("tace-fl", "torch", "monai", "flwr", "opacus", "SimpleITK", "numpy", "scipy", "pandas", "scikit-learn",
                     "lifelines", "statsmodels", "gseapy", "matplotlib", "pydicom", "highdicom", "jinja2", "isal")  # fmt: skip


def software_versions() -> dict[str, str]:
    """{package: installed version} for `RECORDED_PACKAGES` plus Python."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def command_parser(prog: str, description: str) -> tuple[argparse.ArgumentParser, Any]:
    """A top-level parser with --version and a subcommand group; subcommands set ``func`` via set_defaults."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_version(parser)
    return parser, parser.add_subparsers(title="commands", metavar="COMMAND")


def command(
    sub: Any, name: str, func: Callable[[argparse.Namespace], int], help: str, description: str = "",
    parents: Sequence[argparse.ArgumentParser] = (),
) -> argparse.ArgumentParser:  # fmt: skip
    """A subcommand running ``func(args)``, with the shared options of `parents` (`shared_options`)."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description or help, parents=list(parents))
    parser.set_defaults(func=func)
    return parser


#: The options several commands share, by name: (flags, argparse keyword arguments). Each command takes them
#: through a parent parser (`shared_options`), so a flag means the same everywhere.
SHARED_OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "manifest": (("--manifest",), {"type": Path, "required": True, "help": "the site's manifest CSV"}),
    "cache": (("--cache",), {"type": Path, "help": "preprocessing cache folder"}),
    "device": (("--device",), {"default": "auto", "help": "auto (GPU when there is one), cpu, cuda or cuda:N (default %(default)s)"}),
    "seed": (("--seed",), {"type": int, "default": 0, "help": "random seed (default %(default)s)"}),
    "run-config": (("--run-config",), {"default": "", "metavar": '"KEY=VALUE ..."', "help": "override run-config keys (docs/training.md)"}),
}


def shared_options(*names: str, **helps: str) -> argparse.ArgumentParser:
    """A parent parser (argparse ``parents=``) holding the shared options `names`; `helps` (keyed by the option's
    name with ``_`` for ``-``) words an option's help for one command."""
    parser = argparse.ArgumentParser(add_help=False)
    for name in names:
        flags, kwargs = SHARED_OPTIONS[name]
        parser.add_argument(*flags, **{**kwargs, "help": helps.get(name.replace("-", "_"), kwargs["help"])})
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse arguments and run the chosen subcommand's ``func(args)``; turn expected errors into a message and an
    exit status, never a traceback.

    Exit status: 0 success, 1 the input has problems (listed), 2 usage or configuration error, 3 internal error,
    130 interrupted. Set TACE_DEBUG=1 to see the traceback of an internal error.
    """
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except TaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last line of defence: one clear line instead of a traceback
        if os.environ.get("TACE_DEBUG"):
            raise
        print(
            f"internal error: {type(exc).__name__}: {exc}\n"
            "  -> this is a bug in TACE-FL; rerun with TACE_DEBUG=1 and report the output (it holds no patient values)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterable[T]:
    """A progress bar on stderr when it is a terminal; the plain iterable otherwise (CI logs, pipes)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=None, file=sys.stderr, dynamic_ncols=True)


def triple(kind: Callable[[str], Any]) -> Callable[[str], tuple[Any, Any, Any]]:
    """argparse type for 'X,Y,Z'."""

    def parse(text: str) -> tuple[Any, Any, Any]:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"expected three comma-separated values X,Y,Z, got {text!r}")
        try:
            a, b, c = (kind(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected three numbers X,Y,Z, got {text!r}") from None
        return a, b, c

    return parse


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {version_string()}")
