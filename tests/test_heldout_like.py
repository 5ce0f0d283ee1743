"""Held-out-like fixtures: faithful stand-ins for real logs kept aside for evaluation.

Each fixture under ``tests/fixtures/heldout_like/`` reproduces the shape of a real sample
named in ``shared/realworld/PROVENANCE.md`` (synthetic hosts and addresses).  The tests run
the whole chain an analyst uses: ``loaders.load(format="auto")`` → ``providers.with_provider``
→ ``classify.with_classes`` → ``metrics.rates_table``, and assert the fields the analysis
depends on with exact values.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from deferral_kit import metrics
from deferral_kit.classify import with_classes
from deferral_kit.loaders import load
from deferral_kit.providers import with_provider

FIX = Path(__file__).parent / "fixtures" / "heldout_like"
PF = FIX / "postfix"

COLS = ("agent", "recipient_domain", "mx_host", "smtp_code", "enhanced_code", "smtp_stage", "outcome", "remote",
        "attempt", "provider", "response_class", "side")


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def run(path: Path, **kw):
    """Load with format detection and enrich as an analyst would; returns (attempts, connections, load)."""
    kw.setdefault("year", 2025)
    result = load(path, format="auto", **kw)
    attempts = with_classes(with_provider(result.attempts)).collect()
    return attempts, result.connections.collect(), result


def rows(attempts: pl.DataFrame, cols=COLS) -> list[tuple]:
    return attempts.select(cols).rows()


# --- Microsoft 365 "451 4.7.500 Server busy" (lightmeter issue 319) ---------------------------------

def test_o365_server_busy_per_mx_line_is_a_connection_and_retry_counts_up():
    a, c, res = run(PF / "o365_server_busy.log")
    assert a["source"].unique().to_list() == ["postfix"]
    assert rows(a) == [
        ("smtp", "contoso.de", "contoso-de.mail.protection.outlook.com", 451, "4.7.500", "end of DATA", "deferred", True, 1,
         "microsoft_365", "rate_limit", "receiver"),
        ("smtp", "contoso.de", "contoso-de.mail.protection.outlook.com", 250, "2.6.0", "end of DATA", "delivered", True, 2,
         "microsoft_365", "delivered", "receiver"),
    ]
    assert a["ts"].to_list() == [utc(2025, 3, 14, 9, 12, 44), utc(2025, 3, 14, 9, 19, 24)]
    assert a["rule_id"][0] == "microsoft.server_busy_4_7_500"
    assert a["sender"].to_list() == ["news@shop.example.net"] * 2
    assert a["response"][0].startswith("451 4.7.500 Server busy. Please try again later from [198.51.100.23]. (S77719) [FR3DEU02FT014")
    assert a["response"][0].endswith("prod.protection.outlook.com]")
    # the non-final "host ... said:" line against the first MX is a connection event, not an attempt
    assert c.select("event", "mx_host", "mx_ip", "smtp_code", "enhanced_code", "smtp_stage").rows() == [
        ("said", "contoso-de.mail.protection.outlook.com", "104.47.7.10", 451, "4.7.500", "end of DATA")]
    assert res.accounting.count("attempt") == 2 and res.accounting.count("connection") == 1
    assert res.accounting.lines_read == 7


def test_server_busy_is_not_counted_as_452_capacity():
    a, _, res = run(PF / "o365_server_busy.log")
    table = metrics.rates_table(res.attempts, by=["provider"]).collect()
    assert table.select("provider", "attempts", "count", "non_mx_rows").rows() == [("microsoft_365", 2, 0, 0)]


# --- Outlook.com IP reputation 4.7.651 (Mailu 3013) -----------------------------------------------

def test_outlook_ip_reputation_4_7_651_with_trailing_frontend_block_and_upper_case_host():
    a, c, _ = run(PF / "outlook_ip_reputation.log")
    assert rows(a) == [
        ("smtp", "hotmail.com", "hotmail-com.olc.protection.outlook.com", 451, "4.7.651", "RCPT TO", "deferred", True, 1,
         "microsoft_consumer", "reputation", "receiver"),
        ("smtp", "outlook.com", "outlook-com.olc.protection.outlook.com", 451, "4.7.651", "MAIL FROM", "deferred", True, 1,
         "microsoft_consumer", "reputation", "receiver"),
    ]
    assert a["ts"].to_list() == [utc(2025, 10, 28, 12, 19, 32), utc(2025, 10, 28, 12, 21, 5)]
    assert a["mx_ip"].to_list() == ["104.47.57.161", "52.101.9.3"]
    # the "[... 2023-10-28T12:19:31.847Z 08DB...]" block and "(S844)" stay in the reply; the closing
    # "(in reply to ...)" does not
    assert a["response"][0].endswith("(S844) [DM6NAM11FT088.eop-nam11.prod.protection.outlook.com 2023-10-28T12:19:31.847Z 08DBD70830F39917]")
    assert c.height == 0


# --- Outlook 452 4.5.3 ATTR38 and 451 4.7.650, 13-char queue ids (pastebin aW9rxeVy) ---------------

def test_outlook_multiple_regions_is_not_capacity_and_long_queue_ids():
    a, c, _ = run(PF / "outlook_4.5.3_4.7.650.log")
    assert a["queue_id"].to_list() == ["7C1A2B3D4E5F6"] * 3 + ["8D2B3C4E5F6A7"]
    assert rows(a, ("recipient_domain", "smtp_code", "enhanced_code", "smtp_stage", "outcome", "response_class", "rule_id", "side")) == [
        ("outlook.com", 250, "2.0.0", "end of DATA", "delivered", "delivered", "delivered", "receiver"),
        ("hotmail.co.uk", 452, "4.5.3", "RCPT TO", "deferred", "too_many_recipients", "too_many_recipients.microsoft_regions", "receiver"),
        ("live.com", 452, "4.5.3", "RCPT TO", "deferred", "too_many_recipients", "too_many_recipients.microsoft_regions", "receiver"),
        ("hotmail.com", 451, "4.7.650", "MAIL FROM", "deferred", "reputation", "microsoft.ip_reputation_rate_limit", "receiver"),
    ]
    assert a["provider"].unique().to_list() == ["microsoft_consumer"]
    assert a["provider_family"].unique().to_list() == ["microsoft"]
    assert a["sender"].unique().to_list() == ["billing@invoices.example.org"]
    assert a["message_key"].n_unique() == 2
    # the 452 here is 4.5.3, so the seed metric (452 4.3.1) stays at zero
    table = metrics.rates_table(load(PF / "outlook_4.5.3_4.7.650.log", year=2025).attempts, by=["provider_family"]).collect()
    assert table.select("provider_family", "attempts", "count").rows() == [("microsoft", 4, 0)]


# --- Hotmail RP-001, Yahoo TS01 refused to talk, lost connection (pastebin dW4JrGn7) ----------------

def test_hotmail_rp001_yahoo_ts01_and_lost_connection():
    a, c, _ = run(PF / "hotmail_RP-001_yahoo_TS01.log")
    assert rows(a) == [
        ("smtp", "hotmail.com", "mx3.hotmail.com", 421, "4.0.0", "MAIL FROM", "deferred", True, 1, "microsoft_consumer", "rate_limit", "receiver"),
        ("smtp", "yahoo.com", "mta5.am0.yahoodns.net", 421, "4.7.0", "greeting", "deferred", True, 1, "yahoo", "rate_limit", "receiver"),
        ("smtp", "hotmail.com", "mx2.hotmail.com", None, "4.4.2", "RCPT TO", "deferred", False, 1, "microsoft_consumer", "connection", "unknown"),
    ]
    assert a["rule_id"].to_list() == ["microsoft.rp_limit", "yahoo.tss_deferral", "connection.lost"]
    assert a["dsn"].to_list() == ["4.0.0", "4.7.0", "4.4.2"]
    assert a["response"][1] == ("421 4.7.0 [TS01] Messages from 203.0.113.5 temporarily deferred due to user complaints - 4.16.55.1; "
                                "see http://postmaster.yahoo.com/421-ts01.html")
    # the per-MX lost connection to mx1 precedes the final record naming mx2
    assert c.select("event", "queue_id", "mx_host", "smtp_stage").rows() == [("lost_connection", "5D21340BE6", "mx1.hotmail.com", "RCPT TO")]


# --- postfix/error "delivery temporarily suspended" (pastebin tNp7Bjnj) ------------------------------

def test_error_agent_suspensions_are_rows_but_not_mx_attempts():
    a, c, res = run(PF / "postfix_error_delivery_suspended.log")
    assert rows(a) == [
        ("smtp", "hotmail.com", "mx4.hotmail.com", None, "4.4.2", "greeting", "deferred", False, 1, "microsoft_consumer", "connection", "unknown"),
        ("error", "hotmail.com", "mx4.hotmail.com", None, "4.4.2", "greeting", "deferred", False, 1, "microsoft_consumer", "local", "sender"),
        ("error", "msn.com", "mx4.hotmail.com", None, "4.4.2", "greeting", "deferred", False, 1, "microsoft_consumer", "local", "sender"),
    ]
    assert a["rule_id"].to_list() == ["connection.lost", "local.delivery_suspended", "local.delivery_suspended"]
    assert a.select(metrics.is_mx_attempt()).to_series().to_list() == [True, False, False]
    table = metrics.rates_table(res.attempts, by=["provider"], code=None, enhanced="4.4.2").collect()
    # denominator: the one real try; the two suspensions are reported beside it, not in it
    assert table.select("provider", "attempts", "count", "rate_per_10k", "non_mx_rows").rows() == [
        ("microsoft_consumer", 1, 1, 10000.0, 2)]


# --- Yahoo TS03 block, AOL refused, virtual bounce, bounce notification (pastebin NspYGDaR) ---------

def test_yahoo_ts03_aol_refused_virtual_bounce_and_ndr():
    a, c, res = run(PF / "yahoo_TS03_aol_refused.log")
    assert rows(a) == [
        ("smtp", "yahoo.com", "mta7.am0.yahoodns.net", 421, "4.7.1", "greeting", "deferred", True, 1, "yahoo", "reputation", "receiver"),
        ("smtp", "aol.com", "mailin-03.mx.aol.com", 421, "4.0.0", "greeting", "deferred", True, 1, "yahoo", "capacity", "receiver"),
        ("virtual", "deals.example.com", None, None, "5.1.1", None, "bounced", False, 1, "unknown", "mailbox", "sender"),
        ("smtp", "deals.example.com", "mail.deals-backend.example.com", 250, "2.0.0", "end of DATA", "delivered", True, 1, "other", "delivered", "receiver"),
    ]
    assert a["rule_id"].to_list()[:2] == ["yahoo.permanently_deferred", "capacity.service_unavailable"]
    # the bounce notification goes out with the null sender
    assert a["sender"].to_list() == ["offers@deals.example.com"] * 3 + [""]
    assert a.select(metrics.is_mx_attempt()).to_series().to_list() == [True, True, False, True]
    assert res.accounting.count("skipped", "postfix bounce: not a delivery record") == 1
    assert c.height == 0


# --- Microsoft capacity vs our own relay's back pressure ---------------------------------------------

def test_microsoft_capacity_signals_and_own_exchange_relay():
    a, _, res = run(PF / "microsoft_capacity_and_own_relay.log")
    assert a["instance"].unique().to_list() == ["postfix-out2"]
    assert rows(a, ("mx_host", "smtp_code", "enhanced_code", "provider", "response_class", "rule_id", "side")) == [
        ("hotmail-com.olc.protection.outlook.com", 452, "4.3.1", "microsoft_consumer", "capacity", "microsoft.insufficient_system_resources", "receiver"),
        ("fabrikam-example.mail.protection.outlook.com", 451, "4.4.24", "microsoft_365", "capacity", "microsoft.replication_failed", "receiver"),
        ("exch-relay01.corp.example.net", 452, "4.3.1", "other", "local", "local.exchange_back_pressure", "sender"),
        ("outlook-com.olc.protection.outlook.com", 451, "4.4.4", "microsoft_consumer", "capacity", "capacity.temporary_server_error", "receiver"),
        ("hotmail-com.olc.protection.outlook.com", 250, "2.0.0", "microsoft_consumer", "delivered", "delivered", "receiver"),
        ("hotmail-com.olc.protection.outlook.com", 451, "4.7.700", "microsoft_consumer", "capacity", "microsoft.pfa_agent_busy", "receiver"),
    ]
    # the seed metric: 452 4.3.1 per 10,000 Microsoft attempts; the own relay's 452 4.3.1 is "other"
    table = metrics.rates_table(res.attempts, by=["provider_family"]).collect().sort("provider_family")
    assert table.select("provider_family", "attempts", "count", "rate_per_10k").rows() == [
        ("microsoft", 5, 1, 2000.0), ("other", 1, 1, 10000.0)]
    receiver_only = metrics.rate(with_classes(res.attempts), where=metrics.response_is() & (pl.col("side") == "receiver")).collect()
    assert receiver_only.select("attempts", "count").rows() == [(6, 1)]


# --- postfix pitfalls: shipper prefix, amavis hop, quoted local part, probes, expiry, per-MX connects --

def test_postfix_pitfalls_shipper_prefix_amavis_probe_expiry_connect_timeouts():
    a, c, res = run(PF / "pitfalls_postfix.log")
    assert rows(a, ("ts", "queue_id", "recipient", "mx_host", "mx_ip", "outcome", "provider", "response_class", "side")) == [
        (utc(2025, 7, 1, 6, 0, 1), "C0D1E2F301", "a.b@amavis-check.example.com", "127.0.0.1", "127.0.0.1", "delivered", "local", "delivered", "sender"),
        (utc(2025, 7, 1, 6, 0, 2), "D1E2F30412", "a.b@amavis-check.example.com", "mx.amavis-check.example.com", "2001:db8:15::25", "delivered", "other", "delivered", "receiver"),
        (utc(2025, 7, 1, 6, 0, 3), "C0D1E2F301", '"first last"@example.net', "mx1.example.net", "192.0.2.41", "deferred", "other", "policy", "receiver"),
        (utc(2025, 7, 1, 6, 0, 7), "0415263745", "x@gone.example", "mx2.gone.example", "192.0.2.91", "deferred", "other", "connection", "unknown"),
    ]
    assert a["recipient_domain"].to_list() == ["amavis-check.example.com", "amavis-check.example.com", "example.net", "gone.example"]
    assert a["rule_id"][2] == "policy.greylisting"
    # the loopback content-filter hop is not a try against an MX
    assert a.select(metrics.is_mx_attempt()).to_series().to_list() == [False, True, True, True]
    assert c.select("event", "mx_host", "mx_ip", "smtp_stage").rows() == [("connect_failed", "mx1.gone.example", "192.0.2.90", "connect")]
    assert res.accounting.count("skipped", "address verification probe") == 1
    assert res.accounting.count("context", "qmgr expired (message-level)") == 1


def test_rfc3339_offset_is_converted_to_utc_and_gmail_multiline_reply():
    a, _, _ = run(PF / "rfc3339_offset.log")
    assert a["ts"].to_list() == [datetime(2025, 1, 29, 21, 26, 6, 120001, tzinfo=timezone.utc)]
    assert rows(a, ("smtp_code", "enhanced_code", "smtp_stage", "provider", "response_class", "rule_id", "side")) == [
        (421, "4.7.28", "end of DATA", "google", "rate_limit", "google.unusual_rate", "receiver")]
    assert a["response"][0].startswith("421-4.7.28 Gmail has detected an unusual rate of unsolicited mail originating 421-4.7.28 from")


# --- Debian rsyslog set: mail.log + mail.log.1 + mail.warn(.N.gz) + mail.err.N.gz -------------------

def test_debian_rotated_set_as_folder_drops_warn_and_err_duplicates():
    a, c, res = run(PF / "logs_sample")
    assert a.height == 9 and c.height == 0
    assert a["agent"].value_counts().sort("agent").rows() == [("lmtp", 3), ("smtp", 6)]
    assert a["outcome"].value_counts().sort("outcome").rows() == [("bounced", 1), ("delivered", 8)]
    # rotation order: mail.log.1 (Feb 27-28) before mail.log (Mar 1-2); year-less stamps span days
    assert a["ts"].is_sorted()
    assert a["ts"].to_list()[0] == utc(2025, 2, 27, 23, 58, 8) and a["ts"].to_list()[-1] == utc(2025, 3, 2, 9, 1, 30)
    assert [Path(f).name for f in a["file"].to_list()] == ["mail.log.1"] * 5 + ["mail.log"] * 4
    bounce = a.filter(pl.col("outcome") == "bounced")
    assert rows(bounce, ("recipient_domain", "mx_host", "smtp_code", "enhanced_code", "smtp_stage", "provider", "response_class", "side")) == [
        ("gmail.com", "gmail-smtp-in.l.google.com", 550, "5.1.1", "RCPT TO", "google", "mailbox", "receiver")]
    # the IPv6 relay address is kept whole
    assert a.filter(pl.col("mx_host") == "gmail-smtp-in.l.google.com")["mx_ip"].to_list() == ["2607:f8b0:4023:c0b::1b", "142.250.102.26"]
    # every warning/error line that also sits in mail.warn, mail.warn.1.gz, mail.err.1.gz is counted once
    assert res.accounting.count("duplicate") == 6
    assert res.accounting.lines_read == 24 + 31 + 2 + 3 + 1
    assert res.accounting.count("skipped", "not postfix: opendkim") == 1 and res.accounting.count("skipped", "not postfix: dovecot") == 1
    # lmtp to the local dovecot socket is not an MX attempt: denominators hold the 6 smtp tries
    table = metrics.rates_table(res.attempts, by=(), code=550, enhanced="5.1.1").collect()
    assert table.select("attempts", "count", "non_mx_rows").rows() == [(6, 1, 3)]


def test_lmtp_to_a_local_socket_is_provider_local():
    a, _, _ = run(PF / "logs_sample")
    assert a.filter(pl.col("agent") == "lmtp").select("mx_host", "mx_ip", "provider", "provider_family", "side").unique().rows() == [
        ("mail.example.org", "private/dovecot-lmtp", "local", "local", "sender")]


def test_rotated_set_crossing_new_year_uses_file_mtimes(tmp_path):
    folder = tmp_path / "mail"
    shutil.copytree(PF / "year_crossing", folder)
    os.utime(folder / "mail.log.1", (datetime(2025, 1, 1, 0, 0, tzinfo=timezone.utc).timestamp(),) * 2)
    os.utime(folder / "mail.log", (datetime(2025, 1, 1, 0, 10, tzinfo=timezone.utc).timestamp(),) * 2)
    a = load(folder, format="auto").attempts.collect()
    assert a["ts"].to_list() == [utc(2024, 12, 31, 23, 59, 58), utc(2025, 1, 1, 0, 0, 3)]


# --- Exim: per-host SMTP error vs the "==" deferral, then delivery on retry -------------------------

def test_exim_microsoft_452_4_3_1_per_host_error_is_a_connection():
    a, c, res = run(FIX / "exim" / "microsoft_452_4.3.1_mainlog")
    assert a["source"].unique().to_list() == ["exim"]
    assert rows(a) == [
        ("smtp", "hotmail.com", "hotmail-com.olc.protection.outlook.com", 452, "4.3.1", "RCPT TO", "deferred", True, 1, "microsoft_consumer", "capacity", "receiver"),
        ("smtp", "fabrikam.example", "fabrikam-example.mail.protection.outlook.com", 250, "2.6.0", "end of DATA", "delivered", True, 1, "microsoft_365", "delivered", "receiver"),
        ("smtp", "hotmail.com", "hotmail-com.olc.protection.outlook.com", 250, "2.6.0", "end of DATA", "delivered", True, 2, "microsoft_consumer", "delivered", "receiver"),
    ]
    assert a["ts"].to_list() == [utc(2025, 5, 6, 10, 0, 2), utc(2025, 5, 6, 10, 0, 3), utc(2025, 5, 6, 10, 30, 4)]
    assert a["mx_ip"].to_list() == ["52.101.42.8", "52.101.11.4", "52.101.42.7"]
    assert a["sender"].unique().to_list() == ["news@shop.example.net"]
    assert c.select("event", "mx_host", "mx_ip", "smtp_code", "enhanced_code", "smtp_stage").rows() == [
        ("said", "hotmail-com.olc.protection.outlook.com", "52.101.42.7", 452, "4.3.1", "RCPT TO")]
    table = metrics.rates_table(res.attempts, by=["provider_family"]).collect()
    assert table.select("provider_family", "attempts", "count", "rate_per_10k", "band").rows() == [
        ("microsoft", 3, 1, pytest.approx(10000 / 3), "incident")]


# --- SendGrid event webhook batch (no MX host: provider from reply markers / recipient domain) ------

def test_sendgrid_batch_provider_from_reply_and_domain_stays_one_provider():
    a, c, res = run(FIX / "esp" / "sendgrid_events.json")
    assert rows(a, ("ts", "recipient_domain", "smtp_code", "enhanced_code", "outcome", "attempt", "provider", "provider_basis", "response_class", "side")) == [
        (utc(2025, 5, 6, 10, 1, 2), "outlook.com", 452, "4.3.1", "deferred", 1, "microsoft_consumer", "reply", "capacity", "receiver"),
        (utc(2025, 5, 6, 10, 1, 3), "hotmail.com", None, None, "deferred", 2, "microsoft_consumer", "domain", "rate_limit", "receiver"),
        (utc(2025, 5, 6, 10, 31, 2), "outlook.com", 250, "2.6.0", "delivered", 2, "microsoft_consumer", "reply", "delivered", "receiver"),
    ]
    assert a["message_id"].to_list() == ["<1a2b3c@shop.example.net>", "<4d5e6f@shop.example.net>", "<1a2b3c@shop.example.net>"]
    assert res.accounting.count("skipped") == 1 and c.height == 0
    table = metrics.rates_table(res.attempts, by=["provider"]).collect()
    assert table.select("provider", "attempts", "count").rows() == [("microsoft_consumer", 3, 1)]


# --- replies from the smtp_codes.md tables (sections 2.3-6), as a destination MX would send them ---

MS, O365, GOOGLE, YAHOO, AOL = ("hotmail-com.olc.protection.outlook.com", "contoso-com.mail.protection.outlook.com",
                                "gmail-smtp-in.l.google.com", "mta5.am0.yahoodns.net", "mx-aol.mail.gm0.yahoodns.net")
REPLY_CASES = [
    (MS, "452 4.3.1 Insufficient system resources (TSTE) [outlook.com]", "capacity", "microsoft.insufficient_system_resources"),
    (O365, "451 4.4.24 Message failed to be replicated: insufficient system resource: Insufficient number of replica targets", "capacity", "microsoft.replication_failed"),
    (O365, "451 4.4.25 Message failed to be replicated: no healthy secondary server available to accept replica", "capacity", "microsoft.replication_failed"),
    (MS, "451 4.3.2 Temporary server error. Please try again later ATTR17", "capacity", "capacity.temporary_server_error"),
    (MS, "451 4.7.0 Temporary server error. Please try again later. PRX6", "capacity", "capacity.temporary_server_error"),
    (MS, "421 4.3.2 Service not available [outlook.com]", "capacity", "capacity.service_unavailable"),
    (MS, "451 4.7.700 PFA agent busy, please try again.", "capacity", "microsoft.pfa_agent_busy"),
    (O365, "451 4.7.500 Server busy. Please try again later from [192.0.2.1]. (S77719)", "rate_limit", "microsoft.server_busy_4_7_500"),
    (O365, "451 4.7.500 Access denied, please try again later. (AS761)", "rate_limit", "microsoft.ip_throttling_4_7_5xx_6xx"),
    (MS, "451 4.7.651 The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation. (S844)", "reputation", "microsoft.ip_reputation_rate_limit"),
    (MS, "450 4.7.3 Organization queue quota exceeded. [outlook.com]", "rate_limit", "microsoft.organization_queue_quota"),
    (MS, "452 4.5.3 Recipients belong to multiple regions ATTR38", "too_many_recipients", "too_many_recipients.microsoft_regions"),
    (MS, "550 5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3150).", "reputation", "microsoft.block_list"),
    (O365, "550 5.7.606 Access denied, banned sending IP [192.0.2.1].", "reputation", "microsoft.block_list"),
    (O365, "432 4.3.2 STOREDRV.Deliver; recipient thread limit exceeded", "rate_limit", "microsoft.recipient_thread_limit"),
    (O365, "550 5.4.1 Recipient address rejected: Access denied. AS(201806281)", "mailbox", "microsoft.recipient_access_denied"),
    (O365, "451 4.7.850 Access denied, please try again later.", "reputation", "microsoft.suspicious_ip_4_7_85x"),
    (GOOGLE, "421 4.3.0 Temporary System Problem. Try again later.", "capacity", "capacity.google_temporary_system_problem"),
    (GOOGLE, "421 4.4.5 Server busy, try again later.", "capacity", "capacity.server_busy"),
    (GOOGLE, "421 4.7.28 Our system has detected an unusual rate of unsolicited mail originating from your IP address.", "rate_limit", "google.unusual_rate"),
    (GOOGLE, "421 4.7.0 This message is suspicious due to the very low reputation of the sending IP address.", "reputation", "reputation.text"),
    (GOOGLE, "421 4.7.26 This mail has been rate limited because it is unauthenticated. Gmail requires all senders to authenticate with either SPF or DKIM.", "policy", "policy.authentication"),
    (GOOGLE, "421 4.7.0 TLS required for RCPT domain, closing connection.", "policy", "policy.tls_required_by_receiver"),
    (GOOGLE, "450 4.2.1 Peak SMTP relay limit exceeded for customer.", "rate_limit", "google.relay_limit"),
    (GOOGLE, "452 4.2.2 The email account that you tried to reach is over quota.", "mailbox", "mailbox.over_quota"),
    (GOOGLE, "452 4.5.3 Your message has too many recipients.", "too_many_recipients", "too_many_recipients.text"),
    (GOOGLE, "451 4.4.2 Timeout - closing connection.", "connection", "connection.timeout"),
    (YAHOO, "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1", "rate_limit", "yahoo.tss_deferral"),
    (YAHOO, "421 Max message per connection reached, closing transmission channel", "rate_limit", "rate_limit.text"),
    (YAHOO, "450 User is receiving mail too quickly", "rate_limit", "google.receiving_rate"),
    (YAHOO, "451 Message temporarily deferred due to unresolvable RFC.5321 from domain", "policy", "policy.authentication"),
    (YAHOO, "553 5.7.1 [BL21] Connections will not be accepted from 192.0.2.1, because the ip is in Spamhaus's list", "reputation", "yahoo.block_list"),
    (AOL, "421 mtaig-mae02.mx.aol.com Service unavailable - try again later", "capacity", "capacity.service_unavailable"),
    ("eu-smtp-inbound-1.mimecast.com", "451 Internal resource temporarily unavailable - https://community.mimecast.com/docs/DOC-1369#451", "capacity", "capacity.resources_unavailable"),
    ("mx01.mail.icloud.com", "451 [BS02] Temporary server error", "capacity", "capacity.temporary_server_error"),
    ("mx.example.net", "450 4.2.0 <a@example.net>: Recipient address rejected: Greylisted", "policy", "policy.greylisting"),
    ("mx.example.net", "550 Sender frequency limited", "rate_limit", "rate_limit.text"),
]


def test_replies_from_the_research_tables_get_the_documented_class():
    frame = pl.DataFrame(
        {
            "mx_host": [c[0] for c in REPLY_CASES],
            "mx_ip": ["192.0.2.200"] * len(REPLY_CASES),
            "response": [c[1] for c in REPLY_CASES],
            "smtp_code": [int(c[1][:3]) for c in REPLY_CASES],
            "enhanced_code": [c[1].split(" ")[1] if c[1][4:5].isdigit() else None for c in REPLY_CASES],
            "outcome": ["bounced" if c[1][0] == "5" else "deferred" for c in REPLY_CASES],
            "remote": [True] * len(REPLY_CASES),
            "agent": ["smtp"] * len(REPLY_CASES),
            "smtp_stage": ["RCPT TO"] * len(REPLY_CASES),
            "recipient_domain": ["example.com"] * len(REPLY_CASES),
        },
        schema_overrides={"smtp_code": pl.Int16},
    )
    got = with_classes(frame.lazy()).collect()
    assert list(zip(got["response_class"], got["rule_id"])) == [(c[2], c[3]) for c in REPLY_CASES]
    assert got["side"].unique().to_list() == ["receiver"]


def test_exim_unrouteable_address_is_a_bad_recipient_domain(tmp_path):
    log = tmp_path / "mainlog"
    log.write_text(
        "2025-05-06 11:00:00 1uCAcd-000124-CD <= news@shop.example.net H=app1.shop.example.net [192.0.2.31] P=esmtps S=1823 id=x2@shop.example.net\n"
        "2025-05-06 11:00:05 1uCAcd-000124-CD ** e@nxd.example: Unrouteable address\n"
    )
    a, _, _ = run(log)
    assert rows(a, ("recipient_domain", "outcome", "remote", "response_class", "rule_id", "side")) == [
        ("nxd.example", "bounced", False, "mailbox", "mailbox.domain_not_found", "sender")]
    assert a.select(metrics.is_mx_attempt()).item() is False


# --- line shapes found by QA: short-precise stamps, container-log prefixes, nameless hosts ----------

def test_postfix_short_precise_timestamps_keep_microseconds(tmp_path):
    log = tmp_path / "journal.log"
    log.write_text(
        "Mar 14 09:12:44.123456 mx1 postfix/smtp[30111]: 4F1A23C0B7: to=<anna@contoso.de>, relay=contoso-de.mail.protection.outlook.com[104.47.8.10]:25, "
        "delay=4.1, delays=0.05/0.01/1.6/2.4, dsn=4.3.1, status=deferred (host contoso-de.mail.protection.outlook.com[104.47.8.10] said: "
        "452 4.3.1 Insufficient system resources (in reply to RCPT TO command))\n"
    )
    a, _, _ = run(log)
    assert a["ts"].to_list() == [datetime(2025, 3, 14, 9, 12, 44, 123456, tzinfo=timezone.utc)]



def test_postfix_lines_behind_a_docker_compose_prefix_load(tmp_path):
    log = tmp_path / "smtp.log"
    log.write_text(
        "mailu-smtp-1  | Oct 28 12:19:32 mail postfix/smtp[39032]: 213A0C01A2: to=<kim.lee@hotmail.com>, relay=hotmail-com.olc.protection.outlook.com[104.47.57.161]:25, "
        "delay=767, delays=760/3.5/2.5/0.63, dsn=4.7.651, status=deferred (host hotmail-com.olc.protection.outlook.com[104.47.57.161] said: 451 4.7.651 "
        "The mail server [192.0.2.165] has been temporarily rate limited due to IP reputation. (S844) [DM6NAM11FT088.eop-nam11.prod.protection.outlook.com "
        "2023-10-28T12:19:31.847Z 08DBD70830F39917] (in reply to RCPT TO command))\n"
    )
    a, _, _ = run(log)
    assert rows(a, ("mx_host", "smtp_code", "enhanced_code", "response_class")) == [
        ("hotmail-com.olc.protection.outlook.com", 451, "4.7.651", "reputation")]


def test_postfix_reply_from_a_nameless_host_is_parsed(tmp_path):
    log = tmp_path / "mail.log"
    log.write_text(
        "Jan 10 00:00:56 node postfix/smtp[12357]: 375593D395: to=<recipient@example.com>, relay=relay.example.com[198.51.100.90]:25, delay=0.86, "
        "delays=0.1/0/0.71/0.05, dsn=5.7.606, status=bounced (host [198.51.100.90] said: 550 5.7.606 Access denied, banned sending IP [192.0.2.50]. "
        "(in reply to RCPT TO command))\n"
    )
    a, _, _ = run(log)
    assert rows(a, ("mx_host", "smtp_code", "enhanced_code", "smtp_stage", "remote", "response_class", "side")) == [
        ("relay.example.com", 550, "5.7.606", "RCPT TO", True, "reputation", "receiver")]


def test_mail_log_and_mail_warn_given_as_files_count_warnings_once():
    res = load([PF / "logs_sample" / "mail.log", PF / "logs_sample" / "mail.warn"], format="auto", year=2025)
    assert res.attempts.collect().height == 4
    assert res.accounting.count("duplicate") == 2
    assert res.accounting.count("skipped", "postfix warning/fatal") == 2


# --- Mailgun and SES: a Microsoft 452 4.3.1 seen through an ESP ----------------------------------------

def test_mailgun_temporary_failure_then_delivery():
    a, _, res = run(FIX / "esp" / "mailgun_events.jsonl")
    assert rows(a, ("ts", "recipient_domain", "mx_host", "egress_ip", "smtp_code", "enhanced_code", "outcome", "remote", "attempt",
                    "provider", "response_class", "side")) == [
        (datetime(2025, 5, 6, 10, 1, 2, 118000, tzinfo=timezone.utc), "outlook.com", "outlook-com.olc.protection.outlook.com", "198.51.100.61",
         452, "4.3.1", "deferred", True, 1, "microsoft_consumer", "capacity", "receiver"),
        (datetime(2025, 5, 6, 10, 11, 3, 402000, tzinfo=timezone.utc), "outlook.com", "outlook-com.olc.protection.outlook.com", "198.51.100.61",
         250, None, "delivered", True, 2, "microsoft_consumer", "delivered", "receiver"),
    ]
    # Mailgun's "message" omits the code; the response is rebuilt with it, as the other formats write it
    assert a["response"][0].startswith("452 4.3.1 Insufficient system resources (TSTE)")
    table = metrics.rates_table(res.attempts, by=["provider_family"]).collect()
    assert table.select("provider_family", "attempts", "count", "rate_per_10k").rows() == [("microsoft", 2, 1, 5000.0)]


def test_ses_delivery_delay_with_a_receiver_reply_is_a_remote_reply():
    a, _, _ = run(FIX / "esp" / "ses_deliverydelay.json")
    assert rows(a, ("ts", "recipient_domain", "mx_host", "smtp_code", "enhanced_code", "dsn", "outcome", "remote", "provider", "provider_basis",
                    "response_class", "side")) == [
        (datetime(2025, 5, 6, 10, 5, 12, 345000, tzinfo=timezone.utc), "outlook.com", None, 452, "4.3.1", "4.3.1", "deferred", True,
         "microsoft_consumer", "reply", "capacity", "receiver")]
    assert a["log_host"].to_list() == ["a8-70.smtp-out.amazonses.com"]


def test_ses_unable_to_connect_stays_a_no_contact_try(realworld):
    a, _, _ = run(realworld / "esp" / "ses" / "sns-examples__09_deliverydelay_record.json")
    assert rows(a, ("agent", "smtp_code", "enhanced_code", "remote", "response_class", "side")) == [
        ("smtp", 421, "4.4.1", False, "connection", "unknown")]


def test_sparkpost_delay_then_delivery():
    a, _, res = run(FIX / "esp" / "sparkpost_events.json")
    assert rows(a, ("ts", "recipient_domain", "mx_ip", "egress_ip", "egress_pool", "smtp_code", "enhanced_code", "outcome", "remote",
                    "attempt", "provider", "response_class", "side")) == [
        (utc(2025, 5, 6, 10, 1, 2), "outlook.com", "52.101.42.7", "198.51.100.70", "shared", 452, "4.3.1", "deferred", True, 1,
         "microsoft_consumer", "capacity", "receiver"),
        (utc(2025, 5, 6, 10, 11, 3), "outlook.com", "52.101.42.8", "198.51.100.70", "shared", None, None, "delivered", True, 2,
         "microsoft_consumer", "delivered", "receiver"),
    ]
    assert res.accounting.count("attempt") == 2
