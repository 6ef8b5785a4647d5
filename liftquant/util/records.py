"""Benchmark record files that keep their history: rows are merged, never rewritten wholesale.

Re-running a documented benchmark command must not erase rows measured at other commits or on
other GPUs. :func:`merge_csv_rows` and :func:`merge_json_rows` read the existing file, replace
the rows whose ``key`` columns (configuration columns + :data:`~liftquant.util.provenance.RECORD_KEY`)
equal a new row's, append the others, and write atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from liftquant.util.fileio import atomic_write


def _cell(value: Any) -> str:
    """A value as the csv module writes it (None -> empty), so new rows compare with read ones."""
    return "" if value is None else str(value)


def _merge(old: list[dict], new: list[dict], key: Sequence[str], cell) -> list[dict]:
    for row in new:
        missing = [k for k in key if k not in row]
        if missing:
            raise ValueError(f"record row lacks its key columns {missing}: {row}")

    def ident(row: dict) -> tuple:
        return tuple(cell(row.get(k)) for k in key)

    pending = {ident(r): r for r in new}  # among new rows with one key, the last wins
    out, placed = [], set()
    for row in old:
        k = ident(row)
        if k in pending:
            if k not in placed:  # replaced in place; older duplicates of the key are dropped
                out.append(pending[k])
                placed.add(k)
        else:
            out.append(row)
    out += [r for k, r in pending.items() if k not in placed]
    return out


def merge_csv_rows(path: str | Path, rows: Sequence[dict], key: Sequence[str], *,
                   columns: Sequence[str] | None = None) -> Path:
    """Merge ``rows`` into the CSV at ``path`` (created if missing); returns ``path``.

    Columns are the union in a stable order: the existing header, then ``columns``, then any
    other keys of the new rows in their order. Cells a row lacks are left empty.
    """
    path = Path(path)
    old: list[dict] = []
    header: list[str] = []
    if path.is_file() and path.stat().st_size:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            old = list(reader)
    fields = list(dict.fromkeys([*header, *(columns or ()), *(k for r in rows for k in r)]))
    merged = _merge(old, list(rows), key, _cell)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(merged)

    return atomic_write(path, write)


def _legacy_rows(data: Any, path: Path) -> list[dict]:
    """A JSON list of records; an older ``{"gpu": .., "commit": .., "rows": [..]}`` file is
    read as its rows with the top-level scalars copied into each, and an older ``{name: {..}}``
    file (e.g. the GEMV sweep) as one record per entry with its key as ``name``."""
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return data
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        shared = {k: v for k, v in data.items() if k != "rows" and not isinstance(v, dict | list)}
        return [{**shared, **r} for r in data["rows"]]
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        return [{"name": k, **v} for k, v in data.items()]
    raise ValueError(f"{path} holds no list of records: write the results to a new file")


def merge_json_rows(path: str | Path, rows: Sequence[dict], key: Sequence[str]) -> Path:
    """:func:`merge_csv_rows` for a JSON file holding a list of dicts (indent 1)."""
    path = Path(path)
    old = _legacy_rows(json.loads(path.read_text()), path) if path.is_file() and \
        path.stat().st_size else []
    merged = _merge(old, list(rows), key, lambda v: json.dumps(v, sort_keys=True))

    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(merged, indent=1) + "\n")

    return atomic_write(path, write)
