"""Rates per 10,000 MX attempts, Wilson intervals, bands, buckets (deferral_kit.metrics)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import polars as pl
import pytest

from deferral_kit import cli, metrics, schema

UTC = timezone.utc
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
MS = "hotmail-com.olc.protection.outlook.com"
GOOG = "gmail-smtp-in.l.google.com"
R452 = "452 4.3.1 Insufficient system resources (TSTE) [outlook.com]"


def _rows(*rows) -> pl.LazyFrame:
    """Canonical attempts from (minutes after T0, agent, mx_host, recipient_domain, code, enhanced, outcome)."""
    cols = dict(ts=[], agent=[], mx_host=[], recipient_domain=[], smtp_code=[], enhanced_code=[], outcome=[], response=[], remote=[])
    for minute, agent, mx, dom, code, enh, outcome in rows:
        cols["ts"].append(T0 + timedelta(minutes=minute))
        cols["agent"].append(agent)
        cols["mx_host"].append(mx)
        cols["recipient_domain"].append(dom)
        cols["smtp_code"].append(code)
        cols["enhanced_code"].append(enh)
        cols["outcome"].append(outcome)
        cols["response"].append(R452 if (code, enh) == (452, "4.3.1") else None)
        cols["remote"].append(code is not None)  # a reply code here means the remote replied
    return schema.conform(pl.LazyFrame(cols, schema_overrides={"ts": schema.UTC_DT}))


def _delivered(minute, mx=MS, dom="outlook.com"):
    return (minute, "smtp", mx, dom, 250, "2.0.0", "delivered")


def _cap(minute, mx=MS, dom="outlook.com"):
    return (minute, "smtp", mx, dom, 452, "4.3.1", "deferred")


# --- Wilson ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("count", "n", "low", "high"), [
    (0, 200, 0.0, 0.018845326377266575),
    (5, 10_000, 0.00021358842616382576, 0.0011700259461420934),
    (1, 2, 0.0945, 0.9055),       # textbook values (Newcombe 1998 style tables), 4 decimals
    (50, 100, 0.4038, 0.5962),
])
def test_wilson_interval_known_values(count, n, low, high):
    lo_e, hi_e = metrics.wilson_interval(pl.col("c"), pl.col("n"))
    got = pl.DataFrame({"c": [count], "n": [n]}).select(lo_e.alias("lo"), hi_e.alias("hi")).row(0)
    tol = 1e-12 if n >= 200 else 5e-5
    assert got == pytest.approx((low, high), abs=tol)
    assert metrics.wilson(count, n) == pytest.approx(got, abs=1e-15)


def test_wilson_zero_attempts_is_null():
    lo_e, hi_e = metrics.wilson_interval("c", "n")
    assert pl.DataFrame({"c": [0], "n": [0]}).select(lo_e.alias("lo"), hi_e.alias("hi")).row(0) == (None, None)


# --- bands -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("count", "n", "band"), [
    (0, 10_000, "watch"),
    (2, 10_000, "watch"),          # 0.02 % exactly stays watch
    (3, 10_000, "throttle"),
    (20, 10_000, "throttle"),      # 0.2 % exactly stays throttle
    (21, 10_000, "incident"),
    (1, 2, "incident"),
])
def test_default_band_boundaries(count, n, band):
    out = pl.DataFrame({"c": [count], "n": [n]}).select(metrics.band_expr(pl.col("c") / pl.col("n")))
    assert out.item() == band


def test_bands_from_user_yaml(tmp_path):
    f = tmp_path / "bands.yaml"
    f.write_text("bands:\n  - name: ok\n    max_percent: 0.01\n  - name: look\n    max_per_10k: 5\n  - name: page\n")
    bands = metrics.load_bands(f)
    assert bands.names == ("ok", "look", "page")
    assert bands.upper[0] == pytest.approx(0.0001) and bands.upper[1] == pytest.approx(0.0005) and bands.upper[2] is None
    rates = pl.DataFrame({"p": [0.0, 0.0001, 0.0002, 0.0005, 0.0006, None]})
    assert rates.select(metrics.band_expr(pl.col("p"), bands)).to_series().to_list() == ["ok", "ok", "look", "look", "page", None]
    assert metrics.DEFAULT_BANDS.to_frame().rows() == [("watch", 0.0, 2.0), ("throttle", 2.0, 20.0), ("incident", 20.0, None)]


def test_bad_bands_file_is_rejected(tmp_path):
    f = tmp_path / "bands.yaml"
    f.write_text("bands:\n  - name: a\n    max_per_10k: 5\n  - name: b\n    max_per_10k: 3\n  - name: c\n")
    with pytest.raises(ValueError, match="increasing"):
        metrics.load_bands(f)


# --- denominators --------------------------------------------------------------------------------

def test_denominator_excludes_error_local_and_loopback_rows():
    lf = _rows(
        _delivered(0), _cap(1), (2, "smtp", MS, "outlook.com", None, "4.4.1", "deferred"),  # connection failure counts
        (3, "error", MS, "outlook.com", None, "4.4.2", "deferred"),        # delivery temporarily suspended
        (4, "local", None, "example.net", None, "2.0.0", "delivered"),
        (5, "virtual", None, "example.net", None, "2.0.0", "delivered"),
        (6, "pipe", None, "example.net", None, "2.0.0", "delivered"),
        (7, "qmgr", None, "outlook.com", None, "4.4.7", "expired"),
        (8, "smtp", "127.0.0.1", "outlook.com", 250, "2.0.0", "delivered"),  # amavis hop
        (9, "lmtp", "/var/run/dovecot/lmtp", "example.net", 250, "2.0.0", "delivered"),
        (10, "lmtp", "mail.example.net", "example.net", 250, "2.0.0", "delivered"),
    )
    out = metrics.rate(lf, where=metrics.response_is()).collect()
    assert out.select("attempts", "count").row(0) == (4, 1)
    assert out["rate_per_10k"][0] == pytest.approx(2500.0)
    excluded = metrics.non_mx_rows(lf).collect()
    assert sorted(excluded.rows()) == [("error", 1), ("local", 1), ("loopback", 2), ("pipe", 1), ("qmgr", 1), ("virtual", 1)]
    flags = lf.select(metrics.is_mx_attempt()).collect().to_series().to_list()
    assert flags == [True, True, True, False, False, False, False, False, False, False, True]


# --- buckets -------------------------------------------------------------------------------------

def test_buckets_truncate_in_utc_keep_zero_buckets_and_invent_none():
    # 09:00-09:59 two attempts (one 452), 10:xx one delivered, nothing at 11:xx, 12:xx one 452
    lf = _rows(_delivered(5), _cap(59), _delivered(60), _cap(185))
    out = metrics.rate(lf, where=metrics.response_is(), bucket="1h").collect()
    assert out.select("bucket", "attempts", "count").rows() == [
        (datetime(2026, 3, 2, 9, tzinfo=UTC), 2, 1),
        (datetime(2026, 3, 2, 10, tzinfo=UTC), 1, 0),
        (datetime(2026, 3, 2, 12, tzinfo=UTC), 1, 1),
    ]
    assert out.schema["bucket"] == pl.Datetime("us", "UTC")


def test_day_bucket_is_utc_day_even_for_offset_timestamps():
    # 23:30 at +02:00 is 21:30 UTC the same day; 01:30 at +02:00 is 23:30 UTC the day before
    local = timezone(timedelta(hours=2))
    ts = [datetime(2026, 3, 2, 23, 30, tzinfo=local), datetime(2026, 3, 3, 1, 30, tzinfo=local), datetime(2026, 3, 3, 2, 30, tzinfo=local)]
    lf = schema.conform(pl.LazyFrame({
        "ts": pl.Series(ts).dt.convert_time_zone("UTC"), "agent": ["smtp"] * 3, "mx_host": [MS] * 3,
        "smtp_code": [452, 452, 250], "enhanced_code": ["4.3.1", "4.3.1", "2.0.0"],
    }))
    out = metrics.rate(lf, where=metrics.response_is(), bucket="1d").collect()
    assert out.select("bucket", "attempts", "count").rows() == [
        (datetime(2026, 3, 2, tzinfo=UTC), 2, 2),
        (datetime(2026, 3, 3, tzinfo=UTC), 1, 0),
    ]


def test_bad_bucket_is_rejected():
    with pytest.raises(ValueError, match="bucket"):
        metrics.rate(_rows(_cap(0)), where=metrics.response_is(), bucket="hourly")


# --- grouping, sorting, provider ------------------------------------------------------------------

def test_rate_by_provider_sorted_by_bucket_then_count():
    lf = _rows(
        *[_delivered(i) for i in range(7)], _cap(10), _cap(11), _cap(12),
        *[_delivered(i, GOOG, "gmail.com") for i in range(4)],
        _cap(20, "acme-com.mail.protection.outlook.com", "acme.com"), _delivered(21, "acme-com.mail.protection.outlook.com", "acme.com"),
        _delivered(70, GOOG, "gmail.com"), _cap(71),
    )
    out = metrics.rate(lf, where=metrics.response_is(), by=["provider"], bucket="1h").collect()
    assert out.select("bucket", "provider", "attempts", "count", "band").rows() == [
        (datetime(2026, 3, 2, 9, tzinfo=UTC), "microsoft_consumer", 10, 3, "incident"),
        (datetime(2026, 3, 2, 9, tzinfo=UTC), "microsoft_365", 2, 1, "incident"),
        (datetime(2026, 3, 2, 9, tzinfo=UTC), "google", 4, 0, "watch"),
        (datetime(2026, 3, 2, 10, tzinfo=UTC), "microsoft_consumer", 1, 1, "incident"),
        (datetime(2026, 3, 2, 10, tzinfo=UTC), "google", 1, 0, "watch"),
    ]
    first = out.row(0, named=True)
    assert first["rate_per_10k"] == pytest.approx(3000.0)
    lo, hi = metrics.wilson(3, 10)
    assert (first["ci_low_per_10k"], first["ci_high_per_10k"]) == pytest.approx((lo * 1e4, hi * 1e4))


def test_rates_table_code_any_enhanced_and_non_mx_column():
    lf = _rows(_cap(0), (1, "smtp", MS, "outlook.com", 452, "4.5.3", "deferred"), _delivered(2),
               (3, "error", MS, "outlook.com", None, "4.3.1", "deferred"))
    exact = metrics.rates_table(lf, by=["recipient_domain"], bucket=None, code=452, enhanced="4.3.1", response_class=None, bands=None).collect()
    anycode = metrics.rates_table(lf, by=["recipient_domain"], bucket=None, code=452, enhanced=None, response_class=None, bands=None).collect()
    assert exact.select("recipient_domain", "attempts", "count", "non_mx_rows").rows() == [("outlook.com", 3, 1, 1)]
    assert anycode.select("attempts", "count").row(0) == (3, 2)


def test_cli_rates_on_parquet(tmp_path, capsys):
    lf = _rows(*[_delivered(i) for i in range(9)], _cap(30), _delivered(90, GOOG, "gmail.com"))
    path = tmp_path / "attempts.parquet"
    lf.collect().write_parquet(path)
    assert cli.main(["rates", str(path), "--by", "provider", "--bucket", "1h", "--csv"]) == 0
    csv = pl.read_csv(capsys.readouterr().out.encode())
    assert csv.select("bucket", "provider", "attempts", "count", "band", "non_mx_rows").rows() == [
        ("2026-03-02T09:00:00.000000+0000", "microsoft_consumer", 10, 1, "incident", 0),
        ("2026-03-02T10:00:00.000000+0000", "google", 1, 0, "watch", 0),
    ]


def test_cli_rates_by_class_and_side(tmp_path, capsys):
    relay = "smarthost.example.net"
    lf = _rows(*[_delivered(i) for i in range(6)], _cap(7), _cap(8),
               (9, "smtp", GOOG, "gmail.com", 452, "4.2.2", "deferred"), _delivered(10, GOOG, "gmail.com"),
               (11, "error", MS, "outlook.com", None, "4.4.2", "deferred"))
    path = tmp_path / "attempts.parquet"
    lf.collect().write_parquet(path)
    assert cli.main(["rates", str(path), "--by", "provider_family,side", "--class", "capacity", "--csv"]) == 0
    csv = pl.read_csv(capsys.readouterr().out.encode())
    assert csv.select("provider_family", "side", "attempts", "count", "band", "non_mx_rows").rows() == [
        ("microsoft", "receiver", 8, 2, "incident", 0),
        ("google", "receiver", 2, 0, "watch", 0),
        ("microsoft", "sender", 0, 0, None, 1),  # the error-agent suspension: its own group, no attempts
    ]
    assert relay not in csv["provider_family"].to_list()


def test_rate_with_custom_denominator_and_eager_input():
    lf = _rows(_cap(0), _delivered(1), (2, "error", MS, "outlook.com", None, "4.4.2", "deferred"))
    every_row = metrics.rate(lf.collect(), where=metrics.response_is(), denominator=pl.lit(True)).collect()
    assert every_row.select("attempts", "count", "rate_per_10k").row(0) == (3, 1, pytest.approx(10_000 / 3))
    smtp_code_any = metrics.rate(lf, where=metrics.response_is(code=452, enhanced=None), by="recipient_domain").collect()
    assert smtp_code_any.select("recipient_domain", "attempts", "count").rows() == [("outlook.com", 2, 1)]


def test_real_postfix_denominator(realworld):
    """Real lines: two per-MX connect timeouts and one hotmail delivery are MX attempts; the amavis
    content-filter hops (127.0.0.1:10024/10025) and the error-agent suspensions are not."""
    from deferral_kit.loaders import load

    forums = realworld / "postfix" / "forums"
    res = load([forums / "pastebin_MnYLJtdj_amavis_hops_hotmail_sent.log", forums / "pastebin_Bv937fkd_amavis_down_suspended.log",
                forums / "pastebin_6Cc8MVqF_hotmail_connect_timeouts.log"])
    table = metrics.rates_table(res.attempts, by=["provider"], bucket=None, code=452, enhanced="4.3.1", response_class=None, bands=None).collect()
    assert table.select("provider", "attempts", "count", "band", "non_mx_rows").rows() == [
        ("microsoft_consumer", 3, 0, "watch", 0),
        ("local", 0, 0, None, 8),  # amavis hops and suspensions of the amavis hop: no MX attempt, still shown
    ]
    assert sorted(metrics.non_mx_rows(res.attempts).collect().rows()) == [("error", 5), ("loopback", 3)]


# --- rates_table keeps groups that only have non-MX rows ------------------------------------------

ORG_MX, ORG_IP = "mx.example.org", "203.0.113.25"


def _pf(minute, agent, dom, mx, ip, code, dsn, outcome, response) -> dict:
    """One canonical row shaped like the Postfix loader's output (columns it does not set stay null)."""
    return dict(ts=T0 + timedelta(minutes=minute), source="postfix", log_host="mx1", instance="postfix", agent=agent,
                queue_id=f"4F{minute:04X}A1", message_key=f"4F{minute:04X}A1@mx1", sender="news@example.net",
                recipient=f"user{minute}@{dom}", recipient_domain=dom, mx_host=mx, mx_ip=ip, smtp_code=code,
                enhanced_code=dsn, dsn=dsn, response=response, outcome=outcome, remote=code is not None, attempt=1)


