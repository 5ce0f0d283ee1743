"""The sample-world generator: truth invariants, episodes, the Postfix writer and the bundled sample."""

from __future__ import annotations

import gzip
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from deferral_kit import schema
from deferral_kit.loaders import load
from deferral_kit.sample import Episode, SendingIP, WorldConfig, default_episodes, generate, write
from deferral_kit.sample.world import DEFAULT_IPS
from deferral_kit.sample.writers import postfix as postfix_writer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
UTC = timezone.utc
WARMUP_IP = "198.51.100.30"
BUSY = "451 4.7.500 Server busy. Please try again later from [{egress_ip}]. (S77719) [{ms_fe}]"


@pytest.fixture(scope="module")
def world():
    """Three days with every episode kind the other modules build their tests from; a two-day
    queue lifetime so expiries happen inside the data."""
    return generate(WorldConfig(
        days=3, seed=21, messages_per_day=1500, maximal_queue_lifetime_s=2 * 86400, p_over_quota=0.01,
        sending_ips=(*DEFAULT_IPS, SendingIP(WARMUP_IP, pool="warmup", ramp=(50, 200, 600))),
        episodes=[
            Episode("ms-capacity", kind="capacity", providers=["microsoft"], probability=0.4, start="2026-11-17T13:00Z", end="2026-11-17T17:00Z"),
            Episode("relay-disk", kind="sender_relay", probability=0.6, start="2026-11-16T08:00Z", end="2026-11-16T09:30Z"),
            Episode("warmup-step", kind="reputation", providers=["microsoft"], egress_ips=[WARMUP_IP], probability=0.5,
                    start="2026-11-18T00:00Z", end="2026-11-19T00:00Z"),
            Episode("busy-ms", kind="custom", code=451, enhanced="4.7.500", text=BUSY, stage="RCPT TO", providers=["microsoft"],
                    egress_ips=["198.51.100.20"], probability=0.9, start="2026-11-16T10:00Z", end="2026-11-16T14:00Z"),
        ],
    ))


def test_truth_has_canonical_columns_first(world):
    schema.validate(world.attempts)
    assert world.truth.columns[: len(schema.ATTEMPT_COLUMNS)] == list(schema.ATTEMPT_COLUMNS)
    assert set(world.truth["outcome"].unique()) == {"delivered", "deferred", "bounced", "expired"}
    # remote is true exactly when there is a reply code
    assert (world.truth["remote"] == world.truth["smtp_code"].is_not_null()).all()


def test_same_seed_same_world_other_seed_other_world(world):
    again = generate(world.config)
    assert again.truth.equals(world.truth)
    assert again.messages.equals(world.messages)
    other = generate(world.config, seed=22)
    assert not other.truth.select("ts", "recipient").equals(world.truth.select("ts", "recipient"))


def test_every_deferral_is_followed_by_a_try_expiry_or_the_end_of_data(world):
    rows = world.truth.sort("r", "ts").with_columns(
        pl.col("outcome").shift(-1).over("r").alias("next"), pl.int_range(1, pl.len() + 1).over("r").alias("n"))
    # attempt counts each recipient's rows 1, 2, 3 ... in time order
    assert (rows["attempt"] == rows["n"]).all()
    # a final row is the last row of its recipient
    assert rows.filter((pl.col("outcome") != "deferred") & pl.col("next").is_not_null()).height == 0
    last = rows.filter(pl.col("next").is_null()).join(world.messages.select("r", "final_outcome"), on="r")
    dangling = last.filter(pl.col("outcome") == "deferred")
    assert (dangling["final_outcome"] == "pending").all()
    # pending recipients' next run would be after the end of the data
    assert dangling.height == world.summary()["recipients"]["pending"] > 0
    assert world.summary()["recipients"]["expired"] == world.truth.filter(pl.col("outcome") == "expired").height > 0
    # expiry happens on the first queue run after the lifetime, never before
    exp = world.truth.filter(pl.col("outcome") == "expired")
    assert (exp["delay_s"] > 2 * 86400).all()


def test_backoff_doubles_with_age_up_to_the_maximum(world):
    t = world.truth.sort("r", "ts").with_columns(pl.col("active_at").shift(-1).over("r").alias("next_run")).filter(
        (pl.col("outcome") == "deferred") & pl.col("next_run").is_not_null())
    gap = (t["next_run"] - t["ts"]).dt.total_microseconds() / 1e6
    age = t["delay_s"].clip(300, 4000)
    assert (gap >= age).all()
    # at most the maximal backoff + 10 % jitter + one queue scan + the sibling recipients' try time
    assert gap.max() < 4000 * 1.1 + 300 + 120
    # the retry gaps of one recipient grow until they reach the cap
    long = t.filter(pl.col("r") == t.group_by("r").len().sort("len", "r", descending=[True, False])["r"][0])
    g = ((long["next_run"] - long["ts"]).dt.total_microseconds() / 1e6).to_list()
    assert g[0] < 700 and g[1] > g[0] and g[2] > g[1] and g[3] > g[2] and min(g[5:]) > 4000


