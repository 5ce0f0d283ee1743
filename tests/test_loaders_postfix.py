"""Postfix loader on hand-written fixtures: every canonical field of the rows that matter."""

from __future__ import annotations

import gzip
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from deferral_kit import schema
from deferral_kit.loaders import load, postfix


def _utc(*a) -> datetime:
    return datetime(*a, tzinfo=timezone.utc)


def _write(path: Path, text: str, *, mtime: datetime | None = None) -> Path:
    path.write_text(text)
    if mtime is not None:
        os.utime(path, (mtime.timestamp(), mtime.timestamp()))
    return path


def _load(paths, **kw):
    res = load(paths, format="postfix", **kw)
    att, conn = res.attempts.collect(), res.connections.collect()
    schema.validate(att)
    schema.validate(conn, schema.CONNECTION_COLUMNS)
    return att, conn, res.accounting


MICROSOFT = """\
Mar  4 10:00:00 mta1 postfix-out2/cleanup[101]: 4A1B2C3D4E: message-id=<20240304.news.1@sender.example>
Mar  4 10:00:00 mta1 postfix-out2/qmgr[100]: 4A1B2C3D4E: from=<news@sender.example>, size=20480, nrcpt=2 (queue active)
Mar  4 10:00:02 mta1 postfix-out2/smtp[200]: 4A1B2C3D4E: to=<alice@hotmail.com>, relay=hotmail-com.olc.protection.outlook.com[52.101.42.1]:25, delay=2.1, delays=0.1/0.01/1.5/0.49, dsn=4.3.1, status=deferred (host hotmail-com.olc.protection.outlook.com[52.101.42.1] said: 452 4.3.1 Insufficient system resources (TSTE) [AM4PEPF00027A5F.eurprd04.prod.outlook.com 2024-03-04T10:00:02.123Z 08DC3B7A1B2C3D4E] (in reply to end of DATA command))
Mar  4 10:00:03 mta1 postfix-out2/smtp[201]: 4A1B2C3D4E: to=<bob@Contoso.com>, relay=contoso-com.mail.protection.outlook.com[52.101.8.40]:25, delay=3, delays=0.1/0.01/2.4/0.49, dsn=4.3.1, status=deferred (host contoso-com.mail.protection.outlook.com[52.101.8.40] said: 452 4.3.1 Insufficient system resources (in reply to RCPT TO command))
Mar  4 10:30:00 mta1 postfix-out2/qmgr[100]: 4A1B2C3D4E: from=<news@sender.example>, size=20480, nrcpt=2 (queue active)
Mar  4 10:30:05 mta1 postfix-out2/smtp[202]: 4A1B2C3D4E: to=<alice@hotmail.com>, relay=hotmail-com.olc.protection.outlook.com[52.101.42.7]:25, delay=1805, delays=1800/0.02/2.1/2.9, dsn=2.0.0, status=sent (250 2.6.0 <20240304.news.1@sender.example> [InternalId=1234, Hostname=AM4PR04MB1234.eurprd04.prod.outlook.com] Queued mail for delivery)
Mar  4 10:30:06 mta1 postfix-out2/smtp[203]: 4A1B2C3D4E: to=<bob@Contoso.com>, relay=contoso-com.mail.protection.outlook.com[52.101.8.41]:25, delay=1806, delays=1800/0.02/3/3, dsn=2.0.0, status=sent (250 2.6.0 <20240304.news.1@sender.example> [InternalId=5678] Queued mail for delivery)
Mar  4 10:30:06 mta1 postfix-out2/qmgr[100]: 4A1B2C3D4E: removed
"""