def _sent(minute, dom="outlook.com", mx=MS, ip="52.101.40.2"):
    return _pf(minute, "smtp", dom, mx, ip, 250, "2.0.0", "delivered", "250 2.0.0 OK <msg@example.net> [Hostname=X]")


def _capped(minute, dom="outlook.com", mx=MS, ip="52.101.40.2"):
    return _pf(minute, "smtp", dom, mx, ip, 452, "4.3.1", "deferred", R452)


def _suspended(minute, dom="example.org", mx=ORG_MX, ip=ORG_IP):
    """Postfix's error agent deferring a queued message while the destination is marked dead."""
    return _pf(minute, "error", dom, mx, ip, None, "4.4.1", "deferred",
               f"delivery temporarily suspended: connect to {mx}[{ip}]:25: Connection timed out")


def _canonical(*rows: dict) -> pl.LazyFrame:
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    return schema.conform(pl.LazyFrame(cols, schema={k: schema.ATTEMPTS[k] for k in cols}))


def _outage() -> pl.LazyFrame:
    """09:xx: outlook.com 6 sent + 2 capped + 1 suspension, gmail.com 3 sent, example.org 2 suspensions;
    10:xx: only suspensions (example.org 1, outlook.com 1)."""
    return _canonical(
        *[_sent(i) for i in range(6)], _capped(6), _capped(7), _suspended(30, "outlook.com", MS, "52.101.40.2"),
        *[_sent(10 + i, "gmail.com", GOOG, "142.250.27.26") for i in range(3)],
        _suspended(20), _suspended(40), _suspended(65), _suspended(75, "outlook.com", MS, "52.101.40.2"),
    )


