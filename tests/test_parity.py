"""One generated world written as every supported MTA/ESP format must load to the same counts.

The world is format-independent; each writer renders it as the real software would, and
``deferral_kit.loaders.load(..., format="auto")`` must detect the format and give exactly the
truth's per-domain, per-MX (where the format names the MX) and per-outcome counts.
Postfix-only local suspensions (``postfix/error``) have no equivalent in the other formats and
are left out of their expectation.
"""

from __future__ import annotations

from dataclasses import replace

import polars as pl
import pytest

from deferral_kit.loaders import load
from deferral_kit.sample import FORMATS, Episode, catalog, WorldConfig, default_episodes, generate, write

# The MX columns each format names (SendGrid, SES and Postmark name neither; SES gives the
# MX's IP only on deliveries and bounces, not on delays).
MX_KEYS = {"postfix": ["mx_host", "mx_ip"], "exim": ["mx_host", "mx_ip"], "powermta": ["mx_host", "mx_ip"],
           "kumomta": ["mx_host", "mx_ip"], "exchange": ["mx_host", "mx_ip"], "mailgun": ["mx_host"], "sparkpost": ["mx_ip"]}
# an explicit expiry record (Exim/PMTA log it as a failure; SendGrid, SES, SparkPost and
# Postmark exports are written without one)
HAS_EXPIRY = {"postfix", "kumomta", "exchange", "mailgun"}
# SparkPost delivery events carry no reply, so no 250 code
NO_DELIVERY_CODE = {"sparkpost"}


@pytest.fixture(scope="module")
def world():
    # more mail to the unreachable domain than usual, so connect timeouts and suspensions occur
    dests = [replace(d, weight=0.01) if d.unreachable else d for d in catalog.destinations()]
    cfg = WorldConfig(days=2, seed=8, messages_per_day=1200, maximal_queue_lifetime_s=86400, p_over_quota=0.01, destinations=dests)
    cfg.episodes = [*default_episodes(cfg),
                    Episode("relay-disk", kind="sender_relay", probability=0.5, start="2026-11-16T08:00Z", end="2026-11-16T09:00Z")]
    return generate(cfg)


@pytest.fixture(scope="module")
def loaded(world, tmp_path_factory):
    out = {}
    for fmt in FORMATS:
        d = tmp_path_factory.mktemp(fmt)
        write(world, fmt, d)
        out[fmt] = load(d, format="auto").attempts.collect()
    return out


def counts(frame: pl.DataFrame, keys: list[str]) -> dict:
    return {tuple(r[:-1]): r[-1] for r in frame.group_by(keys).len().iter_rows()}


def expected(world, fmt: str) -> pl.DataFrame:
    return world.truth if fmt == "postfix" else world.truth.filter(pl.col("agent") != "error")


def test_world_has_every_kind_of_row(world):
    t = world.truth
    assert {"delivered", "deferred", "bounced", "expired"} == set(t["outcome"])
    assert t.filter(pl.col("mx_host") == "relay.internal.example").height > 0
    assert t.filter(~pl.col("remote") & (pl.col("agent") == "smtp")).height > 0  # connect timeouts
    assert t.filter(pl.col("n_hosts") == 2).height > 0  # a second MX tried after a session-level 4xx


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_is_detected(loaded, fmt):
    assert set(loaded[fmt]["source"]) == {fmt}


@pytest.mark.parametrize("fmt", FORMATS)
def test_mx_attempts_per_domain_and_outcome(world, loaded, fmt):
    got = loaded[fmt].filter(pl.col("agent") == "smtp")
    want = expected(world, fmt).filter(pl.col("agent") == "smtp")
    assert counts(got, ["recipient_domain", "outcome"]) == counts(want, ["recipient_domain", "outcome"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_remote_replies_per_domain_outcome_and_code(world, loaded, fmt):
    got = loaded[fmt].filter(pl.col("remote").fill_null(False))
    want = world.truth.filter(pl.col("remote"))
    if fmt in NO_DELIVERY_CODE:
        want = want.with_columns(pl.when(pl.col("outcome") != "delivered").then(pl.col("smtp_code")).alias("smtp_code"))
    assert counts(got, ["recipient_domain", "outcome", "smtp_code"]) == counts(want, ["recipient_domain", "outcome", "smtp_code"])
    c431 = (pl.col("smtp_code") == 452) & (pl.col("enhanced_code") == "4.3.1")
    assert got.filter(c431).height == want.filter(c431).height == world.summary()["code_452_431"]["total"]


@pytest.mark.parametrize("fmt", sorted(MX_KEYS))
def test_remote_replies_per_mx_host(world, loaded, fmt):
    got = loaded[fmt].filter(pl.col("remote").fill_null(False))
    want = world.truth.filter(pl.col("remote"))
    keys = [*MX_KEYS[fmt], "outcome"]
    assert counts(got, keys) == counts(want, keys)


@pytest.mark.parametrize("fmt", sorted(HAS_EXPIRY))
def test_expiries_per_domain(world, loaded, fmt):
    got = loaded[fmt].filter(pl.col("outcome") == "expired")
    want = world.truth.filter(pl.col("outcome") == "expired")
    assert counts(got, ["recipient_domain"]) == counts(want, ["recipient_domain"])
    assert sorted(got["recipient"]) == sorted(want["recipient"])