def test_microsoft_452_431_deferrals_then_delivery_every_field(tmp_path):
    f = _write(tmp_path / "mail.log", MICROSOFT, mtime=_utc(2024, 3, 5))
    att, conn, acc = _load(f)
    assert conn.height == 0
    assert acc.count("attempt") == 4 and acc.count("context") == 4 and acc.lines_read == 8
    common = {
        "source": "postfix",
        "log_host": "mta1",
        "instance": "postfix-out2",
        "agent": "smtp",
        "queue_id": "4A1B2C3D4E",
        "message_key": "mta1/postfix-out2/4A1B2C3D4E#0",
        "message_id": "<20240304.news.1@sender.example>",
        "sender": "news@sender.example",
        "orig_recipient": None,
        "egress_ip": None,
        "egress_pool": None,
        "remote": True,
        "size": 20480,
        "file": str(f),
    }
    expected = [
        {
            "ts": _utc(2024, 3, 4, 10, 0, 2), "recipient": "alice@hotmail.com", "recipient_domain": "hotmail.com",
            "mx_host": "hotmail-com.olc.protection.outlook.com", "mx_ip": "52.101.42.1", "smtp_code": 452,
            "enhanced_code": "4.3.1", "dsn": "4.3.1", "smtp_stage": "end of DATA",
            "response": "452 4.3.1 Insufficient system resources (TSTE) [AM4PEPF00027A5F.eurprd04.prod.outlook.com 2024-03-04T10:00:02.123Z 08DC3B7A1B2C3D4E]",
            "outcome": "deferred", "delay_s": 2.1, "queued_at": _utc(2024, 3, 4, 9, 59, 59, 900000), "attempt": 1, "line_no": 3,
        },
        {
            "ts": _utc(2024, 3, 4, 10, 0, 3), "recipient": "bob@Contoso.com", "recipient_domain": "contoso.com",
            "mx_host": "contoso-com.mail.protection.outlook.com", "mx_ip": "52.101.8.40", "smtp_code": 452,
            "enhanced_code": "4.3.1", "dsn": "4.3.1", "smtp_stage": "RCPT TO",
            "response": "452 4.3.1 Insufficient system resources",
            "outcome": "deferred", "delay_s": 3.0, "queued_at": _utc(2024, 3, 4, 10, 0, 0), "attempt": 1, "line_no": 4,
        },
        {
            "ts": _utc(2024, 3, 4, 10, 30, 5), "recipient": "alice@hotmail.com", "recipient_domain": "hotmail.com",
            "mx_host": "hotmail-com.olc.protection.outlook.com", "mx_ip": "52.101.42.7", "smtp_code": 250,
            "enhanced_code": "2.6.0", "dsn": "2.0.0", "smtp_stage": "end of DATA",
            "response": "250 2.6.0 <20240304.news.1@sender.example> [InternalId=1234, Hostname=AM4PR04MB1234.eurprd04.prod.outlook.com] Queued mail for delivery",
            "outcome": "delivered", "delay_s": 1805.0, "queued_at": _utc(2024, 3, 4, 10, 0, 0), "attempt": 2, "line_no": 6,
        },
        {
            "ts": _utc(2024, 3, 4, 10, 30, 6), "recipient": "bob@Contoso.com", "recipient_domain": "contoso.com",
            "mx_host": "contoso-com.mail.protection.outlook.com", "mx_ip": "52.101.8.41", "smtp_code": 250,
            "enhanced_code": "2.6.0", "dsn": "2.0.0", "smtp_stage": "end of DATA",
            "response": "250 2.6.0 <20240304.news.1@sender.example> [InternalId=5678] Queued mail for delivery",
            "outcome": "delivered", "delay_s": 1806.0, "queued_at": _utc(2024, 3, 4, 10, 0, 0), "attempt": 2, "line_no": 7,
        },
    ]
    rows = att.to_dicts()
    assert len(rows) == 4
    for got, want in zip(rows, expected):
        assert got == {**common, **want}


def test_egress_ip_only_from_instances_named_after_an_address(tmp_path):
    rec = "to=<a@x.example>, relay=mx.x.example[192.0.2.1]:25, delay=1, delays=0/0/0.5/0.5, dsn=2.0.0, status=sent (250 ok)"
    text = (
        f"Sep 16 00:07:43 n7 postfix-10.20.30.40/smtp[1]: A1: {rec}\n"
        f"Sep 16 00:07:44 n7 postfix-out2/smtp[1]: A2: {rec}\n"
        f"Sep 16 00:07:45 n7 postfix-2001:db8::25/smtp[1]: A3: {rec}\n"
        "Sep 16 00:07:46 n7 postfix-10.20.30.40/smtp[1]: connect to mx.y.example[192.0.2.8]:25: Connection refused\n"
    )
    att, conn, _ = _load(_write(tmp_path / "mail.log", text, mtime=_utc(2024, 9, 17)))
    assert att.select("instance", "egress_ip").rows() == [
        ("postfix-10.20.30.40", "10.20.30.40"), ("postfix-out2", None), ("postfix-2001:db8::25", "2001:db8::25"),
    ]
    assert conn.select("egress_ip", "event").rows() == [("10.20.30.40", "connect_failed")]


