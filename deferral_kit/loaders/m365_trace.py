"""Microsoft 365 (Exchange Online) message trace exports → canonical attempts.

Reads ``Get-MessageTrace`` / Reporting Web Service rows (JSON lines, a JSON array, or
``Export-Csv`` / EAC CSV with ``Received, SenderAddress, RecipientAddress, Status, ToIP,
FromIP, Size, MessageId, MessageTraceId``) and the EAC *enhanced summary* CSV
(``origin_timestamp, sender_address, Recipient_status, ...``, ``Recipient_status`` =
``address##Receive, Send`` per recipient, ``;``-separated).

A trace row is the *current state of one recipient*, not one delivery try: ``Pending`` →
deferred, ``Delivered`` → delivered, ``Failed`` → bounced (enhanced summary: the last event
``Defer``/``Send``/``Deliver``/``Fail``); Quarantined, FilteredAsSpam, GettingStatus,
Expanded, ... are skipped with the status as the reason.  Retries and the remote reply
text are not in a trace, so ``smtp_code``/``response``/``mx_host`` are null and every row
has ``attempt`` 1: rates from a trace are per recipient, not per attempt.  ``ToIP`` →
``mx_ip``; ``agent`` is "smtp" except for inbound rows of the enhanced summary
(directionality 1/Incoming → "local").  Timestamps without a zone are UTC (``--tz``
overrides, for EAC downloads made in a local zone).
"""

from __future__ import annotations

import re

import polars as pl

from .. import schema
from ..accounting import Accounting
from ..sources import SourceFile, head, scan_lines
from . import Load, LoadOptions
from .generic import domain_of, number_attempts, parse_ts

FORMAT = "m365_trace"

# Source column (lower case, no spaces/underscores) → internal name.
_ALIASES = {
    "received": "received", "origintimestamp": "received", "date": "received", "dateutc": "received", "datetimeutc": "received",
    "senderaddress": "sender", "sender": "sender",
    "recipientaddress": "recipient", "recipient": "recipient",
    "status": "status", "deliverystatus": "status",
    "recipientstatus": "recipient_status",
    "messageid": "message_id",
    "messagetraceid": "trace_id", "networkmessageid": "trace_id",
    "toip": "to_ip", "fromip": "from_ip",
    "size": "size", "totalbytes": "size",
    "directionality": "direction",
    "connectorid": "connector",
    "organization": "organization",
}
_COLUMNS = sorted(set(_ALIASES.values()))

_STATUS = {"delivered": "delivered", "failed": "bounced", "pending": "deferred"}
_LAST_EVENT = {"send": "delivered", "deliver": "delivered", "fail": "bounced", "defer": "deferred"}

_JSON_KEYS = re.compile(r'"MessageTraceId"\s*:|"RecipientAddress"\s*:[^\n]*"Received"\s*:|"Received"\s*:[^\n]*"RecipientAddress"\s*:')


def _norm(name: str) -> str:
    return re.sub(r"[\s_()\-\"']", "", name.lower())


def _csv_header(text: str) -> set[str] | None:
    first = next((ln for ln in text.replace("\x00", "").splitlines() if ln.strip()), "")
    if first.lstrip().startswith(("{", "[")):
        return None
    return {_norm(c) for c in first.split(",")}


def sniff(text: str) -> bool:
    """A message trace: JSON rows with ``MessageTraceId`` / ``Received`` + ``RecipientAddress``,
    or a CSV header naming the trace columns."""
    if _JSON_KEYS.search(text):
        return True
    cols = _csv_header(text.lstrip("\ufeff"))
    if not cols:
        return False
    return {"received", "senderaddress", "recipientaddress", "status"} <= cols or {"origintimestamp", "senderaddress", "recipientstatus"} <= cols


