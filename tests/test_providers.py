"""Provider of a destination from its MX host (deferral_kit.providers)."""

from __future__ import annotations

import json

import polars as pl
import pytest

from deferral_kit import providers, schema


def _frame(**cols) -> pl.LazyFrame:
    return schema.conform(pl.LazyFrame(cols))


# Real MX names from research/smtp_codes.md §2.1 and the realworld logs (mixed case, trailing dot).
MX_CASES = [
    ("hotmail-com.olc.protection.outlook.com", "microsoft_consumer", "microsoft"),
    ("outlook-com.olc.protection.outlook.com", "microsoft_consumer", "microsoft"),
    ("eur.olc.protection.outlook.com", "microsoft_consumer", "microsoft"),
    ("apc.olc.protection.outlook.com", "microsoft_consumer", "microsoft"),
    ("hotmail-com.olc.protection.outlook.COM", "microsoft_consumer", "microsoft"),
    ("hotmail-com.olc.protection.outlook.com.", "microsoft_consumer", "microsoft"),
    ("mx1.hotmail.com", "microsoft_consumer", "microsoft"),
    ("MX4.HOTMAIL.COM.", "microsoft_consumer", "microsoft"),
    ("some-company-de.mail.protection.outlook.com", "microsoft_365", "microsoft"),
    ("nxp-com.mail.protection.outlook.com", "microsoft_365", "microsoft"),
    ("global-mail-onmicrosoft-com.mail.protection.outlook.com", "microsoft_365", "microsoft"),
    ("contoso-com.o-v1.mx.microsoft", "microsoft_365", "microsoft"),
    ("smtp-mail.outlook.com", "microsoft", "microsoft"),
    ("gmail-smtp-in.l.google.com", "google", "google"),
    ("ALT2.ASPMX.L.GOOGLE.com", "google", "google"),
    ("ASPMX.L.GOOGLE.COM", "google", "google"),
    ("aspmx2.googlemail.com", "google", "google"),
    ("mta7.am0.yahoodns.net", "yahoo", "yahoo"),
    ("mx-aol.mail.gm0.yahoodns.net", "yahoo", "yahoo"),
    ("a.mx.mail.yahoo.com", "yahoo", "yahoo"),
    ("mailin-04.mx.aol.com", "yahoo", "yahoo"),
    ("mx6.mail.icloud.com", "apple", "apple"),
    ("mx02.mail.icloud.com", "apple", "apple"),
    ("us-smtp-inbound-2.mimecast.com", "mimecast", "mimecast"),
    ("mxa.aaa.pphosted.com", "proofpoint", "proofpoint"),
    ("mx2.inmotionhosting.com", "other", "other"),
    # look-alikes must not match a suffix
    ("notgoogle.com", "other", "other"),
    ("mail.evilhotmail.com", "other", "other"),
    ("h-50f3c4ccac5be32ede8", "other", "other"),
    ("127.0.0.1", "local", "local"),
    ("/var/run/dovecot/lmtp", "local", "local"),
    (None, "unknown", "unknown"),
]


@pytest.mark.parametrize(("mx_host", "provider", "family"), MX_CASES)
def test_provider_from_mx(mx_host, provider, family):
    out = providers.with_provider(_frame(mx_host=[mx_host], recipient_domain=["example.org"])).collect()
    assert (out["provider"][0], out["provider_family"][0]) == (provider, family)
    assert out["provider_basis"][0] == ("mx" if mx_host else None)


def test_provider_of_expression_matches_with_provider():
    hosts = [h for h, _, _ in MX_CASES]
    got = pl.DataFrame({"mx_host": hosts}).select(providers.provider_of(pl.col("mx_host"))).to_series().to_list()
    assert got == [p for _, p, _ in MX_CASES]


def test_mx_wins_over_recipient_domain():
    # a 365 tenant on a vanity domain is Microsoft; outlook.com via our smarthost is not
    out = providers.with_provider(_frame(
        mx_host=["acme-corp-com.mail.protection.outlook.com", "smarthost.example.net"],
        recipient_domain=["acme-corp.com", "outlook.com"],
        response=["250 2.6.0 Queued", "451 4.7.500 Server busy (S77719) [FR2DEU01FT008.eop-deu01.prod.protection.outlook.com]"],
    )).collect()
    assert out.select("provider", "provider_family", "provider_basis").rows() == [
        ("microsoft_365", "microsoft", "mx"),
        ("other", "other", "mx"),
    ]


