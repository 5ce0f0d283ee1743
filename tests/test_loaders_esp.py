"""ESP event loaders: SendGrid, Mailgun, Amazon SES, SparkPost, Postmark (deferral_kit.loaders.<esp>).

Real samples come from ../shared/realworld/esp (Anymail's captured webhook payloads with the
fields Anymail asserts, SendGrid's and AWS's documented examples); the hand-written fixtures
in tests/fixtures/esp cover what the samples lack: a Microsoft 452 4.3.1 deferral followed by
a delivery for every ESP, batches, SNS envelopes, Events API pages and damaged lines.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from deferral_kit import schema
from deferral_kit.loaders import InputError, detect, load
from deferral_kit.sources import discover

FIX = Path(__file__).parent / "fixtures" / "esp"
UTC = timezone.utc
R452_O365 = "452 4.3.1 Insufficient system resources [AM6PR03MB1234.eurprd03.prod.outlook.com]"


def _ts(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def _anymail(realworld: Path, esp: str) -> list[dict]:
    path = realworld / "esp" / "anymail_fixtures" / f"{esp}_webhook_payloads.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_payloads(tmp_path: Path, cases: list[dict], name: str) -> Path:
    """The captured payloads as JSON lines (one webhook body per line, as a receiver would log them)."""
    out = tmp_path / f"{name}.jsonl"
    out.write_text("".join(json.dumps(c["payload"]) + "\n" for c in cases))
    return out


def _rows(res) -> pl.DataFrame:
    df = res.attempts.collect()
    schema.validate(df)
    return df


def _one(df: pl.DataFrame, **where) -> dict:
    got = df.filter(*[pl.col(k) == v for k, v in where.items()])
    assert got.height == 1, f"{where}: {got.height} rows"
    return got.row(0, named=True)


# --- conformance: Anymail's captured payloads and the fields Anymail asserts ------------------

_OUTCOME = {"deferred": "deferred", "delivered": "delivered", "bounced": "bounced"}


def _normalised(mta_response: str) -> str:
    """Anymail keeps the ESP's raw text; the canonical response drops ``smtp;`` and joins lines."""
    import re

    text = re.sub(r"^smtp;\s*", "", mta_response.strip())
    return re.sub(r"\s*\n\s*(?:[245]\.\d+\.\d+\s+)?", " ", text)


@pytest.mark.parametrize(
    ("esp", "fmt", "not_attempts"),
    [
        # test name -> why Anymail's delivery-type event is not an attempt row here
        ("sendgrid", "sendgrid", {}),
        ("mailgun", "mailgun", {
            "MailgunWebhookSecurityTestCase.test_verifies_bad_signature": "malformed",  # no timestamp, no recipient
            "MailgunLegacyTestCase.test_invalid_mailbox": "malformed",  # legacy form post without timestamp
            "MailgunLegacyTestCase.test_alt_smtp_code": "malformed",
            "MailgunLegacyTestCase.test_x_tags": "malformed",
        }),
        ("sparkpost", "sparkpost", {}),
        ("postmark", "postmark", {
            "PostmarkDeliveryTestCase.test_subscription_change_bounce": "skipped",  # a suppression change, not a bounce event
        }),
        ("amazon_ses", "ses", {
            "AmazonSESNotificationsTests.test_multiple_bounce_event": "malformed",  # trimmed payload without timestamps
        }),
    ],
)
def test_anymail_payloads_give_the_events_anymail_expects(realworld, tmp_path, esp, fmt, not_attempts):
    cases = _anymail(realworld, esp)
    res = load([_write_payloads(tmp_path, cases, esp)], format=fmt)
    df = _rows(res)
    expected_attempt_lines, unasserted = set(), set()
    for line_no, case in enumerate(cases, start=1):
        exp = case["anymail_expected"]
        rows = df.filter(pl.col("line_no") == line_no)
        if "event.event_type" not in exp and case["test"] not in not_attempts:
            unasserted.add(line_no)  # Anymail's test checks other fields only (tags, metadata)
            continue
        outcome = _OUTCOME.get(exp.get("event.event_type"))
        if outcome is None or case["test"] in not_attempts:
            assert rows.height == 0, f"{case['test']}: {exp.get('event.event_type')} must not be an attempt"
            continue
        expected_attempt_lines.add(line_no)
        assert rows.height >= 1, case["test"]
        row = rows.row(0, named=True)
        assert row["outcome"] == outcome, case["test"]
        assert row["source"] == fmt
        if "event.recipient" in exp:
            assert exp["event.recipient"] in rows["recipient"].to_list(), case["test"]
        mta = exp.get("event.mta_response")
        if isinstance(mta, str) and not mta.startswith("SRC:"):
            # Mailgun gives the code apart from the message; the canonical response puts it in front.
            assert row["response"].endswith(_normalised(mta)) or row["response"] == _normalised(mta), (case["test"], row["response"])
    assert set(df["line_no"].unique()) - unasserted == expected_attempt_lines
    acc = res.accounting
    # one accounting row per event: a batch payload (SparkPost) counts its events
    assert acc.lines_read == sum(len(c["payload"]) if isinstance(c["payload"], list) else 1 for c in cases)
    # the delivery events without a timestamp are malformed (named in the accounting), not dropped
    malformed = [c for c in not_attempts.values() if c == "malformed"]
    assert acc.count("malformed") == len(malformed)
    assert acc.count("attempt") + acc.count("skipped") + acc.count("malformed") == acc.lines_read


