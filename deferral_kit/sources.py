"""Finding input files and reading them as lines: globs, directories, rotated sets, compression.

Everything here is format-agnostic.  Loaders get :class:`SourceFile` objects in time
order (oldest rotated file first) and read them with :func:`scan_lines` or
:func:`open_bytes`; compressed files are recognised by their magic bytes, not their
names, and are decompressed once to a private temporary file so polars can stream them.
"""

from __future__ import annotations

import atexit
import bz2
import glob as globmod
import gzip
import itertools
import lzma
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

try:  # ISA-L inflates the same gzip streams about 3x faster than zlib (rotated logs are .gz)
    from isal import isal_zlib as _inflate
except ImportError:  # a platform without isal wheels: the standard library's zlib
    _inflate = zlib
_INFLATE_ERRORS = (zlib.error,) if _inflate is zlib else (zlib.error, _inflate.error)


class InputError(Exception):
    """An input cannot be read: the message names the file and says why."""


_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
}

_tmpdir: tempfile.TemporaryDirectory | None = None


_names = itertools.count()


def _scratch() -> Path:
    global _tmpdir
    if _tmpdir is None:
        _tmpdir = tempfile.TemporaryDirectory(prefix="deferral_kit_")
        atexit.register(_tmpdir.cleanup)
    return Path(_tmpdir.name)


@dataclass
class SourceFile:
    """One input file.  ``path`` is what the user named (reported in accounting);
    ``readable`` is a plain-text path polars can scan (a decompressed copy when needed)."""

    path: Path
    compression: str | None = None
    mtime: datetime | None = None
    problems: list[str] = field(default_factory=list)  # e.g. truncated compressed stream
    from_directory: bool = False  # found by expanding a folder rather than named by the user
    _readable: Path | None = None

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def readable(self) -> Path:
        if self._readable is None:
            self._readable = _decompress(self)
        return self._readable


def compression_of(path: Path) -> str | None:
    """The compression of a file by its magic bytes (gzip, zstd, bzip2, xz) or None."""
    with open(path, "rb") as fh:
        head = fh.read(6)
    for magic, name in _MAGIC.items():
        if head.startswith(magic):
            return name
    return None


def _opener(sf: SourceFile):
    if sf.compression == "gzip":
        return gzip.open(sf.path, "rb")
    if sf.compression == "bzip2":
        return bz2.open(sf.path, "rb")
    if sf.compression == "xz":
        return lzma.open(sf.path, "rb")
    if sf.compression == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(sf.path, "rb"), read_across_frames=True, closefd=True)
    return open(sf.path, "rb")


def _gunzip(src: Path, out: Path) -> None:
    """Decompress gzip (multi-member too) chunk by chunk, so that everything that decompressed
    is on disk before EOFError reports a stream cut short."""
    d = _inflate.decompressobj(16 + _inflate.MAX_WBITS)
    fed = False  # has the current member received any input?
    with open(src, "rb") as fin, open(out, "wb") as dst:
        while chunk := fin.read(1 << 20):
            while chunk:
                fed = True
                dst.write(d.decompress(chunk))
                if not d.eof:
                    break
                chunk = d.unused_data.lstrip(b"\x00")  # next member (or zero padding)
                d, fed = _inflate.decompressobj(16 + _inflate.MAX_WBITS), False
        dst.write(d.flush())
    if fed and not d.eof:
        raise EOFError("compressed file ended before the end-of-stream marker was reached")


