"""Normalizing reply texts: per-connection details masked, reply codes kept, same reply grouped."""

from __future__ import annotations

from datetime import datetime, timezone

import polars as pl

from deferral_kit import schema
from deferral_kit.textnorm import group_responses, mask_addresses, normalize_response

CASES = {
    # Microsoft capacity reply with host, timestamp and correlation id
    "452 4.3.1 Insufficient system resources (UsedDiskSpace[C:\\Queue]) [AM6PR03MB1234.eurprd03.prod.outlook.com 2026-11-17T10:00:00.123Z 08DC1A2B3C4D5E6F]":
        "452 4.3.1 Insufficient system resources (UsedDiskSpace[C:\\Queue]) [<host>.outlook.com <time> <hex>]",
    "smtp;452 4.3.1 Insufficient system resources (TSTE) [outlook.com]": "452 4.3.1 Insufficient system resources (TSTE) [outlook.com]",
    # Gmail multi-line reply joined into one line: continuation codes dropped, lead normalized
    "421-4.7.0 [216.194.173.80 15] Our system has detected an unusual rate of 421-4.7.0 unsolicited mail. 421 4.7.0 Please visit the guidelines. p4si3522070uam.9 - gsmtp":
        "421 4.7.0 [<ip> <n>] Our system has detected an unusual rate of unsolicited mail. Please visit the guidelines. <id> - gsmtp",
    "450 4.7.1 <user@example.com>: Recipient address rejected: Greylisted for 5 minutes": "450 4.7.1 <address>: Recipient address rejected: Greylisted for <n> minutes",
    "421 4.7.0 [TSS04] Messages from 10.20.30.40 temporarily deferred; see https://help.yahoo.com/kb/postmaster/SLN3434.html":
        "421 4.7.0 [TSS04] Messages from <ip> temporarily deferred; see https://help.yahoo.com/kb/postmaster/SLN3434.html",
    "550-5.7.1 [2607:4100:3:25:100::2      12] Our system has detected that this 550-5.7.1 message is likely unsolicited mail.":
        "550 5.7.1 [<ip> <n>] Our system has detected that this message is likely unsolicited mail.",
    "connect to mx.example.com[192.0.2.1]:25: Connection timed out": "connect to mx.example.com[<ip>]:<n>: Connection timed out",
    "451 4.4.4 Temporary server error. Please try again later ATTR1": "451 4.4.4 Temporary server error. Please try again later ATTR1",
}


def test_normalize_response_masks_per_connection_details():
    got = pl.DataFrame({"response": list(CASES) + [None]}).select(normalize_response("response"))["response"].to_list()
    assert got == list(CASES.values()) + [None]


def test_mask_addresses_keeps_the_domain():
    s = pl.Series(["550 5.1.1 <alice.smith@gmail.com> does not exist", "to=<b+tag@Example.ORG>, relay=x", "no address"])
    assert s.to_frame("t").select(mask_addresses("t"))["t"].to_list() == [
        "550 5.1.1 <***@gmail.com> does not exist", "to=<***@Example.ORG>, relay=x", "no address",
    ]


def test_group_responses_counts_distinct_hosts_and_shares():
    t = datetime(2026, 11, 18, 14, tzinfo=timezone.utc)
    rows = pl.DataFrame({
        "ts": [t.replace(minute=m) for m in range(6)],
        "recipient_domain": ["outlook.com", "outlook.com", "hotmail.com", "gmail.com", "gmail.com", "gmail.com"],
        "mx_host": ["a.olc.protection.outlook.com", "b.olc.protection.outlook.com", "a.olc.protection.outlook.com", "g", "g", "g"],
        "response": [
            "452 4.3.1 Insufficient system resources [AM6PR03MB1234.eurprd03.prod.outlook.com]",
            "452 4.3.1 Insufficient system resources [DB9PR10MB5678.eurprd10.prod.outlook.com]",
            "452 4.3.1 Insufficient system resources [VI1PR01MB0001.eurprd01.prod.outlook.com]",
            "250 2.0.0 OK 1700000000 abc123def.1 - gsmtp", "", None,
        ],
        "outcome": ["deferred"] * 3 + ["delivered"] * 3,
    })
    lf = schema.conform(rows.lazy())
    got = group_responses(lf, where=pl.col("outcome") == "deferred").collect()
    assert got.select("response_text", "attempts", "share", "destinations", "mx_hosts").to_dicts() == [
        {"response_text": "452 4.3.1 Insufficient system resources [<host>.outlook.com]", "attempts": 3, "share": 1.0, "destinations": 2, "mx_hosts": 2},
    ]
    assert (got["first_seen"][0], got["last_seen"][0]) == (t, t.replace(minute=2))
    everything = group_responses(lf).collect()
    assert everything["response_text"].to_list() == ["452 4.3.1 Insufficient system resources [<host>.outlook.com]", "250 2.0.0 OK <n> <id> - gsmtp"]
    assert everything["share"].to_list() == [0.75, 0.25]
    by_domain = group_responses(lf, by=["recipient_domain"], limit=1).collect()
    assert by_domain.select("recipient_domain", "attempts", "share").rows() == [("gmail.com", 1, 1.0), ("hotmail.com", 1, 1.0), ("outlook.com", 2, 1.0)]


def test_group_responses_describe_columns_do_not_split_shares():
    rows = pl.DataFrame({
        "ts": [datetime(2026, 11, 18, tzinfo=timezone.utc)] * 4,
        "recipient_domain": ["a.example", "a.example", "b.example", "b.example"],
        "response": ["421 4.7.0 Try again later", "421 4.7.0 Try again later", "421 4.7.0 Try again later", "451 4.3.2 Busy"],
        "response_class": ["rate_limit", "rate_limit", "other", "capacity"],
    })
    lf = schema.conform(rows.lazy()).with_columns(rows["response_class"].alias("response_class"))
    got = group_responses(lf, describe=["response_class"]).collect()
    assert got.select("response_class", "response_text", "attempts", "share").rows() == [
        ("rate_limit", "421 4.7.0 Try again later", 2, 0.5),
        ("other", "421 4.7.0 Try again later", 1, 0.25),
        ("capacity", "451 4.3.2 Busy", 1, 0.25),
    ]
