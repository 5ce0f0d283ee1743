"""Loaders: one module per log format, each turning files into the canonical tables.

Every loader module defines

* ``FORMAT``: its name (the ``source`` column value and the ``--format`` choice),
* ``sniff(text: str) -> bool``: whether the first bytes of a file look like this format,
* ``load(files: list[SourceFile], options: LoadOptions) -> Load``.

:func:`load` discovers the files, detects each file's format from its content (unless a
format is named), runs each loader on its files and concatenates the results.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field

import polars as pl

from .. import schema
from ..accounting import Accounting
from ..sources import InputError, SourceFile, decompress_all, discover, head

# Detection order matters: more specific formats first.  Modules that do not exist yet
# are skipped, so the registry can list formats before their loaders land.
_MODULES = (
    "exchange",
    "m365_trace",
    "powermta",
    "kumomta",
    "sendgrid",
    "mailgun",
    "ses",
    "sparkpost",
    "postmark",
    "exim",
    "postfix",
)


@dataclass
class LoadOptions:
    """Options shared by all loaders.

    ``tz``: zone of timestamps written without an offset (syslog, Exim), default UTC.
    ``year``: year of year-less syslog timestamps; default inferred from each file's mtime.
    ``mapping``: column mapping for the ``generic`` loader.
    ``dedupe``: drop records identical to one already read (same file given twice,
    overlapping rotated copies); the accounting counts them as ``duplicate``.
    """

    tz: str = "UTC"
    year: int | None = None
    mapping: dict | None = None
    dedupe: bool = True


@dataclass
class Load:
    """The result of loading: canonical attempts, connection events, and the accounting."""

    attempts: pl.LazyFrame = field(default_factory=lambda: schema.empty(schema.ATTEMPT_COLUMNS))
    connections: pl.LazyFrame = field(default_factory=lambda: schema.empty(schema.CONNECTION_COLUMNS))
    accounting: Accounting = field(default_factory=Accounting)

    @classmethod
    def concat(cls, parts: list[Load]) -> Load:
        if not parts:
            return cls()
        if len(parts) == 1:
            return parts[0]
        return cls(
            attempts=pl.concat([p.attempts for p in parts], how="vertical"),
            connections=pl.concat([p.connections for p in parts], how="vertical"),
            accounting=Accounting.concat([p.accounting for p in parts]),
        )


def registry() -> dict[str, object]:
    """Format name -> loader module, in detection order."""
    out = {}
    for mod in _MODULES:
        try:
            m = importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{mod}":
                continue
            raise
        out[m.FORMAT] = m
    try:
        out["generic"] = importlib.import_module(f"{__name__}.generic")
    except ModuleNotFoundError:
        pass
    return out


def formats() -> list[str]:
    """Names accepted by ``--format`` (besides ``auto``)."""
    return list(registry())


def detect(sf: SourceFile) -> str:
    """The format of one file, from its first bytes.  Raises :class:`InputError` naming the
    file and quoting what was seen when no loader recognises it."""
    text = head(sf)
    if not text.strip():
        raise InputError(f"{sf.name}: file is empty")
    for name, mod in registry().items():
        if name == "generic":
            continue
        if mod.sniff(text):
            return name
    first = next((ln for ln in text.splitlines() if ln.strip()), "")[:200]
    raise InputError(f"{sf.name}: format not recognised (tried {', '.join(formats())}); first line: {first!r}")


def load(paths: list[str | os.PathLike] | str | os.PathLike, *, format: str = "auto", options: LoadOptions | None = None, **kw) -> Load:
    """Load log files of any supported format into the canonical tables.

    ``paths``: files, directories or globs (rotated and compressed sets welcome).
    ``format``: a name from :func:`formats`, or ``auto`` to detect each file's format.
    Keyword arguments are :class:`LoadOptions` fields.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    options = options or LoadOptions(**kw)
    files = discover(list(paths))
    decompress_all(files)
    reg = registry()
    if format != "auto" and format not in reg:
        raise InputError(f"unknown format {format!r}; known: auto, {', '.join(reg)}")
    groups: dict[str, list[SourceFile]] = {}
    passed_over: list[str] = []
    for sf in files:
        try:
            fmt = format if format != "auto" else detect(sf)
        except InputError as exc:
            # A file the user named must be readable; a stray README or notes file found
            # while expanding a folder is passed over, and the accounting says so.
            if not sf.from_directory:
                raise
            passed_over.append(f"passed over {exc}")
            continue
        groups.setdefault(fmt, []).append(sf)
    if not groups:
        raise InputError(f"no log file among {', '.join(map(str, paths))}: " + "; ".join(passed_over))
    result = Load.concat([reg[fmt].load(fs, options) for fmt, fs in groups.items()])
    result.accounting.problems.extend(passed_over)
    return result


__all__ = ["Load", "LoadOptions", "InputError", "load", "detect", "formats", "registry"]
