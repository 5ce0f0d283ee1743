"""PowerMTA accounting CSV loader: real records (header-less pastes, custom field lists, the
User's Guide example) and hand-written files for a Microsoft 452 4.3.1 retry then delivery,
record types, RFC 4180 quoting, CRLF and truncated rows."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from deferral_kit import schema
from deferral_kit.loaders import detect, load, powermta
from deferral_kit.sources import discover

FIX = Path(__file__).parent / "fixtures" / "powermta"
UTC = timezone.utc


def _row(df: pl.DataFrame, **eq) -> dict:
    out = df.filter(pl.all_horizontal(pl.col(k) == v for k, v in eq.items()))
    assert out.height == 1, (eq, out)
    return out.row(0, named=True)


@pytest.fixture(scope="module")
def real(realworld):
    res = load(realworld / "powermta", format="powermta")
    return res, res.attempts.collect(), res.connections.collect()


def test_real_every_line_accounted(real):
    res, att, con = real
    acc = res.accounting
    assert acc.lines_read == 12
    assert (acc.count("attempt"), acc.count("connection"), acc.count("context", "header line"), acc.count("malformed")) == (9, 2, 1, 0)
    assert att.height == 9 and con.height == 2
    schema.validate(att)
    schema.validate(con, schema.CONNECTION_COLUMNS)
    assert att["source"].unique().to_list() == ["powermta"]


def test_real_default_layout_record(real):
    _, att, con = real
    d = _row(att, recipient="keithg@dvhelp.org")
    assert d["ts"] == datetime(2015, 3, 7, 8, 31, 17, tzinfo=UTC)
    assert (d["delay_s"], d["sender"], d["orig_recipient"], d["outcome"], d["agent"], d["remote"]) == (
        1.0, "march@rebecurase.com", "keithg@dvhelp.org", "delivered", "smtp", True,
    )
    assert (d["mx_host"], d["mx_ip"], d["egress_ip"], d["egress_pool"], d["instance"], d["size"]) == (
        "mail.dvhelp.org", "173.160.206.5", "172.31.30.28", "mta1", "mta1", 26770,
    )
    assert (d["smtp_code"], d["enhanced_code"], d["dsn"]) == (250, "2.6.0", "2.0.0")
    assert d["response"].startswith("250 2.6.0 <24369389984335476713fc9c6ca984d0@supt.rebecurase.com> [InternalId=444]")
    assert d["message_id"] == "1677621"
    # tq rows are queue-level: connection events, not recipient attempts
    assert con["event"].to_list() == ["queue_transient", "queue_transient"]
    assert con["recipient_domain"].to_list() == ["dvhelp.org", "dvhelp.org"]
    assert con["mx_host"].to_list() == ["mail.dvhelp.org", "a537448.mx.mailhop.org"]
    assert con["mx_ip"].to_list() == ["173.160.206.5", "54.148.218.146"]
    assert con["response"].to_list() == ["421 4.4.1 Connection timed out", None]
    assert con["enhanced_code"].to_list() == ["4.4.1", "4.4.1"]


def test_real_timeimprinted_layouts_by_content(real):
    _, att, _ = real
    y = _row(att, recipient="klangan7@yahoo.com")
    assert (y["sender"], y["mx_host"], y["mx_ip"], y["response"], y["egress_ip"], y["size"]) == (
        "bounced@paperlesspost.com", "mta6.am0.yahoodns.net", "98.138.112.35", "250 ok dirdel", "10.50.0.83", 8801,
    )
    assert y["message_id"] == "<production-dispatcher07.453357436.de023c15c7517daab92b7261c2d7da3e54dd7278.production@paperlesspost.com>"
    h = _row(att, recipient="VJAYPRAKASH@YMAIL.COM")
    # +0530 offsets converted to UTC
    assert h["ts"] == datetime(2014, 8, 24, 10, 30, 14, tzinfo=UTC)
    assert (h["recipient_domain"], h["sender"], h["instance"], h["mx_host"], h["size"]) == (
        "ymail.com", "Emailstatements.cards@hdfcbank.net", "CAMPAIGN", "mta7.am0.yahoodns.net", 155704,
    )


def test_real_users_guide_header_and_time_t(real):
    _, att, _ = real
    doc = att.filter(pl.col("recipient").str.ends_with("@domain.com")).sort("line_no")
    assert doc["recipient"].to_list() == ["user1@domain.com", "user2@domain.com", "user3@domain.com", "user4@domain.com"]
    assert doc["outcome"].to_list() == ["delivered", "delivered", "bounced", "bounced"]
    assert doc["ts"][0] == datetime(2007, 5, 10, 14, 38, 23, tzinfo=UTC)
    # a bounce with no remote MTA and no diagnostic is not claimed as an MX try
    assert doc["agent"].to_list() == ["smtp", "smtp", "internal", "internal"]
    assert doc["remote"].to_list() == [True, True, False, False]  # a delivery implies the server's 250
    assert doc["egress_ip"].to_list() == ["10.0.0.1", "10.0.0.1", None, None]
    assert doc["mx_host"].null_count() == 4


@pytest.fixture(scope="module")
def fixture_load():
    res = load(FIX, format="powermta")
    return res, res.attempts.collect(), res.connections.collect()


def test_fixture_microsoft_452_retry_then_delivery(fixture_load):
    _, att, _ = fixture_load
    ann = att.filter(pl.col("recipient") == "ann@contoso.com").sort("attempt")
    assert ann["attempt"].to_list() == [1, 2, 3]
    assert ann["outcome"].to_list() == ["deferred", "deferred", "delivered"]
    assert ann["remote"].to_list() == [True, False, True]  # the 2nd try never reached the server
    assert ann["mx_ip"].to_list() == ["52.101.68.12", "52.101.68.13", "52.101.68.14"]
    first = ann.row(0, named=True)
    assert first["response"] == (
        '452 4.3.1 Insufficient system resources (TSTE), try "later" [AM6PR03MB1234.eurprd03.prod.outlook.com]'
    )
    assert (first["smtp_code"], first["enhanced_code"], first["dsn"], first["mx_host"], first["egress_pool"], first["instance"]) == (
        452, "4.3.1", "4.3.1", "contoso-com.mail.protection.outlook.com", "pool-ms", "vmta-ms1",
    )
    assert (first["queue_id"], first["message_id"], first["orig_recipient"], first["delay_s"]) == (
        "env-0001", "<20261117100000.abc@sender.example>", "ann@contoso.com", 2.0,
    )
    assert ann["delay_s"].to_list()[2] == 2709.0


def test_fixture_record_types_quoting_and_truncation(fixture_load):
    res, att, con = fixture_load
    acc = res.accounting
    assert acc.lines_read == 16
    assert acc.count("skipped", "rb/rs remote bounce/status (out-of-band, not an SMTP try)") == 1
    assert acc.count("skipped", "f feedback-loop (FBL) record") == 1
    assert acc.count("skipped", "r received record") == 1
    assert acc.count("skipped", "empty line") == 1
    assert acc.count("context", "continuation of a multi-line CSV record") == 1
    assert acc.count("malformed", "truncated row (fewer fields than the header)") == 1
    assert acc.count("malformed", "no header line and no known layout fits") == 1
    assert any("acct-headerless-unknown.csv" in p and "5 columns" in p for p in acc.problems)
    eve = _row(att, recipient="eve@example.org")
    assert (eve["outcome"], eve["smtp_code"], eve["enhanced_code"], eve["remote"], eve["line_no"]) == ("bounced", 550, "5.1.1", True, 6)
    assert eve["response"] == (
        "550 5.1.1 The email account that you tried to reach does not exist. "
        "Please try double-checking the recipient's email address"
    )
    fay = _row(att, recipient="fay@gone.example")
    assert (fay["outcome"], fay["agent"], fay["remote"], fay["dsn"]) == ("expired", "internal", False, "4.4.7")
    assert con.height == 1
    tq = con.row(0, named=True)
    assert (tq["event"], tq["mx_host"], tq["mx_ip"], tq["recipient_domain"], tq["egress_ip"], tq["instance"]) == (
        "queue_transient", "contoso-com.mail.protection.outlook.com", "52.101.68.13", "contoso.com", "192.0.2.10", "vmta-ms1",
    )


def test_fixture_headerless_default_with_time_t(fixture_load):
    _, att, _ = fixture_load
    carl = att.filter(pl.col("recipient") == "carl@hotmail.com").sort("attempt")
    assert carl["outcome"].to_list() == ["deferred", "delivered"]
    assert carl["attempt"].to_list() == [1, 2]
    assert carl["mx_host"].to_list() == ["hotmail-com.olc.protection.outlook.com"] * 2
    assert carl["ts"].to_list() == [datetime(2025, 11, 17, 10, 0, 2, tzinfo=UTC), datetime(2025, 11, 17, 10, 30, tzinfo=UTC)]
    assert carl["response"][0] == "452 4.3.1 Insufficient system resources (TSTE) [outlook.com]"
    assert carl["queued_at"][1] == datetime(2025, 11, 17, 10, 0, tzinfo=UTC)


def test_headerless_layout_choice():
    default = ["t", "1763373602", "1763373600", "a@b", "c@d", "", "delayed", "4.3.1 (x)"] + [""] * 15
    assert powermta.headerless_layout(default) == powermta.DEFAULT_FIELDS
    imprinted = ["d", "1", "2", "", "a@b", "c@d", "", "relayed", "2.0.0 (success)"] + [""] * 13
    assert powermta.headerless_layout(imprinted)[3] == "timeImprinted"
    assert len(powermta.headerless_layout(imprinted + ["<id@x>"])) == 23
    assert powermta.headerless_layout(["d", "1", "a@b"]) is None


def test_sniff_and_detect(realworld):
    for p in sorted((realworld / "powermta").iterdir()):
        assert detect(discover([p])[0]) == "powermta", p
    assert detect(discover([FIX / "acct-2026-11-17-1000.csv"])[0]) == "powermta"
    assert not powermta.sniff("2026-11-17 10:00:00 2aBcDe-000Abc-12 => a@b.c R=x T=remote_smtp H=mx [1.2.3.4]\n")
    assert not powermta.sniff("date-time,connector-id,session-id,sequence-number,local-endpoint\n")


def test_mixed_formats_in_one_call(realworld):
    res = load([FIX / "acct-headerless-default.csv", realworld / "exim" / "forums" / "pastebin_6G7q8H39_exim_defer_multiline_escaped.log"])
    att = res.attempts.collect()
    assert sorted(att["source"].to_list()) == ["exim", "exim", "powermta", "powermta"]
    assert set(res.accounting.table["format"]) == {"exim", "powermta"}


def test_same_file_twice_counts_once(tmp_path):
    copy = tmp_path / "acct-copy.csv"
    copy.write_bytes((FIX / "acct-headerless-default.csv").read_bytes())
    res = load([copy, FIX / "acct-headerless-default.csv"], format="powermta")
    assert res.attempts.collect().height == 2
    assert res.accounting.count("duplicate", "identical record in an earlier file") == 2


_HEADER = "type,timeLogged,timeQueued,orig,rcpt,orcpt,dsnAction,dsnStatus,dsnDiag,dsnMta,bounceCat,vmta,vmtaPool\n"
_ROWS = (
    't,2026-11-17 10:00:02+0000,2026-11-17 10:00:00+0000,news@sender.example,ann@contoso.com,,delayed,4.3.1 (x),'
    '"smtp;452 4.3.1 Insufficient system resources, try later",contoso-com.mail.protection.outlook.com (52.101.68.12),,vmta-ms1,pool-ms\n'
    # last field empty: a complete row, not a short one
    'd,2026-11-17 10:30:00+0000,2026-11-17 10:00:00+0000,news@sender.example,ann@contoso.com,,relayed,2.0.0 (success),'
    'smtp;250 2.0.0 OK,contoso-com.mail.protection.outlook.com (52.101.68.14),,vmta-ms1,\n'
    # cut short after dsnStatus
    "t,2026-11-17 10:31:00+0000,2026-11-17 10:00:00+0000,news@sender.example,bob@contoso.com,,delayed,4.3.1 (x)\n"
)


@pytest.mark.parametrize("extra", ["", 'r,2026-11-17 10:32:00+0000,,a@b,"odd ""quote,,,,,,,,,,,\n'])
def test_csv_fast_path_and_careful_path_agree(tmp_path, extra):
    # Without the extra line the file is read by the CSV parser; the odd-quoted line sends the
    # whole file through the field splitter.  The records read the same either way.
    f = tmp_path / "acct.csv"
    f.write_text(_HEADER + _ROWS + extra)
    res = load(f, format="powermta")
    att = res.attempts.collect()
    acc = res.accounting
    assert acc.count("attempt") == 2 and acc.count("context", "header line") == 1
    assert acc.count("malformed", "truncated row (fewer fields than the header)") == 1
    assert acc.examples.filter(pl.col("reason").str.starts_with("truncated"))["line_no"].to_list() == [4]
    assert acc.count("malformed", "unclosed quote (record cut short)") == (1 if extra else 0)
    assert att["outcome"].to_list() == ["deferred", "delivered"]
    assert att["response"][0] == "452 4.3.1 Insufficient system resources, try later"
    assert att["egress_pool"].to_list() == ["pool-ms", "vmta-ms1"]  # empty vmtaPool → the vmta
    assert att["attempt"].to_list() == [1, 2] and att["line_no"].to_list() == [2, 3]


def _tables(res):
    acc = res.accounting
    return res.attempts.collect(), res.connections.collect(), acc.table, acc.examples


def test_blocks_read_the_same_as_one_block(tmp_path, monkeypatch):
    # A file read by the CSV parser is read block by block (the header only in the first);
    # a second file repeating some records is checked for duplicates across them.  Tiny
    # blocks must give the same tables as one block per file.
    (tmp_path / "a.csv").write_text(_HEADER + _ROWS.replace("\nt,2026-11-17 10:31", "\nx,2026-11-17 10:31") * 5)
    (tmp_path / "b.csv").write_text(_HEADER + _ROWS.splitlines(keepends=True)[0] + _ROWS.splitlines(keepends=True)[0].replace("ann@", "cy@"))
    whole = _tables(load(tmp_path, format="powermta"))
    monkeypatch.setattr(powermta, "_BLOCK_BYTES", 300)
    blocks = _tables(load(tmp_path, format="powermta"))
    for a, b in zip(whole, blocks):
        assert_frame_equal(a, b)
    att, _, table, _ = blocks
    assert att.height == 11 and att["attempt"].to_list()[:4] == [1, 2, 3, 4]
    assert table.filter(pl.col("category") == "duplicate")["lines"].sum() == 1
