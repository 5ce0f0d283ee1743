"""Render a world as PowerMTA accounting CSV (``acct-YYYY-MM-DD-0000.csv``, one per day).

RFC 4180 CSV with the common 23-column header; ``d`` (delivered), ``b`` (bounced; expiry
as ``bounceCat=message-expired``) and ``t`` (transient, per recipient) records;
``dsnDiag`` ``smtp;452 4.3.1 ...``, ``dsnMta`` ``host (ip)``, ``dlvSourceIp``, ``vmta``,
``vmtaPool``; times as ``YYYY-MM-DD HH:MM:SS+0000``.  Postfix-only local suspensions and
the non-final first-host replies are not written (PMTA would log those as ``tq``).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import polars as pl

HEADER = ("type,timeLogged,timeQueued,orig,rcpt,orcpt,dsnAction,dsnStatus,dsnDiag,dsnMta,bounceCat,srcType,srcMta,"
          "dlvType,dlvSourceIp,dlvDestinationIp,dlvEsmtpAvailable,dlvSize,vmta,jobId,envId,queue,vmtaPool").split(",")
STAMP = "%Y-%m-%d %H:%M:%S+0000"
_SUBJECT = {"0": "other status", "1": "bad destination mailbox address", "2": "mailbox status", "3": "mail system status",
            "4": "network/routing status", "5": "protocol status", "6": "content status", "7": "security/policy status"}


def render(world) -> pl.DataFrame:
    t = world.truth.filter(pl.col("agent") != "error")
    remote = pl.col("smtp_code").is_not_null()
    expired = pl.col("outcome") == "expired"
    vmta = pl.format("vmta-{}", pl.col("egress_ip").str.replace_all(".", "-", literal=True))
    status = (pl.when(pl.col("outcome") == "delivered").then(pl.lit("2.0.0 (success)"))
              .when(expired).then(pl.lit("4.4.7 (delivery time expired)"))
              .when(~remote).then(pl.lit("4.4.1 (no answer from host)"))
              .otherwise(pl.format("{} ({})", "enhanced_code", pl.col("enhanced_code").str.slice(2, 1).replace_strict(_SUBJECT, default="other status"))))
    cat = (pl.when(pl.col("outcome") != "bounced").then(pl.lit(None, pl.String))
           .when(pl.col("class_truth") == "policy").then(pl.lit("policy-related"))
           .when(pl.col("class_truth") == "mailbox").then(pl.lit("bad-mailbox"))
           .otherwise(pl.lit("other")))
    return t.select(
        "ts",
        pl.col("outcome").replace_strict({"delivered": "d", "bounced": "b", "expired": "b", "deferred": "t"}).alias("type"),
        pl.col("ts").dt.strftime(STAMP).alias("timeLogged"),
        pl.col("queued_at").dt.strftime(STAMP).alias("timeQueued"),
        pl.col("sender").alias("orig"), pl.col("recipient").alias("rcpt"), pl.format("rfc822;{}", "recipient").alias("orcpt"),
        pl.col("outcome").replace_strict({"delivered": "relayed", "bounced": "failed", "expired": "failed", "deferred": "delayed"}).alias("dsnAction"),
        status.alias("dsnStatus"),
        pl.when(remote).then(pl.format("smtp;{}", pl.col("reply_text").str.replace_all("\n", " ", literal=True))).otherwise(pl.lit(None, pl.String)).alias("dsnDiag"),
        pl.when(pl.col("mx_host").is_not_null()).then(pl.format("{} ({})", "mx_host", "mx_ip")).otherwise(pl.lit(None, pl.String)).alias("dsnMta"),
        pl.when(expired).then(pl.lit("message-expired")).otherwise(cat).alias("bounceCat"),
        pl.lit("smtp").alias("srcType"), pl.lit("app1.internal.example (10.1.0.11)").alias("srcMta"), pl.lit("smtp").alias("dlvType"),
        pl.col("egress_ip").alias("dlvSourceIp"), pl.col("mx_ip").alias("dlvDestinationIp"),
        pl.when(remote).then(pl.lit("PIPELINING,8BITMIME,SIZE,STARTTLS,ENHANCEDSTATUSCODES")).otherwise(pl.lit(None, pl.String)).alias("dlvEsmtpAvailable"),
        pl.when(pl.col("outcome") == "delivered").then(pl.col("size")).otherwise(None).alias("dlvSize"),
        vmta.alias("vmta"), pl.lit("campaign-2026-11").alias("jobId"), pl.col("queue_id").alias("envId"),
        pl.format("{}/{}", "recipient_domain", vmta).alias("queue"), pl.col("egress_pool").alias("vmtaPool"),
    ).sort("ts", maintain_order=True)


def write(world, out_dir: Path, *, rotate: bool = True, gzip_old: bool = False) -> list[Path]:
    """Write ``acct-YYYY-MM-DD-0000.csv`` files (one per UTC day when ``rotate``), each with the header."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = render(world).with_columns(pl.col("ts").dt.date().alias("day"))
    groups = rows.partition_by("day", maintain_order=True) if rotate else [rows]
    paths = []
    for part in groups:
        day = part["day"][0]
        path = out_dir / (f"acct-{day:%Y-%m-%d}-0000.csv" if rotate else "acct.csv")
        buf = io.BytesIO()
        part.select(HEADER).write_csv(buf, quote_style="necessary")
        path.write_bytes(buf.getvalue())
        last = part["ts"].max().timestamp()
        os.utime(path, (last, last))
        paths.append(path)
    return paths