def test_outlook_452_453_and_451_47650_keep_their_codes(tmp_path):
    text = (
        "Nov 12 08:01:10 edge postfix/smtp[5120]: AD5666ED542F3: to=<carol@outlook.com>, relay=outlook-com.olc.protection.outlook.com[52.101.68.5]:25, "
        "delay=1.4, delays=0.02/0/0.9/0.48, dsn=4.5.3, status=deferred (host outlook-com.olc.protection.outlook.com[52.101.68.5] said: "
        "452 4.5.3 Recipients belong to multiple regions ATTR38 [DB1PEPF000509F0.eurprd03.prod.outlook.com 2024-11-12T08:01:10.006Z 08DD02B1] (in reply to RCPT TO command))\n"
        "Nov 12 08:01:11 edge postfix/smtp[5121]: BE5666ED542F4: to=<dave@hotmail.com>, relay=hotmail-com.olc.protection.outlook.com[52.101.68.6]:25, "
        "delay=0.9, delays=0.02/0/0.5/0.38, dsn=4.7.650, status=deferred (host hotmail-com.olc.protection.outlook.com[52.101.68.6] said: "
        "451 4.7.650 The mail server [203.0.113.7] has been temporarily rate limited due to IP reputation. (S843) (in reply to MAIL FROM command))\n"
    )
    att, _, _ = _load(_write(tmp_path / "mail.log", text, mtime=_utc(2024, 11, 13)))
    assert att.select("queue_id", "smtp_code", "enhanced_code", "dsn", "smtp_stage", "remote").rows() == [
        ("AD5666ED542F3", 452, "4.5.3", "4.5.3", "RCPT TO", True),
        ("BE5666ED542F4", 451, "4.7.650", "4.7.650", "MAIL FROM", True),
    ]
    assert att["response"][1] == "451 4.7.650 The mail server [203.0.113.7] has been temporarily rate limited due to IP reputation. (S843)"


def test_outlook_451_47651_reason_with_nested_parentheses_and_brackets(tmp_path):
    # shape of the Mailu #3013 deferral: "(S844)" and a "[frontend timestamp id]" block inside the reply
    text = (
        "Oct 28 12:19:32 mail postfix/smtp[39032]: 213A0C01A2: to=<x@hotmail.com>, relay=hotmail-com.olc.protection.outlook.com[104.47.57.161]:25, "
        "delay=767, delays=760/3.5/2.5/0.63, dsn=4.7.651, status=deferred (host hotmail-com.olc.protection.outlook.com[104.47.57.161] said: "
        "451 4.7.651 The mail server [198.51.100.165] has been temporarily rate limited due to IP reputation. For e-mail delivery information, "
        "see https://aka.ms/postmaster (S844) [DM6NAM11FT088.eop-nam11.prod.protection.outlook.com 2023-10-28T12:19:31.847Z 08DBD70830F39917] "
        "(in reply to RCPT TO command))\n"
    )
    att, _, _ = _load(_write(tmp_path / "mail.log", text, mtime=_utc(2023, 10, 29)))
    r = att.row(0, named=True)
    assert (r["ts"], r["mx_host"], r["mx_ip"], r["smtp_code"], r["enhanced_code"], r["dsn"], r["smtp_stage"], r["remote"], r["queued_at"]) == (
        _utc(2023, 10, 28, 12, 19, 32), "hotmail-com.olc.protection.outlook.com", "104.47.57.161", 451, "4.7.651", "4.7.651", "RCPT TO", True,
        _utc(2023, 10, 28, 12, 6, 45),
    )
    assert r["response"] == (
        "451 4.7.651 The mail server [198.51.100.165] has been temporarily rate limited due to IP reputation. For e-mail delivery information, "
        "see https://aka.ms/postmaster (S844) [DM6NAM11FT088.eop-nam11.prod.protection.outlook.com 2023-10-28T12:19:31.847Z 08DBD70830F39917]"
    )


def test_error_agent_suspension_is_an_attempt_row_but_not_remote(tmp_path):
    text = (
        "Jan  9 03:12:45 mx postfix/smtp[9001]: lost connection with mx4.hotmail.com[65.55.92.168] while receiving the initial server greeting\n"
        "Jan  9 03:12:46 mx postfix/error[9002]: 5C2F1A3B: to=<erin@hotmail.com>, relay=none, delay=4012, delays=4012/0.03/0/0, dsn=4.4.2, "
        "status=deferred (delivery temporarily suspended: lost connection with mx4.hotmail.com[65.55.92.168] while receiving the initial server greeting)\n"
        "Jan  9 03:12:47 mx postfix/retry[9003]: 5C2F1A3C: to=<fred@hotmail.com>, relay=none, delay=8000, delays=8000/0/0/0, dsn=4.4.2, "
        "status=deferred (delivery temporarily suspended: lost connection with mx4.hotmail.com[65.55.92.168] while receiving the initial server greeting)\n"
    )
    att, conn, acc = _load(_write(tmp_path / "mail.log", text, mtime=_utc(2024, 1, 10)))
    assert att.select("agent", "outcome", "remote", "mx_host", "mx_ip", "smtp_code", "enhanced_code", "smtp_stage").rows() == [
        ("error", "deferred", False, "mx4.hotmail.com", "65.55.92.168", None, "4.4.2", "greeting"),
        ("retry", "deferred", False, "mx4.hotmail.com", "65.55.92.168", None, "4.4.2", "greeting"),
    ]
    assert att["response"][0].startswith("delivery temporarily suspended: lost connection with mx4.hotmail.com")
    assert conn.select("event", "mx_host", "smtp_stage", "queue_id").rows() == [("lost_connection", "mx4.hotmail.com", "greeting", None)]
    assert acc.count("connection") == 1 and acc.count("attempt") == 2


