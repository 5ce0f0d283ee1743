"""A canonical attempts table with a known Microsoft capacity episode, for the report tests.

Two ISO weeks (2026-W46 and 2026-W47), five destinations, 60 tries per destination per hour
from two sending IPs.  In W47 outlook.com and hotmail.com get ``452 4.3.1`` on 12 tries per
hour for four hours (Wed 2026-11-18 14:00-17:59 UTC); W46 has one per day on outlook.com.
A Yahoo reply carries a hostile ``<script>`` text; Gmail bounces quote the recipient address.
Built with vectorized polars and :func:`deferral_kit.schema.conform`, so the truth is exact.
"""

from __future__ import annotations

from datetime import datetime, timezone

import polars as pl

from deferral_kit import schema

DESTINATIONS = {
    "outlook.com": "outlook-com.olc.protection.outlook.com",
    "hotmail.com": "hotmail-com.olc.protection.outlook.com",
    "contoso.com": "contoso-com.mail.protection.outlook.com",
    "gmail.com": "gmail-smtp-in.l.google.com",
    "yahoo.com": "mta5.am0.yahoodns.net",
}
PER_HOUR = 60
EPISODE_DOMAINS = ("outlook.com", "hotmail.com")
EPISODE_HOURS = (14, 15, 16, 17)  # on 2026-11-18, UTC
EPISODE_PER_HOUR = 12
HOSTILE = "421 4.7.0 [TSS04] <script>alert(1)</script> temporarily deferred"
BOUNCED_RECIPIENT_LOCAL = "alice.smith"

TRUTH = {
    "week": "2026-W47",
    "microsoft_attempts": 3 * PER_HOUR * 24 * 7,  # three Microsoft destinations
    "microsoft_431": len(EPISODE_DOMAINS) * len(EPISODE_HOURS) * EPISODE_PER_HOUR,
    "previous_microsoft_431": 7,
    "outlook_431": len(EPISODE_HOURS) * EPISODE_PER_HOUR,
    "per_destination_attempts": PER_HOUR * 24 * 7,
    "peak_bucket": "2026-11-18T14:00:00+00:00",
    "peak_count": len(EPISODE_DOMAINS) * EPISODE_PER_HOUR,
    "peak_attempts": 3 * PER_HOUR,
    "gmail_bounces": 7,
    "yahoo_other_4xx": 7,
}


def attempts() -> pl.DataFrame:
    hours = pl.datetime_range(datetime(2026, 11, 9, tzinfo=timezone.utc), datetime(2026, 11, 22, 23, tzinfo=timezone.utc), "1h", time_zone="UTC", eager=True).alias("hour")
    dest = pl.DataFrame({"recipient_domain": list(DESTINATIONS), "mx_host": list(DESTINATIONS.values())})
    tries = pl.DataFrame({"k": range(PER_HOUR)})
    f = hours.to_frame().join(dest, how="cross").join(tries, how="cross")
    ts = pl.col("hour") + pl.duration(seconds=pl.col("k") * 59)
    in_episode = (
        pl.col("recipient_domain").is_in(EPISODE_DOMAINS)
        & (pl.col("hour").dt.date() == datetime(2026, 11, 18).date())
        & pl.col("hour").dt.hour().is_in(EPISODE_HOURS)
        & (pl.col("k") < EPISODE_PER_HOUR)
    )
    w46_daily = (pl.col("recipient_domain") == "outlook.com") & (pl.col("hour") < datetime(2026, 11, 16, tzinfo=timezone.utc)) & (pl.col("hour").dt.hour() == 9) & (pl.col("k") == 0)
    is_431 = in_episode | w46_daily
    daily_noon = (pl.col("hour").dt.hour() == 12) & (pl.col("k") == 1) & (pl.col("hour") >= datetime(2026, 11, 16, tzinfo=timezone.utc))
    hostile = daily_noon & (pl.col("recipient_domain") == "yahoo.com")
    bounce = daily_noon & (pl.col("recipient_domain") == "gmail.com")
    n = pl.int_range(pl.len())
    recipient = pl.when(bounce).then(pl.lit(BOUNCED_RECIPIENT_LOCAL)).otherwise(pl.format("user{}", pl.col("k"))) + "@" + pl.col("recipient_domain")
    ms_host = pl.format("AM6PR0{}MB{}.eurprd0{}.prod.outlook.com", pl.col("k") % 9, 1000 + pl.col("k"), pl.col("k") % 7)
    f = f.with_columns(
        ts.alias("ts"),
        pl.lit("postfix").alias("source"),
        pl.lit("mx-out1").alias("log_host"),
        pl.lit("postfix").alias("instance"),
        pl.lit("smtp").alias("agent"),
        pl.format("Q{}", n).alias("queue_id"),
        pl.format("Q{}@mx-out1", n).alias("message_key"),
        pl.lit("news@shop.example").alias("sender"),
        recipient.alias("recipient"),
        pl.when(pl.col("k") % 2 == 0).then(pl.lit("192.0.2.10")).otherwise(pl.lit("192.0.2.11")).alias("egress_ip"),
        pl.lit("203.0.113.5").alias("mx_ip"),
        pl.when(is_431).then(452).when(hostile).then(421).when(bounce).then(550).otherwise(250).alias("smtp_code"),
        pl.when(is_431).then(pl.lit("4.3.1")).when(hostile).then(pl.lit("4.7.0")).when(bounce).then(pl.lit("5.1.1")).otherwise(pl.lit("2.0.0")).alias("enhanced_code"),
        pl.when(is_431).then(pl.lit("RCPT TO")).when(hostile).then(pl.lit("MAIL FROM")).when(bounce).then(pl.lit("RCPT TO")).otherwise(pl.lit("end of DATA")).alias("smtp_stage"),
        pl.when(is_431)
        .then(pl.format("452 4.3.1 Insufficient system resources (TSTE) [{} {}]", ms_host, pl.col("hour").dt.strftime("%Y-%m-%dT%H:%M:%S.000Z")))
        .when(hostile)
        .then(pl.lit(HOSTILE))
        .when(bounce)
        .then(pl.format("550 5.1.1 <{}> The email account that you tried to reach does not exist", recipient))
        .otherwise(pl.lit("250 2.0.0 OK queued as 7F3A"))
        .alias("response"),
        pl.when(is_431 | hostile).then(pl.lit("deferred")).when(bounce).then(pl.lit("bounced")).otherwise(pl.lit("delivered")).alias("outcome"),
        pl.lit(True).alias("remote"),
        pl.lit(1).alias("attempt"),
        pl.lit("synthetic").alias("file"),
        (n + 1).alias("line_no"),
    ).with_columns(pl.col("enhanced_code").alias("dsn"))
    # A suspension row per day that must stay out of the denominator.
    suspended = f.filter((pl.col("recipient_domain") == "outlook.com") & (pl.col("k") == 2) & (pl.col("hour").dt.hour() == 15)).with_columns(
        pl.lit("error").alias("agent"), pl.lit(None, dtype=pl.String).alias("mx_host"), pl.lit("deferred").alias("outcome"),
        pl.lit("452 4.3.1 delivery temporarily suspended").alias("response"), pl.lit(452).alias("smtp_code"), pl.lit("4.3.1").alias("enhanced_code"),
    )
    return schema.conform(pl.concat([f, suspended]).lazy()).collect()


def write(path) -> str:
    attempts().write_parquet(path)
    return str(path)
