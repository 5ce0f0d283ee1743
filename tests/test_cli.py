"""The deferral-kit command end to end on the bundled sample, and its errors (exit 2, a message naming the file)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import polars as pl

from deferral_kit import schema
from deferral_kit.cli import main

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
TRUTH = json.loads((SAMPLE / "truth.json").read_text())


def test_parse_writes_the_canonical_table_and_prints_the_accounting(tmp_path, capsys):
    out = tmp_path / "att.parquet"
    assert main(["parse", str(SAMPLE), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    att = pl.read_parquet(out)
    schema.validate(att)
    assert att.height == TRUTH["attempts"]
    assert f"attempts: {TRUTH['attempts']:,}" in text
    assert "lines read:" in text and "skipped" in text
    assert "passed over" in text and "truth.json" in text  # the non-log file in the folder is reported, not lost
    conns = pl.read_parquet(tmp_path / "att.connections.parquet")
    schema.validate(conns, schema.CONNECTION_COLUMNS)
    assert conns.height > 0


def test_rates_csv_on_logs_counts_every_452_4_3_1(capsys):
    assert main(["rates", str(SAMPLE), "--by", "provider,mx_host", "--bucket", "1h", "--csv"]) == 0
    table = pl.read_csv(io.StringIO(capsys.readouterr().out))
    by_provider = dict(table.group_by("provider").agg(pl.col("count").sum()).iter_rows())
    assert by_provider["microsoft_consumer"] == TRUTH["code_452_431"]["by_provider"]["microsoft_consumer"]
    assert by_provider["microsoft_365"] == TRUTH["code_452_431"]["by_provider"]["microsoft_365"]
    ms = table.filter(pl.col("provider").str.starts_with("microsoft"))
    assert ms["attempts"].sum() == TRUTH["microsoft"]["mx_attempts"]
    tried = table.filter(pl.col("attempts") > 0)
    assert set(tried["band"].unique()) <= {"watch", "throttle", "incident"}
    # hosts and hours that only saw suspensions or local hops stay listed, without a rate
    idle = table.filter(pl.col("attempts") == 0)
    assert idle.height > 0 and idle["band"].null_count() == idle.height and (idle["non_mx_rows"] > 0).all()


def test_missing_file_is_exit_2_naming_it(tmp_path, capsys):
    assert main(["rates", str(tmp_path / "nope.log")]) == 2
    assert "nope.log: no such file or directory" in capsys.readouterr().err


def test_unreadable_gzip_is_exit_2_naming_it(tmp_path, capsys):
    bad = tmp_path / "mail.log.2.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage-not-deflate" * 4)
    assert main(["parse", str(bad), "--format", "postfix", "--out", str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err
    assert "mail.log.2.gz" in err and "gzip" in err


def test_truncated_gzip_keeps_what_decompressed_and_says_so(tmp_path, capsys):
    packed = (SAMPLE / "mail.log.7.gz").read_bytes()  # Monday 2026-11-16
    cut = tmp_path / "mail.log.1.gz"
    cut.write_bytes(packed[: len(packed) // 2])
    assert main(["parse", str(cut), "--out", str(tmp_path / "cut.parquet")]) == 0
    out = capsys.readouterr().out
    assert "problem:" in out and "truncated gzip" in out
    n = pl.read_parquet(tmp_path / "cut.parquet").height
    assert 0 < n < TRUTH["by_day"]["2026-11-16"]["mx_attempts"]  # about half of the day survived the cut


def test_input_without_postfix_lines_is_exit_2(tmp_path, capsys):
    log = tmp_path / "dovecot.log"
    log.write_text("Nov 18 13:02:32 mail1 dovecot: imap-login: Login: user=<a>, method=PLAIN\n" * 3)
    assert main(["parse", str(log), "--format", "postfix", "--out", str(tmp_path / "d.parquet")]) == 2
    captured = capsys.readouterr()
    assert "skipped" in captured.out
    assert "no delivery attempts found" in captured.err


def test_connection_events_without_a_final_record_are_written_and_named_in_the_error(realworld, tmp_path, capsys):
    # a forum excerpt: qmgr from= lines and one "host ... said: 450-4.2.1" reply, the status= line cut off
    log = realworld / "postfix" / "forums" / "pastebin_T3TtEqcW_gmail_450_4.2.1_host_said.log"
    out = tmp_path / "a.parquet"
    assert main(["parse", str(log), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no delivery attempts found" in err and "1 connection event without a final record written to" in err
    con = pl.read_parquet(tmp_path / "a.connections.parquet")
    assert con.select("mx_host", "smtp_code", "enhanced_code").row(0) == ("aspmx.l.google.com", 450, "4.2.1")


def test_unknown_format_is_exit_2(tmp_path, capsys):
    assert main(["rates", str(SAMPLE / "mail.log.1.gz"), "--format", "qmail"]) == 2
    assert "unknown format 'qmail'" in capsys.readouterr().err
