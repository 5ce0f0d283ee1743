"""One simulated mail world, independent of any log format, with its exact truth.

:func:`generate` turns a :class:`WorldConfig` into a :class:`World`: messages arriving
over the days with a diurnal pattern, 1–3 recipients each, spread over Microsoft
(consumer and 365 tenants), Google, Yahoo/AOL, Apple and a long tail of domains; each
recipient is tried, deferred and retried with Postfix-like backoff (``minimal_backoff``
300 s doubling with the message age up to ``maximal_backoff`` 4000 s, plus the
``queue_run_delay`` scan) until it is delivered, bounced or expired
(``maximal_queue_lifetime``), or the data ends (pending).  :class:`Episode` objects put
a reply (Microsoft ``452 4.3.1`` capacity, ``451 4.7.650`` reputation, our own relay's
back-pressure, ...) on a scope of attempts during a time window.

Everything is vectorised with numpy and polars: the only Python loops run over retry
rounds (bounded by lifetime / maximal backoff) and over episodes.

Example: a Microsoft capacity event on all sending IPs, Wednesday 13:00-17:00 UTC::

    from datetime import datetime, timezone
    from deferral_kit.sample import Episode, WorldConfig, generate

    cfg = WorldConfig(days=3, seed=7, messages_per_day=2000, episodes=[
        Episode("ms-capacity", kind="capacity", providers=["microsoft"], probability=0.3,
                start="2026-11-18T13:00:00Z", end="2026-11-18T17:00:00Z")])
    world = generate(cfg)
    world.truth        # canonical attempts (plus episode, class_truth, ...)
    world.summary()    # exact counts a loader must reproduce
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl

from .. import schema
from . import catalog
from .catalog import Destination, Reply

UTC = timezone.utc
DEFAULT_START = datetime(2026, 11, 16, tzinfo=UTC)  # Monday of ISO week 2026-W47


def _dt(value: datetime | str) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class SendingIP:
    """One egress IP (one Postfix instance).

    ``instance`` is the syslog_name (default ``postfix-<ip>``, which shows the IP in every
    log line).  ``ramp`` is a planned volume per day (warm-up): when given, the IP's share
    of each day's messages is ``ramp[day]`` messages (the last value repeats); otherwise
    ``weight`` × messages_per_day shares.
    """

    ip: str
    pool: str = "default"
    instance: str | None = None
    weight: float = 1.0
    ramp: tuple[int, ...] | None = None

    @property
    def syslog_name(self) -> str:
        return self.instance or f"postfix-{self.ip}"


DEFAULT_IPS = (
    SendingIP("198.51.100.10", pool="transactional", weight=1.0),
    SendingIP("198.51.100.11", pool="transactional", weight=1.0),
    SendingIP("198.51.100.20", pool="bulk", weight=1.5),
    SendingIP("198.51.100.21", pool="bulk", weight=1.5),
)

_KIND_REPLY = {
    "capacity": catalog.MS_CAPACITY,
    "reputation": catalog.MS_REPUTATION,
    "rate_limit": catalog.GMAIL_UNSOLICITED,
    "sender_relay": catalog.EXCHANGE_RELAY_CAPACITY,
}
_KIND_CLASS = {"capacity": "capacity", "reputation": "reputation", "rate_limit": "rate_limit", "sender_relay": "local", "custom": "other"}


@dataclass
class Episode:
    """A reply put on a scope of attempts during ``[start, end)``.

    ``kind``: capacity (default reply Microsoft ``452 4.3.1 Insufficient system resources
    (TSTE) [...]`` at RCPT TO), reputation (``451 4.7.650 ... rate limited due to IP
    reputation``), rate_limit (Gmail ``421 4.7.28`` after end of DATA), sender_relay (our
    own relay answers ``452 4.3.1 ... (UsedDiskSpace[...])`` at MAIL FROM for every
    destination; ``host`` defaults to ``relay.internal.example``), custom (give ``code``,
    ``enhanced``, ``text``, ``stage``).
    Scope (empty = any): ``providers`` (provider or family: ``microsoft``,
    ``microsoft_consumer``, ``microsoft_365``, ``google``, ``yahoo``, ``apple``, ``other``),
    ``domains``, ``mx_hosts``, ``egress_ips``, ``pools``.
    ``probability``: chance that an in-scope attempt in the window gets this reply.
    ``outcome`` deferred (default) or bounced.  ``host``/``host_ip``: the replying host when
    it is not the destination's MX (a smarthost).

    Examples::

        Episode("relay-disk", kind="sender_relay", probability=0.6,
                start="2026-11-19T08:00Z", end="2026-11-19T09:30Z")
        Episode("warmup-step", kind="reputation", providers=["microsoft"], egress_ips=["198.51.100.30"],
                probability=0.25, start="2026-11-19T00:00Z", end="2026-11-21T00:00Z")
        Episode("tiny-burst", kind="capacity", providers=["microsoft_365"], probability=0.02,
                start="2026-11-17T03:00Z", end="2026-11-17T03:20Z")
    """

    name: str
    kind: str = "capacity"
    start: datetime | str = DEFAULT_START
    end: datetime | str = DEFAULT_START + timedelta(hours=1)
    probability: float = 0.1
    providers: Sequence[str] = ()
    domains: Sequence[str] = ()
    mx_hosts: Sequence[str] = ()
    egress_ips: Sequence[str] = ()
    pools: Sequence[str] = ()
    code: int | None = None
    enhanced: str | None = None
    text: str | None = None
    stage: str | None = None
    outcome: str = "deferred"
    response_class: str | None = None
    host: str | None = None
    host_ip: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KIND_CLASS:
            raise ValueError(f"episode {self.name!r}: unknown kind {self.kind!r}; use one of {sorted(_KIND_CLASS)}")
        self.start, self.end = _dt(self.start), _dt(self.end)
        if self.kind == "sender_relay" and self.host is None:
            self.host, self.host_ip = "relay.internal.example", self.host_ip or "10.20.0.25"
        if self.host and not self.host_ip:
            self.host_ip = "10.20.0.25"
        if self.kind == "custom" and (self.code is None or self.text is None):
            raise ValueError(f"episode {self.name!r}: a custom episode needs code and text")

    def reply(self) -> Reply:
        base = _KIND_REPLY.get(self.kind, catalog.MS_CAPACITY)
        code = self.code if self.code is not None else base.code
        enhanced = self.enhanced if self.enhanced is not None else (base.enhanced if self.code is None else None)
        text = self.text if self.text is not None else base.text
        return Reply(code, enhanced, text, self.stage or base.stage, self.outcome, self.response_class or _KIND_CLASS[self.kind])


@dataclass
class WorldConfig:
    """Everything that shapes a generated world; the same config and seed give the same world.

    ``start`` is midnight UTC of the first day; ``days`` × ``messages_per_day`` messages
    arrive (weekends × ``weekend_factor``).  ``relay`` = (host, ip) sends everything through
    a smarthost instead of the MX hosts.  ``own_infrastructure`` lists our own hosts
    (the relay, episodes' hosts) for classifiers.
    """

    days: int = 7
    seed: int = 1
    messages_per_day: int = 4000
    start: datetime | str = DEFAULT_START
    log_host: str = "mail1"
    sending_ips: Sequence[SendingIP] = DEFAULT_IPS
    senders: Sequence[str] = ("news@mail.example.com", "billing@example.com", "noreply@example.com", "alerts@example.com")
    destinations: Sequence[Destination] | None = None
    episodes: Sequence[Episode] = ()
    relay: tuple[str, str] | None = None
    own_infrastructure: Sequence[str] = ("relay.internal.example",)
    weekend_factor: float = 0.6
    p_unknown_user: float = 0.012
    p_over_quota: float = 0.003
    p_suspended: float = 0.5  # share of tries to an unreachable domain that Postfix suspends locally
    maximal_queue_lifetime_s: float = 5 * 86400
    minimal_backoff_s: float = 300
    maximal_backoff_s: float = 4000
    queue_run_delay_s: float = 300
    smtp_connect_timeout_s: float = 30

    def __post_init__(self) -> None:
        self.start = _dt(self.start)
        if self.days < 1 or self.messages_per_day < 1:
            raise ValueError("days and messages_per_day must be positive")

    @property
    def end(self) -> datetime:
        return self.start + timedelta(days=self.days)


@dataclass
class World:
    """A generated world.

    ``truth``: the intended canonical attempts (``schema.ATTEMPT_COLUMNS`` in order, then
    ``episode`` (name or null), ``class_truth`` (the response class the reply was chosen as:
    capacity, reputation, rate_limit, policy, mailbox, connection, local, other, delivered,
    expired), ``provider_truth`` / ``provider_family_truth`` (of the recipient domain) and
    the internal ids and timings writers use: ``msg``, ``r``, ``active_at``, ``delays_a..d``,
    ``reply_text`` (multi-line replies with ``\n``), ``n_hosts``, ``first_mx_host/ip``).
    ``source`` is ``sample`` and ``file``/``line_no`` are null: they depend on the writer.  ``connections``: the non-final per-MX events
    (``schema.CONNECTION_COLUMNS``).  ``messages``: one row per (message, recipient) with
    ``final_outcome`` (delivered | bounced | expired | pending), ``first_attempt_ts``,
    ``final_ts``, ``attempts`` (tries against an MX) and ``first_attempt_delivered``.
    ``envelopes``: one row per message (queue id, sender, size, nrcpt, arrival, egress).
    """

    config: WorldConfig
    truth: pl.DataFrame
    connections: pl.DataFrame
    messages: pl.DataFrame
    envelopes: pl.DataFrame

    @property
    def attempts(self) -> pl.DataFrame:
        """The truth in canonical columns only."""
        return self.truth.select(list(schema.ATTEMPT_COLUMNS))

    def mx_attempts(self) -> pl.DataFrame:
        """Truth rows that are tries against a remote host (agent smtp): the rate denominator."""
        return self.truth.filter(pl.col("agent") == "smtp")

    def summary(self) -> dict:
        """Exact expected counts, for tests and ``truth.json``.

        ``attempts``: all truth rows; ``mx_attempts``: agent smtp rows (the rate denominator);
        ``by_outcome`` / ``by_domain`` / ``by_provider`` / ``by_mx_host``: MX attempts per
        outcome; ``code_452_431``: MX attempts answered 452 4.3.1, per provider family and
        per provider; ``expired``/``suspended``: qmgr expiry and postfix/error rows;
        ``recipients``: final outcome per recipient-message.
        """
        t = self.truth
        mx = self.mx_attempts()

        def nested(frame: pl.DataFrame, key: str) -> dict:
            out: dict = {}
            for k, o, n in frame.group_by(key, "outcome").len().sort(key, "outcome").iter_rows():
                out.setdefault(k, {})[o] = n
            return out

        c431 = mx.filter((pl.col("smtp_code") == 452) & (pl.col("enhanced_code") == "4.3.1"))
        ms = mx.filter(pl.col("provider_family_truth") == "microsoft")
        ms431 = c431.filter(pl.col("provider_family_truth") == "microsoft")
        day = pl.col("ts").dt.date().cast(pl.String)
        return {
            "start": self.config.start.isoformat(),
            "end": self.config.end.isoformat(),
            "seed": self.config.seed,
            "messages": self.envelopes.height,
            "recipient_messages": self.messages.height,
            "attempts": t.height,
            "mx_attempts": mx.height,
            "suspended": t.filter(pl.col("agent") == "error").height,
            "expired": t.filter(pl.col("outcome") == "expired").height,
            "by_outcome": dict(sorted(mx.group_by("outcome").len().iter_rows())),
            "by_provider": nested(mx, "provider_truth"),
            "by_domain": nested(mx, "recipient_domain"),
            "by_mx_host": nested(mx, "mx_host"),
            "code_452_431": {
                "total": c431.height,
                "by_family": dict(sorted(c431.group_by("provider_family_truth").len().iter_rows())),
                "by_provider": dict(sorted(c431.group_by("provider_truth").len().iter_rows())),
                "by_host": dict(sorted(c431.group_by("mx_host").len().iter_rows())),
            },
            "microsoft": {
                "mx_attempts": ms.height,
                "code_452_431": ms431.height,
                "per_10k": round(ms431.height / ms.height * 1e4, 3) if ms.height else None,
            },
            "by_day": {d: {"mx_attempts": n, "code_452_431": k} for d, n, k in mx.group_by(day.alias("d")).agg(
                pl.len(), ((pl.col("smtp_code") == 452) & (pl.col("enhanced_code") == "4.3.1")).sum()).sort("d").iter_rows()},
            "by_episode": dict(sorted(t.filter(pl.col("episode").is_not_null()).group_by("episode").len().iter_rows())),
            "recipients": dict(sorted(self.messages.group_by("final_outcome").len().iter_rows())),
            "first_attempt_delivered": int(self.messages["first_attempt_delivered"].sum()),
        }


# --- helpers -------------------------------------------------------------------------------

def _hex(rng: np.random.Generator, n: int, width: int, upper: bool = False) -> np.ndarray:
    """n random hex strings of ``width`` characters, without a Python loop per string."""
    nbytes = (width + 1) // 2
    s = rng.bytes(n * nbytes).hex()
    if upper:
        s = s.upper()
    return np.frombuffer(s.encode(), dtype=f"S{nbytes * 2}").astype(f"U{width}")


def _unique_hex(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    ids = _hex(rng, n, width, upper=True)
    while True:
        _, first = np.unique(ids, return_index=True)
        if first.size == n:
            return ids
        dup = np.setdiff1d(np.arange(n), first)
        ids[dup] = _hex(rng, dup.size, width, upper=True)


_FIRST = np.array(["anna", "ben", "carla", "dmitri", "elena", "farid", "grace", "hugo", "ines", "jonas", "kim", "lucia",
                   "marco", "nora", "oscar", "priya", "quentin", "rosa", "sven", "tariq", "uma", "victor", "wen", "yusuf", "zoe"])
_LAST = np.array(["smith", "garcia", "muller", "rossi", "dubois", "silva", "kowalski", "nguyen", "tanaka", "olsen",
                  "jansen", "novak", "ahmed", "kim", "lopez", "bauer"])
_SEP = np.array([".", "_", "", "."])
_MS_FE_PFX = np.array(["DM6NAM11", "BN8NAM12", "CO1NAM11", "SA2NAM12", "MW2NAM10", "BN1NAM02", "CH2NAM04", "DM3NAM02"])
_MS_FE_REGION = np.array(["nam11", "nam12", "nam11", "nam12", "nam10", "nam02", "nam04", "nam02"])


def _diurnal(hours: np.ndarray) -> np.ndarray:
    # Business-hours peak around 14:00 UTC, trough at night.
    return 1.0 + 0.85 * np.cos(2 * np.pi * (hours - 14) / 24)


# --- generation ----------------------------------------------------------------------------

def generate(config: WorldConfig | None = None, **overrides) -> World:
    """Simulate one world from ``config`` (keyword overrides allowed, e.g. ``seed=3``)."""
    cfg = replace(config, **overrides) if config and overrides else (config or WorldConfig(**overrides))
    rng = np.random.default_rng(cfg.seed)
    dests = tuple(cfg.destinations or catalog.destinations())
    ips = tuple(cfg.sending_ips)
    t0 = cfg.start.timestamp()
    end_s = float(cfg.days * 86400)

    # --- messages: arrival times with a diurnal pattern, egress per day by plan -----------
    hours = np.arange(24)
    hour_p = _diurnal(hours) / _diurnal(hours).sum()
    per_day = []
    egress_parts = []
    for day in range(cfg.days):
        weekday = (cfg.start + timedelta(days=day)).weekday()
        n = int(round(cfg.messages_per_day * (cfg.weekend_factor if weekday >= 5 else 1.0)))
        h = rng.choice(24, size=n, p=hour_p)
        per_day.append(day * 86400 + h * 3600 + rng.random(n) * 3600)
        # Ramped IPs send exactly their planned volume; the others share the rest by weight.
        fixed = np.array([ip.ramp[min(day, len(ip.ramp) - 1)] if ip.ramp else 0 for ip in ips], dtype=np.int64)
        if fixed.sum() > n:
            fixed = np.floor(fixed * n / fixed.sum()).astype(np.int64)
        free = np.array([0.0 if ip.ramp else ip.weight for ip in ips])
        rest = n - int(fixed.sum())
        if free.sum() == 0:
            fixed[np.argmax(fixed)] += rest
            rest = 0
        if not fixed.any():
            egress_parts.append(rng.choice(len(ips), size=n, p=free / free.sum()))
            continue
        eg = np.concatenate([np.repeat(np.arange(len(ips)), fixed), rng.choice(len(ips), size=rest, p=free / free.sum()) if rest else np.array([], dtype=np.int64)])
        egress_parts.append(rng.permutation(eg))
    arrival = np.concatenate(per_day)
    egress = np.concatenate(egress_parts)
    order = np.argsort(arrival, kind="stable")
    arrival, egress = arrival[order], egress[order]
    n_msg = arrival.size
    nrcpt = rng.choice([1, 2, 3], size=n_msg, p=[0.78, 0.16, 0.06])
    sender = rng.integers(0, len(cfg.senders), n_msg)
    size = np.round(np.exp(rng.normal(9.6, 0.9, n_msg))).astype(np.int64) + 800
    queue_id = _unique_hex(rng, n_msg, 10)
    mid_hex = _hex(rng, n_msg, 24)
    client = rng.integers(0, 3, n_msg)

    # --- recipients ------------------------------------------------------------------------
    r_msg = np.repeat(np.arange(n_msg), nrcpt)
    n_r = r_msg.size
    w = np.array([d.weight for d in dests])
    r_dest = rng.choice(len(dests), size=n_r, p=w / w.sum())
    fam = np.array([d.family for d in dests])
    prov = np.array([d.provider for d in dests])
    r_unknown = rng.random(n_r) < cfg.p_unknown_user
    quota_ok = np.isin(prov[r_dest], list(catalog.OVER_QUOTA))
    r_quota = (rng.random(n_r) < cfg.p_over_quota) & quota_ok & ~r_unknown
    local = pl.DataFrame({
        "f": _FIRST[rng.integers(0, _FIRST.size, n_r)], "s": _SEP[rng.integers(0, _SEP.size, n_r)],
        "l": _LAST[rng.integers(0, _LAST.size, n_r)], "n": rng.integers(1, 999, n_r),
    }).select(pl.format("{}{}{}{}", "f", "s", "l", pl.when(pl.col("n") < 400).then(pl.col("n").cast(pl.String)).otherwise(pl.lit(""))).alias("local"))["local"]
    # Two recipients of one message must differ: suffix the position within the message.
    pos = np.arange(n_r) - np.repeat(np.cumsum(nrcpt) - nrcpt, nrcpt)
    local = pl.Series(local).to_frame("local").with_columns(
        pl.when(pl.Series(pos) > 0).then(pl.format("{}{}", "local", pl.lit(pos).cast(pl.String))).otherwise("local").alias("local"))["local"]

    # --- MX tables (flat arrays for vectorised choice) -------------------------------------
    host_names: list[str] = []
    host_ip_start: list[int] = []
    host_n_ip: list[int] = []
    ip_names: list[str] = []
    dest_host_start = np.zeros(len(dests), dtype=np.int64)
    dest_n_host = np.zeros(len(dests), dtype=np.int64)
    for i, d in enumerate(dests):
        dest_host_start[i] = len(host_names)
        dest_n_host[i] = len(d.mxs)
        for mx in d.mxs:
            host_names.append(mx.host)
            host_ip_start.append(len(ip_names))
            host_n_ip.append(len(mx.ips))
            ip_names.extend(mx.ips)
    # Hosts that are not MX hosts: the smarthost and episodes' replying hosts.
    extra_hosts = {}
    for h, ip in ([cfg.relay] if cfg.relay else []) + [(e.host, e.host_ip) for e in cfg.episodes if e.host]:
        if h not in extra_hosts:
            extra_hosts[h] = len(host_names)
            host_names.append(h)
            host_ip_start.append(len(ip_names))
            host_n_ip.append(1)
            ip_names.append(ip)
    host_ip_start_a = np.array(host_ip_start)
    host_n_ip_a = np.array(host_n_ip)
    host_lc = np.array([h.lower() for h in host_names])

    # --- replies table -------------------------------------------------------------------
    replies: list[Reply] = []
    rid: dict[int, int] = {}

    def reply_id(r: Reply) -> int:
        if id(r) not in rid:
            rid[id(r)] = len(replies)
            replies.append(r)
        return rid[id(r)]

    delivered_by_fam = {f: reply_id(catalog.DELIVERED[f]) for f in ("microsoft", "google", "yahoo", "apple", "other")}
    deliv_relay = reply_id(catalog.DELIVERED["relay"])
    unknown_by_prov = {p: reply_id(r) for p, r in catalog.UNKNOWN_USER.items()}
    quota_by_prov = {p: reply_id(r) for p, r in catalog.OVER_QUOTA.items()}
    grey_id = reply_id(catalog.GREYLISTED)
    timeout_id = reply_id(catalog.CONNECT_TIMEOUT)
    ep_reply = [reply_id(e.reply()) for e in cfg.episodes]
    bg = {p: [(reply_id(r), pr) for r, pr in lst] for p, lst in catalog.BACKGROUND.items()}
    dest_grey = np.array([d.greylisting for d in dests])
    dest_down = np.array([d.unreachable for d in dests])
    dest_dom = np.array([d.domain for d in dests])
    ip_addr = np.array([ip.ip for ip in ips])
    ip_pool = np.array([ip.pool for ip in ips])

    # Per-recipient default delivered reply.
    r_fam = fam[r_dest]
    r_prov = prov[r_dest]
    deliv_default = np.zeros(n_r, dtype=np.int64)
    for f, i in delivered_by_fam.items():
        deliv_default[r_fam == f] = i
    if cfg.relay:
        deliv_default[:] = deliv_relay
    unknown_reply = np.full(n_r, -1)
    quota_reply = np.full(n_r, -1)
    for p, i in unknown_by_prov.items():
        unknown_reply[r_prov == p] = i
    for p, i in quota_by_prov.items():
        quota_reply[r_prov == p] = i

    # Episode scope masks that do not depend on the try: per recipient.
    r_egress = egress[r_msg]
    ep_static = []
    for e in cfg.episodes:
        m = np.ones(n_r, dtype=bool)
        if e.providers:
            m &= np.isin(r_prov, list(e.providers)) | np.isin(r_fam, list(e.providers))
        if e.domains:
            m &= np.isin(dest_dom[r_dest], [d.lower() for d in e.domains])
        if e.egress_ips:
            m &= np.isin(ip_addr[r_egress], list(e.egress_ips))
        if e.pools:
            m &= np.isin(ip_pool[r_egress], list(e.pools))
        ep_static.append(m)
    ep_host_sets = [np.isin(host_lc, [h.lower() for h in e.mx_hosts]) if e.mx_hosts else None for e in cfg.episodes]

    # --- retry rounds ----------------------------------------------------------------------
    cols: dict[str, list[np.ndarray]] = {k: [] for k in (
        "r", "attempt", "active", "b", "c", "d", "ts", "reply", "host", "ip", "first_host", "first_ip", "n_hosts", "agent", "episode")}
    active_r = np.arange(n_r)
    t_active = (arrival + 0.02 + rng.random(n_msg) * 0.3)[r_msg]  # qmgr picks the new message up
    attempt = np.ones(n_r, dtype=np.int64)
    row_no = np.ones(n_r, dtype=np.int64)  # per recipient: number of the next truth row
    exp_r, exp_ts, exp_row = [], [], []
    pending_r = []
    lifetime = cfg.maximal_queue_lifetime_s
    while active_r.size:
        over = t_active >= end_s
        pending_r.append(active_r[over])
        active_r, t_active, attempt, row_no = active_r[~over], t_active[~over], attempt[~over], row_no[~over]
        old = t_active - arrival[r_msg[active_r]] > lifetime
        exp_r.append(active_r[old])
        exp_ts.append(t_active[old])
        exp_row.append(row_no[old])
        active_r, t_active, attempt, row_no = active_r[~old], t_active[~old], attempt[~old], row_no[~old]
        n = active_r.size
        if n == 0:
            break
        dest = r_dest[active_r]
        # MX choice: the first-preference host mostly, sometimes another; a random address.
        u = rng.random(n)
        npos = dest_n_host[dest]
        hpos = np.where((u < 0.85) | (npos == 1), 0, 1 + np.floor(rng.random(n) * np.maximum(npos - 1, 1)).astype(np.int64) % np.maximum(npos - 1, 1))
        host = dest_host_start[dest] + hpos
        ipx = host_ip_start_a[host] + np.floor(rng.random(n) * host_n_ip_a[host]).astype(np.int64)
        if cfg.relay:
            host[:] = extra_hosts[cfg.relay[0]]
            ipx[:] = host_ip_start_a[host]
        # The next host Postfix tries after a session-level failure (smtp_mx_session_limit 2).
        alt_pos = (hpos + 1) % npos
        alt_host = np.where(npos > 1, dest_host_start[dest] + alt_pos, host)
        alt_ip = np.where(npos > 1, host_ip_start_a[alt_host] + np.floor(rng.random(n) * host_n_ip_a[alt_host]).astype(np.int64),
                          host_ip_start_a[host] + (ipx - host_ip_start_a[host] + 1) % host_n_ip_a[host])
        two_ips = (npos > 1) | (host_n_ip_a[host] > 1)

        reply = deliv_default[active_r].copy()
        agent = np.zeros(n, dtype=np.int8)  # 0 smtp, 1 error
        episode = np.full(n, -1)
        done = np.zeros(n, dtype=bool)
        b = rng.random(n) * 0.05
        start = t_active + b
        rel = start  # seconds since the world's start

        def in_window(e: Episode) -> np.ndarray:
            return (rel >= e.start.timestamp() - t0) & (rel < e.end.timestamp() - t0)

        # 1. our own relay answering (sender side) wins over anything at the destination
        for k, e in enumerate(cfg.episodes):
            if not e.host:
                continue
            m = ~done & ep_static[k][active_r] & in_window(e) & (rng.random(n) < e.probability)
            reply[m], episode[m], done[m] = ep_reply[k], k, True
            host[m] = extra_hosts[e.host]
            ipx[m] = host_ip_start_a[host[m]]
        # 2. unreachable destination: Postfix either times out connecting or suspends locally
        down = ~done & dest_down[dest] & (cfg.relay is None)
        susp = down & (rng.random(n) < cfg.p_suspended)
        reply[down], done[down] = timeout_id, True
        agent[susp] = 1
        # 3. receiver-side episodes
        for k, e in enumerate(cfg.episodes):
            if e.host:
                continue
            m = ~done & ep_static[k][active_r] & in_window(e)
            if ep_host_sets[k] is not None:
                m &= ep_host_sets[k][host]
            m &= rng.random(n) < e.probability
            reply[m], episode[m], done[m] = ep_reply[k], k, True
        if not cfg.relay:
            # 4. recipient problems, greylisting, background replies
            m = ~done & r_unknown[active_r] & (unknown_reply[active_r] >= 0)
            reply[m], done[m] = unknown_reply[active_r][m], True
            m = ~done & r_quota[active_r]
            reply[m], done[m] = quota_reply[active_r][m], True
            m = ~done & dest_grey[dest] & (attempt == 1)
            reply[m], done[m] = grey_id, True
            ub = rng.random(n)
            pv = r_prov[active_r]
            for p, lst in bg.items():
                acc = 0.0
                pm = ~done & (pv == p)
                for rid_, pr in lst:
                    m = pm & (ub >= acc) & (ub < acc + pr)
                    reply[m] = rid_
                    acc += pr
                done |= pm & (ub < acc)

        # Timings: c = connection setup (30 s per timed-out host), d = transmission.
        r_code = np.array([r.code if r.code is not None else 0 for r in replies])
        r_stage = np.array([r.stage for r in replies])
        session = np.isin(r_stage[reply], catalog.SESSION_STAGES) & two_ips & (agent == 0) & (host < len(host_names) - len(extra_hosts))
        timeout = (reply == timeout_id) & (agent == 0)
        n_hosts = np.where(session, 2, 1)
        c = np.where(timeout, cfg.smtp_connect_timeout_s * n_hosts, (0.15 + rng.random(n) * 1.2) * n_hosts)
        d = np.where(r_code[reply] < 300, 0.1 + size[r_msg[active_r]] / 60000.0 * (0.5 + rng.random(n)),
                     np.where(r_stage[reply] == "end of DATA", 0.2 + rng.random(n), 0.02 + rng.random(n) * 0.6))
        d = np.where(timeout, 0.0, d)
        c = np.where(agent == 1, 0.0, c)
        d = np.where(agent == 1, 0.0, d)
        first_host = np.where(n_hosts == 2, host, -1)
        first_ip = np.where(n_hosts == 2, ipx, -1)
        final_host = np.where(n_hosts == 2, alt_host, host)
        final_ip = np.where(n_hosts == 2, alt_ip, ipx)
        ts = start + c + d
        for k, v in (("r", active_r), ("attempt", row_no), ("active", t_active), ("b", b), ("c", c), ("d", d), ("ts", ts),
                     ("reply", reply), ("host", final_host), ("ip", final_ip), ("first_host", first_host), ("first_ip", first_ip),
                     ("n_hosts", n_hosts), ("agent", agent), ("episode", episode)):
            cols[k].append(v)

        # Deferred recipients go back to the deferred queue; the message's next run is
        # clip(age, minimal, maximal backoff) later, picked up by the next queue scan.
        outc = np.array([r.outcome for r in replies])[reply]
        again = outc == "deferred"
        ar, ats = active_r[again], ts[again]
        msg = r_msg[ar]
        umsg, inv = np.unique(msg, return_inverse=True)
        jitter = rng.random(umsg.size)[inv]
        scan = rng.random(umsg.size)[inv]
        age = ats - arrival[msg]
        # All deferred recipients of a message share one next run (Postfix defers the queue file).
        last = np.zeros(umsg.size)
        np.maximum.at(last, inv, ats)
        backoff = np.clip(age, cfg.minimal_backoff_s, cfg.maximal_backoff_s) * (1 + 0.1 * jitter)
        t_active = last[inv] + backoff + scan * cfg.queue_run_delay_s
        active_r, attempt, row_no = ar, attempt[again] + 1, row_no[again] + 1

    cat = {k: np.concatenate(v) if v else np.array([], dtype=np.int64) for k, v in cols.items()}
    exp_r_a, exp_ts_a, exp_row_a = np.concatenate(exp_r), np.concatenate(exp_ts), np.concatenate(exp_row)
    pending_a = np.concatenate(pending_r)

    # --- truth frame -----------------------------------------------------------------------
    env = pl.DataFrame({
        "msg": np.arange(n_msg),
        "queue_id": queue_id,
        "arrival": (t0 + arrival) * 1e6,
        "egress_idx": egress,
        "sender": np.array(cfg.senders)[sender],
        "size": size,
        "nrcpt": nrcpt,
        "mid_hex": mid_hex,
        "client": client,
    }).with_columns(
        pl.col("arrival").cast(pl.Int64).cast(schema.UTC_DT),
        pl.col("egress_idx").replace_strict(list(range(len(ips))), [ip.ip for ip in ips], return_dtype=pl.String).alias("egress_ip"),
        pl.col("egress_idx").replace_strict(list(range(len(ips))), [ip.pool for ip in ips], return_dtype=pl.String).alias("egress_pool"),
        pl.col("egress_idx").replace_strict(list(range(len(ips))), [ip.syslog_name for ip in ips], return_dtype=pl.String).alias("instance"),
        pl.format("<{}.{}@{}>", pl.col("mid_hex").str.slice(0, 14), pl.col("mid_hex").str.slice(14), pl.col("sender").str.split("@").list.get(1)).alias("message_id"),
    ).drop("mid_hex")
    rcpts = pl.DataFrame({"r": np.arange(n_r), "msg": r_msg, "dest": r_dest, "local": local}).with_columns(
        pl.col("dest").replace_strict(list(range(len(dests))), list(dest_dom), return_dtype=pl.String).alias("recipient_domain"),
        pl.col("dest").replace_strict(list(range(len(dests))), list(prov), return_dtype=pl.String).alias("provider_truth"),
        pl.col("dest").replace_strict(list(range(len(dests))), list(fam), return_dtype=pl.String).alias("provider_family_truth"),
    ).with_columns(pl.format("{}@{}", "local", "recipient_domain").alias("recipient")).drop("local")
    rep = pl.DataFrame({
        "reply": np.arange(len(replies)),
        "smtp_code": pl.Series([r.code for r in replies], dtype=pl.Int16),
        "r_enhanced": pl.Series([r.enhanced for r in replies], dtype=pl.String),
        "template": [r.text for r in replies],
        "smtp_stage": [r.stage for r in replies],
        "outcome": [r.outcome for r in replies],
        "class_truth": [r.response_class for r in replies],
    })
    host_df = pl.DataFrame({"host": np.arange(len(host_names)), "mx_host": host_lc})
    ip_df = pl.DataFrame({"ip": np.arange(len(ip_names)), "mx_ip": ip_names})
    ep_names = [e.name for e in cfg.episodes]

    n_t = cat["r"].size
    tries = pl.DataFrame({
        "r": cat["r"], "attempt": cat["attempt"].astype(np.int32), "active_at_s": t0 + cat["active"],
        "delays_b": cat["b"], "delays_c": cat["c"], "delays_d": cat["d"], "ts_s": t0 + cat["ts"],
        "reply": cat["reply"], "host": cat["host"], "ip": cat["ip"], "first_host": cat["first_host"], "first_ip": cat["first_ip"],
        "n_hosts": cat["n_hosts"].astype(np.int8), "agent": np.where(cat["agent"] == 1, "error", "smtp"),
        "episode_idx": cat["episode"],
        "tok_num": rng.integers(10**13, 10**14, n_t), "tok_num3": rng.integers(100, 999, n_t), "tok_kbs": rng.integers(40, 9000, n_t),
        "tok_hex": _hex(rng, n_t, 10, upper=True), "tok_hex16": _hex(rng, n_t, 16, upper=True), "tok_gid_a": _hex(rng, n_t, 12),
        "tok_gid_b": _hex(rng, n_t, 10), "tok_gid_n": rng.integers(10**7, 10**8, n_t), "tok_gid_m": rng.integers(0, 999, n_t),
        "tok_fe": rng.integers(0, _MS_FE_PFX.size, n_t), "tok_ft": rng.integers(1, 300, n_t), "tok_mb": rng.integers(1000, 9999, n_t),
    }).join(rep, on="reply", how="left").join(host_df, on="host", how="left").join(ip_df, on="ip", how="left").join(
        host_df.rename({"host": "first_host", "mx_host": "first_mx_host"}), on="first_host", how="left").join(
        ip_df.rename({"ip": "first_ip", "mx_ip": "first_mx_ip"}), on="first_ip", how="left")

    us = lambda c: (pl.col(c) * 1e6).round(0).cast(pl.Int64).cast(schema.UTC_DT)  # noqa: E731
    tries = tries.join(rcpts, on="r", how="left").join(env, on="msg", how="left").with_columns(
        us("ts_s").alias("ts"), us("active_at_s").alias("active_at"),
        pl.when(pl.col("episode_idx") >= 0).then(pl.col("episode_idx").replace_strict(list(range(len(ep_names))) or [0], ep_names or [""], default=None, return_dtype=pl.String)).alias("episode"),
    )
    tries = tries.with_columns(
        ((pl.col("active_at") - pl.col("arrival")).dt.total_microseconds() / 1e6).alias("delays_a"),
        pl.format("{}FT{}.eop-{}.prod.protection.outlook.com {} {}",
                  pl.col("tok_fe").replace_strict(list(range(_MS_FE_PFX.size)), list(_MS_FE_PFX), return_dtype=pl.String),
                  pl.col("tok_ft").cast(pl.String).str.zfill(3),
                  pl.col("tok_fe").replace_strict(list(range(_MS_FE_PFX.size)), list(_MS_FE_REGION), return_dtype=pl.String),
                  pl.col("ts").dt.strftime("%Y-%m-%dT%H:%M:%S%.3fZ"), "tok_hex16").alias("ms_fe"),
        pl.format("{}-{}si{}{}.{}", "tok_gid_a", "tok_gid_b", "tok_gid_n", pl.col("tok_hex").str.slice(0, 1).str.to_lowercase(), "tok_gid_m").alias("gid"),
        pl.format("BN8PR12MB{}.namprd12.prod.outlook.com", "tok_mb").alias("ms_host"),
    )
    text = pl.col("template")
    for ph, val in (("{egress_ip}", pl.col("egress_ip")), ("{rcpt}", pl.col("recipient")), ("{domain}", pl.col("recipient_domain")),
                    ("{ms_fe}", pl.col("ms_fe")), ("{gid}", pl.col("gid")), ("{hex}", pl.col("tok_hex")), ("{num3}", pl.col("tok_num3").cast(pl.String)),
                    ("{num}", pl.col("tok_num").cast(pl.String)), ("{kbs}", pl.col("tok_kbs").cast(pl.String)), ("{size}", pl.col("size").cast(pl.String)),
                    ("{mid}", pl.col("message_id").str.strip_chars("<>")), ("{ms_host}", pl.col("ms_host")),
                    ("{unix}", pl.col("ts").dt.epoch("s").cast(pl.String))):
        text = text.str.replace_all(ph, val, literal=True)
    no_reply = pl.col("smtp_code").is_null()
    tries = tries.with_columns(text.alias("reply_text")).with_columns(
        # Postfix's dsn: the reply's enhanced code, else one synthesised from the reply class.
        pl.when(no_reply).then(pl.col("r_enhanced"))
        .when(pl.col("r_enhanced").is_not_null()).then(pl.col("r_enhanced"))
        .otherwise(pl.format("{}.0.0", pl.col("smtp_code").cast(pl.String).str.slice(0, 1))).alias("dsn"),
        pl.when(no_reply & (pl.col("agent") == "error"))
        .then(pl.format("delivery temporarily suspended: connect to {}[{}]:25: {}", "mx_host", "mx_ip", "reply_text"))
        .when(no_reply).then(pl.format("connect to {}[{}]:25: {}", "mx_host", "mx_ip", "reply_text"))
        .otherwise(pl.col("reply_text").str.replace_all("\n", " ", literal=True)).alias("response"),
        (~no_reply).alias("remote"),
        # a local suspension never reached the receiver: its class is local, not connection
        pl.when(pl.col("agent") == "error").then(pl.lit("local")).otherwise(pl.col("class_truth")).alias("class_truth"),
    ).with_columns(
        pl.col("dsn").alias("enhanced_code"),
        ((pl.col("ts") - pl.col("arrival")).dt.total_microseconds() / 1e6).alias("delay_s"),
    )
    exp = pl.DataFrame({"r": exp_r_a, "ts_s": t0 + exp_ts_a, "attempt": exp_row_a.astype(np.int32)}).join(rcpts, on="r", how="left").join(env, on="msg", how="left").with_columns(
        us("ts_s").alias("ts"), us("ts_s").alias("active_at"), pl.lit("qmgr").alias("agent"), pl.lit("expired").alias("outcome"),
        pl.lit(False).alias("remote"), pl.lit("expired").alias("class_truth"), pl.lit(-1, dtype=pl.Int64).alias("reply"),
    ).with_columns(((pl.col("ts") - pl.col("arrival")).dt.total_microseconds() / 1e6).alias("delay_s"))

    common = {
        "source": pl.lit("sample"), "log_host": pl.lit(cfg.log_host),
        "message_key": pl.format("{}/{}", "instance", "queue_id"), "orig_recipient": pl.lit(None, pl.String),
        "queued_at": pl.col("arrival"), "file": pl.lit(None, pl.String), "line_no": pl.lit(None, pl.Int64),
    }
    extra = ["episode", "class_truth", "provider_truth", "provider_family_truth", "msg", "r", "active_at", "delays_a", "delays_b",
             "delays_c", "delays_d", "reply", "reply_text", "n_hosts", "first_mx_host", "first_mx_ip"]
    truth = pl.concat([tries.with_columns(**common), exp.with_columns(**common)], how="diagonal_relaxed")
    truth = schema.conform(truth.lazy().with_columns(pl.col(c) for c in truth.columns)).collect().hstack(
        truth.select([pl.col(c) if c in truth.columns else pl.lit(None).alias(c) for c in extra]))
    truth = truth.sort("ts", "msg", "r", maintain_order=True)

    # Per-MX events that were not final for the try (the first of two hosts tried).
    first = truth.filter(pl.col("n_hosts") == 2)
    connections = schema.conform(first.lazy().select(
        pl.col("ts") - pl.duration(microseconds=(pl.col("delays_d") * 1e6 + pl.col("delays_c") * 5e5).cast(pl.Int64)),
        "source", "log_host", "instance", "queue_id", "message_key",
        pl.when(pl.col("smtp_code").is_null()).then(pl.lit("connect_failed")).otherwise(pl.lit("said")).alias("event"),
        "recipient_domain", "egress_ip", pl.col("first_mx_host").alias("mx_host"), pl.col("first_mx_ip").alias("mx_ip"),
        "smtp_code", pl.when(pl.col("smtp_code").is_null()).then(None).otherwise(pl.col("enhanced_code")).alias("enhanced_code"), "smtp_stage",
        pl.when(pl.col("smtp_code").is_null()).then(pl.format("connect to {}[{}]:25: Connection timed out", "first_mx_host", "first_mx_ip"))
        .otherwise(pl.col("response")).alias("response"),
    ), schema.CONNECTION_COLUMNS).collect()
    # Postfix logs every failed connect, the last host's too, before the deferred record.
    timeouts = truth.filter((pl.col("agent") == "smtp") & pl.col("smtp_code").is_null())
    connections = pl.concat([connections, schema.conform(timeouts.lazy().select(
        pl.col("ts") - pl.duration(microseconds=1000), "source", "log_host", "instance", "queue_id", "message_key",
        pl.lit("connect_failed").alias("event"), "recipient_domain", "egress_ip", "mx_host", "mx_ip",
        pl.lit(None, pl.Int16).alias("smtp_code"), pl.lit(None, pl.String).alias("enhanced_code"), "smtp_stage",
        pl.format("connect to {}[{}]:25: Connection timed out", "mx_host", "mx_ip").alias("response"),
    ), schema.CONNECTION_COLUMNS).collect()]).sort("ts", maintain_order=True)

    # --- per recipient-message truth ---------------------------------------------------------
    mx = truth.filter(pl.col("agent") == "smtp")
    per_r = truth.group_by("r").agg(
        pl.col("ts").min().alias("first_row_ts"),
        pl.col("ts").filter(pl.col("outcome") != "deferred").first().alias("final_ts"),
        pl.col("outcome").filter(pl.col("outcome") != "deferred").first().alias("final_outcome"),
    ).join(mx.group_by("r").agg(
        pl.len().cast(pl.Int32).alias("attempts"), pl.col("ts").min().alias("first_attempt_ts"),
        (pl.col("outcome").sort_by("ts").first() == "delivered").alias("first_attempt_delivered"),
    ), on="r", how="left")
    messages = rcpts.join(env.select("msg", "queue_id", "instance", "arrival", "sender", "egress_ip"), on="msg").join(per_r, on="r", how="left").with_columns(
        pl.col("final_outcome").fill_null("pending"), pl.col("attempts").fill_null(0),
        pl.col("first_attempt_delivered").fill_null(False),
        pl.format("{}/{}", "instance", "queue_id").alias("message_key"),
    ).select("message_key", "queue_id", "recipient", "recipient_domain", "provider_truth", "arrival", "final_outcome",
             "first_attempt_ts", "final_ts", "attempts", "first_attempt_delivered", "sender", "egress_ip", "msg", "r").sort("r")
    assert messages.filter(pl.col("final_outcome") == "pending").height == pending_a.size
    envelopes = env.with_columns(pl.format("{}/{}", "instance", "queue_id").alias("message_key"))
    return World(config=cfg, truth=truth, connections=connections, messages=messages, envelopes=envelopes)


def default_episodes(config: WorldConfig) -> list[Episode]:
    """The episodes of the bundled sample: a Microsoft ``452 4.3.1`` capacity event on all
    IPs (third day 13:00-17:00 UTC, 35 % of Microsoft-bound attempts) and a ``451 4.7.650``
    reputation throttle on one bulk IP (fifth day 09:00-12:00 UTC, 25 %)."""
    s = config.start
    d_cap = min(2, config.days - 1)
    d_rep = min(4, config.days - 1)
    bulk = [ip.ip for ip in config.sending_ips if ip.pool == "bulk"][:1] or [config.sending_ips[0].ip]
    return [
        Episode("ms-capacity", kind="capacity", providers=["microsoft"], probability=0.35,
                start=s + timedelta(days=d_cap, hours=13), end=s + timedelta(days=d_cap, hours=17)),
        Episode("ms-reputation-bulk", kind="reputation", providers=["microsoft"], egress_ips=bulk, probability=0.25,
                start=s + timedelta(days=d_rep, hours=9), end=s + timedelta(days=d_rep, hours=12)),
    ]