def _json_rows(sf: SourceFile) -> pl.LazyFrame:
    text = head(sf)
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if first in ("[", "{") or not first.endswith(("}", "]")):
        # ConvertTo-Json writes one pretty-printed array: read the file as one record line.
        body = " ".join(open(sf.readable, encoding="utf-8-sig", errors="replace").read().split())
        lines = pl.LazyFrame({"file": [sf.name], "line_no": [1], "line": [body]}, schema={"file": pl.String, "line_no": pl.Int64, "line": pl.String})
    else:
        lines = scan_lines([sf])
    struct = pl.Struct({k: pl.String for k in ["Received", "SenderAddress", "RecipientAddress", "Status", "MessageId", "MessageTraceId", "ToIP", "FromIP", "Size", "Organization"]})
    line = pl.col("line").str.strip_chars()
    ok = line.str.contains(r"^[\[{]") & line.str.json_path_match("$").is_not_null()
    arr = pl.when(line.str.starts_with("[")).then(line).otherwise(pl.concat_str(pl.lit("["), line, pl.lit("]")))
    recs = (
        lines.with_columns(ok.alias("_ok"), (line == "").alias("_blank"), pl.col("line").alias("text"))
        .with_columns(pl.when(pl.col("_ok")).then(arr).otherwise(pl.lit("[null]")).str.json_decode(pl.List(struct)).alias("_rec"))
        .with_columns(pl.when(pl.col("_rec").list.len() > 0).then(pl.col("_rec")).otherwise(pl.lit([None], dtype=pl.List(struct))).alias("_rec"))
        .with_columns(pl.int_ranges(pl.col("_rec").list.len()).alias("_rec_no"))
        .explode("_rec", "_rec_no")
    )
    r = pl.col("_rec")
    return recs.select(
        "file", "line_no", "text", "_ok", "_blank", "_rec_no",
        *[r.struct.field(k).alias(_ALIASES[_norm(k)]) for k in struct.to_schema()],
        *[pl.lit(None, dtype=pl.String).alias(c) for c in _COLUMNS if c not in {_ALIASES[_norm(k)] for k in struct.to_schema()}],
    )


def _csv_rows(sf: SourceFile) -> pl.LazyFrame:
    lf = pl.scan_csv(sf.readable, infer_schema=False, truncate_ragged_lines=True, encoding="utf8-lossy", row_index_name="_row")
    names = lf.collect_schema().names()
    rename = {}
    for n in names:
        target = _ALIASES.get(_norm(n.lstrip("\ufeff")))
        if target and target not in rename.values():
            rename[n] = target
    row_text = pl.concat_str([pl.col(n).fill_null("") for n in names], separator=",")
    return lf.select(
        pl.lit(sf.name).alias("file"),
        (pl.col("_row").cast(pl.Int64) + 2).alias("line_no"),
        row_text.alias("text"),
        pl.lit(True).alias("_ok"),
        pl.lit(0, dtype=pl.Int64).alias("_rec_no"),
        (row_text.str.replace_all(",", "").str.strip_chars() == "").alias("_blank"),
        *[pl.when(pl.col(src).str.strip_chars() != "").then(pl.col(src)).alias(dst) for src, dst in rename.items()],
        *[pl.lit(None, dtype=pl.String).alias(c) for c in _COLUMNS if c not in rename.values()],
    )


