"""Exchange message tracking and Microsoft 365 message trace loaders."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from deferral_kit import schema
from deferral_kit.loaders import detect, exchange, load, m365_trace
from deferral_kit.sources import InputError, discover

FIX = Path(__file__).parent / "fixtures" / "exchange"
UTC = timezone.utc


def _rows(res) -> list[dict]:
    df = res.attempts.collect()
    schema.validate(df)
    return df.to_dicts()


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("beats_filestream_test_exchange2010_bom.log", "exchange"),
        ("elastic_integrations_messagetracking_test.log", "exchange"),
        ("kinesistap_test_exchange2013_messagetracking.log", "exchange"),
        ("pastebin_KDHJj9ue_smtpsend_protocol_log_excerpt.csv", "exchange"),
        ("elastic_integrations_o365_messagetrace_test.jsonl", "m365_trace"),
    ],
)
def test_detection_of_real_files(realworld, name, fmt):
    assert detect(discover([realworld / "exchange" / name])[0]) == fmt


def test_exchange_2010_bom_and_2013_headers_only_skipped_events(realworld):
    res = load([realworld / "exchange" / "beats_filestream_test_exchange2010_bom.log", realworld / "exchange" / "kinesistap_test_exchange2013_messagetracking.log"])
    assert res.attempts.collect().height == 0
    acc = res.accounting
    assert acc.count("context", "#header") == 10
    assert acc.count("skipped", "NOTIFYMAPI event (not a delivery try)") == 2
    assert acc.count("skipped", "AGENTINFO event (not a delivery try)") == 1
    assert acc.count("skipped", "HAREDIRECT event (not a delivery try)") == 1
    assert acc.lines_read == 14


def test_exchange_headerless_2016_rows_send_and_sendexternal(realworld):
    res = load(realworld / "exchange" / "elastic_integrations_messagetracking_test.log")
    rows = _rows(res)
    assert res.accounting.count("skipped", "RECEIVE event (not a delivery try)") == 2
    assert res.accounting.count("skipped", "HAREDIRECTFAIL event (not a delivery try)") == 1
    send, ext = rows
    assert (send["outcome"], send["agent"], send["remote"], send["mx_host"], send["mx_ip"]) == ("delivered", "smtp", True, "exchange.example.com", "192.168.0.2")
    assert send["dsn"] == "2.1.5" and send["smtp_code"] == 250
    assert ext["ts"] == datetime(2025, 1, 14, 9, 29, 5, 327000, tzinfo=UTC)
    assert ext["mx_host"] == "global-mail-onmicrosoft-com.mail.protection.outlook.com"
    assert ext["response"].startswith("250 2.6.0 <1736846922.907742.2942@foo.bar.local> [InternalId=5450313518243")
    assert ext["response"].endswith("Queued mail for delivery")
    assert (ext["enhanced_code"], ext["smtp_stage"], ext["sender"], ext["recipient"]) == ("2.6.0", "end of DATA", "", "email@email.com")
    assert ext["egress_pool"] == "Outbound to Office 365 - cb1ce4e7-cbb6-46e8-8a4c-e1f2efbdd202"
    assert (ext["queue_id"], ext["message_id"], ext["size"]) == ("8774618205228", "1736846922.907742.2942@foo.bar.local", 136349)
    assert ext["queued_at"] == datetime(2025, 1, 14, 9, 28, 50, 814000, tzinfo=UTC)
    assert ext["delay_s"] == pytest.approx(14.513)


def test_exchange_smtp_protocol_log_is_refused_clearly(realworld):
    f = realworld / "exchange" / "pastebin_KDHJj9ue_smtpsend_protocol_log_excerpt.csv"
    with pytest.raises(InputError, match=r"pastebin_KDHJj9ue.*not supported: Exchange SMTP protocol log"):
        load(f)


def test_exchange_microsoft_452_defer_then_send():
    res = load(FIX / "MSGTRK2026110209-1.LOG")
    rows = _rows(res)
    acc = res.accounting
    assert acc.count("attempt") == 7 and acc.count("context", "#header") == 5
    assert acc.count("malformed", "truncated row (fields missing)") == 1
    assert acc.lines_read == 14
    jane = [r for r in rows if r["recipient"] == "jane@contoso.com"]
    assert [(r["outcome"], r["attempt"]) for r in jane] == [("deferred", 1), ("delivered", 2)]
    d = jane[0]
    assert d["response"] == "452 4.3.1 Insufficient system resources (TSTE) [DB5PEPF00014B8F.eurprd04.prod.outlook.com 2026-11-02T09:15:03.100Z 08DCF2A1B2C3D4E5]."
    assert (d["smtp_code"], d["enhanced_code"], d["dsn"], d["remote"], d["agent"]) == (452, "4.3.1", "4.4.0", True, "smtp")
    assert (d["mx_host"], d["mx_ip"], d["egress_ip"], d["egress_pool"]) == ("contoso-com.mail.protection.outlook.com", "52.101.68.8", "203.0.113.10", "Internet Send Connector")
    assert d["line_no"] == 7
    # The same DEFER row names two recipients: one row each.
    assert [r["recipient"] for r in rows if r["line_no"] == 7] == ["jane@contoso.com", "raj@contoso.com"]
    by = {r["recipient"]: r for r in rows if r["line_no"] > 8}
    g = by["amy@gmail.com"]  # queue last-error format {LED=...};{FQDN=...};{IP=...}
    assert (g["response"], g["enhanced_code"], g["mx_host"], g["remote"]) == (
        "421 4.7.28 Our system has detected an unusual rate of unsolicited mail originating from your IP address.", "4.7.28", "gmail-smtp-in.l.google.com", True)
    dns = by["lee@nxdomain.example"]
    assert (dns["agent"], dns["remote"], dns["mx_host"], dns["outcome"]) == ("dns", False, None, "deferred")
    assert (by["nobody@outlook.com"]["response"], by["full@outlook.com"]["response"]) == (
        "550 5.5.0 Requested action not taken: mailbox unavailable (S2017062302)", "552 5.2.2 Mailbox full")
    assert by["nobody@outlook.com"]["sender"] == ""
    exp = by["late@hotmail.com"]
    assert (exp["outcome"], exp["agent"], exp["remote"], exp["enhanced_code"]) == ("expired", "queue", False, "4.4.7")
    loc = by["ceo@fabrikam.example"]
    assert (loc["outcome"], loc["agent"], loc["remote"], loc["mx_host"], loc["delay_s"]) == ("delivered", "local", False, None, 1.0)


def test_exchange_sniff_does_not_claim_trace_or_csv():
    assert not exchange.sniff('"Received","SenderAddress","RecipientAddress","Status"\n')
    assert not exchange.sniff("type,timeLogged,timeQueued,orig,rcpt\n")


def test_m365_trace_json_row(realworld):
    (r,) = _rows(load(realworld / "exchange" / "elastic_integrations_o365_messagetrace_test.jsonl"))
    assert r["ts"] == datetime(2022, 9, 5, 18, 10, 13, 490765, tzinfo=UTC)  # no zone → UTC
    assert (r["source"], r["outcome"], r["agent"], r["attempt"]) == ("m365_trace", "delivered", "smtp", 1)
    assert (r["sender"], r["recipient"], r["recipient_domain"]) == ("azure-noreply@microsoft.com", "linus@wildsecurity.onmicrosoft.com", "wildsecurity.onmicrosoft.com")
    assert (r["message_id"], r["queue_id"], r["mx_ip"], r["size"]) == (
        "a210cf91-4f2e-484c-8ada-3b27064ee5e3@az.uksouth.production.microsoft.com", "cf7a249a-5edd-4350-130a-08da8f69e0f6", "216.160.83.56", 87891)
    assert r["response"] is None and r["smtp_code"] is None and r["remote"] is None


def test_m365_get_messagetrace_csv_pending_is_deferred():
    res = load(FIX / "trace_getmessagetrace.csv")
    rows = _rows(res)
    assert res.accounting.count("skipped", "status FilteredAsSpam (not a delivery outcome)") == 1
    assert [(r["recipient"], r["outcome"]) for r in rows] == [("jane@contoso.com", "deferred"), ("raj@contoso.com", "delivered"), ("nobody@outlook.com", "bounced")]
    assert rows[0]["ts"] == datetime(2026, 11, 2, 9, 15, 3, tzinfo=UTC)  # Export-Csv "11/2/2026 9:15:03 AM"
    assert rows[0]["mx_ip"] is None and rows[1]["mx_ip"] == "52.101.73.17"
    assert rows[0]["log_host"] == "fabrikam.onmicrosoft.com"


def test_m365_enhanced_summary_per_recipient_status():
    res = load(FIX / "trace_enhanced_summary.csv")
    rows = _rows(res)
    assert res.accounting.count("skipped", "status expand (not a delivery outcome)") == 1
    assert [(r["recipient"], r["outcome"], r["agent"]) for r in rows] == [
        ("jane@contoso.com", "deferred", "smtp"), ("raj@contoso.com", "delivered", "smtp"), ("ceo@fabrikam.example", "delivered", "local")]
    assert rows[0]["egress_pool"] == "Outbound to Internet" and rows[0]["queue_id"] == "0b7099ea-cb95-4a4d-8f5e-08dcf2a1b2c3"


def test_m365_pretty_json_array(tmp_path):
    f = tmp_path / "trace.json"
    f.write_text('[\n  {\n    "Received": "2026-11-02T09:15:03Z",\n    "SenderAddress": "a@fabrikam.example",\n    "RecipientAddress": "jane@contoso.com",\n'
                 '    "Status": "Pending",\n    "MessageTraceId": "t-1",\n    "Size": 10\n  },\n  {\n    "Received": "2026-11-02T09:20:03Z",\n'
                 '    "SenderAddress": "a@fabrikam.example",\n    "RecipientAddress": "jane@contoso.com",\n    "Status": "Delivered",\n    "MessageTraceId": "t-1",\n    "Size": 10\n  }\n]\n')
    assert detect(discover([f])[0]) == "m365_trace"
    rows = _rows(load(f))
    assert [(r["outcome"], r["attempt"], r["message_key"]) for r in rows] == [("deferred", 1, "m365:t-1"), ("delivered", 2, "m365:t-1")]


def test_m365_sniff():
    assert m365_trace.sniff('"Received","SenderAddress","RecipientAddress","Subject","Status"\n')
    assert m365_trace.sniff("origin_timestamp,sender_address,Recipient_status,message_subject\n")
    assert not m365_trace.sniff('{"event":"deferred","email":"a@b"}')


def test_exchange_same_file_twice_counts_once(tmp_path):
    copy = tmp_path / "MSGTRK2026110209-2.LOG"
    copy.write_bytes((FIX / "MSGTRK2026110209-1.LOG").read_bytes())
    once = load(FIX / "MSGTRK2026110209-1.LOG")
    twice = load([FIX / "MSGTRK2026110209-1.LOG", copy])
    acc = twice.accounting
    # every complete row of the copy; its truncated row stays malformed, its header lines context
    assert acc.count("duplicate", "identical row already read") == 8
    assert (acc.count("attempt"), acc.count("malformed"), acc.count("context", "#header")) == (7, 2, 10)
    # (which of the two copies is "earlier" is the rotation order of the paths: only the file differs)
    assert twice.attempts.collect().drop("file").sort("line_no", "recipient").equals(once.attempts.collect().drop("file").sort("line_no", "recipient"))
