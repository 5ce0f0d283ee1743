"""Generic CSV / JSON-lines delivery logs from in-house pipelines, read through a user mapping.

Never auto-detected: name it (``--format generic --mapping map.yaml``; ``--mapping`` alone
implies it) or call ``loaders.load(paths, format="generic", mapping={...})``.

The mapping (a dict, or the same as YAML)::

    columns:                 # canonical column -> source column, or {value: constant}
      ts: event_time
      recipient: rcpt
      mx_host: mx
      response: smtp_reply
      outcome: status
      queue_id: msg_uuid
      agent: {value: smtp}   # default "smtp": each row is a try against a remote host
    timestamp:
      format: "%Y-%m-%d %H:%M:%S"   # strftime pattern, or epoch_s / epoch_ms / epoch_us; omitted: ISO 8601
      tz: Europe/Berlin             # zone of timestamps written without an offset (default: --tz)
    outcomes: {sent: delivered, soft_bounce: deferred, hard_bounce: bounced, expired: expired}
    reply_regex: '^(?P<code>\\d{3})[ -](?P<enhanced>[245]\\.\\d{1,3}\\.\\d{1,3})?'
    format: csv              # csv or ndjson; default: by content (a line starting with "{" is JSON)
    separator: ","           # CSV only

Rows whose outcome value is not in ``outcomes`` (and not already a canonical outcome) are
counted as skipped with the value as the reason; rows without a parseable timestamp are
malformed.  ``smtp_code``/``enhanced_code`` come from ``reply_regex`` on ``response``
unless mapped; ``attempt`` is derived unless mapped.

This module also holds the small expressions the other loaders share (recipient domain,
reply code split, attempt numbering).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import polars as pl

from .. import schema
from ..accounting import Accounting
from ..sources import InputError, SourceFile, head, scan_lines
from . import Load, LoadOptions

FORMAT = "generic"

# "452 4.3.1 text", "452-4.3.1 text", "250 2.1.5Recipient OK" (Exchange writes no space), "452 text".
REPLY_REGEX = r"^\s*(?P<code>[2-5]\d\d)(?:[ -](?P<enhanced>[245]\.\d{1,3}\.\d{1,3})|[ -]|$)?"
_ENHANCED_ANYWHERE = r"\b([245]\.\d{1,3}\.\d{1,3})\b"


def sniff(text: str) -> bool:
    """Never claims a file: generic data is only read when the user names the format."""
    return False


# --- shared expressions ---------------------------------------------------------------------


def domain_of(address: pl.Expr) -> pl.Expr:
    """Lower-cased domain of an address (``user@Example.COM`` → ``example.com``, ``<a@b>`` → ``b``)."""
    return address.str.extract(r"@([^@>\s]+)>?\s*$").str.to_lowercase().str.strip_suffix(".")


def normalize_host(host: pl.Expr) -> pl.Expr:
    """A host name lower-cased, without a trailing dot; empty → null."""
    h = host.str.strip_chars().str.strip_suffix(".").str.to_lowercase()
    return pl.when(h != "").then(h)


def reply_code(reply: pl.Expr, regex: str = REPLY_REGEX) -> pl.Expr:
    """The 3-digit code at the start of a reply text, as Int16."""
    return reply.str.extract(regex, 1).cast(pl.Int16, strict=False)


def reply_enhanced(reply: pl.Expr, regex: str = REPLY_REGEX) -> pl.Expr:
    """The x.y.z enhanced status code right after the reply code, when the reply has one."""
    return reply.str.extract(regex, 2)


def squash_spaces(text: pl.Expr) -> pl.Expr:
    """Runs of whitespace as one space, trimmed (same result as ``replace_all(r"\\s+", " ")``)."""
    # A lone space, nearly every match of "\s+", is left alone: several times faster.
    return text.str.replace_all(r"[^\S ]\s*|\s{2,}", " ").str.strip_chars()


def number_attempts(frame: pl.LazyFrame, *, sort: bool = True) -> pl.LazyFrame:
    """Fill ``attempt`` where null: 1 for the first row of a (message_key, recipient) in time
    order (file/line order breaking ties), counting up.  Rows are returned in time order, or
    in their own order with ``sort=False`` (no copy of the frame: for large loads)."""
    keys = ["message_key", "recipient"]
    have = frame.collect_schema()
    by = ["ts", "file", "line_no"]
    if sort:
        frame = frame.sort(*by, nulls_last=True)
        derived = (pl.int_range(pl.len()).over(keys) + 1).cast(pl.Int32)
    else:
        # The inverse of the time-order permutation is each row's global time rank.
        order = pl.arg_sort_by(by, nulls_last=True).arg_sort()
        derived = order.rank("ordinal").over(keys).cast(pl.Int32)
    if "attempt" in have:
        return frame.with_columns(pl.col("attempt").cast(pl.Int32, strict=False).fill_null(derived))
    return frame.with_columns(derived.alias("attempt"))


def byte_blocks(sf: SourceFile, *, batch_bytes: int = 16 << 20) -> Iterator[tuple[int, bytes]]:
    """``(first line number, bytes)`` blocks of about ``batch_bytes`` of one file, each cut
    after its last line break."""
    if sf.readable.stat().st_size == 0:
        return
    line_no = 1
    rest = b""
    with open(sf.readable, "rb") as fh:
        while True:
            block = fh.read(batch_bytes)
            data = rest + block
            if block:
                cut = data.rfind(b"\n")
                if cut < 0:
                    rest = data
                    continue
                data, rest = data[: cut + 1], data[cut + 1 :]
            if not data:
                break
            yield line_no, data
            line_no += data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
            if not block:
                break


def block_lines(sf: SourceFile, line_no: int, data: bytes) -> pl.DataFrame:
    """One block from :func:`byte_blocks` as ``file, line_no, line`` (as :func:`scan_lines` reads it)."""
    df = pl.read_csv(
        data, has_header=False, separator="\x00", quote_char=None, encoding="utf8-lossy", new_columns=["line"],
        schema={"line": pl.String}, truncate_ragged_lines=True, empty_string_is_null=False, extra_columns="ignore",
    )
    return df.select(
        pl.lit(sf.name).alias("file"),
        (pl.int_range(pl.len(), dtype=pl.Int64) + line_no).alias("line_no"),
        pl.col("line").fill_null("").str.strip_suffix("\r"),
    )


def line_batches(files: list[SourceFile], *, batch_bytes: int = 16 << 20) -> Iterator[pl.DataFrame]:
    """The lines of ``files`` as ``file, line_no, line`` frames of about ``batch_bytes`` each,
    read the same way as :func:`deferral_kit.sources.scan_lines` (lossy UTF-8, trailing CR
    removed, empty lines kept).  Memory stays bounded by the batch size, which polars'
    ``collect_batches`` does not guarantee (its reader runs ahead)."""
    for sf in files:
        for line_no, data in byte_blocks(sf, batch_bytes=batch_bytes):
            yield block_lines(sf, line_no, data)


def account(classified: pl.LazyFrame, *, files: list[SourceFile], fmt: str, problems: list[str]) -> Accounting:
    """The accounting of ``classified`` (``file, line_no, category, reason`` and optionally
    ``text``: one row per line).

    Example texts missing from ``classified`` are read back from the files for the few
    example lines only, so a loader need not carry every line's text through its parse."""
    if "text" not in classified.collect_schema():
        classified = classified.with_columns(pl.lit(None, dtype=pl.String).alias("text"))
    acc = Accounting.from_classified(classified, fmt=fmt, problems=problems)
    missing = acc.examples.filter(pl.col("text").is_null())
    if missing.height:
        # Block by block (a scan of the whole file would map it all into memory).
        wanted = missing.select("file", "line_no").unique()
        names = set(wanted["file"].to_list())
        texts = pl.concat(
            [
                batch.join(wanted, on=["file", "line_no"], how="semi").select("file", "line_no", pl.col("line").str.slice(0, 500).alias("_read"))
                for batch in line_batches([sf for sf in files if sf.name in names])
            ]
            or [pl.DataFrame(schema={"file": pl.String, "line_no": pl.Int64, "_read": pl.String})]
        )
        acc.examples = (
            acc.examples.join(texts, on=["file", "line_no"], how="left", maintain_order="left")
            .with_columns(pl.col("text").fill_null(pl.col("_read")))
            .drop("_read")
        )
    return acc