def test_connection_events_and_relay_none_takes_mx_from_reason(tmp_path):
    text = (
        "Mar 3 08:14:43 kali postfix/smtp[3913]: connect to mx3.hotmail.com[65.54.188.94]:25: Connection timed out\n"
        "Mar 3 08:15:13 kali postfix/smtp[3913]: connect to mx1.hotmail.com[65.55.33.119]:25: Connection timed out\n"
        "Mar 3 08:15:13 kali postfix/smtp[3913]: 356EA602A3: to=<x@hotmail.com>, relay=none, delay=126838, delays=126682/0.16/156/0, dsn=4.4.1, "
        "status=deferred (connect to mx1.hotmail.com[65.55.33.119]:25: Connection timed out)\n"
        "Mar 3 08:16:00 kali postfix/smtp[3914]: 12AB: host mx.yahoo.com[1.2.3.4] refused to talk to me: 421 4.7.0 [TSS04] Messages temporarily deferred\n"
        "Mar 3 08:16:01 kali postfix/smtp[3914]: 12AB: conversation with mx.yahoo.com[1.2.3.4] timed out while sending end of data -- message may be sent more than once\n"
    )
    att, conn, _ = _load(_write(tmp_path / "mail.log", text, mtime=_utc(2024, 3, 4)))
    assert att.select("mx_host", "mx_ip", "remote", "smtp_stage", "smtp_code", "enhanced_code", "response").row(0) == (
        "mx1.hotmail.com", "65.55.33.119", False, "connect", None, "4.4.1", "connect to mx1.hotmail.com[65.55.33.119]:25: Connection timed out",
    )
    assert conn.select("event", "mx_host", "mx_ip", "smtp_stage", "smtp_code", "enhanced_code", "queue_id").rows() == [
        ("connect_failed", "mx3.hotmail.com", "65.54.188.94", "connect", None, None, None),
        ("connect_failed", "mx1.hotmail.com", "65.55.33.119", "connect", None, None, None),
        ("refused_to_talk", "mx.yahoo.com", "1.2.3.4", "greeting", 421, "4.7.0", "12AB"),
        ("timeout", "mx.yahoo.com", "1.2.3.4", "end of DATA", None, None, "12AB"),
    ]
    assert conn["response"][2] == "421 4.7.0 [TSS04] Messages temporarily deferred"


def test_attempt_counts_tries_per_recipient_and_queue_id_reuse_starts_a_new_message(tmp_path):
    line = "Feb  2 {t} h postfix/smtp[1]: ABC123: to=<{r}>, relay=mx.example.net[192.0.2.1]:25, delay=1, delays=0/0/0.5/0.5, dsn={d}, status={s} ({resp})\n"
    text = (
        "Feb  2 10:00:00 h postfix/qmgr[2]: ABC123: from=<a@s.example>, size=100, nrcpt=2 (queue active)\n"
        + line.format(t="10:00:01", r="u1@example.net", d="4.2.0", s="deferred", resp="host mx.example.net[192.0.2.1] said: 450 4.2.0 try later (in reply to RCPT TO command)")
        + line.format(t="10:00:01", r="u2@example.net", d="2.0.0", s="sent", resp="250 2.0.0 ok")
        + line.format(t="10:10:01", r="u1@example.net", d="2.0.0", s="sent", resp="250 2.0.0 ok")
        + "Feb  2 10:10:02 h postfix/qmgr[2]: ABC123: removed\n"
        + "Feb  2 11:00:00 h postfix/qmgr[2]: ABC123: from=<b@s.example>, size=200, nrcpt=1 (queue active)\n"
        + line.format(t="11:00:01", r="u1@example.net", d="2.0.0", s="sent", resp="250 2.0.0 ok")
        + "Feb  2 11:00:02 h postfix/qmgr[2]: ABC123: removed\n"
    )
    att, _, acc = _load(_write(tmp_path / "mail.log", text, mtime=_utc(2024, 2, 3)))
    assert att.select("message_key", "recipient", "sender", "size", "attempt", "outcome").rows() == [
        ("h/postfix/ABC123#0", "u1@example.net", "a@s.example", 100, 1, "deferred"),
        ("h/postfix/ABC123#0", "u2@example.net", "a@s.example", 100, 1, "delivered"),
        ("h/postfix/ABC123#0", "u1@example.net", "a@s.example", 100, 2, "delivered"),
        ("h/postfix/ABC123#1", "u1@example.net", "b@s.example", 200, 1, "delivered"),
    ]
    assert acc.count("context", "qmgr removed") == 2


