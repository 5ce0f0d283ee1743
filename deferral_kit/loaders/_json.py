"""Reading JSON event exports (ESP webhooks, event APIs, Firehose/SNS dumps) into one row per record.

A file is either *JSON lines* (one JSON value per line; a value may itself be a batch
array, as when webhook bodies are logged one per line) or one JSON *document* (a
pretty-printed array or object, as SendGrid batches and SES examples are saved).  polars
decodes every value with the loader's explicit dtype; batch arrays are exploded, so a batch
of N events becomes N records.  Leaf fields are declared as strings (polars renders JSON
numbers and booleans as text), so ESPs that send a field sometimes as a number and sometimes
as a string still decode; loaders cast afterwards.  Plans run on the streaming engine, so a
large export is never held in memory as text.

Record numbers: for JSON lines ``line_no`` is the line; for a document it is the
1-based index of the element in the top-level array, for concatenated objects the object's.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import polars as pl

from ..sources import SourceFile, head, scan_lines

TEXT_LIMIT = 300  # characters of a bad line kept as an accounting example

_DECODER = json.JSONDecoder()


def first_values(text: str, n: int = 5) -> list:
    """The first top-level JSON values of a file head (array elements are unwrapped), for ``sniff``.

    Works on JSON lines, complete documents and documents cut off by the 64 KiB head
    (then only the first array element is returned).  Returns [] when nothing parses.
    """
    s = text.lstrip("\ufeff \t\r\n")
    if not s or s[0] not in "[{":
        return []
    try:
        value, _ = _DECODER.raw_decode(s)
    except ValueError:
        if not s.startswith("["):
            return []
        i = 1
        while i < len(s) and s[i] in " \t\r\n":
            i += 1
        try:
            value, _ = _DECODER.raw_decode(s, i)
        except ValueError:
            return []
        return [value]
    if isinstance(value, list):
        return value[:n]
    return [value]


def _layout(sf: SourceFile) -> str:
    """``single`` (JSON lines, one object per line), ``batches`` (JSON lines, some lines are arrays),
    ``concatenated`` (objects back to back without newlines, as Kinesis Firehose writes them to
    S3 unless told to add a delimiter) or ``document`` (one pretty-printed value), from the head."""
    text = head(sf)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()][:5]
    for ln in lines[:3]:
        if ln[0] in "[{" and ln[-1] in "]}":
            try:
                json.loads(ln)
            except ValueError:
                try:
                    _, end = _DECODER.raw_decode(ln)
                except ValueError:
                    continue
                if ln[end:].lstrip().startswith("{"):
                    return "concatenated"
                continue
            return "batches" if any(x.startswith("[") for x in lines) else "single"
    return "document"


_RAW = {"file": pl.String, "line_no": pl.Int64, "line": pl.String}


def _decode(raw: pl.LazyFrame, dtype: pl.Struct, *, layout: str, check: bool) -> pl.LazyFrame:
    """Decode the lines of one file.  Without ``check`` every line that starts like JSON must be
    valid (fast path: one parse per line, the query fails otherwise); with ``check`` invalid
    lines are found first and counted as malformed."""
    s = pl.col("line")
    arr, obj = s.str.contains(r"^\s*\["), s.str.contains(r"^\s*\{")
    shaped = arr | obj
    # json_path_match returns null instead of raising on invalid JSON: it is the validity test.
    valid = shaped & s.str.json_path_match("$").is_not_null() if check else shaped
    bad = (
        pl.when(~s.str.contains(r"\S")).then(pl.lit("blank line"))
        .when(valid).then(pl.lit(None, pl.String))
        .when(shaped & ~s.str.contains(r"[}\]]\s*$")).then(pl.lit("truncated JSON"))
        .when(shaped).then(pl.lit("invalid JSON"))
        .otherwise(pl.lit("not a JSON object or array"))
    )
    cols = ["file", "line_no", bad.alias("bad"), pl.when(~valid).then(s.str.strip_chars().str.slice(0, TEXT_LIMIT)).alias("text")]
    one = pl.when(valid & obj).then(s).str.json_decode(dtype)
    if layout in ("single", "concatenated") and not check:
        # One record per line: no list building and exploding (the common, large case:
        # Firehose dumps, exported event logs).
        return raw.select(*cols, one.alias("rec"))
    # Objects and batch arrays are decoded apart (no string rewriting), then every value becomes
    # a list of records that is exploded: a batch of N events gives N rows.
    many = pl.when(valid & arr).then(s).str.json_decode(pl.List(dtype))
    out = (
        raw.select(*cols, pl.when(arr).then(many).otherwise(pl.concat_list(one)).alias("rec"), arr.alias("_arr"))
        .explode("rec", empty_as_null=True, keep_nulls=True)
        .with_columns(pl.when(pl.col("bad").is_null() & pl.col("rec").is_null() & pl.col("_arr")).then(pl.lit("empty batch")).otherwise("bad").alias("bad"))
        .drop("_arr")
    )
    if layout == "document":
        out = out.with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("line_no"))
    return out


def _raw(sf: SourceFile, layout: str) -> pl.LazyFrame:
    if layout == "concatenated":
        # Objects are split at "}{" boundaries (a JSON string never holds a raw newline, so the
        # inserted one cannot land inside a value unless a string itself contains "}{").
        return (
            scan_lines([sf])
            .with_columns(pl.col("line").str.replace_all(r"\}\s*\{", "}\n{").str.split("\n"))
            .explode("line")
            .with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("line_no"))
        )
    if layout != "document":
        return scan_lines([sf])
    text = sf.readable.read_bytes().decode("utf-8", errors="replace").lstrip("\ufeff")
    return pl.LazyFrame({"file": [sf.name], "line_no": [1], "line": [text]}, schema=_RAW)


def records(files: list[SourceFile], dtype: pl.Struct, *, check: bool = False) -> pl.LazyFrame:
    """A lazy frame ``file, line_no, bad, text, rec``: one row per record of ``files``.

    ``rec`` is the record decoded as ``dtype`` (null when ``bad`` says why: blank line, invalid or
    truncated JSON, empty batch); ``text`` keeps the start of a bad line for the accounting.
    Without ``check`` the plan assumes valid JSON and fails when collected otherwise: see
    :func:`collect`.
    """
    frames = []
    for sf in files:
        if sf.readable.stat().st_size == 0:
            continue
        layout = _layout(sf)
        frames.append(_decode(_raw(sf, layout), dtype, layout=layout, check=check))
    if not frames:
        return pl.LazyFrame(schema={"file": pl.String, "line_no": pl.Int64, "bad": pl.String, "text": pl.String, "rec": dtype})
    return pl.concat(frames)


def unreadable(sf: SourceFile, dtype: pl.Struct, why: str) -> pl.LazyFrame:
    """One malformed record standing for a whole file whose JSON has a shape the loader cannot decode."""
    return pl.LazyFrame({"file": [sf.name], "line_no": [1], "bad": ["unexpected JSON structure"], "text": [why], "rec": [None]},
                        schema={"file": pl.String, "line_no": pl.Int64, "bad": pl.String, "text": pl.String, "rec": dtype})


def collect(files: list[SourceFile], dtype: pl.Struct, plan) -> tuple[pl.DataFrame, list[str]]:
    """Run ``plan(records)`` (the loader's classification of :func:`records`) over ``files`` with the
    streaming engine, so only the decoded fields are held, not the input text.

    Fast path first; if some line is not valid JSON the records are re-read with the validity
    check; if a file still fails (an object where the loader expects a string) it is decoded
    on its own and, failing again, reported as one malformed record and a problem, not an error.
    Returns the frame and file-level problems (empty or truncated files).
    """
    problems = [f"{sf.name}: {p}" for sf in files for p in sf.problems]
    problems += [f"{sf.name}: file is empty" for sf in files if sf.readable.stat().st_size == 0]
    for check in (False, True):
        try:
            return plan(records(files, dtype, check=check)).collect(engine="streaming"), problems
        except pl.exceptions.ComputeError:
            continue
    parts = []
    for sf in files:
        try:
            parts.append(plan(records([sf], dtype, check=True)).collect(engine="streaming"))
        except pl.exceptions.ComputeError as exc:
            why = str(exc).splitlines()[0][:200]
            problems.append(f"{sf.name}: JSON structure not understood ({why})")
            parts.append(plan(unreadable(sf, dtype, why)).collect())
    return pl.concat(parts), problems


WHOLE_FILE_BYTES = 384 << 20  # JSON lines files up to this size are decoded in one streaming pass
BLOCK_BYTES = 64 << 20  # larger ones in blocks of about this much text


def _pieces(sf: SourceFile, dtype: pl.Struct, check: bool):
    """The records of one (non-empty) file as lazy frames of bounded size: JSON lines of a file
    larger than :data:`WHOLE_FILE_BYTES` in blocks of about :data:`BLOCK_BYTES` (line numbers
    as in the whole file; a streaming pass over a whole file is faster but holds its decoded
    records); smaller files, documents and concatenated objects whole (their record numbers
    count over the file)."""
    layout = _layout(sf)
    if layout in ("single", "batches") and sf.readable.stat().st_size > WHOLE_FILE_BYTES:
        from .generic import block_lines, byte_blocks

        for line_no, data in byte_blocks(sf, batch_bytes=BLOCK_BYTES):
            yield _decode(block_lines(sf, line_no, data).lazy(), dtype, layout=layout, check=check)
    else:
        yield _decode(_raw(sf, layout), dtype, layout=layout, check=check)


def collect_blocks(files: list[SourceFile], dtype: pl.Struct, plan, start: Callable[[], object],
                   take: Callable[[object, pl.DataFrame], None]) -> tuple[object, list[str]]:
    """:func:`collect` block by block: ``take(state, frame)`` receives ``plan(records)`` of each
    block of lines (:func:`_pieces`, in input order) and reduces it into ``state`` (made by
    ``start()``), so only one block's decoded records are held at once.

    Same fallbacks as :func:`collect`: if the fast path fails on any block, every file is read
    again with the validity check (``state`` starts afresh); if a file still fails it is
    reported as one malformed record.  An input without records gives one empty frame.
    Returns the state and the file-level problems.
    """
    problems = [f"{sf.name}: {p}" for sf in files for p in sf.problems]
    problems += [f"{sf.name}: file is empty" for sf in files if sf.readable.stat().st_size == 0]
    full = [sf for sf in files if sf.readable.stat().st_size > 0]
    for check in (False, True):
        state = start()
        if not full:
            take(state, plan(records([], dtype, check=check)).collect(engine="streaming"))
            return state, problems
        failed = False
        for sf in full:
            for piece in _pieces(sf, dtype, check):
                try:
                    frame = plan(piece).collect(engine="streaming")
                except pl.exceptions.ComputeError:
                    failed = True
                    break
                take(state, frame)
                del frame
            if failed:
                break
        if not failed:
            return state, problems
    state = start()
    for sf in full:
        # A file is taken whole or not at all: one malformed record stands for it.
        try:
            frames = [plan(piece).collect(engine="streaming") for piece in _pieces(sf, dtype, True)]
        except pl.exceptions.ComputeError as exc:
            why = str(exc).splitlines()[0][:200]
            problems.append(f"{sf.name}: JSON structure not understood ({why})")
            frames = [plan(unreadable(sf, dtype, why)).collect()]
        for frame in frames:
            take(state, frame)
        del frames
    return state, problems
