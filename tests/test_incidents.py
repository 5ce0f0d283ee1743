"""Episode detection and records on a day of traffic with known episodes.

The hand-built day (classes and sides given, as ``classify`` would add them):

* Microsoft consumer, 300 first tries an hour over 4 IPs; in hours 5, 6, 7 and 9 the first 15
  get ``452 4.3.1`` (receiver capacity) and are retried 30+ minutes later in the same hour:
  12 delivered, 3 bounced.  Hour 8 is quiet, so the episode runs 05:00-10:00.
* Our own Exchange relay (provider ``other``), 100 tries an hour; in hours 12 and 13 the
  first 20 get ``452 4.3.1 ... (UsedDiskSpace[...])``: the sender-side episode.
* A warm-up IP (198.51.100.9), 50 tries an hour to Microsoft in hours 18-20, 10 of them
  ``451 4.7.650`` (reputation).
* Google, 200 tries an hour; one ``421 4.3.0 Temporary System Problem`` (capacity) at 15:00:
  a burst of 1 in 200, too small to be an episode.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import polars as pl
import pytest

from deferral_kit import incidents, queue, outcomes, schema

T0 = datetime(2026, 3, 2, tzinfo=timezone.utc)
MS_MX = "outlook-com.olc.protection.outlook.com"
RELAY = "relay1.corp.example"
CAP = "452 4.3.1 Insufficient system resources (TSTE) [outlook.com]"
RELAY_CAP = "452 4.3.1 Insufficient system resources (UsedDiskSpace[C:\\Program Files\\Microsoft\\Exchange Server\\V15\\TransportRoles\\data\\Queue])"
REP = "451 4.7.650 The mail server [198.51.100.9] has been temporarily rate limited due to IP reputation. (S775)"


def _row(**kw) -> dict:
    base = dict(agent="smtp", attempt=1, outcome="delivered", smtp_code=250, enhanced_code="2.0.0", response="250 2.0.0 OK",
                response_class="delivered", side="receiver")
    base.update(kw)
    base["queued_at"] = base["ts"] - timedelta(seconds=5) if base["attempt"] == 1 else base.pop("queued_at")
    return base


def day() -> pl.LazyFrame:
    rows: list[dict] = []
    for h in range(24):
        hour = T0 + timedelta(hours=h)
        for i in range(300):
            mk, rcpt, ip = f"ms{h}-{i}", f"u{i}@outlook.com", f"192.0.2.{i % 4 + 1}"
            common = dict(message_key=mk, recipient=rcpt, recipient_domain="outlook.com", mx_host=MS_MX, egress_ip=ip, provider="microsoft_consumer")
            first_ts = hour + timedelta(seconds=10 * i)
            if h in (5, 6, 7, 9) and i < 15:
                rows.append(_row(**common, ts=first_ts, outcome="deferred", smtp_code=452, enhanced_code="4.3.1", response=CAP, response_class="capacity"))
                retry = dict(ts=hour + timedelta(minutes=50, seconds=i), attempt=2, queued_at=first_ts - timedelta(seconds=5))
                if i < 12:
                    rows.append(_row(**common, **retry))
                else:
                    rows.append(_row(**common, **retry, outcome="bounced", smtp_code=550, enhanced_code="5.5.0",
                                     response="550 5.5.0 Requested action not taken: mailbox unavailable", response_class="mailbox"))
            else:
                rows.append(_row(**common, ts=first_ts))
        for i in range(100):
            common = dict(message_key=f"rl{h}-{i}", recipient=f"r{i}@outlook.com", recipient_domain="outlook.com", mx_host=RELAY, egress_ip="10.0.0.5",
                          provider="other", side="sender")
            first_ts = hour + timedelta(seconds=30 * i)
            if h in (12, 13) and i < 20:
                rows.append(_row(**common, ts=first_ts, outcome="deferred", smtp_code=452, enhanced_code="4.3.1", response=RELAY_CAP, response_class="capacity", smtp_stage="MAIL FROM"))
                rows.append(_row(**common, ts=hour + timedelta(minutes=55), attempt=2, queued_at=first_ts - timedelta(seconds=5)))
            else:
                rows.append(_row(**common, ts=first_ts))
        if h in (18, 19, 20):
            for i in range(50):
                common = dict(message_key=f"wu{h}-{i}", recipient=f"w{i}@outlook.com", recipient_domain="outlook.com", mx_host=MS_MX,
                              egress_ip="198.51.100.9", provider="microsoft_consumer")
                ts = hour + timedelta(seconds=60 * i)
                if i < 10:
                    rows.append(_row(**common, ts=ts, outcome="deferred", smtp_code=451, enhanced_code="4.7.650", response=REP, response_class="reputation"))
                else:
                    rows.append(_row(**common, ts=ts))
        for i in range(200):
            common = dict(message_key=f"g{h}-{i}", recipient=f"g{i}@gmail.com", recipient_domain="gmail.com", mx_host="gmail-smtp-in.l.google.com",
                          egress_ip=f"192.0.2.{i % 4 + 1}", provider="google")
            ts = hour + timedelta(seconds=15 * i)
            if h == 15 and i == 0:
                rows.append(_row(**common, ts=ts, outcome="deferred", smtp_code=421, enhanced_code="4.3.0", response="421 4.3.0 Temporary System Problem.  Try again later.", response_class="capacity"))
                rows.append(_row(**common, ts=ts + timedelta(minutes=20), attempt=2, queued_at=ts - timedelta(seconds=5)))
            else:
                rows.append(_row(**common, ts=ts))
    df = pl.DataFrame(rows, infer_schema_length=None).with_row_index("line_no", offset=1).with_columns(
        pl.col("ts", "queued_at").cast(schema.UTC_DT), pl.col("line_no").cast(pl.Int64)
    )
    extra = df.select("provider", "response_class", "side")
    return pl.concat([schema.conform(df.lazy()), extra.lazy()], how="horizontal")


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


@pytest.fixture(scope="module")
def attempts() -> pl.LazyFrame:
    return day().collect().lazy()


@pytest.fixture(scope="module")
def episodes(attempts) -> pl.DataFrame:
    return incidents.detect(attempts)


def test_452_431_episodes_per_provider(episodes):
    assert episodes.select("episode", "signal", "provider", "start", "end", "hot_buckets", "attempts", "count", "peak_at", "peak_band").rows() == [
        (1, "452 4.3.1", "microsoft_consumer", at(5), at(10), 4, 4 * 315 + 300, 60, at(5), "incident"),
        (2, "452 4.3.1", "other", at(12), at(14), 2, 240, 40, at(12), "incident"),
    ]
    ms = episodes.row(0, named=True)
    assert ms["rate_per_10k"] == pytest.approx(60 / 1560 * 1e4)
    assert ms["peak_rate_per_10k"] == pytest.approx(15 / 315 * 1e4)
    assert ms["ci_low_per_10k"] < ms["rate_per_10k"] < ms["ci_high_per_10k"]
    assert ms["first_seen"] == at(5) and ms["last_seen"] == at(9) + timedelta(seconds=140)


def test_receiver_capacity_episode_record(episodes):
    ms = episodes.row(0, named=True)
    assert ms["response_class"] == "capacity"
    assert ms["side"] == "receiver"
    assert ms["sending_ips"] == ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"]
    assert (ms["n_sending_ips"], ms["active_sending_ips"]) == (4, 4)
    assert ms["destinations"] == ["outlook.com"] and ms["mx_hosts"] == [MS_MX] and ms["responses"] == [CAP]
    assert (ms["affected_recipients"], ms["retries"], ms["delivered"], ms["bounced"], ms["expired"], ms["pending"]) == (60, 60, 48, 12, 0, 0)
    assert ms["retry_success_rate"] == pytest.approx(0.8)
    assert ms["final_delivery_rate"] == pytest.approx(0.8)
    assert (ms["recovered_at"], ms["time_to_recover"], ms["ongoing"]) == (at(10), timedelta(hours=5), False)
    assert ms["side_evidence"].startswith("60 of 60 matching replies came from the receiver's MX hosts (1 MX host(s), 1 destination(s)); 4 of 4 active sending IPs")


def test_own_relay_episode_is_attributed_to_the_sender(episodes):
    relay = episodes.row(1, named=True)
    assert relay["side"] == "sender"
    assert relay["mx_hosts"] == [RELAY]
    assert "own infrastructure (relay1.corp.example)" in relay["side_evidence"]
    assert (relay["affected_recipients"], relay["retry_success_rate"], relay["final_delivery_rate"]) == (40, 1.0, 1.0)
    v = incidents.verdict(relay)
    assert v["verdict"].startswith("fix our own relay")
    assert v["status"] == "recovered"


def test_warmup_ip_reputation_is_its_own_episode_and_class():
    eps = incidents.detect(day(), response_class="all")
    got = eps.select("episode", "signal", "provider", "start", "end", "count", "response_class", "side", "sending_ips").rows()
    assert got == [
        (1, "capacity", "microsoft_consumer", at(5), at(10), 60, "capacity", "receiver", ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"]),
        (2, "capacity", "other", at(12), at(14), 40, "capacity", "sender", ["10.0.0.5"]),
        (3, "reputation", "microsoft_consumer", at(18), at(21), 30, "reputation", "receiver", ["198.51.100.9"]),
    ]
    rep = eps.row(2, named=True)
    assert rep["attempts"] == 3 * 350
    assert (rep["n_sending_ips"], rep["active_sending_ips"]) == (1, 5)
    assert "concentrated on few of our sending IPs" in rep["side_evidence"]
    assert incidents.verdict(rep)["verdict"].startswith("slow the affected sending IPs")
    # the 4.7.650 replies never count towards a 452 4.3.1 episode
    assert incidents.detect(day(), code=451, enhanced="4.7.650")["count"].to_list() == [30]


def test_a_burst_too_small_is_not_an_episode(attempts):
    r = incidents.rates(attempts, response_class="capacity")
    burst = r.filter((pl.col("provider") == "google") & (pl.col("count") > 0))
    assert burst.select("bucket", "attempts", "count", "band", "hot").rows() == [(at(15), 201, 1, "incident", False)]
    # its Wilson lower bound alone (about 0.9 per 10k of 1/201 = 50 per 10k) would pass the
    # 2 per 10k throttle threshold: the count floor is what keeps a lone reply out
    assert burst["ci_low_per_10k"][0] > 2
    eps = incidents.detect(attempts, response_class="capacity")
    assert "google" not in eps["provider"].to_list()
    assert "google" in incidents.detect(attempts, response_class="capacity", min_count=1)["provider"].to_list()


def test_merge_gap_splits_when_short(attempts):
    eps = incidents.detect(attempts, merge_gap="0h")
    ms = eps.filter(pl.col("provider") == "microsoft_consumer")
    assert ms.select("start", "end").rows() == [(at(5), at(8)), (at(9), at(10))]


def test_per_destination(attempts):
    eps = incidents.detect(attempts, by=["recipient_domain"])
    # our relay and Microsoft both answered for outlook.com: one destination episode 05:00-14:00
    # would need the gap merged; with a 1h gap they stay apart
    assert eps.select("recipient_domain", "start", "end", "count").rows() == [
        ("outlook.com", at(5), at(10), 60),
        ("outlook.com", at(12), at(14), 40),
    ]
    assert eps["side"].to_list() == ["receiver", "sender"]


def test_no_episodes_gives_an_empty_frame_with_the_columns(attempts):
    eps = incidents.detect(attempts.filter(pl.col("provider") == "google"))
    assert eps.height == 0
    assert eps.columns == ["episode", "signal", "provider", *incidents.EPISODE_COLUMNS[2:]]


def test_capacity_verdict_waits_for_queue_age_to_fall(attempts, episodes):
    ms = episodes.row(0, named=True)
    v = incidents.verdict(ms)
    assert v["verdict"] == "receiver capacity: keep retrying, ease off slightly, hold ramp-ups"
    assert v["actions"][0] == "keep retrying at the normal schedule (80% of retries right after a deferral were delivered)"
    assert "reduce concurrency towards this provider slightly" in v["actions"][1]
    assert "hold IP warm-up ramp-ups" in v["actions"][2]
    assert v["restore_when"] == "the rate is back to baseline (watch band) and queue age has fallen back"
    oc = outcomes.recipient_outcomes(attempts.filter(pl.col("provider") == "microsoft_consumer"))
    age = queue.age_over_time(oc, every="10m", by=[]).collect()
    # until 18:00 the queue is empty again after the episode
    assert incidents.verdict(ms, queue_age=age.filter(pl.col("instant") < at(18)))["status"] == "recovered"
    # by the end of the day the warm-up IP's 30 deferred recipients have waited over 5 hours
    assert age.row(-1) == (at(23 + 2 / 3), 30, pytest.approx(340 + 5 / 60), pytest.approx(337 + 11 / 60))
    assert incidents.verdict(ms, queue_age=age)["status"] == "recovering"


def test_text_listing(episodes):
    text = incidents.to_text(episodes)
    assert "#1 microsoft_consumer  452 4.3.1  class capacity  side receiver" in text
    assert "60 of 1,560 attempts = 384.6 per 10k" in text
    assert "#2 other  452 4.3.1  class capacity  side sender" in text


# --- a generated world with known episodes, classified by deferral_kit.classify ---------------------

WARMUP_IP = "198.51.100.30"


@pytest.fixture(scope="module")
def world():
    from deferral_kit.sample import Episode, SendingIP, WorldConfig, generate
    from deferral_kit.sample.world import DEFAULT_IPS

    return generate(WorldConfig(
        days=3, seed=11, messages_per_day=4000, sending_ips=(*DEFAULT_IPS, SendingIP(WARMUP_IP, pool="warmup", weight=1.0)),
        episodes=[
            Episode("ms-capacity", kind="capacity", providers=["microsoft"], probability=0.3, start="2026-11-17T13:00Z", end="2026-11-17T17:00Z"),
            Episode("relay-disk", kind="sender_relay", probability=0.6, start="2026-11-16T08:00Z", end="2026-11-16T09:30Z"),
            Episode("warmup-step", kind="reputation", providers=["microsoft"], egress_ips=[WARMUP_IP], probability=0.6,
                    start="2026-11-18T08:00Z", end="2026-11-18T14:00Z"),
            Episode("tiny-burst", kind="capacity", providers=["microsoft_365"], probability=0.06, start="2026-11-16T10:00Z", end="2026-11-16T10:30Z"),
        ],
    ))


def _truth_count(world, where: pl.Expr, start: str, end: str) -> int:
    t = world.truth.filter((pl.col("agent") == "smtp") & where & pl.col("ts").is_between(
        datetime.fromisoformat(start), datetime.fromisoformat(end), closed="left"))
    return t.height


def test_generated_world_episodes(world):
    eps = incidents.detect(world.attempts.lazy())
    c431 = (pl.col("smtp_code") == 452) & (pl.col("enhanced_code") == "4.3.1")
    assert eps.select("provider", "start", "end", "response_class", "side").rows() == [
        ("other", datetime.fromisoformat("2026-11-16T08:00Z"), datetime.fromisoformat("2026-11-16T10:00Z"), "local", "sender"),
        ("microsoft_365", datetime.fromisoformat("2026-11-17T13:00Z"), datetime.fromisoformat("2026-11-17T17:00Z"), "capacity", "receiver"),
        ("microsoft_consumer", datetime.fromisoformat("2026-11-17T13:00Z"), datetime.fromisoformat("2026-11-17T17:00Z"), "capacity", "receiver"),
    ]
    assert eps["count"].to_list() == [
        _truth_count(world, c431 & (pl.col("mx_host") == "relay.internal.example"), "2026-11-16T08:00Z", "2026-11-16T10:00Z"),
        _truth_count(world, c431 & (pl.col("provider_truth") == "microsoft_365"), "2026-11-17T13:00Z", "2026-11-17T17:00Z"),
        _truth_count(world, c431 & (pl.col("provider_truth") == "microsoft_consumer"), "2026-11-17T13:00Z", "2026-11-17T17:00Z"),
    ]
    relay = eps.row(0, named=True)
    assert relay["mx_hosts"] == ["relay.internal.example"]
    assert relay["side_evidence"].startswith(f"{relay['count']} of {relay['count']} matching replies came from our own infrastructure (relay.internal.example)")
    assert incidents.verdict(relay)["verdict"].startswith("fix our own relay")
    ms = eps.row(2, named=True)
    assert (ms["n_sending_ips"], ms["active_sending_ips"]) == (5, 5)
    # the affected recipients' fate, from the generator's per-recipient truth
    hit = world.truth.filter((pl.col("agent") == "smtp") & c431 & (pl.col("provider_truth") == "microsoft_consumer")
                             & pl.col("ts").is_between(ms["start"], ms["end"], closed="left")).select("message_key", "recipient").unique()
    fate = world.messages.join(hit, on=["message_key", "recipient"])
    assert ms["affected_recipients"] == fate.height
    assert ms["delivered"] == int((fate["final_outcome"] == "delivered").sum())
    assert ms["final_delivery_rate"] == pytest.approx((fate["final_outcome"] == "delivered").sum() / (fate["final_outcome"] != "pending").sum())
    # the half-hour burst of 452 4.3.1 at microsoft_365 on the 16th (2 of 38 tries) is not an episode
    assert _truth_count(world, c431 & (pl.col("provider_truth") == "microsoft_365"), "2026-11-16T10:00Z", "2026-11-16T11:00Z") == 2
    assert eps.filter(pl.col("start") < datetime.fromisoformat("2026-11-17T00:00Z"))["provider"].to_list() == ["other"]


def test_generated_warmup_ip_is_reputation(world):
    eps = incidents.detect(world.attempts.lazy(), response_class="reputation")
    start, end = datetime.fromisoformat("2026-11-18T08:00Z"), datetime.fromisoformat("2026-11-18T14:00Z")
    assert eps.select("provider", "start", "end", "response_class", "side", "sending_ips", "active_sending_ips").rows() == [
        ("microsoft_365", start, end, "reputation", "receiver", [WARMUP_IP], 5),
        ("microsoft_consumer", start, end, "reputation", "receiver", [WARMUP_IP], 5),
    ]
    rep = (pl.col("class_truth") == "reputation") & (pl.col("outcome") == "deferred")
    assert eps["count"].to_list() == [
        _truth_count(world, rep & (pl.col("provider_truth") == p), "2026-11-18T08:00Z", "2026-11-18T14:00Z") for p in ("microsoft_365", "microsoft_consumer")
    ]
    assert incidents.verdict(eps.row(1, named=True))["actions"][0] == f"reduce volume on {WARMUP_IP}; pause their warm-up ramp"


# --- command line and notebook ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def world_parquet(world, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("world") / "attempts.parquet"
    world.attempts.write_parquet(path)
    return str(path)


def test_cli_json(world, world_parquet, capsys):
    import json

    from deferral_kit import cli

    assert cli.main(["incidents", world_parquet, "--provider", "microsoft", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [(e["provider"], e["start"], e["end"], e["side"]) for e in got] == [
        ("microsoft_365", "2026-11-17T13:00:00+00:00", "2026-11-17T17:00:00+00:00", "receiver"),
        ("microsoft_consumer", "2026-11-17T13:00:00+00:00", "2026-11-17T17:00:00+00:00", "receiver"),
    ]
    assert got[1]["time_to_recover"] == 4 * 3600
    assert cli.main(["incidents", world_parquet, "--class", "reputation", "--by", "provider_family"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#1 microsoft  reputation  class reputation  side receiver\n    2026-11-18 08:00 - 2026-11-18 14:00 UTC")
    assert f"sending IPs 1 of 5: {WARMUP_IP}" in out
    assert cli.main(["incidents", world_parquet, "--provider", "yahoo"]) == 0
    assert capsys.readouterr().out.startswith("no episodes")
    assert cli.main(["incidents", world_parquet, "--merge-gap", "2x"]) == 2
    assert "grid step '2x'" in capsys.readouterr().err


@pytest.mark.slow
def test_incident_review_notebook(world, world_parquet, tmp_path):
    from deferral_kit import report

    rep = report.run(notebook="incident_review", parameters={"inputs": [world_parquet], "week": "data", "display_tz": "Europe/Berlin"},
                     out=tmp_path, progress=False, log=lambda msg: None)
    m = rep.metrics
    assert m["week"] == "2026-W47"
    c431 = (pl.col("smtp_code") == 452) & (pl.col("enhanced_code") == "4.3.1")
    assert [(e["episode"], e["provider"], e["count"]) for e in m["episodes"]] == [
        (i, p, _truth_count(world, c431 & (pl.col("provider_truth") == p), "2026-11-17T13:00Z", "2026-11-17T17:00Z"))
        for i, p in ((1, "microsoft_365"), (2, "microsoft_consumer"))
    ]
    assert m["episode"]["provider"] == "microsoft_consumer" and m["episode"]["side"] == "receiver"
    assert m["verdict"]["verdict"] == "receiver capacity: keep retrying, ease off slightly, hold ramp-ups"
    assert m["verdict"]["status"] == "recovered"
    during = next(d for d in m["delivery"] if d["period"] == "during")
    assert during["first_attempt_delivery_rate"] < during["final_delivery_rate"]
    assert m["scope"]["side"] == "receiver"
    assert m["charts"] == 4
    page = rep.html.read_text(encoding="utf-8")
    assert report.external_references(page) == []
    assert "Playbook verdict" in page and "import html" not in page


def test_review_frames_and_charts(attempts, episodes):
    from deferral_kit import charts_incidents

    ep = incidents.pick(episodes)
    assert ep["episode"] == 1  # the most matching replies
    assert incidents.pick(episodes, 2)["provider"] == "other"
    assert incidents.pick(episodes.head(0)) is None
    rv = incidents.review(attempts.filter(pl.col("provider") == "microsoft_consumer"), ep, pad="2h", every="30m", everyone=attempts)
    assert (rv.start, rv.end) == (at(3), at(12))
    assert (rv.scope["side"], rv.scope["events"], rv.scope["top_provider"]) == ("receiver", 60, "microsoft")
    assert rv.rates["bucket"].to_list() == [at(h) for h in range(3, 12)]
    assert rv.rates.filter(pl.col("count") > 0)["count"].to_list() == [15, 15, 15, 15]
    # 09:30: the hour-9 deferrals wait (15, queued 08:59:55 + 10 s apart); p90 interpolates the ages of the 3rd and 2nd queued
    assert rv.queue_age.filter(pl.col("instant") == at(9.5)).row(0) == (at(9.5), 15, pytest.approx(30 + 5 / 60), pytest.approx(30 + 5 / 60 - 20 / 60 + 0.6 * 10 / 60))
    assert rv.delivery.select(pl.col("period").cast(pl.String), "recipients", "first_attempt_delivered", "delivered", "bounced").rows() == [
        ("before", 2 * 300, 600, 600, 0),
        ("during", 5 * 300, 1440, 1440 + 48, 12),
        ("after", 2 * 300, 600, 600, 0),
    ]
    assert incidents.verdict_markdown(rv.verdict).startswith("**receiver capacity: keep retrying, ease off slightly, hold ramp-ups** (status: recovered)")
    spec = charts_incidents.episode_timeline(episodes, tz="Europe/Berlin").to_dict()
    rows = next(iter(spec["datasets"].values()))
    assert [(r["row"], r["time"][:19], r["time_end"][:19], r["peak_band"]) for r in rows] == [
        ("microsoft_consumer · 452 4.3.1", "2026-03-02T06:00:00", "2026-03-02T11:00:00", "incident"),
        ("other · 452 4.3.1", "2026-03-02T13:00:00", "2026-03-02T15:00:00", "incident"),
    ]
    for chart in (charts_incidents.rate_around(rv.rates, ep, group="provider"), charts_incidents.queue_age(rv.queue_age, episode=ep),
                  charts_incidents.first_vs_final(outcomes.first_vs_final(rv.delivery, by=["period"]), group="period")):
        assert chart.to_dict()["$schema"].startswith("https://vega.github.io/schema/vega-lite/")