def test_anymail_sendgrid_fields(realworld, tmp_path):
    res = load([_write_payloads(tmp_path, _anymail(realworld, "sendgrid"), "sg")])
    df = _rows(res)
    deferred = _one(df, outcome="deferred")
    # SendGrid replaced the receiver's reply with its own summary: kept, but no code is invented.
    assert deferred["response"] == "Email was deferred due to the following reason(s): [IPs were throttled by recipient server]"
    assert deferred["smtp_code"] is None and deferred["enhanced_code"] is None
    assert deferred["remote"] is True  # "throttled by recipient server": the receiver answered
    assert deferred["attempt"] == 1 and deferred["agent"] == "smtp" and deferred["mx_host"] is None
    assert deferred["ts"] == _ts(2016, 4, 21, 1, 9, 50)
    assert deferred["queue_id"] == "u9Gvi3mzT6iC2poAb58_qQ"
    bounce = _one(df, outcome="bounced")
    assert (bounce["smtp_code"], bounce["enhanced_code"], bounce["dsn"], bounce["egress_ip"]) == (550, "5.1.1", "5.1.1", "167.89.17.173")
    compat = _one(df, message_id="<152712433591.85282.8340115595767222398@example.com>")
    assert compat["outcome"] == "delivered" and compat["smtp_code"] == 250 and compat["enhanced_code"] == "2.0.0"
    assert res.accounting.count("skipped", "dropped by SendGrid (never attempted)") == 3
    assert res.accounting.count("skipped", "engagement event: open") == 1


def test_anymail_mailgun_fields(realworld, tmp_path):
    df = _rows(load([_write_payloads(tmp_path, _anymail(realworld, "mailgun"), "mg")]))
    bounced = _one(df, recipient="invalid@example.com")
    # Multi-line message without its code: code put in front, lines joined, repeated 5.1.1 dropped.
    assert bounced["response"] == ("550 5.1.1 The email account that you tried to reach does not exist. "
                                   "Please try double-checking the recipient's email address for typos")
    assert (bounced["smtp_code"], bounced["enhanced_code"], bounced["mx_host"], bounced["remote"]) == (550, "5.1.1", "aspmx.l.example.org", True)
    nomx = _one(df, recipient="undeliverable@nomx.example.com")
    assert (nomx["outcome"], nomx["smtp_code"], nomx["response"], nomx["mx_host"], nomx["remote"], nomx["attempt"]) == \
        ("deferred", 498, "498 No MX for nomx.example.com", None, False, 3)
    grey = _one(df, recipient="undeliverable@mx.example.com")
    assert (grey["response"], grey["mx_host"], grey["remote"], grey["attempt"]) == ("450 Recipient address rejected: Greylisted", "mx.example.com", True, 1)
    delivered = _one(df, outcome="delivered")
    assert (delivered["egress_ip"], delivered["sender"], delivered["size"], delivered["ts"]) == \
        ("333.123.123.200", "test@example.org", 809, _ts(2018, 8, 12, 21, 17, 17, 153125))
    assert delivered["message_id"] == "20180812211713.1.DF5966851B4BAA99@example.org"


