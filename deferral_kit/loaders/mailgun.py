"""Mailgun events: webhook bodies (``{"signature":…, "event-data":{…}}``), Events API pages
(``{"items":[…]}``), bare event objects, as JSON lines or documents.

Mapping (formats.md §6.2): ``delivered`` -> delivered; ``failed`` with ``severity`` temporary ->
deferred, permanent -> bounced, except permanent failures Mailgun never tried (``reason``
suppress-bounce/-unsubscribe/-complaint, codes >= 600) which are skipped, and ``reason: old``
(Mailgun gave up after its retry period) which is ``expired`` with agent ``internal`` because it
reports no new try.  ``delivery-status``: ``code`` + ``enhanced-code`` + ``message`` rebuild the
response ("550 5.1.1 The email account…"; a multi-line message is joined, and a message
without its code gets the code put in front); ``mx-host`` -> mx_host (null when Mailgun did
not reach an MX, e.g. 498 "No MX for …"); ``attempt-no`` -> attempt; ``envelope.sending-ip``
-> egress_ip.  ``remote`` is true when an MX is named and the code is an SMTP reply (2xx-5xx).
"""

from __future__ import annotations

import polars as pl

from ..sources import SourceFile
from . import Load, LoadOptions
from . import _esp, _json
from ._esp import s

FORMAT = "mailgun"

EVENT = _esp.fields(
    "event", "severity", "reason", "timestamp", "id", "recipient", "recipient-domain", "log-level",
    "code", "error", "description", "Message-Id",  # legacy (pre-2018) webhook fields
    envelope=_esp.fields("sending-ip", "sender", "transport"),
    message=_esp.fields("size", headers=_esp.fields("message-id")),
    **{"delivery-status": _esp.fields("code", "enhanced-code", "message", "description", "attempt-no", "mx-host", "retry-seconds", "session-seconds")},
)
RECORD = pl.Struct({**dict(EVENT.to_schema()), "event-data": EVENT, "items": pl.List(EVENT)})

_NOT_TRIED = ("suppress-bounce", "suppress-unsubscribe", "suppress-complaint")


def sniff(text: str) -> bool:
    """A webhook body with ``event-data``, an Events API page whose items are Mailgun events, or
    an event with Mailgun's ``log-level``/``delivery-status`` beside ``event``."""
    vals = _json.first_values(text)
    if not vals or not all(isinstance(v, dict) for v in vals):
        return False

    def is_event(d) -> bool:
        return isinstance(d, dict) and "event" in d and ("log-level" in d or "delivery-status" in d or "recipient-domain" in d)

    v = vals[0]
    if isinstance(v.get("event-data"), dict):
        return True
    if isinstance(v.get("items"), list):
        return bool(v["items"]) and is_event(v["items"][0]) or ("paging" in v and not v["items"])
    return all(is_event(x) for x in vals)


def _events(raw: pl.LazyFrame) -> pl.LazyFrame:
    rec = pl.col("rec")
    own = pl.struct([rec.struct.field(n) for n in EVENT.to_schema()])
    events = (
        pl.when(rec.struct.field("items").is_not_null()).then(rec.struct.field("items"))
        .when(rec.struct.field("event-data").is_not_null()).then(pl.concat_list(rec.struct.field("event-data")))
        .when(rec.is_not_null()).then(pl.concat_list(own))
    )
    out = raw.with_columns(events.alias("rec")).explode("rec", empty_as_null=True, keep_nulls=True)
    return out.with_columns(pl.when(pl.col("bad").is_null() & pl.col("rec").is_null()).then(pl.lit("empty events page")).otherwise("bad").alias("bad"))