def test_episode_reply_only_inside_its_window_and_scope(world):
    busy = world.truth.filter(pl.col("response").str.contains("(S77719)", literal=True))
    assert busy.height > 20
    assert (busy["episode"] == "busy-ms").all()
    assert (busy["provider_family_truth"] == "microsoft").all() and (busy["egress_ip"] == "198.51.100.20").all()
    start = busy.select(pl.col("active_at") + pl.duration(microseconds=(pl.col("delays_b") * 1e6).cast(pl.Int64)))["active_at"]
    assert start.min() >= datetime(2026, 11, 16, 10, tzinfo=UTC) and start.max() < datetime(2026, 11, 16, 14, tzinfo=UTC)
    # in scope and in the window, an attempt gets the episode's reply unless something earlier in the chain answered
    scope = world.truth.filter((pl.col("egress_ip") == "198.51.100.20") & (pl.col("provider_family_truth") == "microsoft")
                               & pl.col("ts").is_between(datetime(2026, 11, 16, 10, 1, tzinfo=UTC), datetime(2026, 11, 16, 13, 59, tzinfo=UTC)))
    assert busy.height > 0.8 * scope.height
    assert busy.select("smtp_code", "enhanced_code", "smtp_stage", "outcome").unique().rows() == [(451, "4.7.500", "RCPT TO", "deferred")]
    assert all(r.startswith("451 4.7.500 Server busy. Please try again later from [198.51.100.20]. (S77719) [") and
               re.search(r"FT\d{3}\.eop-nam\d\d\.prod\.protection\.outlook\.com 2026-11-16T1[0-3]:\d\d:\d\d\.\d{3}Z [0-9A-F]{16}\]$", r)
               for r in busy["response"])

    warm = world.truth.filter(pl.col("episode") == "warmup-step")
    assert warm.height > 0 and set(warm["egress_ip"]) == {WARMUP_IP} and set(warm["provider_family_truth"]) == {"microsoft"}
    assert set(warm["enhanced_code"]) == {"4.7.650"}

    cap = world.truth.filter((pl.col("smtp_code") == 452) & (pl.col("enhanced_code") == "4.3.1"))
    ms = cap.filter(pl.col("mx_host").str.ends_with(".protection.outlook.com"))
    assert (ms["episode"].fill_null("background") != "relay-disk").all()
    assert ms.filter(pl.col("episode") == "ms-capacity").height > 0.9 * ms.height  # background 452 4.3.1 is rare (1 in 10,000)
    assert all("Insufficient system resources (TSTE) [" in r for r in ms["response"])


def test_sender_relay_episode_answers_for_every_destination(world):
    relay = world.truth.filter(pl.col("episode") == "relay-disk")
    assert set(relay["mx_host"]) == {"relay.internal.example"} and set(relay["mx_ip"]) == {"10.20.0.25"}
    assert len(set(relay["provider_truth"])) == 6  # microsoft_consumer, microsoft_365, google, yahoo, apple, other
    assert set(relay["response"]) == {"452 4.3.1 Insufficient system resources (UsedDiskSpace[C:\\Program Files\\Microsoft\\Exchange Server\\V15\\TransportRoles\\data\\Queue])"}
    assert set(relay["smtp_stage"]) == {"MAIL FROM"} and set(relay["n_hosts"]) == {1}


def test_warmup_ramp_follows_the_planned_daily_volume(world):
    per_day = world.envelopes.filter(pl.col("egress_ip") == WARMUP_IP).group_by(pl.col("arrival").dt.date()).len().sort("arrival")["len"].to_list()
    assert per_day == [50, 200, 600]
    others = world.envelopes.filter(pl.col("egress_ip") != WARMUP_IP).group_by(pl.col("arrival").dt.date()).len().sort("arrival")["len"].to_list()
    assert others == [1500 - 50, 1500 - 200, 1500 - 600]


def test_summary_counts_are_those_of_the_truth(world):
    s = world.summary()
    mx = world.truth.filter(pl.col("agent") == "smtp")
    assert s["mx_attempts"] == mx.height == sum(s["by_outcome"].values())
    assert s["attempts"] == mx.height + s["suspended"] + s["expired"]
    assert sum(sum(v.values()) for v in s["by_domain"].values()) == mx.height
    assert s["recipient_messages"] == world.messages.height == sum(s["recipients"].values())
    assert s["code_452_431"]["total"] == sum(s["code_452_431"]["by_provider"].values()) == mx.filter(
        (pl.col("smtp_code") == 452) & (pl.col("enhanced_code") == "4.3.1")).height