def test_anymail_sparkpost_and_postmark_fields(realworld, tmp_path):
    sp = _rows(load([_write_payloads(tmp_path, _anymail(realworld, "sparkpost"), "sp")]))
    delay = _one(sp, outcome="deferred")
    # "[internal]": SparkPost's own text (no MX for the domain), not a receiver reply.
    assert (delay["smtp_code"], delay["enhanced_code"], delay["remote"], delay["attempt"], delay["delay_s"]) == (454, "4.4.4", False, 2, 1200.161)
    assert delay["ts"] == _ts(2016, 6, 2, 0, 2, 28)
    assert _one(sp, outcome="delivered")["recipient"] == "Recipient@example.com"
    pm = _rows(load([_write_payloads(tmp_path, _anymail(realworld, "postmark"), "pm")]))
    bounce = _one(pm, outcome="bounced")
    assert (bounce["response"], bounce["smtp_code"], bounce["enhanced_code"], bounce["ts"]) == \
        ("550 5.1.1 The email account that you tried to reach does not exist.", 550, "5.1.1", _ts(2016, 4, 27, 20, 28, 50, 396393))
    delivered = _one(pm, outcome="delivered")
    assert (delivered["ts"], delivered["instance"], delivered["smtp_code"]) == (_ts(2014, 8, 1, 17, 28, 10, 273539), "23", None)


# --- real documentation examples ---------------------------------------------------------

def test_sendgrid_docs_examples(realworld):
    res = load([realworld / "esp" / "sendgrid"])
    df = _rows(res)
    assert df.height == 4
    single = _one(df, file=str(realworld / "esp" / "sendgrid" / "sendgrid_docs_event_md_deferred_single.json"))
    assert (single["outcome"], single["attempt"], single["smtp_code"], single["response"], single["queue_id"]) == \
        ("deferred", 5, 400, "400 try again later", "14c5d75ce93.dfd.64b469")
    assert single["ts"] == _ts(2017, 12, 15, 0, 59, 29)
    allev = df.filter(pl.col("file").str.ends_with("all_events_example.json")).sort("line_no")
    # attempt "5" on the deferral; the delivery and bounce after it continue the count
    assert allev.select("line_no", "outcome", "attempt", "smtp_code", "enhanced_code", "dsn").rows() == [
        (2, "deferred", 5, 400, None, None),
        (3, "delivered", 6, 250, None, None),
        (4, "bounced", 7, 500, "5.0.0", "5.0.0"),
    ]
    assert res.accounting.count("skipped") == 2