def _ts(text: pl.Expr, tz: str) -> pl.Expr:
    iso = parse_ts(text, fmt=None, tz=tz)
    # Export-Csv from PowerShell writes the culture's format, e.g. "9/5/2022 6:10:13 PM".
    us = text.str.strip_chars().str.to_datetime("%m/%d/%Y %I:%M:%S %p", time_unit="us", strict=False).fill_null(
        text.str.strip_chars().str.to_datetime("%m/%d/%Y %H:%M:%S", time_unit="us", strict=False)
    )
    return iso.fill_null(us.dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null").dt.convert_time_zone("UTC"))


def load(files: list[SourceFile], options: LoadOptions) -> Load:
    """Message trace rows → one attempt row per recipient state (Pending/Delivered/Failed)."""
    frames = []
    for sf in files:
        cols = _csv_header(head(sf).lstrip("\ufeff"))
        frames.append(_csv_rows(sf) if cols else _json_rows(sf))
    rows = pl.concat([f.select("file", "line_no", "text", "_ok", "_blank", pl.col("_rec_no").cast(pl.Int64), *_COLUMNS) for f in frames], how="vertical")
    # Enhanced summary: one Recipient_status entry per recipient ("a@x##Receive, Send;b@y##Receive, Fail").
    rs = pl.col("recipient_status")
    rows = rows.with_columns(rs.str.split(";").alias("_rs")).explode("_rs").with_columns(
        pl.col("recipient").fill_null(pl.col("_rs").str.extract(r"^\s*([^#]*)##").str.strip_chars()).alias("recipient"),
        pl.col("_rs").str.extract(r"##(.*)$").str.split(",").list.last().str.strip_chars().str.to_lowercase().alias("_last_event"),
    )
    status = pl.col("status").str.strip_chars()
    outcome = status.str.to_lowercase().replace_strict(_STATUS, default=None).fill_null(pl.col("_last_event").replace_strict(_LAST_EVENT, default=None))
    ts = _ts(pl.col("received"), options.tz)
    rows = rows.with_columns(outcome.alias("outcome"), ts.alias("ts"))
    if options.dedupe:
        rows = rows.with_columns(pl.struct("text", "_rec_no", "recipient").is_first_distinct().alias("_first"))
    else:
        rows = rows.with_columns(pl.lit(True).alias("_first"))
    rows = rows.cache()
    shown_status = pl.coalesce(status, pl.col("_last_event"), pl.lit("(none)"))
    category = (
        pl.when(pl.col("_blank")).then(pl.lit("skipped"))
        .when(~pl.col("_ok") | pl.col("ts").is_null()).then(pl.lit("malformed"))
        .when(~pl.col("_first")).then(pl.lit("duplicate"))
        .when(pl.col("outcome").is_not_null()).then(pl.lit("attempt"))
        .otherwise(pl.lit("skipped"))
    )
    reason = (
        pl.when(pl.col("_blank")).then(pl.lit("blank line"))
        .when(~pl.col("_ok")).then(pl.lit("invalid JSON"))
        .when(pl.col("ts").is_null()).then(pl.lit("no parseable Received time"))
        .when(~pl.col("_first")).then(pl.lit("identical row already read"))
        .when(pl.col("outcome").is_null()).then(pl.concat_str(pl.lit("status "), shown_status, pl.lit(" (not a delivery outcome)")))
    )
    rows = rows.with_columns(category.alias("_category"), reason.alias("_reason"))
    accounting = Accounting.from_classified(
        rows.select("file", "line_no", pl.col("_category").alias("category"), pl.col("_reason").alias("reason"), pl.col("text").str.slice(0, 500)),
        fmt=FORMAT,
        problems=[f"{sf.name}: {p}" for sf in files for p in sf.problems],
    )
    key = pl.coalesce(pl.col("trace_id"), pl.col("message_id"))
    inbound = pl.col("direction").str.strip_chars().str.to_lowercase().is_in(["1", "incoming", "inbound"]).fill_null(False)
    sender = pl.col("sender").str.strip_chars()
    attempts = (
        rows.filter(pl.col("_category") == "attempt")
        .with_columns(
            pl.lit(FORMAT).alias("source"),
            pl.col("organization").alias("log_host"),
            pl.when(inbound).then(pl.lit("local")).otherwise(pl.lit("smtp")).alias("agent"),
            pl.col("trace_id").alias("queue_id"),
            pl.concat_str(pl.lit("m365:"), key).alias("message_key"),
            pl.col("message_id").str.strip_chars().str.strip_prefix("<").str.strip_suffix(">").alias("message_id"),
            pl.when(sender == "<>").then(pl.lit("")).otherwise(sender).alias("sender"),
            pl.col("recipient").str.strip_chars(),
            pl.col("connector").alias("egress_pool"),
            pl.col("to_ip").alias("mx_ip"),
            pl.col("size").cast(pl.Int64, strict=False),
        )
        .with_columns(domain_of(pl.col("recipient")).alias("recipient_domain"))
    )
    return Load(attempts=schema.conform(number_attempts(attempts)), connections=schema.empty(schema.CONNECTION_COLUMNS), accounting=accounting)
