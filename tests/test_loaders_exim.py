"""Exim mainlog loader: real samples (the Exim test-suite mainlog, forum pastes, fail2ban files)
and hand-written fixtures for what the samples lack (Microsoft 452 4.3.1, retry then delivery,
log_timezone offsets, syslog [n/m] splits, wrapped lines)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from deferral_kit import schema
from deferral_kit.loaders import detect, exim, load
from deferral_kit.sources import discover

FIX = Path(__file__).parent / "fixtures" / "exim"


def _row(df: pl.DataFrame, **eq) -> dict:
    out = df.filter(pl.all_horizontal(pl.col(k) == v for k, v in eq.items()))
    assert out.height == 1, (eq, out)
    return out.row(0, named=True)


@pytest.fixture(scope="module")
def testsuite(realworld):
    res = load(realworld / "exim" / "exim_testsuite_mainlog_delivery.log", format="exim")
    return res, res.attempts.collect(), res.connections.collect()


def test_testsuite_every_line_accounted(testsuite):
    res, att, con = testsuite
    acc = res.accounting
    assert acc.lines_read == 4988
    assert acc.count("attempt") == att.height == 3219
    assert acc.count("connection") == con.height == 43
    assert acc.count("context", "arrival (<=)") == 1448
    assert acc.count("context", "message completed") == 161
    assert acc.count("skipped", "retry time not reached (no attempt made)") == 45
    assert acc.count("skipped", "delivery suppressed by -N (*>)") == 48
    assert acc.count("skipped", "frozen/unfrozen notice") == 24
    assert acc.count("malformed") == 0
    schema.validate(att)
    schema.validate(con, schema.CONNECTION_COLUMNS)


def test_testsuite_outcomes_and_agents(testsuite):
    _, att, _ = testsuite
    # every => / -> / >> line is a delivery, == a deferral, ** a failure
    assert att.group_by("outcome").len().sort("outcome").rows() == [
        ("bounced", 466), ("deferred", 359), ("delivered", 2323), ("expired", 71),
    ]
    smtp = att.filter(pl.col("agent") == "smtp")
    # AUTH failures name no host (no H=, no per-host line before them)
    assert smtp.filter(pl.col("mx_host").is_null())["response"].str.starts_with("authentication required").to_list() == [True] * 4
    assert not smtp.filter(pl.col("remote") & pl.col("smtp_code").is_null()).height
    assert set(att["agent"].unique()) == {"smtp", "lmtp", "local", "router", "retry", "internal"}


def test_testsuite_multiline_reply_joined(testsuite):
    _, att, _ = testsuite
    r = att.filter(pl.col("recipient") == "useryx@myhost.test.ex", pl.col("outcome") == "deferred", pl.col("agent") == "lmtp")
    assert r["response"].to_list()[1] == (
        "440 Here's a whole long message, in several lines, just for testing that nothing breaks when we do this Temporary error"
    )
    assert r["smtp_stage"].to_list() == ["DATA", "DATA"]
    ok = _row(att, recipient="useryx@myhost.test.ex", outcome="delivered")
    assert (ok["response"], ok["smtp_code"], ok["agent"]) == ("250 This one's OK OK", 250, "lmtp")


def test_testsuite_reused_connection_and_bounce_form(testsuite):
    _, att, _ = testsuite
    r = att.filter(pl.col("recipient") == "d@test.ex", pl.col("response") == "550 Recipient not OK").row(0, named=True)
    assert (r["outcome"], r["agent"], r["mx_host"], r["mx_ip"], r["smtp_code"], r["smtp_stage"], r["remote"]) == (
        "bounced", "smtp", "127.0.0.1", "127.0.0.1", 550, "RCPT TO", True,
    )


def test_forum_pastes(realworld):
    res = load(realworld / "exim" / "forums", format="exim")
    att = res.attempts.collect()
    acc = res.accounting
    assert acc.lines_read == 43
    assert (acc.count("attempt"), acc.count("connection"), acc.count("context"), acc.count("skipped"), acc.count("malformed")) == (11, 5, 11, 16, 0)
    g = _row(att, queue_id="1gKmyS-0007A2-F0")
    assert g["mx_host"] == "alt4.gmail-smtp-in.l.google.com" and g["mx_ip"] == "173.194.209.27"
    assert (g["smtp_code"], g["enhanced_code"], g["smtp_stage"], g["outcome"], g["remote"]) == (421, "4.7.0", "end of DATA", "deferred", True)
    assert g["response"].startswith("421 4.7.0 [216.194.173.80 15] Our system has detected an unusual rate of unsolicited mail")
    assert g["response"].endswith("review our Bulk Email Senders Guidelines. p4si3522070uam.9 - gsmtp")
    assert g["orig_recipient"] == "jane@gocleanse.ne"
    # the older "defer (-45): ... host H [ip]: 421" form
    y = _row(att, queue_id="1cWVWv-0007kW-AW")
    assert (y["mx_host"], y["mx_ip"], y["smtp_code"], y["enhanced_code"], y["smtp_stage"]) == (
        "mta6.am0.yahoodns.net", "66.196.118.240", 421, "4.7.0", "MAIL FROM",
    )
    # syslog-wrapped Exim 4.74 with 16-char ids: year from the file, host from syslog
    s = _row(att, queue_id="1PqsgA-000CU6-GO")
    assert (s["log_host"], s["sender"], s["size"], s["mx_host"], s["response"]) == (
        "ns1", "root@mx.compeg.ru", 1457, "googlemail-smtp.l.google.com", "250 2.0.0 OK 1298144479 e6sm1688320fav.8",
    )
    assert s["ts"].strftime("%m-%d %H:%M:%S") == "02-19 22:41:21"
    q = _row(att, queue_id="1anOzU-004Abe-D0")
    assert (q["delay_s"], q["sender"], q["size"], q["egress_pool"]) == (0.0, "varun.vijayan@kokban.co.in", 781, "remote_smtp")
    con = res.connections.collect()
    assert sorted(con["event"].to_list()) == ["connect_failed", "said", "said", "said", "said"]
    ts01 = _row(con, queue_id="1bPxwi-0001xA-Te")
    assert (ts01["smtp_code"], ts01["enhanced_code"], ts01["smtp_stage"], ts01["mx_host"]) == (421, "4.7.0", "MAIL FROM", None)


def test_fail2ban_inbound_lines_are_not_attempts(realworld):
    res = load([realworld / "exim" / "fail2ban_tests_exim.log", realworld / "exim" / "fail2ban_tests_exim_spam.log"], format="exim")
    assert res.attempts.collect().height == 0
    assert res.accounting.lines_read == 59 == res.accounting.count("skipped")


def test_fail2ban_timestamps_match_expected(realworld):
    """The wrapper forms (plain, [pid], ``host exim[pid]: stamp``, ``stamp host exim[pid]:``)
    give the time fail2ban expects."""
    f = realworld / "exim" / "fail2ban_tests_exim.log"
    cases = [json.loads(x) for x in (realworld / "exim" / "fail2ban_tests_exim.expected.jsonl").read_text().splitlines()]
    files = discover([f])
    got = exim._records(files, exim_options()).with_columns(ts=exim._timestamps(files, exim_options())).collect()
    assert got["line"].to_list() == [c["line"] for c in cases]
    timed = [(i, c["expected_fail2ban"]["time"]) for i, c in enumerate(cases) if "time" in c["expected_fail2ban"]]
    assert len(timed) == 47
    assert [got["ts"][i] for i, _ in timed] == [datetime.fromisoformat(t).replace(tzinfo=timezone.utc) for _, t in timed]


def exim_options():
    from deferral_kit.loaders import LoadOptions

    return LoadOptions(tz="UTC", year=2026)


@pytest.fixture(scope="module")
def fixture_load():
    res = load([FIX / "microsoft_452_retry.log", FIX / "syslog_split.log"], format="exim", tz="Europe/Berlin", year=2026)
    return res, res.attempts.collect(), res.connections.collect()


def test_microsoft_452_retry_then_delivery(fixture_load):
    _, att, _ = fixture_load
    ann = att.filter(pl.col("recipient") == "ann@contoso.com").sort("attempt")
    assert ann["attempt"].to_list() == [1, 2, 3]
    assert ann["outcome"].to_list() == ["deferred", "deferred", "delivered"]
    assert ann["mx_ip"].to_list() == ["52.101.68.12", "52.101.68.13", "52.101.68.14"]
    assert ann["mx_host"].unique().to_list() == ["contoso-com.mail.protection.outlook.com"]
    first = ann.row(0, named=True)
    assert (first["smtp_code"], first["enhanced_code"], first["smtp_stage"], first["remote"], first["agent"]) == (452, "4.3.1", "RCPT TO", True, "smtp")
    assert first["response"] == (
        "452 4.3.1 Insufficient system resources (TSTE) [AM6PR03MB1234.eurprd03.prod.outlook.com 2026-11-17T10:00:02.123Z 08DBD70830F39917]"
    )
    # naive stamps are Europe/Berlin (UTC+1 in November)
    assert first["ts"] == datetime(2026, 11, 17, 9, 0, 2, tzinfo=timezone.utc)
    assert (first["sender"], first["size"], first["message_id"]) == ("news@sender.example", 48211, "20261117100000.abc@sender.example")
    second = ann.row(1, named=True)
    assert (second["smtp_code"], second["enhanced_code"], second["smtp_stage"]) == (452, "4.3.1", "MAIL FROM")
    last = ann.row(2, named=True)
    assert (last["delay_s"], last["egress_ip"], last["enhanced_code"]) == (2709.0, "192.0.2.10", "2.6.0")
    assert last["queued_at"] == datetime(2026, 11, 17, 9, 0, 0, tzinfo=timezone.utc)
    bob = _row(att, recipient="bob@gmail.com")
    assert (bob["mx_host"], bob["delay_s"], bob["response"]) == ("gmail-smtp-in.l.google.com", 2.0, "250 2.0.0 OK 1763373602 a1si123456 - gsmtp")


def test_fixture_offsets_timeouts_local_and_wrapped(fixture_load):
    res, att, con = fixture_load
    carl = _row(att, recipient="carl@hotmail.com")
    # "+0100" in the line wins over the tz option
    assert carl["ts"] == datetime(2026, 11, 17, 10, 0, 1, tzinfo=timezone.utc)
    assert carl["sender"] == ""  # bounce message, null sender <>
    assert carl["response"] == (
        "451 4.7.500 Server busy. Please try again later from [192.0.2.10]. (S77719) [BN1NAM02FT012.eop-nam02.prod.protection.outlook.com]"
    )
    assert (carl["enhanced_code"], carl["smtp_stage"]) == ("4.7.500", "end of DATA")
    dee = _row(att, recipient="dee@example.net")
    # no H= on a connect timeout: the host comes from the per-host line just before
    assert (dee["agent"], dee["remote"], dee["mx_host"], dee["mx_ip"], dee["response"]) == (
        "smtp", False, "mx2.example.net", "198.51.100.7", "Connection timed out",
    )
    local = _row(att, recipient="dee")
    assert (local["agent"], local["orig_recipient"], local["recipient_domain"], local["mx_host"]) == ("local", "dee@local.example", "local.example", None)
    eve = _row(att, recipient="eve@example.org")
    assert eve["response"] == "550 5.1.1 <eve@example.org>: Recipient address rejected: User unknown in virtual mailbox table"
    fay = _row(att, recipient="fay@gone.example")
    assert (fay["outcome"], fay["agent"], fay["remote"]) == ("expired", "retry", False)
    assert res.accounting.count("skipped", "retry time not reached (no attempt made)") == 1
    assert res.accounting.count("context", "continuation line joined to its record") == 2
    timeout = _row(con, event="timeout")
    assert (timeout["mx_host"], timeout["line_no"]) == ("mx2.example.net", 11)


def test_syslog_split_lines_rejoined(fixture_load):
    _, att, _ = fixture_load
    gus = att.filter(pl.col("recipient") == "gus@outlook.com").sort("attempt")
    assert gus["outcome"].to_list() == ["deferred", "delivered"]
    g = gus.row(0, named=True)
    assert (g["response"], g["log_host"], g["message_key"], g["line_no"]) == (
        "452 4.3.1 Insufficient system resources (TSTE)", "mx1", "mx1/2aBcDg-000Abe-56", 2,
    )
    hal = _row(att, recipient="hal@example.com")
    assert (hal["log_host"], hal["ts"]) == ("mail.example.com", datetime(2026, 11, 17, 9, 6, tzinfo=timezone.utc))


def test_sniff_and_detect(realworld):
    assert detect(discover([FIX / "syslog_split.log"])[0]) == "exim"
    assert detect(discover([realworld / "exim" / "forums" / "pastebin_3J8jbGK5_exim_rejects_cloudflare_obfuscated.log"])[0]) == "exim"
    postfix_line = "Oct 10 15:59:28 mail postfix/smtp[1234]: ABCDEF123: to=<a@b.c>, relay=mx.b.c[1.2.3.4]:25, delay=1, status=sent (250 ok)\n"
    assert not exim.sniff(postfix_line)
    assert not exim.sniff("type,timeLogged,orig,rcpt\nd,1178807903,a@b,c@d\n")


def test_duration_and_reply_helpers():
    df = pl.DataFrame({"t": ["1h2m3s", "0.5s", "2d", "1w1d", "0s", "45m9s", "junk"]})
    assert df.select(exim.duration_seconds(pl.col("t")).alias("t"))["t"].to_list() == [3723.0, 0.5, 172800.0, 691200.0, 0.0, 2709.0, None]
    r = pl.DataFrame({"r": [r"421-4.7.0 first\n421-4.7.0 second\n421 4.7.0 third", r"250-This one's OK\\n250 OK"]})
    assert r.select(exim.join_reply_lines(pl.col("r")))["r"].to_list() == ["421 4.7.0 first second third", "250 This one's OK OK"]


def test_same_file_twice_counts_once(tmp_path):
    copy = tmp_path / "mainlog.1"
    copy.write_bytes((FIX / "microsoft_452_retry.log").read_bytes())
    res = load([copy, FIX / "microsoft_452_retry.log"], format="exim", tz="Europe/Berlin")
    assert res.attempts.collect().height == 9
    # 15 stamped lines; the wrapped continuation line is context of its (duplicate) record
    assert res.accounting.count("duplicate", "identical line in an earlier file") == 15
    kept = load([copy, FIX / "microsoft_452_retry.log"], format="exim", dedupe=False)
    assert kept.attempts.collect().height == 18


def test_local_time_across_dst_change(tmp_path):
    log = tmp_path / "mainlog"
    log.write_text(
        "2026-03-29 01:59:59 2aBcDz-000Abz-00 => a@example.com R=dnslookup T=remote_smtp H=mx.example.com [198.51.100.1] C=\"250 OK\"\n"
        "2026-03-29 02:30:00 2aBcDz-000Abz-00 => b@example.com R=dnslookup T=remote_smtp H=mx.example.com [198.51.100.1] C=\"250 OK\"\n"
        "2026-03-29 03:00:00 2aBcDz-000Abz-00 => c@example.com R=dnslookup T=remote_smtp H=mx.example.com [198.51.100.1] C=\"250 OK\"\n"
    )
    att = load(log, format="exim", tz="Europe/Berlin").attempts.collect()
    # 02:30 does not exist in Berlin that night: read with the offset before the gap (+01:00)
    assert att["ts"].to_list() == [
        datetime(2026, 3, 29, 0, 59, 59, tzinfo=timezone.utc),
        datetime(2026, 3, 29, 1, 30, tzinfo=timezone.utc),
        datetime(2026, 3, 29, 1, 0, tzinfo=timezone.utc),
    ]


def test_stamp_forms_next_to_plain_lines(tmp_path):
    """Plain ``YYYY-MM-DD HH:MM:SS`` lines are read by position; the forms that only look
    plain (fraction, offset, [pid], a "Z" zone, "host exim[pid]:" and a second stamp, an id
    starting with Z) still get the wrapper's reading."""
    d = 'R=dnslookup T=remote_smtp H=mx.example.com [198.51.100.1] C="250 OK"'
    log = tmp_path / "mainlog"
    log.write_text(
        f"2026-11-17 10:00:00 2aBcDa-000Abc-01 => a@example.com {d}\n"
        f"2026-11-17 10:00:01.250 2aBcDa-000Abc-01 => b@example.com {d}\n"
        f"2026-11-17 10:00:02 +0100 2aBcDa-000Abc-01 => c@example.com {d}\n"
        f"2026-11-17 10:00:03 [4242] 2aBcDa-000Abc-01 => d@example.com {d}\n"
        f"2026-11-17 10:00:04 mx1 exim[4242]: 2026-11-17 10:00:05 2aBcDa-000Abc-01 => e@example.com {d}\n"
        f"2026-11-17 10:00:06 Z 2aBcDa-000Abc-01 => f@example.com {d}\n"
        f"2026-11-17 10:00:07 ZbOrT0-7vidzx-eM => g@example.com {d}\n"
    )
    att = load(log, format="exim", tz="Europe/Berlin").attempts.collect()
    utc = lambda s, us=0: datetime(2026, 11, 17, 9, 0, s, us, tzinfo=timezone.utc)  # noqa: E731
    assert att["recipient"].to_list() == [f"{c}@example.com" for c in "abcdefg"]
    assert att["ts"].to_list() == [utc(0), utc(1, 250000), utc(2), utc(3), utc(5), utc(6).replace(hour=10), utc(7)]
    assert att["message_key"].to_list() == ["2aBcDa-000Abc-01"] * 4 + ["mx1/2aBcDa-000Abc-01", "2aBcDa-000Abc-01", "ZbOrT0-7vidzx-eM"]
    assert att["attempt"].to_list() == [1] * 7