RATES_TABLE_SCHEMA = pl.Schema({"attempts": pl.Int64, "count": pl.Int64, "rate_per_10k": pl.Float64, "ci_low_per_10k": pl.Float64,
                                "ci_high_per_10k": pl.Float64, "band": pl.String, "non_mx_rows": pl.Int64})


def test_rates_table_keeps_domain_with_only_error_agent_suspensions():
    table = metrics.rates_table(_outage(), by=["recipient_domain"]).collect()
    assert table.schema == pl.Schema({"recipient_domain": pl.String, **RATES_TABLE_SCHEMA})
    assert table.select("recipient_domain", "attempts", "count", "band", "non_mx_rows").rows() == [
        ("outlook.com", 8, 2, "incident", 2),
        ("gmail.com", 3, 0, "watch", 0),
        ("example.org", 0, 0, None, 3),  # no MX attempt: no denominator, so no rate, interval or band
    ]
    org = table.row(2, named=True)
    assert (org["rate_per_10k"], org["ci_low_per_10k"], org["ci_high_per_10k"]) == (None, None, None)
    outlook = table.row(0, named=True)
    assert outlook["rate_per_10k"] == pytest.approx(2500.0)
    assert (outlook["ci_low_per_10k"], outlook["ci_high_per_10k"]) == pytest.approx(tuple(x * 1e4 for x in metrics.wilson(2, 8)))
    # every input row is either an attempt or a non-MX row of exactly one group
    assert table["attempts"].sum() + table["non_mx_rows"].sum() == _outage().collect().height == 16


