"""Normalizing remote reply texts so the same reply from many hosts groups as one line.

Receivers put per-connection details into their replies: our IP, their host name and a
transaction id (Microsoft ``[AM6PR03MB1234.eurprd03.prod.outlook.com]``, Gmail
``p4si3522070uam.9 - gsmtp``), timestamps, the recipient's address.  Masking those gives a
few dozen distinct texts per week instead of thousands, with counts an analyst can read.
The reply code and enhanced code at the start are kept as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

# Reply code and enhanced code at the start: "452 4.3.1", "421-4.7.0", "550 5.7.1".
_LEAD = r"^\s*(?:smtp;\s*)?(\d{3}(?:[ -]+[245]\.\d{1,3}\.\d{1,3})?)"

# (pattern, replacement) applied in order to the text after the lead codes; Rust regex syntax.
MASKS: tuple[tuple[str, str], ...] = (
    # continuation prefixes of multi-line replies joined into one ("... rate of 421-4.7.0 unsolicited")
    (r"(?:^|\s)\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?:\s|$)", " "),
    (r"(?:^|\s)\d{3}-", " "),
    (r"(?i)<?[^\s<>@\"'\[\](),;:]+@[^\s<>@\"'\[\](),;:]+>?", "<address>"),
    (r"(?i)\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", "<id>"),
    (r"(?i)\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:\s?Z|\s?[+-]\d{2}:?\d{2})?", "<time>"),
    (r"\b\d{1,2}/\d{1,2}/\d{2,4}\s+\d{1,2}:\d{2}(?::\d{2})?(?:\s?[AP]M)?", "<time>"),
    (r"\b\d{1,2}:\d{2}:\d{2}(?:\.\d+)?\b", "<time>"),
    (r"(?i)\b[\w.-]*\.prod\.(?:protection\.)?outlook\.com\b", "<host>.outlook.com"),
    (r"(?i)\b(?:[0-9a-f]{1,4})?(?:::?[0-9a-f]{1,4}){2,7}(?:::)?", "<ip>"),
    (r"\b\d{1,3}(?:\.\d{1,3}){3}\b", "<ip>"),
    (r"\b\S+ - gsmtp\b", "<id> - gsmtp"),
    (r"\b\d{8,}\b", "<n>"),
    # hex correlation ids; an English word made only of a-f letters and 8+ long is rare enough
    (r"(?i)\b[0-9a-f]{8,}\b", "<hex>"),
    (r"\b[A-Z]{2,}\d[A-Z0-9]{4,}\b", "<id>"),
    (r"\b\d+\b", "<n>"),
    (r"\s+", " "),
)

def _masked(rest: pl.Expr) -> pl.Expr:
    for pat, rep in MASKS:
        rest = rest.str.replace_all(pat, rep)
    return rest.str.strip_chars()


def normalize_response(expr: pl.Expr | str = "response") -> pl.Expr:
    """The reply text with addresses, IPs, host and transaction ids, timestamps and numbers masked.

    ``"452 4.3.1 Insufficient system resources (UsedDiskSpace[C:\\\\...]) [AM6PR03MB1234.eurprd03.prod.outlook.com 2026-11-17T10:00:00Z]"``
    becomes ``"452 4.3.1 Insufficient system resources (UsedDiskSpace[C:\\\\...]) [<host>.outlook.com <time>]"``.
    Null stays null.
    """
    e = pl.col(expr) if isinstance(expr, str) else expr
    lead = e.str.extract(_LEAD, 1).str.replace_all(r"[\s-]+", " ")  # "421-4.7.0" (multi-line) groups with "421 4.7.0"
    rest = _masked(e.str.replace(_LEAD, ""))
    return pl.when(lead.is_not_null()).then(pl.concat_str([lead, rest], separator=" ").str.strip_chars()).otherwise(rest)


def mask_addresses(expr: pl.Expr | str) -> pl.Expr:
    """Email addresses with the local part hidden (``***@example.com``): destinations stay visible."""
    e = pl.col(expr) if isinstance(expr, str) else expr
    return e.str.replace_all(r"[^\s<>@\"'\[\](),;:=]+@([A-Za-z0-9.-]+)", "***@$1")


def group_responses(attempts: pl.LazyFrame, *, where: pl.Expr | None = None, by: Sequence[str] = (), describe: Sequence[str] = (), limit: int | None = 20) -> pl.LazyFrame:
    """Reply texts grouped after :func:`normalize_response`, most frequent first.

    Columns: the ``by`` columns, the ``describe`` columns (grouped on too, e.g. ``response_class``,
    but shares and ``limit`` are per ``by`` group), ``response_text``, ``attempts`` (rows with that
    text), ``share`` (of the rows matching ``where`` within the same ``by`` group),
    ``destinations`` and ``mx_hosts`` (distinct recipient domains / remote hosts that sent it),
    ``first_seen``, ``last_seen`` (UTC).  Rows without a reply text are left out.
    """
    lf = attempts if where is None else attempts.filter(where)
    by, describe = list(by), list(describe)
    part = by if by else pl.lit(1)
    grouped = (
        lf.filter(pl.col("response").is_not_null() & (pl.col("response") != ""))
        .with_columns(normalize_response("response").alias("response_text"))
        .group_by(*by, *describe, "response_text")
        .agg(
            pl.len().cast(pl.Int64).alias("attempts"),
            pl.col("recipient_domain").n_unique().cast(pl.Int64).alias("destinations"),
            pl.col("mx_host").drop_nulls().n_unique().cast(pl.Int64).alias("mx_hosts"),
            pl.col("ts").min().alias("first_seen"),
            pl.col("ts").max().alias("last_seen"),
        )
        .with_columns((pl.col("attempts") / pl.col("attempts").sum().over(part)).alias("share"))
        .sort([*by, "attempts", "response_text", *describe], descending=[False] * len(by) + [True, False] + [False] * len(describe), nulls_last=True)
        .select(*by, *describe, "response_text", "attempts", "share", "destinations", "mx_hosts", "first_seen", "last_seen")
    )
    if limit is not None:
        grouped = grouped.filter(pl.int_range(pl.len()).over(by) < limit) if by else grouped.head(limit)
    return grouped