def _decompress(sf: SourceFile) -> Path:
    if sf.compression is None:
        return sf.path
    out = _scratch() / f"{next(_names)}_{sf.path.name}.txt"  # (unique also when files are decompressed in parallel)
    try:
        if sf.compression == "gzip":
            _gunzip(sf.path, out)
        else:
            with _opener(sf) as src, open(out, "wb") as dst:
                # small chunks: a truncated stream loses at most one chunk
                shutil.copyfileobj(src, dst, 64 << 10)
    except (EOFError, *_INFLATE_ERRORS) as exc:
        # A truncated archive (a copy cut short, a file still being written): keep what
        # decompressed and say so, rather than losing the whole file.
        if out.stat().st_size == 0:
            raise InputError(f"{sf.path}: unreadable {sf.compression} data ({exc})") from exc
        sf.problems.append(f"truncated {sf.compression} stream: {exc}")
    except OSError as exc:
        raise InputError(f"{sf.path}: unreadable {sf.compression} data ({exc})") from exc
    except Exception as exc:  # zstandard raises its own error type
        if type(exc).__module__.startswith("zstandard"):
            if out.exists() and out.stat().st_size > 0:
                sf.problems.append(f"truncated {sf.compression} stream: {exc}")
            else:
                raise InputError(f"{sf.path}: unreadable {sf.compression} data ({exc})") from exc
        else:
            raise
    return out


def open_bytes(sf: SourceFile):
    """A binary file object over the decompressed content (for loaders that need bytes)."""
    return open(sf.readable, "rb")


def head(sf: SourceFile, n_bytes: int = 65536) -> str:
    """The first bytes of the decompressed content as text (for format detection)."""
    try:
        with _opener(sf) as fh:
            data = fh.read(n_bytes)
    except (EOFError, OSError, zlib.error):
        with open(sf.readable, "rb") as fh:
            data = fh.read(n_bytes)
    return data.decode("utf-8", errors="replace").lstrip("\ufeff")


# --- discovery and rotation order ----------------------------------------------------------

_COMPRESSED_SUFFIX = re.compile(r"\.(gz|zst|zstd|bz2|xz)$")
_NUMBERED = re.compile(r"^(?P<base>.*?)\.(?P<n>\d{1,3})$")
_DATED = re.compile(r"^(?P<base>.*?)[-.](?P<date>\d{8}(?:[-T]?\d{4,6})?)$")


def rotation_key(path: Path) -> tuple[str, int, str]:
    """Sort key putting a rotated set in time order: ``mail.log.3.gz, mail.log.2.gz, mail.log.1,
    mail.log`` and ``maillog-20261101, maillog-20261108, maillog``.

    Returns (family, rank, tie-break); a smaller rank is older.
    """
    name = _COMPRESSED_SUFFIX.sub("", path.name)
    if m := _NUMBERED.match(name):
        return (str(path.parent / m["base"]), -int(m["n"]), "")
    if m := _DATED.match(name):
        return (str(path.parent / m["base"]), -1000, m["date"])
    return (str(path.parent / name), 0, "")


def discover(inputs: list[str | os.PathLike]) -> list[SourceFile]:
    """Expand files, directories (their regular, non-hidden files) and globs into
    :class:`SourceFile` objects, rotated sets in time order, each file once.

    Raises :class:`InputError` for a path that does not exist or a glob that matches nothing.
    """
    paths: list[Path] = []
    expanded: set[Path] = set()
    for item in inputs:
        s = str(item)
        p = Path(s)
        if p.is_dir():
            found = sorted(c for c in p.iterdir() if c.is_file() and not c.name.startswith("."))
            if not found:
                raise InputError(f"{p}: directory has no files")
            paths.extend(found)
            expanded.update(c.resolve() for c in found)
        elif p.is_file():
            paths.append(p)
        elif any(ch in s for ch in "*?["):
            found = sorted(Path(x) for x in globmod.glob(s) if Path(x).is_file())
            if not found:
                raise InputError(f"{s}: no file matches this pattern")
            paths.extend(found)
        elif p.exists():
            raise InputError(f"{p}: not a regular file")
        else:
            raise InputError(f"{p}: no such file or directory")
    seen: set[Path] = set()
    unique: list[Path] = []
    for p in paths:
        rp = p.resolve()
        if rp not in seen:
            seen.add(rp)
            unique.append(p)
    unique.sort(key=rotation_key)
    out = []
    for p in unique:
        try:
            comp = compression_of(p)
            mtime = datetime.fromtimestamp(p.stat().st_mtime, tz=timezone.utc)
        except OSError as exc:
            raise InputError(f"{p}: cannot read ({exc.strerror})") from exc
        out.append(SourceFile(path=p, compression=comp, mtime=mtime, from_directory=p.resolve() in expanded))
    return out