def _classified(raw: pl.LazyFrame) -> pl.LazyFrame:
    r = lambda *p: s("rec", *p)  # noqa: E731
    ev, sev = r("event"), r("severity")
    code = pl.coalesce(r("delivery-status", "code"), r("code")).cast(pl.Int64, strict=False)
    complete = _esp.epoch_ts(r("timestamp")).is_not_null() & r("recipient").is_not_null()
    delivery = ev.is_in(["delivered", "failed", "bounced"])
    not_tried = (ev == "failed") & (sev == "permanent") & (r("reason").is_in(_NOT_TRIED) | (code >= 600))
    cat, reason = _esp.categorise(
        [
            (not_tried, "skipped", pl.concat_str(pl.lit("not attempted: suppressed by Mailgun ("), pl.coalesce(r("reason"), code.cast(pl.String)), pl.lit(")"))),
            ((ev == "failed") & ~sev.is_in(["temporary", "permanent"]), "malformed", "failed event without severity"),
            (delivery & complete, "attempt", ""),
            (delivery, "malformed", "delivery event without timestamp or recipient"),
            (ev.is_in(["rejected", "dropped"]), "skipped", pl.concat_str(pl.lit("not attempted: "), ev)),
            (ev.is_in(["accepted", "stored"]), "skipped", pl.concat_str(pl.lit("accepted by Mailgun, not a delivery attempt: "), ev)),
            (ev.is_in(["opened", "clicked", "unsubscribed", "complained"]), "skipped", pl.concat_str(pl.lit("engagement event: "), ev)),
        ],
        default_reason=pl.concat_str(pl.lit("not a delivery event: "), pl.coalesce(ev, pl.lit("(no event field)"))),
    )
    return _events(raw).with_columns(cat, reason)


def _rows(att: pl.LazyFrame) -> pl.LazyFrame:
    r = lambda *p: s("rec", *p)  # noqa: E731
    ds = lambda f: r("delivery-status", f)  # noqa: E731
    ev, sev = r("event"), r("severity")
    expired = (ev == "failed") & (sev == "permanent") & (r("reason") == "old")
    outcome = (
        pl.when(ev == "delivered").then(pl.lit("delivered"))
        .when(expired).then(pl.lit("expired"))
        .when((ev == "failed") & (sev == "temporary")).then(pl.lit("deferred"))
        .otherwise(pl.lit("bounced"))
    )
    msg_id = pl.coalesce(r("message", "headers", "message-id"), r("Message-Id"))
    text = pl.coalesce(pl.when(ds("message").str.len_chars() > 0).then(ds("message")), r("error"),
                       pl.when(ds("description").str.len_chars() > 0).then(ds("description")))
    # Two stages: the reply parts are columns before the response is rebuilt from them, so
    # no sub-expression is evaluated more than once.
    return att.select(
        _esp.epoch_ts(r("timestamp")).alias("ts"),
        pl.when(expired).then(pl.lit("internal")).otherwise(pl.lit("smtp")).alias("agent"),
        pl.concat_str(pl.lit("mailgun:"), msg_id).alias("message_key"),
        msg_id.alias("message_id"),
        r("envelope", "sender").alias("sender"),
        r("recipient").alias("recipient"),
        pl.coalesce(r("recipient-domain").str.to_lowercase(), _esp.domain_of(r("recipient"))).alias("recipient_domain"),
        r("envelope", "sending-ip").alias("egress_ip"),
        _esp.host(ds("mx-host")).alias("mx_host"),
        pl.coalesce(ds("code"), r("code")).cast(pl.Int16, strict=False).alias("smtp_code"),
        ds("enhanced-code").alias("dsn"),
        _esp.clean_reply(text).alias("_text"),
        outcome.alias("outcome"),
        expired.alias("_expired"),
        r("message", "size").cast(pl.Int64, strict=False).alias("size"),
        ds("attempt-no").cast(pl.Int64, strict=False).alias("attempt_given"),
        "file",
        "line_no",
    ).with_columns(
        _esp.with_code(pl.col("smtp_code"), pl.col("_text"), pl.col("dsn")).alias("response"),
        (~pl.col("_expired") & pl.col("mx_host").is_not_null() & pl.col("smtp_code").is_between(200, 599)).alias("remote"),
    ).with_columns(
        pl.coalesce(_esp.reply_enhanced(pl.col("response")), pl.col("dsn")).alias("enhanced_code"),
    ).drop("_text", "_expired")


def load(files: list[SourceFile], options: LoadOptions) -> Load:
    """Mailgun event files -> canonical attempts (one row per delivered/failed event)."""
    return _esp.run(files, fmt=FORMAT, dtype=RECORD, classify=_classified, rows=_rows, dedupe=options.dedupe)
