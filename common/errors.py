"""Error types and the `Problem` record used to report bad input as an actionable checklist."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a site's data, located precisely and never carrying a patient value.

    Parameters
    ----------
    kind : str
        A stable machine-readable code (``missing-file``, ``out-of-range``, ...), listed in ``docs/manifest.md``.
    message : str
        What is wrong, in words. Mentions column names and allowed values, never the offending value itself.
    hint : str
        What to do about it.
    row : int, optional
        Line number in the manifest CSV as a spreadsheet shows it (the header is row 1, the first patient row 2).
    column : str, optional
        Manifest column the problem belongs to.
    file : str, optional
        File or folder concerned, as written in the manifest (relative to the manifest's folder).
    """

    kind: str
    message: str
    hint: str = ""
    row: int | None = None
    column: str | None = None
    file: str | None = None

    def location(self) -> str:
        parts = []
        if self.row is not None:
            parts.append(f"row {self.row}")
        if self.column is not None:
            parts.append(f"column {self.column}")
        if self.file is not None:
            parts.append(f"file {self.file}")
        return ", ".join(parts) if parts else "manifest"

    def format(self) -> str:
        text = f"{self.location()}: {self.message} [{self.kind}]"
        if self.hint:
            text += f"\n    -> {self.hint}"
        return text

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class TaceError(Exception):
    """Base class of every error TACE-FL raises on purpose; the CLIs print these without a traceback."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  -> {self.hint}" if self.hint else self.message


class ConfigError(TaceError):
    """A configuration key or value is wrong (unknown key, bad type, out of range)."""


class ImageReadError(TaceError):
    """An image could not be read, or what was read cannot be trusted (truncated, not 3D, ...)."""

    def __init__(self, kind: str, message: str, hint: str = "", column: str | None = None, file: str | None = None) -> None:
        super().__init__(message, hint)
        self.kind = kind
        self.column = column
        self.file = file

    def problem(self, row: int | None = None) -> Problem:
        return Problem(self.kind, self.message, self.hint, row, self.column, self.file)


class ManifestError(TaceError):
    """A site's data failed validation; carries every problem found, not only the first."""

    def __init__(self, problems: list[Problem], manifest: str = "") -> None:
        self.problems = list(problems)
        head = f"{len(self.problems)} problem(s) in site manifest {manifest}".rstrip()
        super().__init__(head, "run `tace-client check --manifest PATH` for the full list, fix them and retry")

    def __str__(self) -> str:
        lines = [self.message]
        lines += ["  " + p.format().replace("\n", "\n  ") for p in self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"  ... and {len(self.problems) - 50} more")
        return "\n".join(lines)
