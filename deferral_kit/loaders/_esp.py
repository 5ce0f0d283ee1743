"""Shared pieces of the ESP event loaders (SendGrid, Mailgun, SES, SparkPost, Postmark).

Each ESP loader decodes its records with :mod:`._json`, gives every record a
``category``/``reason`` (attempt, skipped engagement event, malformed, ...) and maps the
attempt records to canonical columns; :func:`finish` does the rest the same way for all
of them: duplicate records, the accounting, attempt numbering and the canonical schema.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import polars as pl

from .. import schema
from ..accounting import EXAMPLES_PER_REASON, TABLE_SCHEMA, Accounting
from ..sources import SourceFile
from . import Load, _json

_ENHANCED = r"([245]\.\d{1,3}\.\d{1,3})"


def s(name: str, *path: str) -> pl.Expr:
    """A (nested) field of the ``rec`` struct column: ``s("rec", "delivery-status", "code")``."""
    e = pl.col(name)
    for p in path:
        e = e.struct.field(p)
    return e


def fields(*names: str, **nested: pl.DataType) -> pl.Struct:
    """A struct dtype whose listed leaves are strings (see ``_json``) plus nested dtypes."""
    return pl.Struct({**{n: pl.String for n in names}, **nested})


def epoch_ts(expr: pl.Expr) -> pl.Expr:
    """Unix seconds (int, float or digits in a string) -> Datetime(us, UTC); null otherwise."""
    secs = expr.cast(pl.String).str.strip_chars().cast(pl.Float64, strict=False)
    return (secs * 1_000_000).round(0).cast(pl.Int64, strict=False).cast(pl.Datetime("us")).dt.replace_time_zone("UTC")


def iso_ts(expr: pl.Expr) -> pl.Expr:
    """ISO 8601 with ``Z`` or an offset and any number of fractional digits -> Datetime(us, UTC)."""
    e = expr.str.strip_chars().str.replace(r"Z$", "+00:00").str.replace(r"(\.\d{6})\d+", "$1")
    return e.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%:z", time_zone="UTC", time_unit="us", strict=False)


def any_ts(expr: pl.Expr) -> pl.Expr:
    """Unix seconds or ISO 8601 (SparkPost sends both)."""
    return pl.coalesce(epoch_ts(expr), iso_ts(expr))


def clean_reply(expr: pl.Expr) -> pl.Expr:
    """Reply text as the canonical ``response``: no ``smtp;`` prefix (SES, Postmark), continuation
    lines joined by one space with their repeated ``NNN-``/``x.y.z`` prefixes dropped, null if empty."""
    e = (
        expr.str.replace(r"^(?i)\s*smtp\s*;\s*", "")
        .str.replace_all(r"\s*[\r\n]+\s*(?:\d{3}[ -])?(?:[245]\.\d{1,3}\.\d{1,3}\s+)?", " ")
        .str.strip_chars()
    )
    return pl.when(e.str.len_chars() > 0).then(e)


def reply_code(response: pl.Expr) -> pl.Expr:
    """The leading 3-digit reply code of a response, as Int16 (null when it starts with text)."""
    return response.str.extract(r"^(\d{3})(?:[ -]|$)", 1).cast(pl.Int16, strict=False)


def reply_enhanced(response: pl.Expr) -> pl.Expr:
    """The x.y.z enhanced status at the start of a reply (after the code, if any)."""
    return response.str.extract(r"^(?:\d{3}[ -])?" + _ENHANCED + r"(?:$|[^\d.])", 1)


def with_code(code: pl.Expr, text: pl.Expr, enhanced: pl.Expr | None = None) -> pl.Expr:
    """Rebuild ``code [x.y.z] text`` when a format gives the code apart from the text (Mailgun)."""
    code_s = code.cast(pl.String)
    if enhanced is not None:
        text = pl.when(enhanced.is_not_null() & ~pl.coalesce(text, pl.lit("")).str.starts_with(pl.coalesce(enhanced, pl.lit("")))) \
            .then(pl.concat_str(enhanced, pl.lit(" "), text, ignore_nulls=True)).otherwise(text)
    needs = code_s.is_not_null() & ~pl.coalesce(text, pl.lit("")).str.starts_with(pl.coalesce(code_s, pl.lit("")))
    out = pl.when(needs).then(pl.concat_str(code_s, pl.lit(" "), text, ignore_nulls=True)).otherwise(text)
    return pl.when(out.str.len_chars() > 0).then(out.str.strip_chars())


def domain_of(addr: pl.Expr) -> pl.Expr:
    """Lower-cased domain of an address (after the last @, without a closing >)."""
    return addr.str.extract(r"@([^@>\s]+)>?\s*$", 1).str.to_lowercase().str.strip_suffix(".")


def address_of(text: pl.Expr) -> pl.Expr:
    """The address inside ``Name <a@b>``, or the text itself."""
    return pl.coalesce(text.str.extract(r"<([^<>]*)>\s*$", 1), text.str.strip_chars())


def host(expr: pl.Expr) -> pl.Expr:
    """Canonical host name: lower case, no trailing dot, null if empty."""
    e = expr.str.strip_chars().str.to_lowercase().str.strip_suffix(".")
    return pl.when(e.str.len_chars() > 0).then(e)


def categorise(rules: list[tuple[pl.Expr, str, str | pl.Expr]], *, default_reason: pl.Expr) -> tuple[pl.Expr, pl.Expr]:
    """``category`` and ``reason`` from ordered (condition, category, reason) rules; records that
    ``_json`` could not decode (``bad``) come first, anything unmatched is skipped with ``default_reason``."""
    bad = pl.col("bad")
    # Blank lines and empty batches/pages are not records, but not damaged either.
    harmless = (bad == "blank line") | bad.str.starts_with("empty ")
    cat = pl.when(harmless).then(pl.lit("skipped")).when(bad.is_not_null()).then(pl.lit("malformed"))
    rea = pl.when(bad.is_not_null()).then(bad)
    for cond, c, r in rules:
        cat = cat.when(cond).then(pl.lit(c))
        rea = rea.when(cond).then(r if isinstance(r, pl.Expr) else pl.lit(r))
    return cat.otherwise(pl.lit("skipped")).alias("category"), rea.otherwise(default_reason).alias("reason")


def number_attempts(frame: pl.DataFrame) -> pl.Series:
    """``attempt`` for each row of ``frame``: ``attempt_given`` (the ESP's counter) where there is
    one, else derived within (message_key, recipient) in time order, counting on from the last
    given number (a delivery after "attempt 5" deferrals is attempt 6), or from 1 when the ESP
    never numbers its tries.  Computed on a narrow copy so the wide frame is never re-sorted."""
    k = pl.int_range(1, pl.len() + 1, dtype=pl.Int64)
    # One u64 per (message_key, recipient): windows over an integer key are much cheaper than
    # over two strings.
    narrow = frame.select(
        pl.int_range(pl.len()).alias("_row"),
        pl.struct("message_key", "recipient").hash().alias("_grp"),
        "ts", "file", "line_no",
        pl.col("attempt_given").cast(pl.Int64, strict=False).alias("_g"),
    ).sort("_grp", "ts", "file", "line_no")
    return (
        narrow.with_columns(k.over("_grp").alias("_k"))
        .with_columns(
            pl.col("_g").forward_fill().over("_grp").alias("_last_g"),
            pl.when(pl.col("_g").is_not_null()).then(pl.col("_k")).forward_fill().over("_grp").alias("_k_at_g"),
        )
        .select("_row", pl.coalesce("_g", pl.col("_last_g") + pl.col("_k") - pl.col("_k_at_g"), "_k").cast(pl.Int32).alias("attempt"))
        .sort("_row")
        .get_column("attempt")
    )


def run(files: list[SourceFile], *, fmt: str, dtype: pl.Struct, classify: Callable[[pl.LazyFrame], pl.LazyFrame],
        rows: Callable[[pl.LazyFrame], pl.LazyFrame], dedupe: bool) -> Load:
    """Load one ESP's files: decode (``_json``), ``classify`` each record, then :func:`finish`.

    Files are decoded one at a time (:func:`_json.collect_blocks`) and each is reduced at once to
    what the result needs (see :class:`_Reduced`), so the decoded records of only one file are
    held, never those of the whole input."""
    # The record hash (for duplicates) is computed inside the streaming plan: hashing a whole
    # struct column at once materialises a row encoding as large as the records.
    def plan(lf: pl.LazyFrame) -> pl.LazyFrame:
        return classify(lf).with_columns(pl.col("rec").hash().alias("_hash"))

    red, problems = _json.collect_blocks(files, dtype, plan, lambda: _Reduced(rows=rows, dedupe=dedupe, fmt=fmt), _Reduced.take)
    return red.finish(problems)


def finish(records: pl.DataFrame, *, fmt: str, rows: Callable[[pl.LazyFrame], pl.LazyFrame], dedupe: bool, problems: list[str]) -> Load:
    """The Load for one ESP: ``records`` has ``file, line_no, bad, text, rec, category, reason`` (one
    row per input record); ``rows`` maps the attempt records to canonical columns (plus
    ``attempt_given`` when the ESP numbers its tries), possibly several rows per record (one per
    recipient).  Records identical to one already read (webhook retries, the same export given
    twice, SES SNS and Firehose copies) are counted as ``duplicate`` when ``dedupe``."""
    red = _Reduced(rows=rows, dedupe=dedupe, fmt=fmt)
    red.take(records)
    return red.finish(problems)


class _Reduced:
    """What :func:`finish` needs of the records, kept block by block (blocks in input order).

    Nothing is kept per record but its 64-bit hash (duplicates are found across blocks with the
    hashes of the blocks read before): the accounting keeps the line count per (file, category,
    reason) and the first ``EXAMPLES_PER_REASON`` records of each (within a block: together
    a superset of the first ones overall), the only ones the examples can come from; the
    attempt rows are mapped (``rows``) per block."""

    _KEYS: ClassVar[list[str]] = ["file", "category", "reason"]

    def __init__(self, *, rows: Callable[[pl.LazyFrame], pl.LazyFrame], dedupe: bool, fmt: str) -> None:
        self.rows, self.dedupe, self.fmt = rows, dedupe, fmt
        self.counts: list[pl.DataFrame] = []
        self.firsts: list[pl.DataFrame] = []
        self.att: list[pl.DataFrame] = []
        self.seen: pl.Series | None = None
        self.height = 0
        self.files: dict[str, None] = {}
        self.reasons: set[str] = set()

    def take(self, records: pl.DataFrame) -> None:
        recs = records if "_hash" in records.columns else records.with_columns(pl.col("rec").hash().alias("_hash"))
        if self.dedupe:
            # A 64-bit hash of the decoded record stands in for its text (collisions are negligible
            # at millions of records), so no copy of every record's JSON is kept.
            h = pl.col("_hash")
            repeat = ~h.is_first_distinct()
            if self.seen is not None and self.seen.len():
                repeat = repeat | h.is_in(self.seen.implode())
            dup = (pl.col("category") == "attempt") & repeat
            recs = recs.with_columns(
                pl.when(dup).then(pl.lit("duplicate")).otherwise("category").alias("category"),
                pl.when(dup).then(pl.lit("identical record already read")).otherwise("reason").alias("reason"),
            )
            self.seen = recs["_hash"] if self.seen is None else pl.concat([self.seen, recs["_hash"]], rechunk=True)
        self.height += recs.height
        self.files.update(dict.fromkeys(recs["file"].unique(maintain_order=True).to_list()))
        self.reasons.update(recs["reason"].drop_nulls().unique().to_list())
        self.counts.append(recs.group_by(self._KEYS).agg(pl.len().alias("lines")))
        # The record's JSON is only rendered for the few rows per reason the accounting may keep
        # as examples, not for millions of parsed records.
        shown = pl.coalesce(pl.col("text"), pl.col("rec").struct.json_encode().str.replace_all(r'"[^"]*":null,?', "")).str.slice(0, 500)
        self.firsts.append(
            recs.filter(pl.int_range(pl.len()).over(self._KEYS) < EXAMPLES_PER_REASON)
            .select("file", "line_no", "category", "reason", shown.alias("_shown"))
        )
        att = self.rows(recs.lazy().filter(pl.col("category") == "attempt"))
        if "attempt_given" not in att.collect_schema():
            att = att.with_columns(pl.lit(None, pl.Int64).alias("attempt_given"))
        self.att.append(att.with_columns(pl.lit(self.fmt).alias("source")).collect())

    def _accounting(self, problems: list[str]) -> Accounting:
        """The accounting of all records: line counts per (file, category, reason), and as examples
        the first EXAMPLES_PER_REASON records of each with their text."""
        # Positions over the kept rows are the positions overall for the first N of each key.
        firsts = pl.concat(self.firsts).with_columns(pl.int_range(pl.len()).over(self._KEYS).alias("_pos"))
        n = EXAMPLES_PER_REASON
        cols = ["file", "line_no", "category", "reason"]
        # (only the first N of each key, with their text: the examples are what is asked of it)
        classified = firsts.filter(pl.col("_pos") < n).select(*cols, pl.col("_shown").alias("text")).lazy()
        accounting = Accounting.from_classified(classified, fmt=self.fmt, problems=problems)
        # The line counts (from_classified counts the rows it is given: here only the first ones).
        table = (
            pl.concat(self.counts).group_by(self._KEYS).agg(pl.col("lines").sum())
            .select("file", pl.lit(self.fmt).alias("format"), "category", pl.col("reason").fill_null(""), pl.col("lines").cast(pl.Int64))
        )
        accounting.table = table.cast(dict(TABLE_SCHEMA)).sort("file", "category", "reason")
        return accounting

    def finish(self, problems: list[str]) -> Load:
        accounting = self._accounting(problems)
        if self.height and not accounting.count("attempt"):
            accounting.problems.append(f"{', '.join(self.files)}: no delivery attempts (only {', '.join(sorted(self.reasons))[:300]})")
        attempt = number_attempts(pl.concat(self.att))
        # The attempt numbers are added block by block: a column of one chunk beside the
        # blocks' chunks would make polars copy the whole table into single chunks.
        parts, at = [], 0
        for part in self.att:
            parts.append(part.with_columns(attempt.slice(at, part.height)).drop("attempt_given"))
            at += part.height
        self.att = []
        att = pl.concat(parts)
        return Load(attempts=schema.conform(att.lazy()), connections=schema.empty(schema.CONNECTION_COLUMNS), accounting=accounting)