def test_qmgr_expiry_makes_expired_rows_for_pending_recipients_only(tmp_path):
    text = (
        "Apr 10 08:00:00 m postfix/qmgr[1]: BACE842E72: from=<noreply@domain.com>, size=900, nrcpt=2 (queue active)\n"
        "Apr 10 08:00:01 m postfix/smtp[3]: BACE842E72: to=<p@full.example>, relay=mx.full.example[192.0.2.9]:25, delay=1, delays=0/0/0.5/0.5, dsn=4.2.2, "
        "status=deferred (host mx.full.example[192.0.2.9] said: 452 4.2.2 Mailbox full (in reply to RCPT TO command))\n"
        "Apr 10 08:00:01 m postfix/smtp[3]: BACE842E72: to=<q@ok.example>, relay=mx.ok.example[192.0.2.10]:25, delay=1, delays=0/0/0.5/0.5, dsn=2.0.0, status=sent (250 2.0.0 ok)\n"
        "Apr 15 08:00:02 m postfix/qmgr[1]: BACE842E72: from=<noreply@domain.com>, status=expired, returned to sender\n"
        "Apr 15 08:00:03 m postfix/qmgr[1]: BACE842E72: removed\n"
    )
    att, _, acc = _load(_write(tmp_path / "mail.log", text, mtime=_utc(2024, 4, 16)))
    exp = att.filter(pl.col("outcome") == "expired")
    assert exp.select("ts", "agent", "recipient", "sender", "remote", "mx_host", "attempt", "delay_s", "line_no").rows() == [
        (_utc(2024, 4, 15, 8, 0, 2), "qmgr", "p@full.example", "noreply@domain.com", False, None, None, 432002.0, 4),
    ]
    assert acc.count("context", "qmgr expired (message-level)") == 1


def test_probes_warnings_and_inbound_lines_are_skipped_by_reason(tmp_path):
    text = (
        "May  1 00:00:01 h postfix/error[1]: 3E29030F8637E: to=<user@yahoo.com>, relay=none, delay=0.01, delays=0.01/0/0/0, dsn=5.1.1, "
        "status=undeliverable-but-not-cached (User unknown in virtual alias table)\n"
        "May  1 00:00:02 h postfix/smtp[2]: 7A: to=<v@x.example>, relay=mx.x.example[192.0.2.3]:25, delay=0.2, delays=0/0/0.1/0.1, dsn=2.1.5, status=deliverable (250 2.1.5 Ok)\n"
        "May  1 00:00:03 h postfix/smtpd[3]: connect from unknown[198.51.100.2]\n"
        "May  1 00:00:04 h postfix/postscreen[4]: PASS NEW [198.51.100.2]:5678\n"
        "May  1 00:00:05 h postfix/qmgr[5]: warning: lots of deferred mail, that is bad for performance\n"
        "May  1 00:00:06 h postfix/smtp[6]: Trusted TLS connection established to mx.x.example[192.0.2.3]:25: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)\n"
        "May  1 00:00:07 h dovecot: imap-login: Login: user=<u@x.example>\n"
        "May  1 00:00:08 h opendkim[7]: 7A: DKIM-Signature field added (s=m, d=x.example)\n"
    )
    att, conn, acc = _load(_write(tmp_path / "mail.log", text, mtime=_utc(2024, 5, 2)))
    assert att.height == 0 and conn.height == 0
    got = dict(acc.table.filter(pl.col("category") == "skipped").select("reason", "lines").iter_rows())
    assert got == {
        "address verification probe": 2,
        "inbound smtpd/postscreen": 2,
        "postfix warning/fatal": 1,
        "tls": 1,
        "not postfix: dovecot": 1,
        "not postfix: opendkim": 1,
    }


def test_wrapped_fragments_and_binary_junk_are_malformed_never_attempts(tmp_path):
    text = (
        "Jun 29 00:20:39 mail postfix/smtp[23085]: 9AA0611911D: to=<a@hotmail.com>, relay=mx3.hotmail.com[65.54.188.72]:25, delay=2, delays=0.22/0.08/1.4/0.27, dsn=5.0.0, st\n"
        "atus=bounced (host mx3.hotmail.com[65.54.188.72] said: 550 Requested action not taken: mailbox unavailable (in reply to RCPT TO command))\n"
        "\x01\x02\xff\xfe garbage \x7f\x1b[0m\n"
        "\n"
    )
    p = tmp_path / "mail.log"
    p.write_bytes(text.encode("latin-1"))
    att, _, acc = _load(p)
    assert att.height == 0
    assert acc.count("malformed", "truncated or wrapped delivery record") == 1
    assert acc.count("malformed", "fragment of a wrapped record") == 1
    assert acc.count("malformed", "no syslog header") == 1
    assert acc.count("skipped", "empty line") == 1
    ex = acc.examples.filter(pl.col("reason") == "fragment of a wrapped record")
    assert ex["line_no"].to_list() == [2] and ex["text"][0].startswith("atus=bounced (")


