"""Reading JSON event exports (ESP webhooks, event APIs, Firehose/SNS dumps) into one row per record.

A file is either *JSON lines* (one JSON value per line; a value may itself be a batch
array, as when webhook bodies are logged one per line) or one JSON *document* (a
pretty-printed array or object, as SendGrid batches and SES examples are saved).  Every
top-level value is wrapped into an array and decoded by polars with the loader's explicit
dtype, then exploded, so a batch of N events becomes N records.  Leaf fields are declared
as strings (polars renders JSON numbers and booleans as text), so ESPs that send a field
sometimes as a number and sometimes as a string still decode; loaders cast afterwards.

Record numbers: for JSON lines ``line_no`` is the line; for a document it is the
1-based index of the element in the top-level array.
"""

from __future__ import annotations

import json

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


def _is_lines(sf: SourceFile) -> bool:
    """JSON lines when one of the first non-empty lines is a complete JSON object or array by itself."""
    lines = [ln.strip() for ln in head(sf).splitlines() if ln.strip()][:3]
    for ln in lines:
        if ln[0] in "[{" and ln[-1] in "]}":
            try:
                json.loads(ln)
                return True
            except ValueError:
                continue
    return False


def _raw_frames(files: list[SourceFile]) -> list[pl.LazyFrame]:
    frames = []
    for sf in files:
        if sf.readable.stat().st_size == 0:
            continue
        if _is_lines(sf):
            frames.append(scan_lines([sf]).with_columns(pl.lit(False).alias("doc")))
        else:
            text = sf.readable.read_bytes().decode("utf-8", errors="replace").lstrip("\ufeff")
            frames.append(pl.LazyFrame({"file": [sf.name], "line_no": [1], "line": [text], "doc": [True]},
                                       schema={"file": pl.String, "line_no": pl.Int64, "line": pl.String, "doc": pl.Boolean}))
    return frames


def _flags(raw: pl.LazyFrame) -> pl.LazyFrame:
    s = pl.col("line").str.strip_chars()
    return raw.with_columns(
        s.alias("line"),
        (s == "").alias("_blank"),
        s.str.starts_with("[").alias("_arr"),
        s.str.starts_with("{").alias("_obj"),
    )


def _decode(raw: pl.LazyFrame, dtype: pl.Struct, *, check: bool) -> pl.LazyFrame:
    """Decode flagged lines.  Without ``check`` every line that starts like JSON must be valid (fast
    path: one parse per line); with ``check`` invalid lines are found first and counted as malformed."""
    s, arr, obj = pl.col("line"), pl.col("_arr"), pl.col("_obj")
    shaped = arr | obj
    # json_path_match returns null instead of raising on invalid JSON: it is the validity test.
    valid = shaped & s.str.json_path_match("$").is_not_null() if check else shaped
    bad = (
        pl.when(pl.col("_blank")).then(pl.lit("blank line"))
        .when(valid).then(pl.lit(None, pl.String))
        .when(shaped & ~s.str.ends_with("}") & ~s.str.ends_with("]")).then(pl.lit("truncated JSON"))
        .when(shaped).then(pl.lit("invalid JSON"))
        .otherwise(pl.lit("not a JSON object or array"))
    )
    # Objects and batch arrays are decoded apart (no string rewriting), then every value becomes
    # a list of records that is exploded: a batch of N events gives N rows.
    one = pl.when(valid & obj).then(s).str.json_decode(dtype)
    cols = [
        "file",
        "line_no",
        "doc",
        bad.alias("bad"),
        pl.when(~valid).then(s.str.slice(0, TEXT_LIMIT)).alias("text"),
    ]
    if "_single" in raw.collect_schema():
        return raw.select(*cols, one.alias("rec")).drop("doc")
    many = pl.when(valid & arr).then(s).str.json_decode(pl.List(dtype))
    return (
        raw.select(*cols, pl.when(arr).then(many).otherwise(pl.concat_list(one)).alias("rec"), arr.alias("_arr"))
        .explode("rec", empty_as_null=True, keep_nulls=True)
        .with_columns(
            pl.when(pl.col("doc")).then(pl.col("line_no").cum_count().over("file").cast(pl.Int64)).otherwise("line_no").alias("line_no"),
            pl.when(pl.col("bad").is_null() & pl.col("rec").is_null() & pl.col("_arr")).then(pl.lit("empty batch")).otherwise("bad").alias("bad"),
        )
        .drop("doc", "_arr")
    )


def _decoded(lf: pl.LazyFrame, dtype: pl.Struct) -> pl.DataFrame:
    flagged = _flags(lf).collect()
    if not flagged["_arr"].any():
        # No batch arrays: one record per line, no list building and exploding (the common,
        # large case: Firehose dumps, exported event logs).
        flagged = flagged.with_columns(pl.col("_arr").alias("_single"))
    try:
        return _decode(flagged.lazy(), dtype, check=False).collect()
    except pl.exceptions.ComputeError:
        # Some line is not valid JSON (or not of the expected shape): find the bad lines first.
        return _decode(flagged.lazy(), dtype, check=True).collect()


def read(files: list[SourceFile], dtype: pl.Struct) -> tuple[pl.DataFrame, list[str]]:
    """Decode ``files`` into ``file, line_no, bad, text, rec``: one row per record.

    ``rec`` is the record as ``dtype`` (null when ``bad`` says why: blank line, invalid or
    truncated JSON, empty batch); ``text`` keeps the start of a bad line for the accounting.
    Returns the frame and file-level problems.  A file whose JSON does not fit ``dtype`` (an
    object where a string was expected) is reported as one malformed record, not an error.
    """
    problems = [f"{sf.name}: {p}" for sf in files for p in sf.problems]
    problems += [f"{sf.name}: file is empty" for sf in files if sf.readable.stat().st_size == 0]
    frames = _raw_frames(files)
    empty = pl.DataFrame(schema={"file": pl.String, "line_no": pl.Int64, "bad": pl.String, "text": pl.String, "rec": dtype})
    if not frames:
        return empty, problems
    try:
        return _decoded(pl.concat(frames), dtype), problems
    except pl.exceptions.PolarsError:
        pass
    # Some file has a shape the dtype does not expect: decode file by file so only it is lost.
    parts = []
    for lf in frames:
        try:
            parts.append(_decoded(lf, dtype))
        except pl.exceptions.PolarsError as exc:
            name = lf.select(pl.col("file").first()).collect().item()
            msg = str(exc).splitlines()[0][:200]
            problems.append(f"{name}: JSON structure not understood ({msg})")
            parts.append(pl.DataFrame({"file": [name], "line_no": [1], "bad": ["unexpected JSON structure"], "text": [msg], "rec": [None]},
                                      schema=empty.schema))
    return pl.concat(parts), problems
