"""Render a world as Amazon SES event publishing records (Kinesis Firehose newline-delimited JSON, one object per day).

Per message a ``Send`` event; per try one event for its recipient: ``DeliveryDelay``
(``delayType`` RecipientServerError / MailboxFull / IPFailure / SpamDetected from the reply,
TransientCommunicationFailure with ``smtp; 421 4.4.1 Unable to connect to remote host`` for a
connect timeout; ``diagnosticCode`` "smtp; <reply>", ``status`` the enhanced code),
``Delivery`` (``smtpResponse``, ``remoteMtaIp``, ``processingTimeMillis``) or ``Bounce``
(Permanent, ``bouncedRecipients`` with ``diagnosticCode``).  ``mail`` carries the SES
``messageId``, ``source``, ``destination`` and the ``ses:outgoing-ip`` tag.  SES names no MX
host (no ``remoteMtaIp`` on delays); queue expiry (SES sends no event for it) and
Postfix-only local suspensions are not written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from ._daily import write_daily
from .common import rng_for

_ENH = r"^\d{3}[ -](\d\.\d{1,3}\.\d{1,3})\b"
_ISO = "%Y-%m-%dT%H:%M:%S%.3fZ"


def render(world) -> pl.DataFrame:
    rng = rng_for(world, 8)
    n = world.envelopes.height
    hexes = np.frombuffer(rng.bytes(n * 22).hex().encode(), dtype="S44").astype("U44")
    rcpts = world.messages.group_by("msg").agg(pl.col("recipient").sort_by("r").alias("destination"))
    env = world.envelopes.with_columns(pl.Series("h", hexes)).join(rcpts, on="msg").with_columns(
        pl.format("0102{}-{}-{}-{}-{}-{}-000000", *(pl.col("h").str.slice(a, b) for a, b in ((0, 12), (12, 8), (20, 4), (24, 4), (28, 4), (32, 12))))
        .alias("ses_id"))
    mail = pl.struct(
        pl.col("arrival").dt.strftime(_ISO).alias("timestamp"), pl.col("sender").alias("source"),
        pl.lit("arn:aws:ses:eu-west-1:123456789012:identity/example.com").alias("sourceArn"),
        pl.lit("123456789012").alias("sendingAccountId"), pl.col("ses_id").alias("messageId"), "destination",
        pl.lit(False).alias("headersTruncated"),
        pl.struct(pl.concat_list(pl.lit("prod")).alias("ses:configuration-set"), pl.concat_list("egress_ip").alias("ses:outgoing-ip")).alias("tags"),
    ).alias("mail")
    env = env.with_columns(mail)
    t = world.truth.filter(pl.col("agent") == "smtp").join(env.select("msg", "mail"), on="msg")
    t = t.with_columns(pl.Series("mta", rng.integers(1, 99, t.height)))
    reply = pl.col("reply_text").str.replace_all("\n", " ", literal=True)
    timeout = pl.col("smtp_code").is_null()
    mta = pl.format("a{}-{}.smtp-out.eu-west-1.amazonses.com", pl.col("egress_ip").str.extract(r"(\d+)$"), "mta")
    enh = pl.coalesce(pl.col("reply_text").str.extract(_ENH, 1), pl.col("enhanced_code"))
    diag = pl.when(timeout).then(pl.lit("smtp; 421 4.4.1 Unable to connect to remote host")).otherwise(pl.format("smtp; {}", reply))
    delay_type = (pl.when(timeout).then(pl.lit("TransientCommunicationFailure"))
                  .otherwise(pl.col("class_truth").replace_strict({"mailbox": "MailboxFull", "reputation": "IPFailure", "policy": "SpamDetected"},
                                                                   default="RecipientServerError")))
    ts = pl.col("ts").dt.strftime(_ISO)
    deferred = t.filter(pl.col("outcome") == "deferred").select("ts", pl.struct(
        pl.lit("DeliveryDelay").alias("eventType"), "mail",
        pl.struct(ts.alias("timestamp"), delay_type.alias("delayType"),
                  (pl.col("queued_at") + pl.duration(hours=24)).dt.strftime(_ISO).alias("expirationTime"), mta.alias("reportingMTA"),
                  pl.concat_list(pl.struct(pl.col("recipient").alias("emailAddress"), pl.when(timeout).then(pl.lit("4.4.1")).otherwise(enh).alias("status"),
                                           diag.alias("diagnosticCode")))
                  .alias("delayedRecipients")).alias("deliveryDelay"),
    ).struct.json_encode().alias("line"))
    delivered = t.filter(pl.col("outcome") == "delivered").select("ts", pl.struct(
        pl.lit("Delivery").alias("eventType"), "mail",
        pl.struct(ts.alias("timestamp"), (pl.col("delay_s") * 1000).round(0).cast(pl.Int64).alias("processingTimeMillis"),
                  pl.concat_list("recipient").alias("recipients"), reply.alias("smtpResponse"), pl.col("mx_ip").alias("remoteMtaIp"),
                  mta.alias("reportingMTA")).alias("delivery"),
    ).struct.json_encode().alias("line"))
    bounced = t.filter(pl.col("outcome") == "bounced").select("ts", pl.struct(
        pl.lit("Bounce").alias("eventType"),
        pl.struct(pl.lit("Permanent").alias("bounceType"),
                  pl.when(pl.col("class_truth") == "mailbox").then(pl.lit("NoEmail")).otherwise(pl.lit("General")).alias("bounceSubType"),
                  pl.concat_list(pl.struct(pl.col("recipient").alias("emailAddress"), pl.lit("failed").alias("action"), enh.alias("status"),
                                           diag.alias("diagnosticCode"))).alias("bouncedRecipients"),
                  ts.alias("timestamp"), pl.format("{}-{}-000000", pl.col("mail").struct.field("messageId").str.slice(0, 24), "r").alias("feedbackId"),
                  pl.col("mx_ip").alias("remoteMtaIp"), pl.format("dns; {}", mta).alias("reportingMTA")).alias("bounce"),
        "mail",
    ).struct.json_encode().alias("line"))
    send = env.select(pl.col("arrival").alias("ts"), pl.struct(pl.lit("Send").alias("eventType"), "mail", pl.struct(pl.lit(None, pl.String).alias("x")).alias("send"))
                      .struct.json_encode().str.replace(r'"send":\{"x":null\}', '"send":{}').alias("line"))
    return pl.concat([send, deferred, delivered, bounced]).sort("ts", maintain_order=True)


def write(world, out_dir: Path, *, rotate: bool = True, gzip_old: bool = False) -> list[Path]:
    """Write Firehose objects ``ses-events-1-YYYY-MM-DD-00-00-00`` (one per UTC day when ``rotate``)."""
    return write_daily(render(world), out_dir, lambda d: f"ses-events-1-{d:%Y-%m-%d}-00-00-00" if d else "ses-events-1", rotate=rotate)