def test_file_without_postfix_lines_gives_no_attempts_and_all_skipped(tmp_path):
    text = "Jul  1 00:00:00 h CRON[1]: (root) CMD (run-parts /etc/cron.hourly)\nJul  1 00:00:01 h dovecot: master: Dovecot v2.3 starting up\n"
    att, _, acc = _load(_write(tmp_path / "syslog", text))
    assert att.height == 0
    assert acc.table.select("category", "reason", "lines").sort("reason").rows() == [
        ("skipped", "not postfix: CRON", 1),
        ("skipped", "not postfix: dovecot", 1),
    ]


def test_dec_to_jan_rollover_takes_previous_year_for_december(tmp_path):
    text = (
        "Dec 31 23:59:58 h postfix/smtp[1]: A1: to=<a@x.example>, relay=mx.x.example[192.0.2.1]:25, delay=1, delays=0/0/0.5/0.5, dsn=2.0.0, status=sent (250 ok)\n"
        "Jan  1 00:00:02 h postfix/smtp[1]: A2: to=<b@x.example>, relay=mx.x.example[192.0.2.1]:25, delay=1, delays=0/0/0.5/0.5, dsn=2.0.0, status=sent (250 ok)\n"
    )
    att, _, _ = _load(_write(tmp_path / "mail.log", text, mtime=_utc(2025, 1, 1, 6)))
    assert att["ts"].to_list() == [_utc(2024, 12, 31, 23, 59, 58), _utc(2025, 1, 1, 0, 0, 2)]
    # an explicit year is the year of the file's last line
    att, _, _ = _load(_write(tmp_path / "mail.log", text, mtime=_utc(2025, 1, 1, 6)), year=2021)
    assert att["ts"].to_list() == [_utc(2020, 12, 31, 23, 59, 58), _utc(2021, 1, 1, 0, 0, 2)]


def test_mtime_month_earlier_than_last_line_means_previous_year(tmp_path):
    text = "Sep 30 20:46:08 h postfix/smtp[1]: A1: to=<a@x.example>, relay=mx.x.example[192.0.2.1]:25, delay=1, delays=0/0/0.5/0.5, dsn=2.0.0, status=sent (250 ok)\n"
    att, _, _ = _load(_write(tmp_path / "mail.log", text, mtime=_utc(2026, 2, 1)))
    assert att["ts"].to_list() == [_utc(2025, 9, 30, 20, 46, 8)]


def test_mixed_timezones_iso_offsets_and_local_syslog_with_tz(tmp_path):
    rec = "to=<a@x.example>, relay=mx.x.example[192.0.2.1]:25, delay=1, delays=0/0/0.5/0.5, dsn=2.0.0, status=sent (250 ok)"
    iso = _write(tmp_path / "iso.log", f"2024-03-31T03:30:00.250000+02:00 h postfix/smtp[1]: B1: {rec}\n2024-03-31T01:30:00Z h postfix/smtp[1]: B2: {rec}\n")
    local = _write(
        tmp_path / "local.log",
        # 02:30 does not exist in Berlin on 2024-03-31; 02:30 on 2024-10-27 happens twice.
        f"Mar 31 01:30:00 h postfix/smtp[1]: C1: {rec}\nMar 31 02:30:00 h postfix/smtp[1]: C2: {rec}\nOct 27 02:30:00 h postfix/smtp[1]: C3: {rec}\n",
        mtime=_utc(2024, 11, 1),
    )
    att, _, _ = _load([iso, local], tz="Europe/Berlin")
    got = dict(att.select("queue_id", "ts").iter_rows())
    assert got == {
        "B1": _utc(2024, 3, 31, 1, 30, 0, 250000),
        "B2": _utc(2024, 3, 31, 1, 30),
        "C1": _utc(2024, 3, 31, 0, 30),
        "C2": _utc(2024, 3, 31, 1, 30),  # read with the offset before the gap (+01:00)
        "C3": _utc(2024, 10, 27, 0, 30),  # ambiguous: earliest (+02:00)
    }


