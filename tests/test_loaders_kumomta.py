"""KumoMTA JSON log loader: real docs records, a hand-written Microsoft 452 retry, compressed segments."""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import zstandard

from deferral_kit import schema
from deferral_kit.loaders import detect, kumomta, load
from deferral_kit.sources import discover

FIX = Path(__file__).parent / "fixtures" / "kumomta"
UTC = timezone.utc


def _rows(res) -> list[dict]:
    df = res.attempts.collect()
    schema.validate(df)
    return df.to_dicts()


def test_reception_records_are_skipped_with_reason(realworld):
    res = load(realworld / "kumomta" / "docs_reception_records.jsonl")
    assert res.attempts.collect().height == 0
    assert res.accounting.count("skipped", "Reception (inbound message)") == 4
    assert res.accounting.lines_read == 4


def test_partial_docs_records_internal_failure_is_local(realworld):
    res = load(realworld / "kumomta" / "docs_partial_delayed_transientfailure_records.jsonl")
    rows = _rows(res)
    assert res.accounting.count("skipped", "Delayed (local scheduling, not a try)") == 2
    assert len(rows) == 1
    r = rows[0]
    assert (r["agent"], r["remote"], r["outcome"], r["smtp_code"]) == ("internal", False, "deferred", 400)
    assert r["response"].startswith("400 KumoMTA internal: error in deliver_message")
    assert r["mx_host"] is None and r["enhanced_code"] is None


def test_docs_reference_record_tolerates_comments(realworld, tmp_path):
    # The docs example is JSONC (comments: tolerated by the loader) with one stray "}" after
    # tls_peer_subject_name, a typo in the docs that no JSON reader accepts: fixed here.
    text = (realworld / "kumomta" / "docs_reference_log_record_md_example.jsonc").read_text()
    assert 'mydomain"]},' in text
    f = tmp_path / "record.jsonc"
    f.write_text(text.replace('mydomain"]},', 'mydomain"],'))
    assert detect(discover([f])[0]) == "kumomta"
    (r,) = _rows(load(f))
    assert r["ts"] == datetime(2025, 9, 12, 11, 8, 1, 440526, tzinfo=UTC)
    assert r["queued_at"] == r["ts"]
    assert (r["outcome"], r["agent"], r["remote"]) == ("delivered", "smtp", True)
    assert r["response"] == "250 2.0.0 OK ids=8a5475ccbbc611eda12250ebf67f93bd"
    assert (r["smtp_code"], r["enhanced_code"], r["smtp_stage"]) == (250, "2.0.0", "end of DATA")
    assert (r["mx_host"], r["mx_ip"]) == ("gmail-smtp-in.l.google.com", "142.251.2.27")
    assert (r["egress_ip"], r["egress_pool"], r["instance"]) == ("10.0.0.1", "pool0", "source2")
    assert r["log_host"] == "557f3ad4-2c8c-11ee-976e-782d7e12e173"
    assert (r["queue_id"], r["sender"], r["recipient"], r["recipient_domain"]) == (
        "1d98076abbbc11ed940250ebf67f93bd", "user@sender.example.com", "user@recipient.example.com", "recipient.example.com")
    assert r["size"] == 1047 and r["attempt"] == 1 and r["source"] == "kumomta"


def test_tsa_yahoo_transient_failure(realworld, tmp_path):
    src = realworld / "kumomta" / "tsa_torture_js_transientfailure_yahoo_TSS04.jsonc"
    # As saved, the record is JavaScript ("timestamp": now): counted as malformed, not guessed.
    res = load(src)
    assert res.accounting.count("malformed", "invalid JSON") == 1
    assert res.attempts.collect().height == 0
    f = tmp_path / "tsa.jsonc"
    f.write_text(src.read_text().replace(": now,", ": 1757675281,"))
    (r,) = _rows(load(f))
    assert r["response"] == "421 4.7.0 [TSS04] Messages from a.b.c.d temporarily deferred due to user complaints"
    assert (r["outcome"], r["remote"], r["recipient_domain"], r["smtp_stage"]) == ("deferred", True, "yahoo.com", "end of DATA")
    assert r["ts"] == datetime(2025, 9, 12, 11, 8, 1, tzinfo=UTC)