def test_ses_documented_examples_each_loaded_or_skipped(realworld):
    files = sorted((realworld / "esp" / "ses").glob("*.json"))
    assert len(files) == 25
    res = load(files, dedupe=False)
    table = res.accounting.table
    assert table.height == 25 and set(table["lines"]) == {1}
    by_file = dict(zip(table["file"].str.split("/").list.last(), zip(table["category"], table["reason"])))
    assert by_file["sns-examples__09_deliverydelay_record.json"] == ("attempt", "")
    assert by_file["firehose-examples__06_open_record.json"] == ("skipped", "engagement event: Open")
    assert by_file["sns-examples__08_rendering_failure_record.json"] == ("skipped", "not a delivery attempt: Rendering Failure")
    assert by_file["notification-examples__03_complaint_notification_with_a_feedback_report.json"] == ("skipped", "engagement event: Complaint")
    assert sum(c == "attempt" for c, _ in by_file.values()) == 9
    df = _rows(res)
    delays = df.filter(pl.col("outcome") == "deferred")
    assert delays.height == 2 and set(delays["file"].str.split("/").list.last()) == {
        "sns-examples__09_deliverydelay_record.json", "firehose-examples__09_deliverydelay_record.json"}
    d = delays.row(0, named=True)
    assert d["ts"] == _ts(2020, 6, 16, 0, 25, 40, 95000)
    assert d["queued_at"] == _ts(2020, 6, 16, 0, 15, 40, 641000)
    assert (d["recipient"], d["recipient_domain"], d["sender"]) == ("recipient@example.com", "example.com", "sender@example.com")
    assert (d["smtp_code"], d["enhanced_code"], d["dsn"], d["response"]) == (421, "4.4.1", "4.4.1", "421 4.4.1 Unable to connect to remote host")
    # TransientCommunicationFailure: SES could not reach the receiver; no remote reply, no MX named.
    assert (d["agent"], d["remote"], d["mx_host"]) == ("smtp", False, None)
    assert d["message_id"] == "EXAMPLE7c191be45-e9aedb9a-02f9-4d12-a87d-dd0099a07f8a-000000"
    legacy = _one(df, outcome="delivered", message_id="0000014644fe5ef6-9a483358-9170-4cb4-a269-f5dcdf415321-000000")
    assert (legacy["log_host"], legacy["mx_ip"], legacy["smtp_code"], legacy["delay_s"]) == ("a8-70.smtp-out.amazonses.com", "127.0.2.0", 250, 0.546)
    bounce = _one(df, file=str(realworld / "esp" / "ses" / "notification-examples__01_bounce_notification_with_a_dsn.json"))
    assert (bounce["outcome"], bounce["smtp_code"], bounce["enhanced_code"], bounce["response"]) == \
        ("bounced", 550, "5.1.1", "550 5.1.1 <jane@example.com>... User")


def test_ses_sns_and_firehose_copies_are_duplicates(realworld):
    res = load([realworld / "esp" / "ses"])
    # the SNS and Firehose examples are the same events: the second copy of each attempt is a duplicate
    assert res.accounting.count("duplicate") == 3
    assert res.attempts.filter(pl.col("outcome") == "deferred").collect().height == 1


# --- hand-written fixtures: Microsoft 452 4.3.1, retry then delivery ----------------------

def test_sendgrid_microsoft_452_retry_then_delivery():
    res = load([FIX / "sendgrid_retry.json"])
    df = _rows(res).filter(pl.col("recipient") == "ana@contoso.com").sort("ts")
    assert df.select("outcome", "attempt", "smtp_code", "enhanced_code", "remote").rows() == [
        ("deferred", 1, 452, "4.3.1", True),
        ("deferred", 2, None, None, True),
        ("delivered", 3, 250, "2.6.0", True),
    ]
    first = df.row(0, named=True)
    assert first["response"] == "452 4.3.1 Insufficient system resources [AM6PR03MB1234.eurprd03.prod.outlook.com 2026-11-17T10:00:05.000Z 08DBD70830F39917]"
    assert (first["egress_ip"], first["egress_pool"], first["message_key"], first["ts"]) == \
        ("198.51.100.21", "transactional", "sendgrid:Xa1b2C3dE4", _ts(2026, 11, 17, 10, 0, 5))
    blocked = _one(_rows(res), recipient="bo@hotmail.com")
    assert (blocked["outcome"], blocked["smtp_code"], blocked["enhanced_code"], blocked["attempt"]) == ("bounced", 550, "5.7.1", 1)


def test_sendgrid_batches_per_line_with_damage():
    res = load([FIX / "sendgrid_batches.jsonl"])
    df = _rows(res)
    assert df.select("line_no", "outcome", "attempt").sort("attempt").rows() == [(1, "deferred", 1), (1, "delivered", 2)]
    acc = res.accounting
    assert acc.count("attempt") == 2
    assert acc.count("skipped", "blank line") == 1
    assert acc.count("skipped", "empty batch") == 1
    assert acc.count("skipped", "dropped by SendGrid (never attempted)") == 1
    assert acc.count("malformed", "truncated JSON") == 1
    assert acc.count("duplicate") == 1
    bad = acc.examples.filter(pl.col("category") == "malformed").row(0, named=True)
    assert bad["line_no"] == 4 and bad["text"].startswith('{"email": "eve@example.org"')
    assert acc.lines_read == 7  # 6 lines, the first a batch of two