def test_fallback_to_reply_markers_then_domain():
    out = providers.with_provider(_frame(
        mx_host=[None] * 7,
        recipient_domain=["example.com", "example.com", "example.com", "example.com", "hotmail.co.uk", "gmail.com", "example.com"],
        response=[
            "451 4.7.651 The mail server [1.2.3.4] has been temporarily rate limited due to IP reputation. (S844) [DM6NAM11FT088.eop-nam11.prod.protection.outlook.com 2023-10-28T12:19:31.847Z 08DBD70830F39917]",
            "421 4.7.28 [x.xx.xx.xx] Our system has detected an unusual rate ... - gsmtp",
            "421 4.7.0 [TSS04] Messages from 10.20.30.40 temporarily deferred due to user complaints",
            "550 5.7.1 Unfortunately, messages from [1.2.3.4] weren't sent ... (S3150)",
            "Email was deferred due to the following reason(s): [IPs were throttled by recipient server]",
            None,
            "421 try again later",
        ],
    )).collect()
    assert out.select("provider", "provider_family", "provider_basis").rows() == [
        ("microsoft", "microsoft", "reply"),
        ("google", "google", "reply"),
        ("yahoo", "yahoo", "reply"),
        ("microsoft", "microsoft", "reply"),
        ("microsoft_consumer", "microsoft", "domain"),
        ("google", "google", "domain"),
        ("unknown", "unknown", None),
    ]


def test_user_rules_extend_and_override(tmp_path):
    user = tmp_path / "providers.yaml"
    user.write_text(
        "providers:\n"
        "  - id: ionos\n    family: ionos\n    mx_suffixes: [.kundenserver.de, .ionos.de]\n"
        "  - id: my_gmail_fleet\n    family: google\n    mx_suffixes: [alt4.gmail-smtp-in.l.google.com]\n"
    )
    rules = providers.load_provider_rules(user)
    out = providers.with_provider(_frame(
        mx_host=["mx00.kundenserver.de", "alt4.gmail-smtp-in.l.google.com", "gmail-smtp-in.l.google.com", "mx1.hotmail.com"],
    ), rules=rules).collect()
    assert out["provider"].to_list() == ["ionos", "my_gmail_fleet", "google", "microsoft_consumer"]
    assert out["provider_family"].to_list() == ["ionos", "google", "google", "microsoft"]
    # the path itself is accepted too
    assert providers.with_provider(_frame(mx_host=["mx00.kundenserver.de"]), rules=user).collect()["provider"][0] == "ionos"


def test_bad_user_rules_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers:\n  - id: x\n    reply: ['(unclosed']\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        providers.load_provider_rules(bad)


def test_realworld_mx_hosts(realworld):
    """Every MX host in the extracted real replies maps to the provider its reply text names."""
    rows = [json.loads(line) for line in (realworld / "smtp_responses" / "extracted_remote_responses_from_saved_logs.jsonl").open()]
    frame = _frame(mx_host=[r["mx_host"] for r in rows])
    got = dict(zip([r["mx_host"] for r in rows], providers.with_provider(frame).collect()["provider"].to_list()))
    assert got["hotmail-com.olc.protection.outlook.com"] == "microsoft_consumer"
    assert got["some-company-de.mail.protection.outlook.com"] == "microsoft_365"
    assert got["lalala.mail.protection.outlook.com"] == "microsoft_365"
    assert got["mx3.hotmail.com"] == got["mx4.hotmail.com"] == "microsoft_consumer"
    assert got["ASPMX.L.GOOGLE.COM"] == got["ALT2.ASPMX.L.GOOGLE.com"] == got["alt4.gmail-smtp-in.l.google.com"] == "google"
    assert got["mta6.am0.yahoodns.net"] == got["a.mx.mail.yahoo.com"] == got["mailin-04.mx.aol.com"] == "yahoo"
    assert got["mx6.mail.icloud.com"] == "apple"
    assert sorted(set(got.values())) == ["apple", "google", "microsoft_365", "microsoft_consumer", "mimecast", "other", "proofpoint", "yahoo"]
    # every provider the table claims for a host whose reply carries gsmtp is google
    gsmtp = {r["mx_host"] for r in rows if r["response"].rstrip().endswith("gsmtp") and r["mx_host"] != "some.host"}
    assert {got[h] for h in gsmtp} == {"google"}


def test_shipped_table_is_package_data():
    from importlib import resources

    assert (resources.files("deferral_kit") / "data" / "providers.yaml").is_file()
    ids = [p.id for p in providers.default_rules().providers]
    assert ids[:4] == ["microsoft_consumer", "microsoft_365", "microsoft", "google"]