def test_microsoft_452_retry_then_delivery_and_accounting():
    res = load(FIX / "ms_452_retry_then_delivery.jsonl")
    rows = _rows(res)
    acc = res.accounting
    assert acc.lines_read == 10  # 9 lines, one holding a batch array of 2 records
    assert acc.count("attempt") == 6
    assert acc.count("skipped", "Reception (inbound message)") == 1
    assert acc.count("skipped", "Delayed (local scheduling, not a try)") == 1
    assert acc.count("skipped", "blank line") == 1
    assert acc.count("malformed", "invalid JSON") == 1
    assert acc.examples.filter(pl.col("category") == "malformed")["line_no"].to_list() == [9]

    jane = [r for r in rows if r["recipient"] == "jane@contoso.com"]
    assert [r["outcome"] for r in jane] == ["deferred", "delivered"]
    assert [r["attempt"] for r in jane] == [1, 2]
    d = jane[0]
    assert d["response"] == "452 4.3.1 Insufficient system resources (TSTE) [DB5PEPF00014B8F.eurprd04.prod.outlook.com 2026-11-02T08:20:03.100Z 08DCF2A1B2C3D4E5]"
    assert (d["smtp_code"], d["enhanced_code"], d["dsn"], d["smtp_stage"]) == (452, "4.3.1", "4.3.1", "RCPT TO")
    assert (d["mx_host"], d["mx_ip"], d["egress_ip"], d["egress_pool"]) == ("contoso-com.mail.protection.outlook.com", "52.101.68.8", "198.51.100.21", "pool-a")
    assert (d["agent"], d["remote"], d["message_id"], d["delay_s"]) == ("smtp", True, "m-0001@shop.example", 3.25)
    assert jane[1]["ts"] == datetime(2026, 11, 2, 9, 15, 3, 500000, tzinfo=UTC)

    by_rcpt = {r["recipient"]: r for r in rows if r["recipient"] != "jane@contoso.com"}
    # A multi-recipient Bounce inside a batch array → one row per recipient.
    assert {k for k, r in by_rcpt.items() if r["outcome"] == "bounced"} == {"nobody@outlook.com", "gone@outlook.com"}
    assert by_rcpt["nobody@outlook.com"]["sender"] == ""
    assert by_rcpt["nobody@outlook.com"]["mx_host"] == "outlook-com.olc.protection.outlook.com"
    # Connection failure: a try against the MX that no server answered.
    c = by_rcpt["bob@gmail.com"]
    assert (c["agent"], c["remote"], c["outcome"], c["mx_host"]) == ("smtp", False, "deferred", None)
    assert (by_rcpt["x@yahoo.com"]["agent"], by_rcpt["x@yahoo.com"]["remote"]) == ("internal", False)
    e = by_rcpt["old@hotmail.com"]
    assert (e["outcome"], e["agent"], e["remote"], e["enhanced_code"], e["delay_s"]) == ("expired", "internal", False, "5.4.7", 259200.0)


def test_zstd_segment_and_duplicates_across_copies(tmp_path):
    raw = (FIX / "ms_452_retry_then_delivery.jsonl").read_bytes()
    seg = tmp_path / "20261102-090000"
    seg.write_bytes(zstandard.ZstdCompressor().compress(raw))
    shutil.copy(FIX / "ms_452_retry_then_delivery.jsonl", tmp_path / "copy.jsonl")
    res = load([seg, tmp_path / "copy.jsonl"])
    assert res.attempts.collect().height == 7
    assert res.accounting.count("duplicate") == 8  # every record of the second copy but the blank and bad lines
    assert set(res.accounting.table["format"]) == {"kumomta"}


def test_sniff_is_specific():
    assert kumomta.sniff('{"type":"TransientFailure","id":"x","response":{"code":452}}')
    # SparkPost/Postmark-style events use other keys or lower-case types.
    assert not kumomta.sniff('{"type":"delivery","raw_rcpt_to":"a@b","num_retries":"0"}')
    assert not kumomta.sniff('{"RecordType":"Delivery","MessageID":"x"}')


def test_small_blocks_number_attempts_across_blocks(tmp_path, monkeypatch):
    # Each block is decoded on its own; the attempt numbers and the duplicate check run over
    # all of them and must not depend on where the blocks are cut.
    from polars.testing import assert_frame_equal

    src = Path(__file__).parent / "fixtures" / "kumomta" / "ms_452_retry_then_delivery.jsonl"
    shutil.copy(src, tmp_path / "a.jsonl")
    shutil.copy(src, tmp_path / "b.jsonl")
    whole = load(tmp_path, format="kumomta")
    monkeypatch.setattr(kumomta, "_BATCH_BYTES", 200)
    small = load(tmp_path, format="kumomta")
    assert_frame_equal(whole.attempts.collect(), small.attempts.collect())
    assert_frame_equal(whole.accounting.table, small.accounting.table)
    assert_frame_equal(whole.accounting.examples, small.accounting.examples)
    att = small.attempts.collect()
    assert att.height > 1 and att["attempt"].max() > 1
    assert small.accounting.count("duplicate") > 0