def test_mailgun_microsoft_452_retry_then_delivery():
    res = load([FIX / "mailgun_retry.jsonl"])
    df = _rows(res)
    ana = df.filter(pl.col("recipient") == "ana@contoso.com").sort("ts")
    assert ana.select("outcome", "attempt", "smtp_code", "enhanced_code", "dsn").rows() == [
        ("deferred", 1, 452, "4.3.1", "4.3.1"), ("delivered", 2, 250, "2.6.0", None)]
    first = ana.row(0, named=True)
    # the code and enhanced code are given apart from the message: rebuilt in front of it
    assert first["response"] == R452_O365
    # "Contoso-com.mail.protection.outlook.com." -> lower case, no trailing dot
    assert (first["mx_host"], first["remote"], first["egress_ip"], first["size"]) == ("contoso-com.mail.protection.outlook.com", True, "198.51.100.31", 10240)
    assert first["ts"] == _ts(2026, 11, 17, 10, 0, 5, 250000)
    old = _one(df, recipient="slow@example.org")
    assert (old["outcome"], old["agent"], old["remote"], old["attempt"]) == ("expired", "internal", False, 8)
    acc = res.accounting
    assert acc.count("skipped", "not attempted: suppressed by Mailgun (suppress-bounce)") == 1
    assert acc.count("malformed", "truncated JSON") == 1


def test_mailgun_events_api_page():
    res = load([FIX / "mailgun_events_page.json"])
    row = _one(_rows(res), outcome="deferred")
    assert row["response"] == "452 4.3.1 Insufficient system resources (TSTE) [outlook.com]"
    assert (row["mx_host"], row["line_no"], row["attempt"]) == ("outlook-com.olc.protection.outlook.com", 1, 1)
    assert res.accounting.count("skipped", "accepted by Mailgun, not a delivery attempt: accepted") == 1


def test_ses_sns_envelopes_delay_per_recipient_then_delivery():
    res = load([FIX / "ses_sns.jsonl"])
    df = _rows(res)
    ana = df.filter(pl.col("recipient") == "ana@contoso.com").sort("ts")
    assert ana.select("outcome", "attempt", "smtp_code", "enhanced_code", "remote", "agent").rows() == [
        ("deferred", 1, 452, "4.3.1", True, "smtp"), ("delivered", 2, 250, "2.6.0", True, "smtp")]
    delay = ana.row(0, named=True)
    assert delay["response"] == R452_O365
    assert (delay["log_host"], delay["egress_ip"], delay["mx_host"], delay["delay_s"]) == \
        ("b224-12.smtp-out.eu-west-1.amazonses.com", "198.51.100.41", None, 300.123)
    assert df.filter(pl.col("outcome") == "deferred", pl.col("agent") == "smtp").height == 2  # one row per delayed recipient
    internal = _one(df, recipient="cy@example.org")
    assert (internal["agent"], internal["remote"], internal["outcome"], internal["smtp_code"]) == ("internal", False, "deferred", None)
    assert _one(df, outcome="delivered", recipient="bo@contoso.com")["mx_ip"] == "52.101.68.1"
    assert res.accounting.count("skipped", "SNS SubscriptionConfirmation (not an event)") == 1


def test_ses_firehose_copy_of_an_sns_event_is_a_duplicate():
    res = load([FIX / "ses_sns.jsonl", FIX / "ses_firehose.jsonl"])
    assert res.accounting.count("duplicate") == 1
    assert res.accounting.count("skipped", "engagement event: Open") == 1
    assert _rows(res).height == 5


