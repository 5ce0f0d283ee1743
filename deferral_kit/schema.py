"""The canonical tables every loader produces and everything downstream reads.

One row of ``ATTEMPTS`` is one recipient × one delivery try that ended in a final
status for that try (delivered, deferred, bounced, expired).  Per-connection events
that are not final for a try (Postfix ``host X said:`` without ``status=``, per-MX
``connect to …: Connection timed out``, Exim per-host ``SMTP error`` lines, PowerMTA
``tq`` rows) go to ``CONNECTIONS`` so per-MX analysis can see them without
double-counting attempts.

Column names are public API: define them here, import them elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping

import polars as pl

UTC_DT = pl.Datetime("us", "UTC")

# name -> (dtype, meaning).  Order is the column order of the canonical table.
ATTEMPT_COLUMNS: dict[str, tuple[pl.DataType, str]] = {
    "ts": (UTC_DT, "when the try ended (UTC)"),
    "source": (pl.String, "log format the row came from: postfix, exim, powermta, kumomta, exchange, m365_trace, sendgrid, mailgun, ses, sparkpost, postmark, generic"),
    "log_host": (pl.String, "host that wrote the log line (syslog host, Exim host, PMTA node, KumoMTA nodeid)"),
    "instance": (pl.String, "MTA instance: Postfix syslog_name (e.g. postfix-out2), KumoMTA/PMTA vmta where that is the instance"),
    "agent": (pl.String, "delivery agent that wrote the record: smtp, lmtp, error, retry, local, virtual, pipe, qmgr, or the format's transport"),
    "queue_id": (pl.String, "MTA-local message id (Postfix queue id, Exim message id, KumoMTA id, ...)"),
    "message_key": (pl.String, "unique key of one message instance in this data set (queue id plus reuse generation, host and instance)"),
    "message_id": (pl.String, "RFC 5322 Message-ID or the ESP's message id, when known"),
    "sender": (pl.String, "envelope sender (MAIL FROM); empty string for the null sender <>"),
    "recipient": (pl.String, "envelope recipient (RCPT TO) as logged"),
    "orig_recipient": (pl.String, "original recipient before rewriting (Postfix orig_to, PMTA orcpt)"),
    "recipient_domain": (pl.String, "lower-cased domain of the recipient"),
    "egress_ip": (pl.String, "local source IP the try went out from, when the log says"),
    "egress_pool": (pl.String, "sending pool / virtual MTA / egress source, when the log says"),
    "mx_host": (pl.String, "remote host tried, lower case, no trailing dot; for relay=none the host named in the reason"),
    "mx_ip": (pl.String, "remote host IP"),
    "smtp_code": (pl.Int16, "3-digit SMTP reply code from the remote reply (or the MTA's own when no reply)"),
    "enhanced_code": (pl.String, "x.y.z from the remote reply when present, else the MTA's dsn"),
    "dsn": (pl.String, "status code the MTA recorded (Postfix dsn=, PMTA dsnStatus), possibly synthesised locally"),
    "smtp_stage": (pl.String, "stage the reply answered: connect, greeting, HELO, STARTTLS, AUTH, MAIL FROM, RCPT TO, DATA, end of DATA"),
    "response": (pl.String, "reply text, continuation lines joined by one space; remote-controlled: escape before display"),
    "outcome": (pl.String, "delivered | deferred | bounced | expired"),
    "remote": (pl.Boolean, "true when a remote server replied; false for connection failures, suspensions, relay=none, local policy/TLS failures"),
    "delay_s": (pl.Float64, "seconds since the message arrived (Postfix delay=, Exim QT=), when known"),
    "queued_at": (UTC_DT, "when the message entered the queue (UTC), when known or derivable (ts - delay)"),
    "size": (pl.Int64, "message size in bytes, when known"),
    "attempt": (pl.Int32, "1 for the first try of this recipient in this message, counting up"),
    "file": (pl.String, "input file the row came from"),
    "line_no": (pl.Int64, "1-based line (or record) number in that file"),
}

CONNECTION_COLUMNS: dict[str, tuple[pl.DataType, str]] = {
    "ts": (UTC_DT, "when the event was logged (UTC)"),
    "source": (pl.String, "log format"),
    "log_host": (pl.String, "host that wrote the log line"),
    "instance": (pl.String, "MTA instance"),
    "queue_id": (pl.String, "MTA-local message id the connection was for (null for queue-level events)"),
    "message_key": (pl.String, "unique key of the message instance, as in the attempts table"),
    "event": (pl.String, "said (a reply that was not final for the try), refused_to_talk, connect_failed, lost_connection, timeout, tls_failed, queue_transient"),
    "recipient_domain": (pl.String, "destination domain, when known"),
    "egress_ip": (pl.String, "local source IP, when known"),
    "mx_host": (pl.String, "remote host, lower case, no trailing dot"),
    "mx_ip": (pl.String, "remote host IP"),
    "smtp_code": (pl.Int16, "reply code, when there was a reply"),
    "enhanced_code": (pl.String, "x.y.z from the reply"),
    "smtp_stage": (pl.String, "stage the reply answered"),
    "response": (pl.String, "reply or error text (remote-controlled)"),
    "file": (pl.String, "input file"),
    "line_no": (pl.Int64, "1-based line number"),
}

OUTCOMES = ("delivered", "deferred", "bounced", "expired")
STAGES = ("connect", "greeting", "HELO", "STARTTLS", "AUTH", "MAIL FROM", "RCPT TO", "DATA", "end of DATA")

# Agents whose records are tries against a remote host: the rate denominator.
REMOTE_AGENTS = ("smtp", "lmtp")


def schema(columns: Mapping[str, tuple[pl.DataType, str]] = ATTEMPT_COLUMNS) -> pl.Schema:
    """The polars schema (name -> dtype) of a canonical table."""
    return pl.Schema({name: dtype for name, (dtype, _) in columns.items()})


ATTEMPTS = schema(ATTEMPT_COLUMNS)
CONNECTIONS = schema(CONNECTION_COLUMNS)


def empty(columns: Mapping[str, tuple[pl.DataType, str]] = ATTEMPT_COLUMNS) -> pl.LazyFrame:
    """An empty lazy frame with the canonical columns and dtypes."""
    return pl.LazyFrame(schema=schema(columns))


def conform(frame: pl.LazyFrame, columns: Mapping[str, tuple[pl.DataType, str]] = ATTEMPT_COLUMNS) -> pl.LazyFrame:
    """Select the canonical columns in order, casting dtypes; absent columns become null.

    Loaders build whatever columns their format has and end with this, so a field a
    format lacks is null, never invented.
    """
    have = frame.collect_schema()
    exprs = []
    for name, (dtype, _) in columns.items():
        if name in have:
            exprs.append(pl.col(name).cast(dtype, strict=False) if have[name] != dtype else pl.col(name))
        else:
            exprs.append(pl.lit(None, dtype=dtype).alias(name))
    return frame.select(exprs)


class SchemaError(ValueError):
    """A frame does not match a canonical table."""


def validate(frame: pl.DataFrame | pl.LazyFrame, columns: Mapping[str, tuple[pl.DataType, str]] = ATTEMPT_COLUMNS) -> None:
    """Raise :class:`SchemaError` unless ``frame`` has exactly the canonical columns, order and dtypes,
    and (for eager frames) only known ``outcome`` values."""
    got = frame.collect_schema() if isinstance(frame, pl.LazyFrame) else frame.schema
    want = schema(columns)
    if list(got.names()) != list(want.names()):
        raise SchemaError(f"columns differ: missing {sorted(set(want) - set(got))}, unexpected {sorted(set(got) - set(want))}, or out of order")
    bad = {n: (str(got[n]), str(want[n])) for n in want if got[n] != want[n]}
    if bad:
        raise SchemaError(f"dtypes differ (got, want): {bad}")
    if isinstance(frame, pl.DataFrame) and "outcome" in want:
        unknown = set(frame["outcome"].drop_nulls().unique().to_list()) - set(OUTCOMES)
        if unknown:
            raise SchemaError(f"unknown outcome values: {sorted(unknown)}")


def describe(columns: Mapping[str, tuple[pl.DataType, str]] = ATTEMPT_COLUMNS) -> str:
    """A Markdown table of the columns (used for the README and ``deferral-kit schema``)."""
    rows = ["| column | dtype | meaning |", "|---|---|---|"]
    rows += [f"| `{n}` | {d} | {m} |" for n, (d, m) in columns.items()]
    return "\n".join(rows)