def parse_ts(text: pl.Expr, *, fmt: str | None, tz: str) -> pl.Expr:
    """Timestamps to UTC: ISO 8601 with or without offset (no offset → ``tz``), a strftime
    pattern, or epoch seconds/milliseconds/microseconds."""
    if fmt in ("epoch_s", "epoch", "epoch_ms", "epoch_us"):
        scale = {"epoch_s": 1_000_000, "epoch": 1_000_000, "epoch_ms": 1_000, "epoch_us": 1}[fmt]
        return (text.cast(pl.Float64, strict=False) * scale).round().cast(pl.Int64).cast(schema.UTC_DT)
    t = text.str.strip_chars()
    if fmt:
        with_zone = "%z" in fmt or "%Z" in fmt
        parsed = t.str.to_datetime(fmt, time_unit="us", strict=False)
        return parsed.dt.convert_time_zone("UTC") if with_zone else parsed.dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null").dt.convert_time_zone("UTC")
    t = t.str.replace(" ", "T")
    has_zone = t.str.contains(r"(Z|[+-]\d\d:?\d\d)$")
    zoned = t.str.replace(r"Z$", "+00:00").str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%z", time_unit="us", strict=False)
    zoned = zoned.fill_null(t.str.replace(r"Z$", "+00:00").str.to_datetime("%Y-%m-%dT%H:%M:%S%z", time_unit="us", strict=False))
    naive = t.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", time_unit="us", strict=False).fill_null(
        t.str.to_datetime("%Y-%m-%dT%H:%M:%S", time_unit="us", strict=False)
    ).fill_null(t.str.to_datetime("%Y-%m-%dT%H:%M", time_unit="us", strict=False))
    return (
        pl.when(has_zone)
        .then(zoned.dt.convert_time_zone("UTC"))
        .otherwise(naive.dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null").dt.convert_time_zone("UTC"))
    )


# --- the generic loader -----------------------------------------------------------------------

_TRUE = ["true", "1", "yes", "y", "t"]


def _mapping(options: LoadOptions) -> dict:
    m = options.mapping
    if not m:
        raise InputError("format 'generic' needs a column mapping (--mapping FILE or mapping={...})")
    if not isinstance(m, Mapping) or not isinstance(m.get("columns"), Mapping):
        raise InputError("generic mapping: expected a 'columns:' table of canonical column -> source column")
    unknown = sorted(set(m["columns"]) - set(schema.ATTEMPT_COLUMNS))
    if unknown:
        raise InputError(f"generic mapping: unknown canonical columns {unknown}; known: {', '.join(schema.ATTEMPT_COLUMNS)}")
    if "ts" not in m["columns"]:
        raise InputError("generic mapping: 'columns' must map 'ts' (the time of the try)")
    return dict(m)


def _source_columns(columns: Mapping) -> list[str]:
    return sorted({v for v in columns.values() if isinstance(v, str)})


def _read(sf: SourceFile, m: dict) -> pl.LazyFrame:
    """One file as ``__file, __line_no, __text, _ok, _blank`` plus the mapped source columns (all String)."""
    cols = _source_columns(m["columns"])
    fmt = m.get("format")
    if fmt is None:
        first = next((ln for ln in head(sf).splitlines() if ln.strip()), "")
        fmt = "ndjson" if first.lstrip().startswith("{") else "csv"
    if fmt in ("ndjson", "jsonl", "json"):
        lines = scan_lines([sf])
        line = pl.col("line").str.strip_chars()
        ok = line.str.starts_with("{") & line.str.json_path_match("$").is_not_null()
        rec = pl.when(ok).then(line).otherwise(pl.lit("{}")).str.json_decode(pl.Struct({c: pl.String for c in cols}))
        return lines.select(
            pl.col("file").alias("__file"), pl.col("line_no").alias("__line_no"), pl.col("line").alias("__text"), ok.alias("_ok"), (line == "").alias("_blank"), rec.alias("_rec")
        ).unnest("_rec")
    if fmt != "csv":
        raise InputError(f"generic mapping: format must be csv or ndjson, not {fmt!r}")
    sep = m.get("separator", ",")
    lf = pl.scan_csv(sf.readable, separator=sep, infer_schema=False, row_index_name="_row", truncate_ragged_lines=True, encoding="utf8-lossy")
    have = lf.collect_schema().names()
    missing = [c for c in cols if c not in have]
    if missing:
        raise InputError(f"{sf.name}: columns {missing} named in the mapping are not in the CSV header {have}")
    row_text = pl.concat_str([pl.col(c).fill_null("") for c in have], separator=sep)
    # A row cut short leaves its last columns null: count it as malformed, not as data.
    return lf.select(
        pl.lit(sf.name).alias("__file"),
        (pl.col("_row").cast(pl.Int64) + 2).alias("__line_no"),
        row_text.alias("__text"),
        pl.col(have[-1]).is_not_null().alias("_ok"),
        pl.lit(False).alias("_blank"),
        *[pl.col(c) for c in cols],
    )


def load(files: list[SourceFile], options: LoadOptions) -> Load:
    """Rows of CSV / JSON-lines files → canonical attempts through the user's mapping."""
    m = _mapping(options)
    columns: Mapping = m["columns"]
    ts_opts = m.get("timestamp") or {}
    tz = ts_opts.get("tz", options.tz)
    outcomes = {str(k): str(v) for k, v in (m.get("outcomes") or {}).items()}
    bad = sorted(set(outcomes.values()) - set(schema.OUTCOMES))
    if bad:
        raise InputError(f"generic mapping: outcomes must map to {', '.join(schema.OUTCOMES)}; got {bad}")
    regex = m.get("reply_regex") or REPLY_REGEX

    raw = pl.concat([_read(sf, m) for sf in files], how="vertical_relaxed")

    def src(name: str) -> pl.Expr | None:
        v = columns.get(name)
        if v is None:
            return None
        if isinstance(v, Mapping):
            return pl.lit(None if v.get("value") is None else str(v.get("value")), dtype=pl.String)
        return pl.col(v)

    ts = parse_ts(src("ts"), fmt=ts_opts.get("format"), tz=tz)
    out_src = src("outcome")
    outcome_raw = out_src.str.strip_chars() if out_src is not None else pl.lit(None, dtype=pl.String)
    outcome = outcome_raw.replace_strict(outcomes, default=None) if outcomes else pl.lit(None, dtype=pl.String)
    outcome = outcome.fill_null(pl.when(outcome_raw.str.to_lowercase().is_in(list(schema.OUTCOMES))).then(outcome_raw.str.to_lowercase()))
    frame = raw.with_columns(ts.alias("ts"), outcome.alias("outcome"), outcome_raw.alias("_outcome_raw"))

    category = (
        pl.when(pl.col("_blank")).then(pl.lit("skipped"))
        .when(~pl.col("_ok")).then(pl.lit("malformed"))
        .when(pl.col("ts").is_null()).then(pl.lit("malformed"))
        .when(pl.col("outcome").is_null()).then(pl.lit("skipped"))
        .otherwise(pl.lit("attempt"))
    )
    reason = (
        pl.when(pl.col("_blank")).then(pl.lit("blank line"))
        .when(~pl.col("_ok")).then(pl.lit("invalid JSON or truncated row"))
        .when(pl.col("ts").is_null()).then(pl.lit("unparseable timestamp"))
        .when(pl.col("outcome").is_null()).then(pl.concat_str(pl.lit("outcome not mapped: "), pl.col("_outcome_raw").fill_null("(empty)")))
    )
    frame = frame.with_columns(category.alias("_category"), reason.alias("_reason")).cache()
    accounting = Accounting.from_classified(
        frame.select(pl.col("__file").alias("file"), pl.col("__line_no").alias("line_no"), pl.col("_category").alias("category"), pl.col("_reason").alias("reason"), pl.col("__text").str.slice(0, 500).alias("text")),
        fmt=FORMAT,
        problems=[f"{sf.name}: {p}" for sf in files for p in sf.problems],
    )

    rows = frame.filter(pl.col("_category") == "attempt")
    exprs = []
    for name in schema.ATTEMPT_COLUMNS:
        if name in ("ts", "outcome", "file", "line_no") or name not in columns:
            continue
        exprs.append(src(name).alias(name))
    rows = rows.with_columns(exprs)
    have = set(columns)
    derived = [pl.lit(FORMAT).alias("source")] if "source" not in have else []
    if "agent" not in have:
        derived.append(pl.lit("smtp").alias("agent"))
    if "recipient_domain" not in have and "recipient" in have:
        derived.append(domain_of(pl.col("recipient")).alias("recipient_domain"))
    if "mx_host" in have:
        derived.append(normalize_host(pl.col("mx_host")).alias("mx_host"))
    if "response" in have:
        resp = pl.col("response").str.replace_all(r"\s+", " ").str.strip_chars()
        derived.append(resp.alias("response"))
        if "smtp_code" not in have:
            derived.append(reply_code(resp, regex).alias("smtp_code"))
        if "enhanced_code" not in have:
            derived.append(reply_enhanced(resp, regex).fill_null(pl.col("dsn") if "dsn" in have else pl.lit(None, dtype=pl.String)).alias("enhanced_code"))
    if "remote" in have:
        derived.append(pl.col("remote").str.to_lowercase().is_in(_TRUE).alias("remote"))
    if "queued_at" in have:
        derived.append(parse_ts(pl.col("queued_at"), fmt=ts_opts.get("format"), tz=tz).alias("queued_at"))
    if "message_key" not in have:
        key = next((c for c in ("queue_id", "message_id") if c in have), None)
        derived.append((pl.concat_str(pl.lit("generic:"), pl.col(key)) if key else pl.lit(None, dtype=pl.String)).alias("message_key"))
    rows = rows.with_columns(derived).with_columns(pl.col("__file").alias("file"), pl.col("__line_no").alias("line_no"))
    numeric = {"smtp_code": pl.Int16, "size": pl.Int64, "delay_s": pl.Float64, "attempt": pl.Int32}
    rows = rows.with_columns([pl.col(c).cast(pl.Float64, strict=False).cast(t, strict=False) for c, t in numeric.items() if c in have])
    if "message_key" in rows.collect_schema() and "recipient" in have:
        rows = number_attempts(rows)
    return Load(attempts=schema.conform(rows), connections=schema.empty(schema.CONNECTION_COLUMNS), accounting=accounting)


def load_mapping(path: str) -> dict:
    """Read a mapping YAML file (for ``--mapping``)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise InputError(f"{path}: cannot read mapping ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: a mapping file is a YAML table with a 'columns:' entry")
    return data


def owned(text: pl.Expr) -> pl.Expr:
    """The strings of ``text`` copied into a buffer of their own.  Strings cut from a large
    block are views into it: kept, they keep the whole block alive; after a filter, they are
    scattered over it and every later string operation waits on memory."""
    return pl.concat_str([text, pl.lit("")])


def owned_strings(frame: pl.DataFrame) -> pl.DataFrame:
    """Every string column of ``frame`` through :func:`owned`."""
    return frame.with_columns(owned(pl.col(c)).alias(c) for c, d in frame.schema.items() if d == pl.String)


def later_copies(frame: pl.DataFrame, eligible: pl.Expr) -> pl.Series:
    """True for a row of ``frame`` (columns ``fidx, _h1, _h2``: the file index and two 64-bit
    hashes of the line) identical to one in an earlier file, among the ``eligible`` rows.
    Only rows whose first hash repeats are grouped: usually few or none."""
    first = frame.select(pl.col("_h1").is_first_distinct()).to_series()
    dup = pl.repeat(False, frame.height, eager=True)
    if not first.all():
        again = frame["_h1"].filter(~first).unique()
        cand = frame.select(pl.col("_h1").is_in(again.implode())).to_series()
        sub = frame.filter(cand).select(eligible & (pl.col("fidx") > pl.col("fidx").min().over("_h1", "_h2"))).to_series()
        dup = dup.scatter(cand.arg_true(), sub)
    return dup



def try_numbers(tries: pl.DataFrame) -> pl.Series:
    """Each row's try number within its (message_key, recipient), in ``seq`` order (``tries``:
    ``seq, message_key, recipient``, rows in seq order).  A pair seen once (the usual case) is
    try 1; only pairs whose hash repeats are ranked, on their real keys: grouping a million
    rows by two strings is slow and large."""
    pair = tries.select(pl.struct("message_key", "recipient").hash()).to_series()
    first = pair.is_first_distinct()
    attempt = pl.repeat(1, tries.height, dtype=pl.Int32, eager=True)
    if not first.all():
        again = pair.is_in(pair.filter(~first).unique().implode())
        ranked = tries.filter(again).select(pl.col("seq").rank("ordinal").over("message_key", "recipient").cast(pl.Int32)).to_series()
        attempt = attempt.scatter(again.arg_true(), ranked)
    return attempt

__all__: Sequence[str] = ("FORMAT", "sniff", "load", "load_mapping", "domain_of", "normalize_host", "reply_code", "reply_enhanced", "number_attempts", "parse_ts", "account", "squash_spaces", "line_batches", "byte_blocks", "block_lines", "owned", "owned_strings", "later_copies", "try_numbers")