def decompress_all(files: list[SourceFile], *, workers: int = 2) -> None:
    """Decompress the compressed ones of ``files`` now, ``workers`` at a time (ISA-L or zlib,
    bz2, lzma and zstd release the GIL), instead of one after the other when each is first read."""
    todo = [sf for sf in files if sf.compression is not None and sf._readable is None]
    if len(todo) < 2:
        return
    from concurrent.futures import ThreadPoolExecutor

    def one(sf: SourceFile) -> Path | None:
        try:
            return sf.readable
        except InputError:
            return None  # raised again where the file is first read, which decides what to do about it

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, todo))


_LINE_CSV = dict(
    has_header=False,
    separator="\x00",
    quote_char=None,
    encoding="utf8-lossy",
    new_columns=["line"],
    schema={"line": pl.String},
    truncate_ragged_lines=True,
    extra_columns="ignore",  # a NUL (the separator) in a damaged line: keep the text before it
    empty_string_is_null=False,
    row_index_name="line_no",
)


def _line_frame(lf, name: str, *, cr: bool = True):
    line = pl.col("line").fill_null("")
    return lf.select(pl.lit(name).alias("file"), pl.col("line_no").cast(pl.Int64), line.str.strip_suffix("\r") if cr else line)


def line_batches(sf: SourceFile, *, batch_bytes: int = 48 << 20) -> Iterator[pl.DataFrame]:
    """The lines of one file as :func:`scan_lines` gives them (``file, line_no, line``), in
    frames of about ``batch_bytes`` of text each, read one after the other: memory stays
    bounded by the batch whatever the file size, and no batch re-reads earlier ones (as a
    ``slice`` of a scan would).

    Each block is read straight into the bytes the CSV reader parses (file reads and the
    parse release the GIL, so other threads go on); a block that ends inside a line drops
    that partial line, which the next block starts with."""
    path = sf.readable
    size = path.stat().st_size
    next_no, start = 1, 0
    with open(path, "rb", buffering=0) as fh:
        while start < size:
            want = batch_bytes
            while True:
                fh.seek(start)
                buf = fh.read(want)
                at_end = start + len(buf) >= size
                # whole lines only: a line longer than the block makes the block longer
                if at_end or buf.rfind(b"\n") >= 0:
                    break
                want *= 2
            keep = len(buf) if at_end else buf.rfind(b"\n") + 1
            if b"\x00" in buf:
                # Binary junk: keep the whole line, NULs shown as U+FFFD, so it is counted
                # (as malformed or skipped) like any other unreadable line.
                buf = buf[:keep].replace(b"\x00", "\ufffd".encode())
                keep_rows = None
            else:
                keep_rows = None if keep == len(buf) else buf.count(b"\n", 0, keep)
            df = pl.read_csv(buf, row_index_offset=next_no, **_LINE_CSV)
            if keep_rows is not None:
                df = df.head(keep_rows)  # the partial last line comes again with the next block
            cr = b"\r" in buf
            del buf
            start += keep
            next_no += df.height
            yield _line_frame(df.lazy(), sf.name, cr=cr).collect()


def scan_lines(files: list[SourceFile]) -> pl.LazyFrame:
    """All lines of ``files`` as a lazy frame ``file, line_no, line``, in file order.

    Invalid UTF-8 is replaced (U+FFFD) rather than failing, trailing CR is removed, and
    empty lines are kept so line numbers match the file.
    """
    frames = []
    for sf in files:
        if sf.readable.stat().st_size == 0:
            continue
        frames.append(_line_frame(pl.scan_csv(sf.readable, row_index_offset=1, **_LINE_CSV), sf.name))
    if not frames:
        return pl.LazyFrame(schema={"file": pl.String, "line_no": pl.Int64, "line": pl.String})
    return pl.concat(frames, how="vertical")
