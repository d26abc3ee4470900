"""The results file of a sweep: one JSON record per line, appended, flushed and fsynced.

A crash, kill or Ctrl-C loses at most the run in progress and never a finished line; a torn last
line (a write killed halfway) is unreadable, skipped with a note, and its run is redone.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def read_results(path: Path) -> tuple[list[dict], int]:
    """(records, unreadable lines). A torn last line from a killed write is unreadable and ignored."""
    numbered, bad = numbered_records(path)
    return [record for _line, record in numbered], len(bad)


def numbered_records(path: Path) -> tuple[list[tuple[int, dict]], list[int]]:
    """([(line number, record)], [numbers of unreadable lines])."""
    records, bad = [], []
    if not path.exists():
        return records, bad
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                bad.append(number)
                continue
            if isinstance(record, dict):
                records.append((number, record))
            else:
                bad.append(number)
    return records, bad


def append_record(path: Path, record: dict) -> None:
    """One line, appended, flushed and fsynced; starts on a fresh line if the last write was torn."""
    line = json.dumps(record, allow_nan=True) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as handle:
        if handle.tell() > 0:
            with open(path, "rb") as tail:
                tail.seek(-1, os.SEEK_END)
                if tail.read(1) != b"\n":
                    handle.write(b"\n")
        handle.write(line.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())