def test_shipper_prefixed_lines_use_the_shipper_utc_stamp(tmp_path):
    text = (
        "2021-03-06T06:09:00.000Z Mar  6 07:08:59 host postfix/smtp[28829]: A1E1E1880093: to=<a@x.example>, relay=mx.x.example[192.0.2.1]:25, "
        "delay=1, delays=0/0/0.5/0.5, dsn=2.0.0, status=sent (250 ok)\n"
    )
    att, _, _ = _load(_write(tmp_path / "mail.log", text, mtime=_utc(2030, 1, 1)), tz="Europe/Berlin")
    assert att.select("ts", "log_host").rows() == [(_utc(2021, 3, 6, 6, 9), "host")]


def test_overlapping_files_count_duplicates_once(tmp_path):
    a = "Aug  1 00:00:0{i} h postfix/smtp[1]: Q{i}: to=<a{i}@x.example>, relay=mx.x.example[192.0.2.1]:25, delay=1, delays=0/0/0.5/0.5, dsn=2.0.0, status=sent (250 ok)\n"
    old = _write(tmp_path / "mail.log.1", "".join(a.format(i=i) for i in range(0, 4)), mtime=_utc(2024, 8, 2))
    new = _write(tmp_path / "mail.log", "".join(a.format(i=i) for i in range(2, 6)), mtime=_utc(2024, 8, 3))
    att, _, acc = _load([new, old])
    assert att["queue_id"].to_list() == ["Q0", "Q1", "Q2", "Q3", "Q4", "Q5"]
    assert acc.count("duplicate") == 2 and acc.lines_read == 8
    assert acc.examples.filter(pl.col("category") == "duplicate")["file"].unique().to_list() == [str(new)]
    att, _, acc = _load([new, old], dedupe=False)
    assert att.height == 8 and acc.count("duplicate") == 0


