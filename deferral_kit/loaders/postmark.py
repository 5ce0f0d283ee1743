"""Postmark webhooks (one event object per POST; saved as JSON lines or arrays) and Bounces API
pages (``{"TotalCount": N, "Bounces": […]}``).

Mapping (formats.md §6.4): ``RecordType: Delivery`` -> delivered (``Details`` is the reply when
Postmark passes it on); ``Bounce`` by ``Type``: SoftBounce, Transient and DnsError ->
deferred (Anymail's mapping: Postmark has no separate deferral event and retries these),
HardBounce, BadEmailAddress, Blocked, DMARCPolicy and Unknown -> bounced; bounce types that are
not delivery failures (AutoResponder, AddressChange, Subscribe/Unsubscribe, SpamNotification,
ChallengeVerification, ManuallyDeactivated, SMTPApiError, TemplateRenderingFailed, ...) and the
Open, Click, SpamComplaint and SubscriptionChange records are skipped with a reason.
``Details`` ("smtp;550 5.1.1 …") -> response; ``BouncedAt``/``DeliveredAt`` (7 fractional
digits and an offset) -> ts; ``ServerID`` -> instance; ``MessageStream`` -> egress_pool
(Postmark sends each stream type from its own IP pools).  No MX host, no attempt counter.
"""

from __future__ import annotations

import polars as pl

from ..sources import SourceFile
from . import Load, LoadOptions
from . import _esp, _json
from ._esp import s

FORMAT = "postmark"

EVENT = _esp.fields(
    "RecordType", "Type", "TypeCode", "ID", "ServerID", "ServerId", "MessageID", "MessageStream", "Recipient", "Email",
    "From", "Details", "Description", "BouncedAt", "DeliveredAt", "Name",
)
RECORD = pl.Struct({**dict(EVENT.to_schema()), "Bounces": pl.List(EVENT)})

_DEFERRED = ("SoftBounce", "Transient", "DnsError")
_BOUNCED = ("HardBounce", "BadEmailAddress", "Blocked", "DMARCPolicy", "Unknown")
_RECORD_TYPES = ("Bounce", "Delivery", "Open", "Click", "SpamComplaint", "SubscriptionChange")


def sniff(text: str) -> bool:
    """Postmark's PascalCase ``RecordType`` with a Postmark value, or Bounces API objects."""
    vals = _json.first_values(text)
    if not vals or not all(isinstance(v, dict) for v in vals):
        return False

    def is_bounce(d) -> bool:
        return isinstance(d, dict) and "TypeCode" in d and "MessageID" in d and ("BouncedAt" in d or "Email" in d)

    v = vals[0]
    if isinstance(v.get("Bounces"), list) and "TotalCount" in v:
        return True
    return all(x.get("RecordType") in _RECORD_TYPES and "MessageID" in x or is_bounce(x) for x in vals)


def _events(raw: pl.LazyFrame) -> pl.LazyFrame:
    rec = pl.col("rec")
    own = pl.struct([rec.struct.field(n) for n in EVENT.to_schema()])
    events = pl.when(rec.struct.field("Bounces").is_not_null()).then(rec.struct.field("Bounces")).when(rec.is_not_null()).then(pl.concat_list(own))
    out = raw.with_columns(events.alias("rec")).explode("rec", empty_as_null=True, keep_nulls=True)
    return out.with_columns(pl.when(pl.col("bad").is_null() & pl.col("rec").is_null()).then(pl.lit("empty bounces page")).otherwise("bad").alias("bad"))


def _kind() -> pl.Expr:
    # Bounces API objects have no RecordType; they are bounces.
    return pl.coalesce(s("rec", "RecordType"), pl.when(s("rec", "TypeCode").is_not_null()).then(pl.lit("Bounce")))


def _classified(raw: pl.LazyFrame) -> pl.LazyFrame:
    kind, typ = _kind(), s("rec", "Type")
    complete = _esp.iso_ts(pl.coalesce(s("rec", "DeliveredAt"), s("rec", "BouncedAt"))).is_not_null() & \
        pl.coalesce(s("rec", "Recipient"), s("rec", "Email")).is_not_null()
    is_attempt = (kind == "Delivery") | ((kind == "Bounce") & typ.is_in(_DEFERRED + _BOUNCED))
    cat, reason = _esp.categorise(
        [
            (is_attempt & complete, "attempt", ""),
            (is_attempt, "malformed", "delivery event without timestamp or recipient"),
            (kind == "Bounce", "skipped", pl.concat_str(pl.lit("not a delivery failure: bounce type "), pl.coalesce(typ, pl.lit("(none)")))),
            (kind.is_in(["Open", "Click", "SpamComplaint", "SubscriptionChange"]), "skipped", pl.concat_str(pl.lit("engagement event: "), kind)),
        ],
        default_reason=pl.concat_str(pl.lit("not a delivery event: "), pl.coalesce(kind, pl.lit("(no RecordType)"))),
    )
    return _events(raw).with_columns(cat, reason)


def _rows(att: pl.LazyFrame) -> pl.LazyFrame:
    r = lambda *p: s("rec", *p)  # noqa: E731
    kind, typ = _kind(), r("Type")
    rcpt = pl.coalesce(r("Recipient"), r("Email"))
    return att.select(
        _esp.iso_ts(pl.coalesce(r("DeliveredAt"), r("BouncedAt"))).alias("ts"),
        pl.coalesce(r("ServerID"), r("ServerId")).alias("instance"),
        pl.lit("smtp").alias("agent"),
        r("MessageID").alias("queue_id"),
        pl.concat_str(pl.lit("postmark:"), r("MessageID")).alias("message_key"),
        r("MessageID").alias("message_id"),
        _esp.address_of(r("From")).alias("sender"),
        rcpt.alias("recipient"),
        _esp.domain_of(rcpt).alias("recipient_domain"),
        r("MessageStream").alias("egress_pool"),
        _esp.clean_reply(r("Details")).alias("response"),
        pl.when(kind == "Delivery").then(pl.lit("delivered")).when(typ.is_in(_DEFERRED)).then(pl.lit("deferred")).otherwise(pl.lit("bounced")).alias("outcome"),
        (typ == "DnsError").alias("_dns"),
        "file",
        "line_no",
    ).with_columns(
        _esp.reply_code(pl.col("response")).alias("smtp_code"),
        _esp.reply_enhanced(pl.col("response")).alias("enhanced_code"),
    ).with_columns(
        # a DNS error: Postmark found no host to talk to
        pl.when(pl.col("_dns").fill_null(False)).then(False)
        .when((pl.col("outcome") == "delivered") | pl.col("smtp_code").is_not_null()).then(True).alias("remote"),
    ).drop("_dns")


def load(files: list[SourceFile], options: LoadOptions) -> Load:
    """Postmark event files -> canonical attempts (one row per Delivery or delivery-failure Bounce)."""
    return _esp.run(files, fmt=FORMAT, dtype=RECORD, classify=_classified, rows=_rows, dedupe=options.dedupe)