def test_rates_table_mixed_groups_are_what_rate_gives():
    lf = _outage()
    for bucket in (None, "1h"):
        table = metrics.rates_table(lf, by=["recipient_domain"], bucket=bucket).collect()
        rated = metrics.rate(lf, where=metrics.response_is(), by=["recipient_domain"], bucket=bucket).collect()
        assert table.filter(pl.col("attempts") > 0).drop("non_mx_rows").equals(rated)
        assert table.filter(pl.col("attempts") == 0)["rate_per_10k"].null_count() == table.filter(pl.col("attempts") == 0).height > 0


def test_rates_table_keeps_bucket_with_only_suspensions():
    h9, h10 = datetime(2026, 3, 2, 9, tzinfo=UTC), datetime(2026, 3, 2, 10, tzinfo=UTC)
    table = metrics.rates_table(_outage(), by="recipient_domain", bucket="1h").collect()
    assert table.schema == pl.Schema({"bucket": schema.UTC_DT, "recipient_domain": pl.String, **RATES_TABLE_SCHEMA})
    assert table.select("bucket", "recipient_domain", "attempts", "count", "rate_per_10k", "band", "non_mx_rows").rows() == [
        (h9, "outlook.com", 8, 2, 2500.0, "incident", 1),
        (h9, "gmail.com", 3, 0, 0.0, "watch", 0),
        (h9, "example.org", 0, 0, None, None, 2),
        (h10, "example.org", 0, 0, None, None, 1),   # an hour with only suspensions
        (h10, "outlook.com", 0, 0, None, None, 1),   # ... also for a domain that had attempts the hour before
    ]


