"""Helpers shared by the writers: random ids, rotation and file output."""

from __future__ import annotations

import gzip
import io
import os
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

CLIENTS = ("app1.internal.example[10.1.0.11]", "app2.internal.example[10.1.0.12]", "web3.internal.example[10.1.0.13]")
TLS_CIPHER = "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519 server-signature RSA-PSS (2048 bits) server-digest SHA256"

_B62 = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", dtype=np.uint8)


def rng_for(world, salt: int) -> np.random.Generator:
    """A generator for one writer, so each format's cosmetic ids are stable for a seed."""
    return np.random.default_rng([world.config.seed, salt])


def base62(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    """n random base-62 strings of ``width`` characters (Exim ids, SendGrid ids)."""
    codes = _B62[rng.integers(0, 62, (n, width))]
    return codes.view(f"S{width}").ravel().astype(f"U{width}")


def pids(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(1200, 65000, n)


def fmt_postfix_delay(e: pl.Expr) -> pl.Expr:
    """Postfix's delay format: integral from 10 s, one decimal from 1 s, else two decimals,
    trailing zeros dropped (``delays=0.1/2.1/0.36/13``, ``delay=767``)."""
    s = (pl.when(e >= 9.95).then(e.round(0).cast(pl.Int64).cast(pl.String))
         .when(e >= 0.995).then(e.round(1).cast(pl.String))
         .otherwise(e.round(2).cast(pl.String)))
    return s.str.replace(r"\.0+$", "").str.replace(r"^(\d+\.\d*?)0+$", "${1}")


def write_rotated(lines: pl.DataFrame, out_dir: Path, base: str, *, rotate: bool, gzip_old: bool, day_col: str = "day",
                  compress_all: bool = False) -> list[Path]:
    """Write ``lines`` (columns ts, line, day) as a Debian-rotated set: ``base`` (newest day),
    ``base.1``, ``base.2.gz``...; each file's mtime is its last line's time.

    ``compress_all``: the state right after a rotation without ``delaycompress``: no
    current file, every day compressed (``base.1.gz`` is the newest).
    Returns the paths, oldest first.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    days = sorted(lines[day_col].unique().to_list()) if rotate else [None]
    paths = []
    for i, day in enumerate(days):
        part = lines if day is None else lines.filter(pl.col(day_col) == day)
        age = len(days) - 1 - i
        if compress_all:
            age += 1
        name = base if age == 0 else f"{base}.{age}"
        if (age >= 2 and gzip_old) or compress_all:
            name += ".gz"
        buf = io.BytesIO()
        part.select("line").write_csv(buf, include_header=False, quote_style="never")
        data = buf.getvalue()
        last: datetime = part["ts"].max()
        path = out_dir / name
        if name.endswith(".gz"):
            with open(path, "wb") as fh, gzip.GzipFile(filename=name[:-3], mode="wb", fileobj=fh, mtime=int(last.timestamp()), compresslevel=6) as gz:
                gz.write(data)
        else:
            path.write_bytes(data)
        os.utime(path, (last.timestamp(), last.timestamp()))
        paths.append(path)
    return paths
