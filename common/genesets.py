"""Reading gene-set collections in GMT format (one set per line: name, description, genes...)."""

from __future__ import annotations

from pathlib import Path

from tace.common.errors import TaceError

GMT_HINT = (
    "give a GMT file with --gene-sets; MSigDB's Hallmark collection (h.all.*.symbols.gmt) is downloadable after "
    "free registration at the MSigDB website; TACE-FL never downloads gene sets itself"
)


def write_gmt(path: Path | str, sets: dict[str, list[str]], description: str = "") -> Path:
    """Write {set name: [genes]} as a GMT file (tab-separated: name, description, genes)."""
    path = Path(path)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for name, genes in sets.items():
            fh.write("\t".join([name, description or name, *genes]) + "\n")
    return path


def read_gmt(path: Path | str) -> dict[str, list[str]]:
    """Read a GMT file into {set name: [gene symbols]} (order kept, duplicates within a set dropped)."""
    path = Path(path)
    if not path.is_file():
        raise TaceError(f"gene-set file not found: {path}", GMT_HINT)
    sets: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            fields = [f.strip() for f in line.rstrip("\r\n").split("\t")]
            if not any(fields):
                continue
            if len(fields) < 3 or not fields[0]:
                raise TaceError(
                    f"{path}, line {lineno}: not a GMT line (needs a name, a description and genes, tab-separated)", GMT_HINT
                )  # fmt: skip
            sets[fields[0]] = list(dict.fromkeys(g for g in fields[2:] if g))
    if not sets:
        raise TaceError(f"{path} holds no gene sets", GMT_HINT)
    return sets