def test_sparkpost_microsoft_452_retry_then_delivery():
    res = load([FIX / "sparkpost_batch.json"])
    df = _rows(res)
    ana = df.filter(pl.col("recipient") == "Ana@Contoso.com").sort("ts")
    assert ana.select("outcome", "attempt", "smtp_code", "enhanced_code", "remote", "mx_ip").rows() == [
        ("deferred", 1, 452, "4.3.1", True, "52.101.68.2"), ("delivered", 2, None, None, True, "52.101.68.2")]
    delay = ana.row(0, named=True)
    assert (delay["response"], delay["recipient_domain"], delay["egress_ip"], delay["egress_pool"], delay["sender"]) == \
        (R452_O365, "contoso.com", "198.51.100.51", "shared-eu", "bounces@sp.example.net")
    assert (delay["queued_at"], delay["delay_s"], delay["size"]) == (_ts(2026, 11, 17, 10, 0, 0), 5.0, 10240)
    oob = _one(df, outcome="bounced")
    # a DSN after acceptance: not a new try against the MX
    assert (oob["agent"], oob["remote"], oob["smtp_code"]) == ("out_of_band", False, 550)
    assert res.accounting.count("skipped", "engagement event: open") == 1


def test_postmark_microsoft_452_soft_bounce_then_delivery():
    res = load([FIX / "postmark_events.jsonl"])
    df = _rows(res)
    ana = df.filter(pl.col("recipient") == "ana@contoso.com").sort("ts")
    assert ana.select("outcome", "attempt", "smtp_code", "enhanced_code", "remote", "egress_pool").rows() == [
        ("deferred", 1, 452, "4.3.1", True, "outbound"), ("delivered", 2, 250, "2.6.0", True, "outbound")]
    assert ana.row(0, named=True)["response"] == R452_O365
    # 7 fractional digits and a -05:00 offset
    assert ana["ts"].to_list() == [_ts(2026, 11, 17, 10, 0, 5, 123456), _ts(2026, 11, 17, 10, 20, 5, 765432)]
    dns = _one(df, recipient="x@nomx.example.org")
    assert (dns["outcome"], dns["remote"], dns["smtp_code"], dns["egress_pool"]) == ("deferred", False, None, "broadcast")
    page = load([FIX / "postmark_bounces_page.json"])
    hard = _one(_rows(page), outcome="bounced")
    assert (hard["recipient"], hard["smtp_code"], hard["enhanced_code"]) == ("nobody@contoso.com", 550, "5.1.10")
    assert page.accounting.count("skipped", "not a delivery failure: bounce type AutoResponder") == 1


# --- detection --------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "fmt"), [
    ("sendgrid_retry.json", "sendgrid"), ("sendgrid_batches.jsonl", "sendgrid"),
    ("mailgun_retry.jsonl", "mailgun"), ("mailgun_events_page.json", "mailgun"),
    ("ses_sns.jsonl", "ses"), ("ses_firehose.jsonl", "ses"),
    ("sparkpost_batch.json", "sparkpost"), ("postmark_events.jsonl", "postmark"), ("postmark_bounces_page.json", "postmark"),
])
def test_detection_of_own_fixtures(name, fmt):
    assert detect(discover([FIX / name])[0]) == fmt


@pytest.mark.parametrize("esp", ["mailjet", "mandrill", "brevo", "postal", "resend", "mailersend", "mailtrap", "unisender_go"])
def test_other_esps_are_not_claimed(realworld, tmp_path, esp):
    path = _write_payloads(tmp_path, _anymail(realworld, esp), esp)
    with pytest.raises(InputError, match=f"{esp}.jsonl: format not recognised"):
        detect(discover([path])[0])


def test_anymail_fixture_wrappers_are_not_claimed(realworld):
    # the fixture files wrap each payload with test metadata: not an ESP export
    path = realworld / "esp" / "anymail_fixtures" / "sendgrid_webhook_payloads.jsonl"
    with pytest.raises(InputError, match="format not recognised"):
        detect(discover([path])[0])


def test_mixed_formats_in_one_call():
    res = load([FIX / "sendgrid_retry.json", FIX / "mailgun_retry.jsonl", FIX / "ses_sns.jsonl", FIX / "sparkpost_batch.json", FIX / "postmark_events.jsonl"])
    df = _rows(res)
    deferred_452 = df.filter(pl.col("smtp_code") == 452, pl.col("enhanced_code") == "4.3.1")
    assert sorted(deferred_452["source"].to_list()) == ["mailgun", "postmark", "sendgrid", "ses", "ses", "sparkpost"]
    assert set(res.accounting.table["format"]) == {"sendgrid", "mailgun", "ses", "sparkpost", "postmark"}