def test_rates_table_without_keys():
    lf = _outage()
    whole = metrics.rates_table(lf, by=()).collect()
    assert whole.schema == RATES_TABLE_SCHEMA
    assert whole.select("attempts", "count", "band", "non_mx_rows").rows() == [(11, 2, "incident", 5)]
    assert whole["rate_per_10k"][0] == pytest.approx(2e4 / 11)
    hourly = metrics.rates_table(lf, by=(), bucket="1h").collect()
    assert hourly.select("bucket", "attempts", "count", "rate_per_10k", "non_mx_rows").rows() == [
        (datetime(2026, 3, 2, 9, tzinfo=UTC), 11, 2, pytest.approx(2e4 / 11), 3),
        (datetime(2026, 3, 2, 10, tzinfo=UTC), 0, 0, None, 2),
    ]
    only_suspended = metrics.rates_table(lf.filter(pl.col("agent") == "error"), by=()).collect()
    assert only_suspended.rows() == [(0, 0, None, None, None, None, 5)]
    assert metrics.rates_table(schema.empty(), by=()).collect().height == 0
    assert metrics.rates_table(schema.empty()).collect().height == 0


def test_cli_rates_shows_destination_with_only_suspensions(tmp_path, capsys):
    path = tmp_path / "attempts.parquet"
    _outage().collect().write_parquet(path)
    assert cli.main(["rates", str(path), "--csv"]) == 0
    csv = pl.read_csv(capsys.readouterr().out.encode())
    assert csv.select("recipient_domain", "attempts", "count", "rate_per_10k", "ci_low_per_10k", "band", "non_mx_rows").rows() == [
        ("outlook.com", 8, 2, 2500.0, pytest.approx(metrics.wilson(2, 8)[0] * 1e4), "incident", 2),
        ("gmail.com", 3, 0, 0.0, 0.0, "watch", 0),
        ("example.org", 0, 0, None, None, None, 3),
    ]
    assert cli.main(["rates", str(path)]) == 0
    text = capsys.readouterr().out
    assert "example.org" in text and "null" in text
