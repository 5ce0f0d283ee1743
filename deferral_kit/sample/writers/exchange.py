"""Render a world as Exchange Server 2016/2019 message tracking logs (``MSGTRK*.LOG``).

Each daily file starts with the ``#Software``/``#Version``/``#Log-type``/``#Date``/``#Fields``
header (30 fields) and has comma-separated rows, fields with commas or quotes quoted with
``""`` escaping.  Per message a ``RECEIVE`` row (all recipients joined by ``;``); per try of
each recipient: ``DEFER`` (source SMTP; ``recipient-status`` is the queue's last error
``[{LRT=…};{LED=451 4.4.0 Primary target IP address responded with: "<reply>." …};{FQDN=…};{IP=…}]``,
or ``Error encountered while communicating with primary target IP address: "Failed to
connect. Winsock error code: 10060 …"`` for a connect timeout), ``FAIL`` (the remote reply)
or ``SENDEXTERNAL`` (``250 2.1.5 Recipient OK``, the end-of-data reply in
``source-context``); queue expiry is a ``QUEUE``/``FAIL`` row with ``550 4.4.7
QUEUE.Expired``.  Postfix-only local suspensions are not written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from ._daily import write_daily
from .common import CLIENTS, rng_for

FIELDS = (
    "date-time,client-ip,client-hostname,server-ip,server-hostname,source-context,connector-id,source,event-id,"
    "internal-message-id,message-id,network-message-id,recipient-address,recipient-status,total-bytes,recipient-count,"
    "related-recipient-address,reference,message-subject,sender-address,return-path,message-info,directionality,"
    "tenant-id,original-client-ip,original-server-ip,custom-data,transport-traffic-type,log-id,schema-version"
).split(",")
VERSION = "15.02.1544.004"
HEADER = ("#Software: Microsoft Exchange Server\r\n#Version: " + VERSION + "\r\n#Log-type: Message Tracking Log\r\n"
          "#Date: {first:%Y-%m-%dT%H:%M:%S.000Z}\r\n#Fields: " + ",".join(FIELDS) + "\r\n")
_FAILOVER = (" Attempted failover to alternate host, but that did not succeed. Either there are no alternate hosts, "
             "or delivery failed to all alternate hosts. The last endpoint attempted was {}:25")


def _uuid(rng: np.random.Generator, n: int) -> pl.Series:
    h = np.frombuffer(rng.bytes(n * 16).hex().encode(), dtype="S32").astype("U32")
    return pl.Series(h).str.replace(r"^(.{8})(.{4})(.{4})(.{4})(.{12})$", "${1}-${2}-${3}-${4}-${5}")


def render(world) -> pl.DataFrame:
    rng = rng_for(world, 6)
    host = world.config.log_host.upper()
    env = world.envelopes.with_columns(
        (pl.col("msg") + 31885837206529).cast(pl.String).alias("imid"), _uuid(rng, world.envelopes.height).alias("nmid"))
    ms = pl.col("ts").dt.strftime("%Y-%m-%dT%H:%M:%S%.3fZ")
    reply = pl.col("reply_text").str.replace_all("\n", " ", literal=True)
    lrt = pl.format("{{LRT={}}}", pl.col("ts").dt.strftime("%-m/%-d/%Y %-I:%M:%S %p"))
    led = (pl.when(pl.col("smtp_code").is_null())
           .then(pl.format('451 4.4.0 Error encountered while communicating with primary target IP address: "Failed to connect. '
                           'Winsock error code: 10060, Win32 error code: 10060." ' + _FAILOVER.strip().replace("{}", "{}"), "mx_ip"))
           .otherwise(pl.format('451 4.4.0 Primary target IP address responded with: "{}."' + _FAILOVER, reply, "mx_ip")))
    t = world.truth.filter(pl.col("agent") != "error").join(env.select("msg", "imid", "nmid", "nrcpt"), on="msg")
    t = t.with_columns(_uuid(rng, t.height).alias("log_id"))
    event = (pl.when(pl.col("outcome") == "expired").then(pl.lit("FAIL")).when(pl.col("outcome") == "deferred").then(pl.lit("DEFER"))
             .when(pl.col("outcome") == "bounced").then(pl.lit("FAIL")).otherwise(pl.lit("SENDEXTERNAL")))
    status = (pl.when(pl.col("outcome") == "expired").then(pl.lit("550 4.4.7 QUEUE.Expired; message expired"))
              .when(pl.col("outcome") == "deferred").then(pl.format("[{};{{LED={}}};{{FQDN={}}};{{IP={}}}]", lrt, led, "mx_host", "mx_ip"))
              .when(pl.col("outcome") == "bounced").then(reply).otherwise(pl.lit("250 2.1.5 Recipient OK")))
    smtp = pl.col("outcome") != "expired"
    conn = pl.format("Outbound {}", "egress_pool")
    tries = t.select(
        "ts",
        ms.alias("date-time"),
        pl.when(smtp).then(pl.col("egress_ip")).alias("client-ip"),
        pl.lit(host).alias("client-hostname"),
        pl.when(smtp).then(pl.col("mx_ip")).alias("server-ip"),
        pl.when(smtp).then(pl.col("mx_host")).alias("server-hostname"),
        pl.when(pl.col("outcome") == "delivered").then(pl.format(";{};ClientSubmitTime:", reply)).alias("source-context"),
        pl.when(smtp).then(conn).alias("connector-id"),
        pl.when(smtp).then(pl.lit("SMTP")).otherwise(pl.lit("QUEUE")).alias("source"),
        event.alias("event-id"),
        pl.col("imid").alias("internal-message-id"),
        pl.col("message_id").alias("message-id"),
        pl.col("nmid").alias("network-message-id"),
        pl.col("recipient").alias("recipient-address"),
        status.alias("recipient-status"),
        pl.col("size").cast(pl.String).alias("total-bytes"),
        pl.col("nrcpt").cast(pl.String).alias("recipient-count"),
        pl.lit(None, pl.String).alias("related-recipient-address"), pl.lit(None, pl.String).alias("reference"),
        pl.lit("Newsletter").alias("message-subject"),
        pl.col("sender").alias("sender-address"), pl.col("sender").alias("return-path"),
        pl.when(pl.col("outcome") == "delivered").then(pl.format("{};SRV={}:TOTAL-HUB={}", pl.col("queued_at").dt.strftime("%Y-%m-%dT%H:%M:%S%.3fZ"),
                                                                  pl.lit(host), pl.col("delay_s").round(3))).alias("message-info"),
        pl.lit("Originating").alias("directionality"),
        pl.lit(None, pl.String).alias("tenant-id"), pl.lit(None, pl.String).alias("original-client-ip"), pl.lit(None, pl.String).alias("original-server-ip"),
        pl.when(pl.col("outcome") == "delivered").then(pl.lit("S:DeliveryPriority=Normal;S:IsSmtpResponseFromExternalServer=True"))
        .otherwise(pl.lit("S:DeliveryPriority=Normal")).alias("custom-data"),
        pl.lit("Email").alias("transport-traffic-type"),
        pl.col("log_id").alias("log-id"),
        pl.lit(VERSION).alias("schema-version"),
    )
    rcpts = world.messages.group_by("msg").agg(pl.col("recipient").sort_by("r").str.join(";"))
    env = env.join(rcpts, on="msg").with_columns(_uuid(rng, env.height).alias("log_id"))
    client = pl.col("client").replace_strict(list(range(len(CLIENTS))), [c.split("[")[1].rstrip("]") for c in CLIENTS], return_dtype=pl.String)
    client_host = pl.col("client").replace_strict(list(range(len(CLIENTS))), [c.split("[")[0] for c in CLIENTS], return_dtype=pl.String)
    recv = env.select(
        pl.col("arrival").alias("ts"), pl.col("arrival").dt.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").alias("date-time"),
        client.alias("client-ip"), client_host.alias("client-hostname"), pl.lit("10.1.0.25").alias("server-ip"), pl.lit(host).alias("server-hostname"),
        pl.format("08DCF2A1B2C3D4E6;{};0", pl.col("arrival").dt.strftime("%Y-%m-%dT%H:%M:%S%.3fZ")).alias("source-context"),
        pl.lit(f"{host}\\Default {host}").alias("connector-id"), pl.lit("SMTP").alias("source"), pl.lit("RECEIVE").alias("event-id"),
        pl.col("imid").alias("internal-message-id"), pl.col("message_id").alias("message-id"), pl.col("nmid").alias("network-message-id"),
        pl.col("recipient").alias("recipient-address"), pl.lit(None, pl.String).alias("recipient-status"),
        pl.col("size").cast(pl.String).alias("total-bytes"), pl.col("nrcpt").cast(pl.String).alias("recipient-count"),
        pl.lit(None, pl.String).alias("related-recipient-address"), pl.lit(None, pl.String).alias("reference"),
        pl.lit("Newsletter").alias("message-subject"), pl.col("sender").alias("sender-address"), pl.col("sender").alias("return-path"),
        pl.lit(None, pl.String).alias("message-info"), pl.lit("Originating").alias("directionality"),
        pl.lit(None, pl.String).alias("tenant-id"), client.alias("original-client-ip"), pl.lit("10.1.0.25").alias("original-server-ip"),
        pl.lit("S:DeliveryPriority=Normal").alias("custom-data"), pl.lit("Email").alias("transport-traffic-type"),
        pl.col("log_id").alias("log-id"), pl.lit(VERSION).alias("schema-version"),
    )
    rows = pl.concat([recv, tries]).sort("ts", maintain_order=True)
    return rows.select("ts", pl.concat_str([_csv_field(pl.col(f)) for f in FIELDS], separator=",").alias("line"))


def _csv_field(c: pl.Expr) -> pl.Expr:
    # Exchange quotes only fields holding a comma or a quote, doubling the quotes inside.
    quoted = pl.concat_str(pl.lit('"'), c.str.replace_all('"', '""', literal=True), pl.lit('"'))
    return pl.when(c.str.contains(r'[,"]')).then(quoted).otherwise(c.fill_null(""))


def write(world, out_dir: Path, *, rotate: bool = True, gzip_old: bool = False) -> list[Path]:
    """Write ``MSGTRKyyyymmdd-1.LOG`` (one per UTC day when ``rotate``), CRLF line ends."""
    rows = render(world).with_columns(pl.concat_str("line", pl.lit("\r")).alias("line"))
    return write_daily(rows, out_dir, lambda d: f"MSGTRK{d:%Y%m%d}-1.LOG" if d else "MSGTRK-1.LOG", rotate=rotate, header=HEADER)
