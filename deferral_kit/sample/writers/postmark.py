"""Render a world as Postmark webhook POSTs saved as JSON lines (one event object per line, one file per day).

Per try: ``RecordType: Delivery`` (``DeliveredAt``, ``Details`` "smtp;<reply>") or
``RecordType: Bounce`` with ``Type`` Transient (a deferral Postmark keeps retrying; a connect
timeout has no SMTP code), SoftBounce (mailbox full), HardBounce or Blocked (policy and
reputation rejections), ``Details`` "smtp;<reply>", ``BouncedAt`` (7 fractional digits),
``MessageID``, ``ServerID``, ``MessageStream`` (outbound / broadcast by IP pool).  Postmark
names no MX and no IP; queue expiry and Postfix-only local suspensions are not written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from ._daily import write_daily
from .common import rng_for

SERVER_ID = 23
# Type -> (TypeCode, Name, Description) as Postmark sends them.
_TYPES = {
    "Transient": (2, "Message delayed", "The server could not temporarily deliver your message (ex: Message is delayed due to network troubles)."),
    "SoftBounce": (4096, "Soft bounce", "Unable to temporarily deliver this email."),
    "HardBounce": (1, "Hard bounce", "The server was unable to deliver your message (ex: unknown user, mailbox not found)."),
    "Blocked": (100000, "ISP block", "The ISP has blocked delivery of this message."),
}


def render(world) -> pl.DataFrame:
    rng = rng_for(world, 10)
    n = world.envelopes.height
    h = pl.Series(np.frombuffer(rng.bytes(n * 16).hex().encode(), dtype="S32").astype("U32"))
    mids = world.envelopes.select("msg", pl.format("{}-{}-{}-{}-{}", *(h.str.slice(a, b) for a, b in ((0, 8), (8, 4), (12, 4), (16, 4), (20, 12)))).alias("pm_id"))
    t = world.truth.filter(pl.col("agent") == "smtp").join(mids, on="msg").sort("ts", maintain_order=True)
    t = t.with_columns(pl.Series("bid", rng.integers(10**9, 4 * 10**18, t.height)))
    reply = pl.col("reply_text").str.replace_all("\n", " ", literal=True)
    details = pl.when(pl.col("smtp_code").is_null()).then(pl.format("connect to {}[{}]:25: Connection timed out", "mx_host", "mx_ip")).otherwise(pl.format("smtp;{}", reply))
    at = pl.format("{}0Z", pl.col("ts").dt.strftime("%Y-%m-%dT%H:%M:%S%.6f"))
    stream = pl.when(pl.col("egress_pool") == "bulk").then(pl.lit("broadcast")).otherwise(pl.lit("outbound"))
    typ = (pl.when(pl.col("outcome") == "deferred").then(pl.when(pl.col("class_truth") == "mailbox").then(pl.lit("SoftBounce")).otherwise(pl.lit("Transient")))
           .when(pl.col("class_truth").is_in(["policy", "reputation"])).then(pl.lit("Blocked")).otherwise(pl.lit("HardBounce")))
    lookup = lambda i: typ.replace_strict({k: v[i] for k, v in _TYPES.items()})  # noqa: E731
    bounces = t.filter(pl.col("outcome") != "delivered").select("ts", pl.struct(
        pl.lit("Bounce").alias("RecordType"), pl.col("bid").alias("ID"), typ.alias("Type"), lookup(0).alias("TypeCode"), lookup(1).alias("Name"),
        pl.lit("newsletter").alias("Tag"), pl.col("pm_id").alias("MessageID"), pl.lit(SERVER_ID).alias("ServerID"), stream.alias("MessageStream"),
        lookup(2).alias("Description"), details.alias("Details"), pl.col("recipient").alias("Email"), pl.col("sender").alias("From"),
        at.alias("BouncedAt"), pl.lit(False).alias("DumpAvailable"), (pl.col("outcome") == "bounced").alias("Inactive"), pl.lit(True).alias("CanActivate"),
        pl.lit("Newsletter").alias("Subject"),
    ).struct.json_encode().alias("line"))
    delivered = t.filter(pl.col("outcome") == "delivered").select("ts", pl.struct(
        pl.lit("Delivery").alias("RecordType"), pl.lit(SERVER_ID).alias("ServerID"), stream.alias("MessageStream"), pl.col("pm_id").alias("MessageID"),
        pl.col("recipient").alias("Recipient"), pl.lit("newsletter").alias("Tag"), at.alias("DeliveredAt"), details.alias("Details"),
    ).struct.json_encode().alias("line"))
    return pl.concat([bounces, delivered]).sort("ts", maintain_order=True)


def write(world, out_dir: Path, *, rotate: bool = True, gzip_old: bool = False) -> list[Path]:
    """Write ``postmark-webhooks-YYYYMMDD.jsonl`` (one per UTC day when ``rotate``)."""
    return write_daily(render(world), out_dir, lambda d: f"postmark-webhooks-{d:%Y%m%d}.jsonl" if d else "postmark-webhooks.jsonl", rotate=rotate)
