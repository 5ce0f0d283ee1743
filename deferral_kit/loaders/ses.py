"""Amazon SES events: event publishing (``eventType``) and legacy notifications
(``notificationType``), bare, SNS-wrapped (``{"Type": "Notification", "Message": "<json>"}``)
or Firehose newline-delimited, as JSON lines or documents.

Mapping (formats.md §6.3), one row per recipient:

* ``DeliveryDelay`` -> deferred, one row per ``deliveryDelay.delayedRecipients[]``:
  ``diagnosticCode`` ("smtp; 421 4.4.1 …") is the response, ``status`` the dsn, the
  ``reportingMTA`` SES's own MTA (``log_host``).  ``delayType`` InternalFailure,
  SendingDeferral and BYOIPHostNameLookupUnavailable are SES-side (smtp_codes.md §6): agent
  ``internal``, remote false, not tries against an MX.  TransientCommunicationFailure is a
  try (agent smtp); remote false unless the diagnostic carries a receiver reply that is not a
  network failure (e.g. "452 4.3.1 Insufficient system resources", not "421 4.4.1 Unable to connect").
* ``Delivery`` -> delivered, one row per ``delivery.recipients[]``: ``smtpResponse``,
  ``remoteMtaIp`` (mx_ip), ``processingTimeMillis`` (delay_s).
* ``Bounce`` -> bounced, one row per ``bounce.bouncedRecipients[]``.  Transient bounces are
  bounced too: SES only publishes "soft bounces that are no longer retried" (Bounce types
  section of the SES docs).  Subtypes Suppressed / OnAccountSuppressionList were never sent:
  agent ``internal``.
* Send, Reject, Open, Click, Complaint, Rendering Failure, Subscription, Received and SNS
  subscription messages are skipped with a reason.

SES never names the MX it tried (``mx_host`` null) and has no attempt counter (attempts are
numbered per message and recipient in time order).  ``queued_at`` is ``mail.timestamp``.
"""

from __future__ import annotations

import polars as pl

from ..sources import SourceFile
from . import Load, LoadOptions
from . import _esp, _json
from ._esp import s

FORMAT = "ses"

_RCPT = _esp.fields("emailAddress", "status", "diagnosticCode", "action")
EVENT = _esp.fields(
    "eventType", "notificationType",
    mail=_esp.fields(
        "timestamp", "messageId", "source", "sourceIp",
        tags=pl.Struct({"ses:outgoing-ip": pl.List(pl.String)}),
    ),
    bounce=_esp.fields("bounceType", "bounceSubType", "timestamp", "reportingMTA", "remoteMtaIp", bouncedRecipients=pl.List(_RCPT)),
    delivery=_esp.fields("timestamp", "smtpResponse", "reportingMTA", "remoteMtaIp", "processingTimeMillis", recipients=pl.List(pl.String)),
    deliveryDelay=_esp.fields("timestamp", "delayType", "expirationTime", "reportingMTA", delayedRecipients=pl.List(_RCPT)),
)
RECORD = pl.Struct({**dict(EVENT.to_schema()), "Type": pl.String, "Message": pl.String, "TopicArn": pl.String})

_KINDS = ("Bounce", "Complaint", "Delivery", "Send", "Reject", "Open", "Click", "Rendering Failure", "DeliveryDelay",
          "Subscription", "Received", "AmazonSnsSubscriptionSucceeded")
_SES_SIDE_DELAYS = ("InternalFailure", "SendingDeferral", "BYOIPHostNameLookupUnavailable")
_NEVER_SENT = ("Suppressed", "OnAccountSuppressionList")


def _is_event(d) -> bool:
    return isinstance(d, dict) and (d.get("eventType") in _KINDS or d.get("notificationType") in _KINDS)


def sniff(text: str) -> bool:
    """An SES event/notification (``eventType``/``notificationType`` with an SES value), or an SNS
    envelope carrying one."""
    import json

    vals = _json.first_values(text)
    if not vals:
        return False
    v = vals[0]
    if _is_event(v):
        return True
    if isinstance(v, dict) and v.get("Type") in ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation") and "TopicArn" in v:
        if v["Type"] != "Notification":
            return True
        try:
            return _is_event(json.loads(v.get("Message") or ""))
        except ValueError:
            return False
    return False


def _events(raw: pl.LazyFrame) -> pl.LazyFrame:
    """Replace SNS envelopes by the SES event in their ``Message`` string."""
    msg = s("rec", "Message")
    # SNS subscription messages carry plain text; an event is a JSON object.
    ok = msg.str.contains(r"^\s*\{")
    inner = pl.when(ok).then(msg).str.json_decode(EVENT)
    own = pl.struct([s("rec", n) for n in EVENT.to_schema()])
    return raw.with_columns(
        s("rec", "Type").alias("sns_type"),
        pl.when(msg.is_not_null() & ~ok & (s("rec", "Type") == "Notification")).then(pl.lit("SNS message is not JSON")).otherwise("bad").alias("bad"),
        pl.when(ok).then(inner).when(pl.col("rec").is_not_null()).then(own).alias("rec"),
    )