# --- the Postfix writer -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def postfix_dir(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("postfix")
    write(world, "postfix", out)
    return out


def test_postfix_files_are_rotated_debian_style_with_mtimes(postfix_dir):
    names = sorted(p.name for p in postfix_dir.iterdir())
    assert names == ["mail.log", "mail.log.1", "mail.log.2.gz"]
    mtimes = {p.name: datetime.fromtimestamp(p.stat().st_mtime, UTC) for p in postfix_dir.iterdir()}
    assert mtimes["mail.log.2.gz"].date().isoformat() == "2026-11-16" and mtimes["mail.log"].date().isoformat() == "2026-11-18"
    with gzip.open(postfix_dir / "mail.log.2.gz", "rt") as fh:
        first, last = fh.readline(), fh.readlines()[-1]
    assert first.startswith("Nov 16 00:") and last.startswith("Nov 16 23:")


def test_postfix_lines_are_shaped_like_postfix_writes_them(world, postfix_dir):
    text = (postfix_dir / "mail.log.1").read_text()
    row = world.truth.filter((pl.col("episode") == "ms-capacity") & (pl.col("n_hosts") == 1)).row(0, named=True)
    line = next(ln for ln in text.splitlines() if f"{row['queue_id']}: to=<{row['recipient']}>" in ln and "4.3.1" in ln)
    stamp = row["ts"].strftime("%b %e %H:%M:%S")
    assert line == (
        f"{stamp} mail1 {row['instance']}/smtp[{line.split('/smtp[')[1].split(']')[0]}]: {row['queue_id']}: to=<{row['recipient']}>, "
        f"relay={row['mx_host']}[{row['mx_ip']}]:25, delay={postfix_fmt(row['delay_s'])}, delays={postfix_fmt(row['delays_a'])}/"
        f"{postfix_fmt(row['delays_b'])}/{postfix_fmt(row['delays_c'])}/{postfix_fmt(row['delays_d'])}, dsn=4.3.1, status=deferred "
        f"(host {row['mx_host']}[{row['mx_ip']}] said: {row['response']} (in reply to RCPT TO command))")
    qid = row["queue_id"]
    assert re.search(rf"postfix-[\d.]+/qmgr\[\d+\]: {qid}: from=<{re.escape(row['sender'])}>, size={row['size']}, nrcpt=\d \(queue active\)", text)
    # Yahoo's MAIL FROM deferral: the first host's reply is logged before the record naming the second
    yahoo = world.truth.filter((pl.col("n_hosts") == 2) & pl.col("smtp_code").is_not_null()).row(0, named=True)
    all_text = text + (postfix_dir / "mail.log").read_text() + gzip.open(postfix_dir / "mail.log.2.gz", "rt").read()
    assert f"{yahoo['queue_id']}: host {yahoo['first_mx_host']}[{yahoo['first_mx_ip']}] said: {yahoo['response']} (in reply to MAIL FROM command)" in all_text
    assert re.search(r"postfix-[\d.]+/error\[\d+\]: [0-9A-F]{10}: to=<[^>]+@oldhost-unreachable\.example>, relay=none, delay=\d+, delays=\d+(\.\d+)?/[\d.]+/0/0, "
                     r"dsn=4\.4\.1, status=deferred \(delivery temporarily suspended: connect to mx2?\.oldhost-unreachable\.example\[[\d.]+\]:25: Connection timed out\)", all_text)
    assert re.search(r"qmgr\[\d+\]: [0-9A-F]{10}: from=<[^>]+>, status=expired, returned to sender\n", all_text)


def postfix_fmt(x: float) -> str:
    return pl.select(postfix_writer.fmt_postfix_delay(pl.lit(x))).item()


def test_postfix_delay_format():
    assert [postfix_fmt(x) for x in (0.0, 0.004, 0.06, 0.357, 0.1, 2.14, 9.5, 9.96, 13.4, 767.49, 440374.2)] == [
        "0", "0", "0.06", "0.36", "0.1", "2.1", "9.5", "10", "13", "767", "440374"]