def test_truncated_gzip_keeps_what_decompressed_and_notes_a_problem(tmp_path):
    line = "Aug  1 00:00:01 h postfix/smtp[1]: Q{i}: to=<a{i}@x.example>, relay=mx.x.example[192.0.2.1]:25, delay=1, delays=0/0/0.5/0.5, dsn=2.0.0, status=sent (250 ok)\n"
    data = gzip.compress("".join(line.format(i=i) for i in range(2000)).encode())
    p = tmp_path / "mail.log.2.gz"
    p.write_bytes(data[: len(data) // 2])
    att, _, acc = _load(p)
    assert 0 < att.height < 2000
    assert len(acc.problems) == 1 and "truncated gzip stream" in acc.problems[0] and str(p) in acc.problems[0]


def test_sniff_recognises_postfix_headers_only():
    assert postfix.sniff("Oct 01 00:59:27 <servername> postfix/smtp[418650]: 7311D2A01F0: to=<a@b>")
    assert postfix.sniff("2020-01-30T06:26:05.404714+09:00 mail postfix/qmgr[18719]: C6: removed")
    assert postfix.sniff("2021-03-06T06:09:00.000Z Mar  6 07:08:59 host postfix-10.20.30.40/relay/smtp[28829]: A1: removed")
    assert not postfix.sniff("Jul  1 00:00:00 h CRON[1]: (root) CMD (run-parts)")
    assert not postfix.sniff("1999-03-02 09:44:33 10HmaX-0005vi-00 => x@y R=r T=t")


def test_batches_give_the_same_result_as_one_pass(pf_individual, monkeypatch):
    whole = _load(pf_individual)
    monkeypatch.setattr(postfix, "BATCH_LINES", 40)
    batched = _load(pf_individual)
    assert batched[0].equals(whole[0]) and batched[1].equals(whole[1])
    assert batched[2].table.equals(whole[2].table) and batched[2].examples.equals(whole[2].examples)


def test_many_small_blocks_and_more_workers_give_the_same_tables_as_one_block_per_file(monkeypatch):
    """The bundled week read in 256 KiB blocks (lines cut at block ends are read again by the
    next block; queue ids, generations and tries span blocks), three at a time, gives the
    same attempts, connection events and accounting as whole files, and its truth."""
    sample = Path(__file__).resolve().parent.parent / "data" / "sample"
    whole = _load(sample, year=2026)
    monkeypatch.setattr(postfix, "BATCH_BYTES", 256 << 10)
    monkeypatch.setattr(postfix, "WORKERS", 3)
    blocks = _load(sample, year=2026)
    assert blocks[0].equals(whole[0]) and blocks[1].equals(whole[1])
    assert blocks[2].table.equals(whole[2].table) and blocks[2].examples.equals(whole[2].examples)
    truth = json.loads((sample / "truth.json").read_text())
    assert blocks[0].height == truth["attempts"] and blocks[0].filter(pl.col("outcome") == "expired").height == truth["expired"]


@pytest.mark.parametrize(
    ("threads", "workers", "batch_mb"),
    [(1, 2, 32), (2, 2, 32), (4, 4, 19.2), (8, 8, 96 / 9), (64, 8, 96 / 9)],
)
def test_blocks_parsed_at_once_follow_the_core_count_and_the_text_in_flight_stays_bounded(monkeypatch, threads, workers, batch_mb):
    """One block per thread of polars' pool (at least 2, at most 8), smaller blocks when there
    are more of them: the text being parsed or read ahead stays about 96 MB."""
    monkeypatch.setattr(pl, "thread_pool_size", lambda: threads)
    got_workers, got_batch = postfix._plan()
    assert got_workers == workers
    assert got_batch == pytest.approx(batch_mb * (1 << 20), abs=1)
    assert (got_workers + 1) * got_batch <= 99 << 20
    monkeypatch.setattr(postfix, "WORKERS", 3)
    monkeypatch.setattr(postfix, "BATCH_BYTES", 1 << 20)
    assert postfix._plan() == (3, 1 << 20)


@pytest.fixture()
def pf_individual(realworld):
    return realworld / "postfix" / "lightmeter_controlcenter" / "individual_files"


def test_generated_world_matches_its_truth(tmp_path):
    from deferral_kit import sample

    config = sample.WorldConfig(days=2, messages_per_day=400, seed=7)
    config.episodes = sample.default_episodes(config)
    world = sample.generate(config)
    files = sample.write(world, "postfix", tmp_path)
    att, _, acc = _load(files)
    truth = world.truth
    assert acc.count("malformed") == 0 and acc.count("duplicate") == 0
    assert att.height == truth.height
    keys = ["queue_id", "recipient", "attempt"]
    cols = ["agent", "instance", "mx_host", "mx_ip", "smtp_code", "enhanced_code", "dsn", "outcome", "remote", "sender", "size", "message_id", "egress_ip", "response"]
    got = att.select(keys + cols).sort(keys)
    want = truth.select(keys + cols).sort(keys)
    assert got.equals(want)
    # the log has whole seconds; the truth keeps the generator's fractions
    assert att.sort(keys)["ts"].equals(truth.sort(keys)["ts"].dt.truncate("1s"))


SAID_REASONS = [
    # Microsoft's capacity deferral, as Postfix logs it
    "host outlook-com.olc.protection.outlook.com[52.101.8.36] said: 452 4.3.1 Insufficient system resources (in reply to RCPT TO command)",
    # parentheses inside the reply (Microsoft's "(S843)"), and the phrase itself quoted inside the reply
    "host eur.olc.protection.outlook.com[40.92.1.2] said: 550 5.7.1 Unfortunately, messages from [1.2.3.4] weren't sent. (S3140) [AM0PR.eurprd04.prod.outlook.com] (in reply to MAIL FROM command)",
    "host mx.example.net[192.0.2.1] said: 451 try later (in reply to RCPT TO command) (in reply to end of DATA command)",
    # multi-line reply flattened, no command suffix, greeting refusal, suspended prefix, IPv6, no name, non-ASCII
    "host gmail-smtp-in.l.google.com[142.250.1.27] said: 450-4.2.1 The user you are trying to contact is receiving mail too quickly. 450-4.2.1 Please try again later. 450 4.2.1 https://support.google.com/mail/?p=ReceivingRate (in reply to end of DATA command)",
    "host mx.example.org[192.0.2.9] said: 421 4.7.0 Try again later, closing connection.",
    "host mta7.am0.yahoodns.net[67.195.204.72] refused to talk to me: 421 4.7.0 [TSS04] Messages from 1.2.3.4 temporarily deferred",
    "delivery temporarily suspended: host mx1.example.com[2001:db8::25] said: 451 4.3.0 Temporary lookup failure (in reply to RCPT TO command)",
    "host [203.0.113.5] said: 550 rejected (in reply to  command)",
    "host mx.exämple.com[198.51.100.7] said: 452 4.3.1 Ressources système insuffisantes (in reply to RCPT TO command)",
]


@pytest.mark.parametrize("text", SAID_REASONS)
def test_said_reasons_are_cut_as_the_reason_grammar_reads_them(text):
    """``host H[IP] said: …`` reasons are cut at literal offsets for speed; the fields are
    what REASON_RE captures, character for character."""
    from deferral_kit.loaders import postfix

    frame = pl.DataFrame({"rtext": [text]})
    want = frame.select(pl.col("rtext").str.extract_groups(postfix.REASON_RE).alias("r")).unnest("r")
    fast = postfix._said_fields(
        frame.lazy().with_columns(pl.col("rtext").alias("_said"), *[pl.lit(None, pl.String).alias(n) for n in want.columns])
    ).collect()
    assert fast.select(want.columns).to_dicts() == want.to_dicts()