def _classified(raw: pl.LazyFrame) -> pl.LazyFrame:
    kind = pl.coalesce(s("rec", "eventType"), s("rec", "notificationType"))
    ts = pl.coalesce(s("rec", "deliveryDelay", "timestamp"), s("rec", "delivery", "timestamp"), s("rec", "bounce", "timestamp"))
    is_attempt = kind.is_in(["DeliveryDelay", "Delivery", "Bounce"])
    cat, reason = _esp.categorise(
        [
            (pl.col("sns_type").is_in(["SubscriptionConfirmation", "UnsubscribeConfirmation"]), "skipped",
             pl.concat_str(pl.lit("SNS "), pl.col("sns_type"), pl.lit(" (not an event)"))),
            (is_attempt & _esp.iso_ts(ts).is_not_null(), "attempt", ""),
            (is_attempt, "malformed", pl.concat_str(kind, pl.lit(" without a timestamp"))),
            (kind.is_in(["Open", "Click", "Complaint", "Subscription"]), "skipped", pl.concat_str(pl.lit("engagement event: "), kind)),
            (kind.is_in(["Send", "Reject", "Rendering Failure"]), "skipped", pl.concat_str(pl.lit("not a delivery attempt: "), kind)),
            (kind == "Received", "skipped", "inbound mail (Received)"),
        ],
        default_reason=pl.concat_str(pl.lit("not an SES event: "), pl.coalesce(kind, pl.lit("(no eventType)"))),
    )
    return _events(raw).with_columns(cat, reason)


def _rows(att: pl.LazyFrame) -> pl.LazyFrame:
    r = lambda *p: s("rec", *p)  # noqa: E731
    kind = pl.coalesce(r("eventType"), r("notificationType"))
    # One list of recipients per record, whatever the event: Delivery lists plain addresses.
    delivered = r("delivery", "recipients").list.eval(pl.struct(
        pl.element().alias("emailAddress"), *[pl.lit(None, pl.String).alias(f) for f in ("status", "diagnosticCode", "action")]))
    rcpts = (
        pl.when(kind == "DeliveryDelay").then(r("deliveryDelay", "delayedRecipients"))
        .when(kind == "Bounce").then(r("bounce", "bouncedRecipients"))
        .otherwise(delivered)
    )
    ts = _esp.iso_ts(pl.coalesce(r("deliveryDelay", "timestamp"), r("delivery", "timestamp"), r("bounce", "timestamp")))
    queued = _esp.iso_ts(r("mail", "timestamp"))
    delay_type = r("deliveryDelay", "delayType")
    internal = delay_type.is_in(_SES_SIDE_DELAYS) | r("bounce", "bounceSubType").is_in(_NEVER_SENT)
    msg_id = r("mail", "messageId")
    base = att.select(
        ts.alias("ts"),
        pl.when(kind == "Bounce").then(None).otherwise(
            _esp.host(pl.coalesce(r("deliveryDelay", "reportingMTA"), r("delivery", "reportingMTA")).str.replace(r"^(?i)dns;\s*", ""))
        ).alias("log_host"),
        pl.when(internal).then(pl.lit("internal")).otherwise(pl.lit("smtp")).alias("agent"),
        msg_id.alias("queue_id"),
        pl.concat_str(pl.lit("ses:"), msg_id).alias("message_key"),
        msg_id.alias("message_id"),
        _esp.address_of(r("mail", "source")).alias("sender"),
        r("mail", "tags", "ses:outgoing-ip").list.first().alias("egress_ip"),
        pl.coalesce(r("delivery", "remoteMtaIp"), r("bounce", "remoteMtaIp")).alias("mx_ip"),
        pl.when(kind == "Delivery").then(r("delivery", "smtpResponse")).alias("_delivery_reply"),
        kind.replace_strict({"DeliveryDelay": "deferred", "Delivery": "delivered", "Bounce": "bounced"}, default=None).alias("outcome"),
        internal.alias("_internal"),
        (delay_type == "TransientCommunicationFailure").alias("_no_contact"),
        queued.alias("queued_at"),
        pl.coalesce(r("delivery", "processingTimeMillis").cast(pl.Float64, strict=False) / 1000, (ts - queued).dt.total_microseconds() / 1e6).alias("delay_s"),
        rcpts.alias("_rcpt"),
        "file",
        "line_no",
    ).explode("_rcpt")
    rc = lambda f: pl.col("_rcpt").struct.field(f)  # noqa: E731
    return base.filter(pl.col("_rcpt").is_not_null()).with_columns(
        rc("emailAddress").alias("recipient"),
        _esp.domain_of(rc("emailAddress")).alias("recipient_domain"),
        rc("status").alias("dsn"),
        _esp.clean_reply(pl.coalesce(rc("diagnosticCode"), pl.col("_delivery_reply"))).alias("response"),
    ).with_columns(
        _esp.reply_code(pl.col("response")).alias("smtp_code"),
        pl.coalesce(_esp.reply_enhanced(pl.col("response")), pl.col("dsn")).alias("enhanced_code"),
    ).with_columns(
        pl.when(pl.col("_internal")).then(False)
        # SES files both "421 4.4.1 Unable to connect" (its own words, no contact) and real replies
        # from the receiver under TransientCommunicationFailure; only network-subject codes (4.4.x)
        # or no code at all mean nobody answered.
        .when(pl.col("_no_contact") & ~_esp.reply_enhanced(pl.col("response")).fill_null("4.4.").str.starts_with("4.4.")).then(True)
        .when(pl.col("_no_contact")).then(False)
        .when((pl.col("outcome") == "delivered") | pl.col("smtp_code").is_not_null()).then(True)
        .alias("remote"),
    ).drop("_rcpt", "_internal", "_no_contact", "_delivery_reply")


def load(files: list[SourceFile], options: LoadOptions) -> Load:
    """SES event files -> canonical attempts (one row per recipient of DeliveryDelay/Delivery/Bounce)."""
    return _esp.run(files, fmt=FORMAT, dtype=RECORD, classify=_classified, rows=_rows, dedupe=options.dedupe)