def test_structure_the_loader_does_not_expect_is_reported_not_raised(tmp_path):
    bad = tmp_path / "odd.jsonl"
    # "response" as an object: cannot be decoded as SendGrid's string field
    bad.write_text('{"email": "a@b.c", "timestamp": 1, "event": "delivered", "sg_event_id": "x", "response": {"code": 250}}\n')
    res = load([bad], format="sendgrid")
    assert res.accounting.count("malformed", "unexpected JSON structure") == 1
    assert any("JSON structure not understood" in p for p in res.accounting.problems)
    assert _rows(res).height == 0


# --- the generator's SendGrid writer ------------------------------------------------------

def test_generated_sendgrid_events_match_the_worlds_truth(tmp_path):
    from deferral_kit.sample import WorldConfig, generate, write

    world = generate(WorldConfig(days=1, seed=5, messages_per_day=600))
    res = load(write(world, "sendgrid", tmp_path))
    got = _rows(res)
    truth = world.truth.filter(pl.col("agent") == "smtp")
    key = ["recipient_domain", "outcome"]
    assert got.group_by(key).len().sort(key).rows() == truth.group_by(key).len().sort(key).rows()
    # SendGrid timestamps are whole seconds; SendGrid counts only its own tries (the truth also
    # numbers Postfix-style local suspensions, which the writer does not render).
    truth_rows = truth.sort("ts").select(
        pl.col("ts").dt.truncate("1s"), "recipient", "smtp_code", "remote",
        pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over("message_key", "recipient").alias("attempt"))
    paired = got.join(truth_rows, on=["ts", "recipient", "attempt"], how="inner", suffix="_truth")
    assert paired.height == truth.height
    assert paired.filter(pl.col("smtp_code").ne_missing(pl.col("smtp_code_truth"))).height == 0
    assert paired.filter(pl.col("remote").ne_missing(pl.col("remote_truth"))).height == 0
    assert res.accounting.count("skipped", "processed (accepted by SendGrid, not a delivery attempt)") == world.messages.height


def test_large_pretty_printed_batch_is_detected_from_its_head(tmp_path):
    # 64 KiB of head cut a pretty-printed array mid-way: detection reads its first element
    events = [{"email": f"u{i}@outlook.com", "timestamp": 1794909600 + i, "event": "deferred", "attempt": "1",
               "response": "452 4.3.1 Insufficient system resources (TSTE) [outlook.com]",
               "sg_event_id": f"e{i}", "sg_message_id": f"m{i}.filter0001.1.AB.0"} for i in range(2000)]
    path = tmp_path / "batch.json"
    path.write_text(json.dumps(events, indent=2))
    assert path.stat().st_size > 65536
    assert detect(discover([path])[0]) == "sendgrid"
    df = _rows(load([path]))
    assert df.height == 2000 and df["line_no"].to_list() == list(range(1, 2001))
    assert df.filter(pl.col("smtp_code") == 452, pl.col("enhanced_code") == "4.3.1", pl.col("attempt") == 1).height == 2000


def test_ses_firehose_objects_concatenated_without_newlines(tmp_path):
    # Kinesis Firehose writes records back to back unless a delimiter is configured
    records = [json.loads(line) for line in (FIX / "ses_firehose.jsonl").read_text().splitlines()]
    path = tmp_path / "firehose-2026-11-17-10-05"
    path.write_text("".join(json.dumps(r) for r in records) + "\n")
    res = load([path])
    df = _rows(res)
    assert df.select("line_no", "recipient", "outcome", "smtp_code").sort("recipient").rows() == [
        (1, "ana@contoso.com", "deferred", 452), (1, "bo@contoso.com", "deferred", 452)]
    assert res.accounting.count("skipped", "engagement event: Open") == 1
    assert res.accounting.examples.filter(pl.col("category") == "skipped")["line_no"].to_list() == [2]
