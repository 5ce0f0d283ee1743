"""SendGrid (Twilio) Event Webhook records: batches (JSON arrays), JSON lines, or saved exports.

Mapping (formats.md §6.1): ``deferred`` -> deferred, ``delivered`` -> delivered, ``bounce``
(``type`` bounce or blocked) -> bounced; ``processed``, ``dropped`` (never attempted) and
engagement events (open, click, spamreport, unsubscribe, ...) are skipped with a reason.
``response`` (deferred, delivered) or ``reason`` (bounce) is the reply; SendGrid sometimes
replaces the receiver's reply with its own summary ("Email was deferred due to the following
reason(s): [IPs were throttled by recipient server]"): it is kept as the response, with a
null ``smtp_code`` (none is shown); ``remote`` is true when the summary says the recipient
server throttled/rejected/deferred, false when SendGrid could not connect ("unable to
connect", "dial tcp … i/o timeout", "unavailable or took too long to respond"), else null.
``attempt`` (a string) numbers deferrals; deliveries and bounces continue that count.
SendGrid never says which MX it tried: ``mx_host`` is null.  ``ip`` is SendGrid's sending IP
(``egress_ip``), ``pool.name`` the IP pool, ``status`` the DSN SendGrid recorded.
"""

from __future__ import annotations

import polars as pl

from ..sources import SourceFile
from . import Load, LoadOptions
from . import _esp, _json
from ._esp import s

FORMAT = "sendgrid"

RECORD = _esp.fields(
    "email", "timestamp", "event", "response", "reason", "status", "attempt", "type", "ip",
    "sg_message_id", "sg_event_id", "smtp-id", "tls",
    pool=pl.Struct({"name": pl.String, "id": pl.String}),
)

_ATTEMPT_EVENTS = {"deferred": "deferred", "delivered": "delivered", "bounce": "bounced"}
# SendGrid's own texts when it never got a reply (its MTA reports dial and DNS errors in
# ``response``, and summarises some deferrals in brackets), and summaries saying the receiver did.
_NO_CONTACT = r"(?i)unable to connect|connection (?:timed out|refused)|i/o timeout|dial tcp|unable to get mx|no mx|unavailable or took too long"
_RECEIVER_SAID = r"(?i)(?:throttled|rejected|deferred) by (?:the )?recipient server"
_ENGAGEMENT = ("open", "click", "spamreport", "unsubscribe", "group_unsubscribe", "group_resubscribe", "machine_opened")


def sniff(text: str) -> bool:
    """SendGrid events carry ``sg_event_id`` / ``sg_message_id`` (no other ESP uses the ``sg_`` prefix)."""
    vals = _json.first_values(text)
    return bool(vals) and all(isinstance(v, dict) and ("sg_event_id" in v or "sg_message_id" in v) and "event" in v for v in vals)


def _classified(raw: pl.LazyFrame) -> pl.LazyFrame:
    ev = s("rec", "event")
    complete = _esp.epoch_ts(s("rec", "timestamp")).is_not_null() & s("rec", "email").is_not_null()
    cat, reason = _esp.categorise(
        [
            (ev.is_in(list(_ATTEMPT_EVENTS)) & complete, "attempt", ""),
            (ev.is_in(list(_ATTEMPT_EVENTS)), "malformed", "delivery event without timestamp or email"),
            (ev == "processed", "skipped", "processed (accepted by SendGrid, not a delivery attempt)"),
            (ev == "dropped", "skipped", "dropped by SendGrid (never attempted)"),
            (ev.is_in(_ENGAGEMENT), "skipped", pl.concat_str(pl.lit("engagement event: "), ev)),
        ],
        default_reason=pl.concat_str(pl.lit("not a delivery event: "), pl.coalesce(ev, pl.lit("(no event field)"))),
    )
    return raw.with_columns(cat, reason)


def _rows(att: pl.LazyFrame) -> pl.LazyFrame:
    r = lambda *p: s("rec", *p)  # noqa: E731
    ev = r("event")
    response = _esp.clean_reply(pl.when(ev == "bounce").then(pl.coalesce(r("reason"), r("response"))).otherwise(pl.coalesce(r("response"), r("reason"))))
    # sg_message_id is "<message id>.filterNNNN...": the part before ".filter" is the message, shared by its recipients.
    sg_msg = r("sg_message_id").str.replace(r"\.filter.*$", "")
    return att.select(
        _esp.epoch_ts(r("timestamp")).alias("ts"),
        pl.lit("smtp").alias("agent"),
        sg_msg.alias("queue_id"),
        pl.concat_str(pl.lit("sendgrid:"), pl.coalesce(sg_msg, r("smtp-id"))).alias("message_key"),
        pl.coalesce(r("smtp-id"), sg_msg).alias("message_id"),
        r("email").alias("recipient"),
        _esp.domain_of(r("email")).alias("recipient_domain"),
        r("ip").alias("egress_ip"),
        r("pool", "name").alias("egress_pool"),
        response.alias("response"),
        r("status").alias("dsn"),
        pl.col("rec").alias("_rec"),
        pl.col("file"),
        pl.col("line_no"),
    ).with_columns(
        _esp.reply_code(pl.col("response")).alias("smtp_code"),
        pl.coalesce(_esp.reply_enhanced(pl.col("response")), pl.col("dsn")).alias("enhanced_code"),
        pl.col("_rec").struct.field("event").replace_strict(_ATTEMPT_EVENTS, default=None).alias("outcome"),
        pl.col("_rec").struct.field("attempt").cast(pl.Int64, strict=False).alias("attempt_given"),
    ).with_columns(
        pl.when(pl.col("smtp_code").is_not_null() | pl.col("response").str.contains(_RECEIVER_SAID)).then(True)
        .when(pl.col("response").str.contains(_NO_CONTACT)).then(False).alias("remote"),
    ).drop("_rec")


def load(files: list[SourceFile], options: LoadOptions) -> Load:
    """SendGrid event files -> canonical attempts (one row per deferred/delivered/bounce event)."""
    return _esp.run(files, fmt=FORMAT, dtype=RECORD, classify=_classified, rows=_rows, dedupe=options.dedupe)
