"""SparkPost (Bird) events: webhook batches (``[{"msys": {"message_event": {…}}}, …]``), the
Events API (``{"results": [{…}]}``) or bare event objects, as JSON lines or documents.

Mapping (formats.md §6.5): ``delay`` -> deferred, ``delivery`` -> delivered, ``bounce`` ->
bounced, ``out_of_band`` -> bounced with agent ``out_of_band`` (a DSN that arrived after the
receiver had accepted the message: not a new try, so not in the attempt denominator).
Bounces of class 60/80/90/100 (auto-reply, subscribe, unsubscribe, challenge-response) are not
delivery failures and are skipped; class 25 (admin failure: SparkPost's own policy) is agent
``internal``.  Injection, policy/generation rejections and failures, engagement
(``track_event``), unsubscribe and relay events are skipped with a reason.

``raw_reason`` (unredacted; else ``reason``) is the response, ``error_code`` the reply code.
A reply marked ``[internal]`` was written by SparkPost, not the receiver (remote false).
``num_retries`` counts the retries before this event, so attempt = num_retries + 1 (the
delay in Anymail's capture has num_retries "1" after 20 minutes in queue: the first retry's
failure).  ``sending_ip``/``ip_pool`` are the egress, ``ip_address`` the receiving MX's IP
(mx_ip); SparkPost gives no MX host name.  All numbers arrive as strings; ``timestamp`` is
Unix seconds or ISO 8601.
"""

from __future__ import annotations

import polars as pl

from ..sources import SourceFile
from . import Load, LoadOptions
from . import _esp, _json
from ._esp import s

FORMAT = "sparkpost"

EVENT = _esp.fields(
    "type", "timestamp", "rcpt_to", "raw_rcpt_to", "raw_reason", "reason", "error_code", "bounce_class", "num_retries",
    "sending_ip", "ip_pool", "ip_address", "message_id", "transmission_id", "event_id", "msg_from", "msg_size",
    "queue_time", "injection_time", "routing_domain",
)
_OTHER = ("track_event", "gen_event", "unsubscribe_event", "relay_event", "ab_test_event", "ingest_event", "sms_status_event")
RECORD = pl.Struct({
    **dict(EVENT.to_schema()),
    "results": pl.List(EVENT),
    "msys": pl.Struct({"message_event": EVENT, **{k: _esp.fields("type") for k in _OTHER}}),
})

_ATTEMPTS = {"delay": "deferred", "delivery": "delivered", "bounce": "bounced", "out_of_band": "bounced"}
_NOT_FAILURES = {"60": "auto-reply", "80": "subscribe", "90": "unsubscribe", "100": "challenge-response"}


def sniff(text: str) -> bool:
    """``msys`` webhook wrappers, or Events API ``results`` / bare events with SparkPost's
    ``event_id`` + ``type`` + ``rcpt_to``/``transmission_id``."""
    vals = _json.first_values(text)
    if not vals or not all(isinstance(v, dict) for v in vals):
        return False

    def is_event(d) -> bool:
        return isinstance(d, dict) and "type" in d and "event_id" in d and ("rcpt_to" in d or "raw_rcpt_to" in d or "transmission_id" in d)

    if all(isinstance(v.get("msys"), dict) for v in vals):
        return True
    v = vals[0]
    if isinstance(v.get("results"), list):
        return bool(v["results"]) and is_event(v["results"][0])
    return all(is_event(x) for x in vals)


def _events(raw: pl.LazyFrame) -> pl.LazyFrame:
    rec, msys = pl.col("rec"), s("rec", "msys")
    own = pl.struct([rec.struct.field(n) for n in EVENT.to_schema()])
    wrapper = pl.coalesce(
        pl.when(msys.struct.field("message_event").is_not_null()).then(pl.lit("message_event")),
        *[pl.when(msys.struct.field(k).is_not_null()).then(pl.concat_str(pl.lit(k + ": "), msys.struct.field(k).struct.field("type"), ignore_nulls=True))
          for k in _OTHER],
        pl.when(msys.is_not_null()).then(pl.lit("empty msys (ping)")),
    )
    events = (
        pl.when(rec.struct.field("results").is_not_null()).then(rec.struct.field("results"))
        .when(msys.struct.field("message_event").is_not_null()).then(pl.concat_list(msys.struct.field("message_event")))
        .when(msys.is_null() & rec.struct.field("type").is_not_null()).then(pl.concat_list(own))
    )
    return (
        raw.with_columns(wrapper.alias("wrapper"), events.alias("rec"))
        .explode("rec", empty_as_null=True, keep_nulls=True)
        .with_columns(
            pl.when(pl.col("wrapper").is_null() & pl.col("rec").is_not_null()).then(pl.lit("message_event")).otherwise("wrapper").alias("wrapper")
        )
    )


