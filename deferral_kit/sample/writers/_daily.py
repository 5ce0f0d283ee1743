"""Daily files of text records (ESP event exports), shared by the ESP writers."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from datetime import date
from pathlib import Path

import polars as pl


def write_daily(rows: pl.DataFrame, out_dir: Path, name: Callable[[date | None], str], *, rotate: bool, header: str = "") -> list[Path]:
    """Write ``rows`` (columns ts, line) one file per UTC day (``name(day)``), or one file
    (``name(None)``); each file's mtime is its last record's time.  Returns the paths, oldest first."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = rows.sort("ts", maintain_order=True).with_columns(pl.col("ts").dt.date().alias("day"))
    paths = []
    for part in (rows.partition_by("day", maintain_order=True) if rotate else [rows]):
        path = out_dir / name(part["day"][0] if rotate else None)
        buf = io.BytesIO()
        part.select("line").write_csv(buf, include_header=False, quote_style="never")
        path.write_bytes(header.format(first=part["ts"].min()).encode() + buf.getvalue())
        last = part["ts"].max().timestamp()
        os.utime(path, (last, last))
        paths.append(path)
    return paths