def test_postfix_round_trip_exact_counts(world, postfix_dir):
    got = load(postfix_dir).attempts.collect()
    keys = ["recipient_domain", "outcome", "agent", "remote"]
    want = world.truth.group_by(keys).len().sort(keys)
    assert got.group_by(keys).len().sort(keys).equals(want)
    # the year comes from the files' mtimes; syslog stamps have whole seconds
    assert got["ts"].sort().to_list() == world.truth["ts"].dt.truncate("1s").sort().to_list()
    from deferral_kit.providers import with_provider

    c431 = with_provider(pl.LazyFrame(got)).filter((pl.col("smtp_code") == 452) & (pl.col("enhanced_code") == "4.3.1")).collect()
    truth431 = world.truth.filter((pl.col("smtp_code") == 452) & (pl.col("enhanced_code") == "4.3.1"))
    assert dict(c431.group_by("mx_host").len().iter_rows()) == dict(truth431.group_by("mx_host").len().iter_rows())
    ms = c431.filter(pl.col("provider_family") == "microsoft")
    assert dict(ms.group_by("provider").len().iter_rows()) == dict(
        truth431.filter(pl.col("mx_host") != "relay.internal.example").group_by("provider_truth").len().iter_rows())


def test_postfix_rfc3339_stamps_keep_microseconds(world, tmp_path):
    paths = write(world, "postfix", tmp_path, timestamps="rfc3339", noise=False, compress_all=True)
    assert [p.name for p in paths] == ["mail.log.3.gz", "mail.log.2.gz", "mail.log.1.gz"]
    first = gzip.open(paths[0], "rt").readline()
    assert re.match(r"2026-11-16T00:\d\d:\d\d\.\d{6}\+00:00 mail1 postfix-", first)
    got = load(tmp_path).attempts.collect()
    assert got["ts"].sort().to_list() == world.truth["ts"].sort().to_list()


# --- the command and the bundled sample ---------------------------------------------------------

def test_cli_writes_logs_and_truth(tmp_path):
    from deferral_kit.cli import main

    assert main(["sample", "--out", str(tmp_path), "--days", "2", "--seed", "3", "--messages-per-day", "300", "--no-noise"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mail.log", "mail.log.1", "truth.json"]
    truth = json.loads((tmp_path / "truth.json").read_text())
    cfg = WorldConfig(days=2, seed=3, messages_per_day=300)
    cfg.episodes = default_episodes(cfg)
    assert truth == json.loads(json.dumps(generate(cfg).summary()))
    assert main(["sample", "--out", str(tmp_path / "x"), "--format", "qmail"]) == 2


def test_bundled_sample_matches_its_truth():
    truth = json.loads((SAMPLE / "truth.json").read_text())
    got = load(sorted(SAMPLE.glob("mail.log*"))).attempts.collect()
    mx = got.filter(pl.col("agent") == "smtp")
    assert got.height == truth["attempts"] and mx.height == truth["mx_attempts"]
    assert dict(mx.group_by("outcome").len().iter_rows()) == truth["by_outcome"]
    by_domain: dict = {}
    for d, o, n in mx.group_by("recipient_domain", "outcome").len().iter_rows():
        by_domain.setdefault(d, {})[o] = n
    assert by_domain == truth["by_domain"]
    c431 = mx.filter((pl.col("smtp_code") == 452) & (pl.col("enhanced_code") == "4.3.1"))
    assert c431.height == truth["code_452_431"]["total"] == 164
    assert dict(c431.group_by("mx_host").len().iter_rows()) == truth["code_452_431"]["by_host"]
    assert got["ts"].min() >= datetime(2026, 11, 16, tzinfo=UTC) and got["ts"].max() < datetime(2026, 11, 23, tzinfo=UTC)


def test_bundled_sample_is_reproducible_from_its_documented_command():
    # data/README.md: deferral-kit sample --out data/sample --days 7 --seed 47 --messages-per-day 2000 --timestamps rfc3339 --compress-all
    cfg = WorldConfig(days=7, seed=47, messages_per_day=2000)
    cfg.episodes = default_episodes(cfg)
    assert json.loads(json.dumps(generate(cfg).summary())) == json.loads((SAMPLE / "truth.json").read_text())


def test_smarthost_relay_world_sends_everything_to_the_relay():
    w = generate(WorldConfig(days=1, seed=4, messages_per_day=400, relay=("exch01.corp.example", "10.20.0.30"), episodes=[
        Episode("relay-disk", kind="sender_relay", host="exch01.corp.example", host_ip="10.20.0.30", probability=1.0,
                start="2026-11-16T12:00Z", end="2026-11-16T13:00Z")]))
    mx = w.mx_attempts()
    assert set(mx["mx_host"]) == {"exch01.corp.example"} and set(mx["mx_ip"]) == {"10.20.0.30"}
    # the relay accepts everything it is offered, except while its queue disk is full
    assert dict(mx.group_by("outcome").len().iter_rows()) == {"delivered": w.messages.height, "deferred": mx.filter(pl.col("episode") == "relay-disk").height}
    assert (mx.filter(pl.col("outcome") == "delivered")["response"].str.contains(r"^250 2\.6\.0 <[^>]+> \[InternalId=\d+, Hostname=EXCH01\.corp\.example\] Queued mail for delivery$")).all()