def _classified(raw: pl.LazyFrame) -> pl.LazyFrame:
    typ, cls = s("rec", "type"), s("rec", "bounce_class")
    complete = _esp.any_ts(s("rec", "timestamp")).is_not_null() & pl.coalesce(s("rec", "raw_rcpt_to"), s("rec", "rcpt_to")).is_not_null()
    is_attempt = (pl.col("wrapper") == "message_event") & typ.is_in(list(_ATTEMPTS))
    cat, reason = _esp.categorise(
        [
            (pl.col("wrapper").str.starts_with("track_event"), "skipped",
             pl.concat_str(pl.lit("engagement event: "), pl.col("wrapper").str.strip_prefix("track_event: "))),
            (pl.col("wrapper").is_not_null() & (pl.col("wrapper") != "message_event"), "skipped",
             pl.concat_str(pl.lit("not a delivery event: "), pl.col("wrapper"))),
            (is_attempt & typ.is_in(["bounce", "out_of_band"]) & cls.is_in(list(_NOT_FAILURES)), "skipped",
             pl.concat_str(pl.lit("not a delivery failure: bounce class "), cls, pl.lit(" ("), cls.replace_strict(_NOT_FAILURES, default=""), pl.lit(")"))),
            (is_attempt & complete, "attempt", ""),
            (is_attempt, "malformed", "delivery event without timestamp or recipient"),
            (typ.is_in(["injection", "policy_rejection", "generation_failure", "generation_rejection", "spam_complaint", "sms_status"]),
             "skipped", pl.concat_str(pl.lit("not a delivery attempt: "), typ)),
        ],
        default_reason=pl.concat_str(pl.lit("not a delivery event: "), pl.coalesce(typ, pl.lit("(no type)"))),
    )
    return _events(raw).with_columns(cat, reason)


def _rows(att: pl.LazyFrame) -> pl.LazyFrame:
    r = lambda *p: s("rec", *p)  # noqa: E731
    typ = r("type")
    msg = pl.coalesce(r("message_id"), r("transmission_id"))
    rcpt = pl.coalesce(r("raw_rcpt_to"), r("rcpt_to"))
    not_remote = (typ == "out_of_band") | (r("bounce_class") == "25")
    # Two stages so the reply, time and delay are computed once and reused.
    return att.select(
        _esp.any_ts(r("timestamp")).alias("ts"),
        pl.when(typ == "out_of_band").then(pl.lit("out_of_band")).when(r("bounce_class") == "25").then(pl.lit("internal"))
        .otherwise(pl.lit("smtp")).alias("agent"),
        r("message_id").alias("queue_id"),
        pl.concat_str(pl.lit("sparkpost:"), msg).alias("message_key"),
        r("message_id").alias("message_id"),
        r("msg_from").alias("sender"),
        rcpt.alias("recipient"),
        pl.coalesce(_esp.domain_of(rcpt), r("routing_domain").str.to_lowercase()).alias("recipient_domain"),
        r("sending_ip").alias("egress_ip"),
        r("ip_pool").alias("egress_pool"),
        r("ip_address").alias("mx_ip"),
        _esp.clean_reply(pl.coalesce(r("raw_reason"), r("reason"))).alias("response"),
        r("error_code").cast(pl.Int16, strict=False).alias("_error_code"),
        typ.replace_strict(_ATTEMPTS, default=None).alias("outcome"),
        not_remote.alias("_not_remote"),
        (r("queue_time").cast(pl.Float64, strict=False) / 1000).alias("delay_s"),
        _esp.iso_ts(r("injection_time")).alias("_injected"),
        r("msg_size").cast(pl.Int64, strict=False).alias("size"),
        (r("num_retries").cast(pl.Int64, strict=False) + 1).alias("attempt_given"),
        "file",
        "line_no",
    ).with_columns(
        pl.coalesce(_esp.reply_code(pl.col("response")), pl.col("_error_code")).alias("smtp_code"),
        _esp.reply_enhanced(pl.col("response")).alias("enhanced_code"),
        pl.coalesce("_injected", pl.col("ts") - pl.duration(microseconds=(pl.col("delay_s") * 1e6).cast(pl.Int64, strict=False))).alias("queued_at"),
    ).with_columns(
        # "[internal]" marks SparkPost's own text, not a receiver reply
        pl.when(pl.col("_not_remote") | pl.col("response").str.contains(r"\[internal\]")).then(False)
        .when((pl.col("outcome") == "delivered") | pl.col("smtp_code").is_not_null()).then(True).alias("remote"),
    ).drop("_error_code", "_not_remote", "_injected")


def load(files: list[SourceFile], options: LoadOptions) -> Load:
    """SparkPost event files -> canonical attempts (one row per delay/delivery/bounce event)."""
    return _esp.run(files, fmt=FORMAT, dtype=RECORD, classify=_classified, rows=_rows, dedupe=options.dedupe)
