"""TMA array maps: the CSV that names each position's core index and patient
(block, row, column -> core_index, patient_id), read and joined to the detected cores."""

from __future__ import annotations

import csv
from pathlib import Path

from fpstore.errors import ConfigError
from fpstore.slides.tma_detect import Core


def _row_number(value: str, path: Path, line_no: int) -> int:
    value = value.strip()
    if value.isdigit():
        return int(value)
    if value.isalpha():  # A, B, ..., Z, AA: the letters many array maps use for rows
        return sum((ord(ch) - 64) * 26**i for i, ch in enumerate(reversed(value.upper())))
    raise ConfigError(
        f"{path.name} line {line_no}: row/column {value!r} is neither a number nor letters"
    )


def read_array_map(path: Path) -> dict[tuple[int, int, int], tuple[int, str]]:
    """(block, row, column) -> (core_index, patient_id) from a CSV with the columns row,
    column, core_index, patient_id and, for arrays of several blocks, block (else 1)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"array map {str(path)!r} does not exist; pass --array-map CSV")
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as error:
        raise ConfigError(
            f"array map {str(path)!r} is not a CSV text file ({str(error)[:120]}); pass --array-map "
            "with a CSV of row, column, core_index, patient_id"
        ) from None
    header = {h.strip().lower(): h for h in (rows[0] if rows else {})}
    needed = ("row", "column", "core_index", "patient_id")
    missing = [c for c in needed if c not in header]
    if missing:
        raise ConfigError(
            f"array map {str(path)!r} lacks the column(s) {', '.join(missing)}; "
            f"it needs {', '.join(needed)} (found: {', '.join(header.values()) or 'no rows'})"
        )
    table = {}
    for line_no, row in enumerate(rows, start=2):
        block = row[header["block"]].strip() if "block" in header else "1"
        if not block.isdigit():
            raise ConfigError(f"{path.name} line {line_no}: block {block!r} is not a number")
        key = (
            int(block),
            _row_number(row[header["row"]], path, line_no),
            _row_number(row[header["column"]], path, line_no),
        )
        if key in table:
            raise ConfigError(
                f"{path.name} line {line_no}: block {key[0]} row {key[1]} column {key[2]} "
                f"appears twice"
            )
        index = row[header["core_index"]].strip()
        if not index.isdigit():
            raise ConfigError(
                f"{path.name} line {line_no}: core_index {index!r} is not a whole number"
            )
        table[key] = (int(index), row[header["patient_id"]].strip())
    return table


def join_array_map(cores: list[Core], table: dict, slide: str = "the slide") -> list[dict]:
    """Set core_index and patient_id of every lattice position from the map; return the map
    entries with no core found (their position empty or not on the lattice)."""
    grid = [k for k in cores if k.status != "orientation"]
    n_blocks = max((k.block for k in grid), default=1)
    if n_blocks > 1 and {key[0] for key in table} == {1}:
        raise ConfigError(
            f"{slide} has {n_blocks} blocks of cores but the array map names block 1 only; "
            f"add a block column (blocks count from 1 top to bottom, then left to right)"
        )
    for core in grid:
        core.core_index, core.patient_id = table.get(
            (core.block, core.row, core.column), (None, None)
        )
    found = {(k.block, k.row, k.column) for k in grid if k.status == "core"}
    return [
        {"block": b, "row": r, "column": c, "core_index": i, "patient_id": p}
        for (b, r, c), (i, p) in sorted(table.items())
        if (b, r, c) not in found
    ]
