"""What kind of "no" each attempt got (``response_class``), by which rule (``rule_id``), and who said it (``side``).

Classes: capacity, rate_limit, reputation, policy, mailbox, too_many_recipients, connection,
local, delivered, other.  Rules are data (``data/response_rules.yaml``), matched on provider,
reply code, enhanced code, reply text (case-insensitive regex), SMTP stage, agent, outcome and
whether a remote replied — never on the code alone; the first match wins.

``side`` is ``receiver`` when a destination MX replied, ``sender`` when the reply came from our
own infrastructure (a user list of relay/smarthost hosts and CIDR ranges, non-MX agents such as
Postfix's error agent, and texts only our MTA writes), ``unknown`` otherwise (connection
failures: a timeout to a Microsoft MX can be either side).

Decision on sender-side 452 4.3.1: a reply from our own relay (Exchange back pressure
``UsedDiskSpace[...]``, Postfix "Insufficient system storage", or any deferral from a listed
own host) is classed ``local`` and gets ``side = sender``, so ``response_class == "capacity"``
rows are never sender-side.  ``metrics.response_is(code=452, enhanced="4.3.1")`` matches the
code wherever it came from; add ``side="receiver"`` to exclude our own relays.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from .config import read_user, shipped
from .metrics import DEFAULT_BANDS, PER, is_mx_attempt, response_is
from .providers import PROVIDER_COLUMNS, normalise_host, with_provider

CLASSES = ("capacity", "rate_limit", "reputation", "policy", "mailbox", "too_many_recipients",
           "connection", "local", "delivered", "other")
SIDES = ("receiver", "sender", "unknown")
UNMATCHED = "unmatched"
_FIELDS = {"id", "class", "provider", "code", "enhanced", "text", "stage", "agent", "outcome", "remote", "side",
           "description", "ambiguous"}


# --- rules -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """One classification rule; every condition that is set must hold."""

    id: str
    response_class: str
    provider: tuple[str, ...] = ()
    code: tuple[int, ...] | str | None = None
    enhanced: str | None = None
    text: str | None = None
    stage: tuple[str, ...] = ()
    agent: tuple[str, ...] = ()
    outcome: tuple[str, ...] = ()
    remote: bool | None = None
    side: tuple[str, ...] = ()
    description: str = ""
    ambiguous: bool = False


@dataclass(frozen=True)
class RuleSet:
    """Ordered rules; the first match wins."""

    rules: tuple[Rule, ...] = field(default_factory=tuple)

    def __add__(self, other: RuleSet) -> RuleSet:
        mine = {r.id for r in self.rules}
        return RuleSet(self.rules + tuple(r for r in other.rules if r.id not in mine))

    def to_frame(self) -> pl.DataFrame:
        """The rules as a table (order, rule_id, response_class, conditions, description) for reports."""
        return pl.DataFrame(
            {
                "order": list(range(1, len(self.rules) + 1)),
                "rule_id": [r.id for r in self.rules],
                "response_class": [r.response_class for r in self.rules],
                "provider": [",".join(r.provider) or None for r in self.rules],
                "code": [None if r.code is None else (r.code if isinstance(r.code, str) else ",".join(map(str, r.code))) for r in self.rules],
                "enhanced": [r.enhanced for r in self.rules],
                "text": [r.text for r in self.rules],
                "ambiguous": [r.ambiguous for r in self.rules],
                "description": [r.description or None for r in self.rules],
            },
            schema_overrides={"provider": pl.String, "code": pl.String, "enhanced": pl.String, "text": pl.String, "description": pl.String},
        )


def _tuple(value) -> tuple:
    if value is None:
        return ()
    return (value,) if isinstance(value, (str, int)) else tuple(value)


def _parse_rules(doc, origin: str) -> RuleSet:
    items = doc.get("rules", []) if isinstance(doc, Mapping) else doc
    out, seen = [], set()
    for i, item in enumerate(items or []):
        where = f"{origin}: rule #{i + 1}"
        if not isinstance(item, Mapping) or "id" not in item or "class" not in item:
            raise ValueError(f"{where} needs an 'id' and a 'class'")
        where = f"{origin}: rule {item['id']!r}"
        unknown = set(item) - _FIELDS
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_FIELDS)}")
        if item["class"] not in CLASSES:
            raise ValueError(f"{where}: class {item['class']!r} is not one of {CLASSES}")
        if item["id"] in seen:
            raise ValueError(f"{where}: duplicate id")
        seen.add(item["id"])
        for key in ("enhanced", "text"):
            if item.get(key) is not None:
                try:
                    re.compile(str(item[key]))
                except re.error as exc:
                    raise ValueError(f"{where}: bad {key} regex {item[key]!r}: {exc}") from exc
        code = item.get("code")
        if isinstance(code, str):
            if not re.fullmatch(r"[2-5]xx", code):
                raise ValueError(f"{where}: code {code!r} must be an int, a list of ints or '4xx'/'5xx'")
        elif code is not None:
            code = tuple(int(c) for c in _tuple(code))
        side = _tuple(item.get("side"))
        if set(side) - set(SIDES):
            raise ValueError(f"{where}: side must be among {SIDES}")
        out.append(Rule(
            id=str(item["id"]), response_class=str(item["class"]), provider=tuple(map(str, _tuple(item.get("provider")))),
            code=code, enhanced=item.get("enhanced"), text=item.get("text"), stage=tuple(map(str, _tuple(item.get("stage")))),
            agent=tuple(map(str, _tuple(item.get("agent")))), outcome=tuple(map(str, _tuple(item.get("outcome")))),
            remote=item.get("remote"), side=side, description=" ".join(str(item.get("description") or "").split()),
            ambiguous=bool(item.get("ambiguous", False)),
        ))
    return RuleSet(tuple(out))


def default_rules() -> RuleSet:
    """The shipped rules (``deferral_kit/data/response_rules.yaml``)."""
    return _parse_rules(*shipped("response_rules.yaml"))


def load_rules(path: str | Path | None = None, *, extend: bool = True) -> RuleSet:
    """Rules from a user YAML file; with ``extend`` they are tried before the shipped rules and
    replace shipped rules with the same id."""
    if path is None:
        return default_rules()
    user = _parse_rules(read_user(path, "response rules"), str(path))
    return user + default_rules() if extend else user


def _coerce_rules(rules) -> RuleSet:
    if rules is None:
        return default_rules()
    if isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, (str, Path)):
        return load_rules(rules)
    return _parse_rules(rules, "response rules") + default_rules()


# --- own infrastructure ------------------------------------------------------------------------

@dataclass(frozen=True)
class OwnInfrastructure:
    """Hosts, networks and texts that mean "this reply came from our own side"."""

    hosts: tuple[str, ...] = ()
    networks: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()

    @classmethod
    def from_mapping(cls, doc: Mapping, origin: str = "own infrastructure") -> OwnInfrastructure:
        unknown = set(doc) - {"hosts", "networks", "texts"}
        if unknown:
            raise ValueError(f"{origin}: unknown key(s) {sorted(unknown)}; allowed: hosts, networks, texts")
        nets = []
        for n in _tuple(doc.get("networks")):
            try:
                net = ipaddress.ip_network(str(n), strict=False)
            except ValueError as exc:
                raise ValueError(f"{origin}: bad network {n!r}: {exc}") from exc
            if net.version == 6 and net.prefixlen % 16:
                raise ValueError(f"{origin}: IPv6 network {n!r}: only prefixes that are a multiple of 16 bits are supported")
            nets.append(str(net))
        for t in _tuple(doc.get("texts")):
            try:
                re.compile(str(t))
            except re.error as exc:
                raise ValueError(f"{origin}: bad text regex {t!r}: {exc}") from exc
        return cls(tuple(str(h).strip().lower().rstrip(".") for h in _tuple(doc.get("hosts"))), tuple(nets),
                   tuple(str(t) for t in _tuple(doc.get("texts"))))

    def expr(self) -> pl.Expr:
        """True when the row's mx_host / mx_ip / reply is ours; never null."""
        host = normalise_host(pl.col("mx_host"))
        ip = pl.col("mx_ip").str.strip_chars().str.strip_chars("[]").str.to_lowercase()
        cond = pl.lit(False)
        exact = [h for h in self.hosts if not h.startswith(".")]
        suffixes = [h for h in self.hosts if h.startswith(".")]
        if exact:
            cond = cond | host.is_in(exact) | ip.is_in(exact)
        if suffixes:
            cond = cond | host.str.contains(r"(^|\.)(" + "|".join(re.escape(s.lstrip(".")) for s in suffixes) + r")$")
        v4 = [ipaddress.ip_network(n) for n in self.networks if ipaddress.ip_network(n).version == 4]
        v6 = [ipaddress.ip_network(n) for n in self.networks if ipaddress.ip_network(n).version == 6]
        if v4:
            octets = ip.str.extract_groups(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$")
            as_int = sum((octets.struct.field(str(i + 1)).cast(pl.Int64) * (256 ** (3 - i)) for i in range(4)), pl.lit(0, dtype=pl.Int64))
            for net in v4:
                cond = cond | as_int.is_between(int(net.network_address), int(net.broadcast_address))
        for net in v6:
            if net.prefixlen == 0:
                cond = cond | ip.str.contains(":")
                continue
            # compare the leading 16-bit groups of the fully expanded address
            groups = net.network_address.exploded.split(":")[: net.prefixlen // 16]
            expanded = _expand_v6(ip)
            cond = cond | expanded.str.starts_with(":".join(groups) + ":")
        if self.texts:
            cond = cond | pl.col("response").str.contains("(?i)" + "|".join(f"(?:{t})" for t in self.texts))
        return cond.fill_null(False)


def _expand_v6(ip: pl.Expr) -> pl.Expr:
    """Fully expanded, zero-padded lower-case IPv6 text of an address expression (null for IPv4)."""
    parts = ip.str.split("::")
    head = parts.list.get(0, null_on_oob=True).str.split(":").list.eval(pl.element().filter(pl.element() != ""))
    tail = parts.list.get(1, null_on_oob=True).fill_null("").str.split(":").list.eval(pl.element().filter(pl.element() != ""))
    missing = 8 - head.list.len() - tail.list.len()
    zeros = pl.lit("0").repeat_by(missing.clip(lower_bound=0))
    groups = pl.concat_list(head, zeros, tail).list.eval(pl.element().str.pad_start(4, "0"))
    return pl.when(ip.str.contains(":")).then(groups.list.join(":")).otherwise(None)


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return "/" in text


def load_own_infrastructure(path) -> OwnInfrastructure:
    """Own-infrastructure list from a YAML file shaped like ``data/own_infrastructure.example.yaml``,
    a mapping of the same shape, or a plain list of host names / CIDR ranges (as
    ``sample.WorldConfig.own_infrastructure``)."""
    if path is None:
        return OwnInfrastructure()
    if isinstance(path, OwnInfrastructure):
        return path
    if isinstance(path, Mapping):
        return OwnInfrastructure.from_mapping(path)
    if isinstance(path, (list, tuple, set, frozenset)):
        items = [str(x) for x in path]
        return OwnInfrastructure.from_mapping({"hosts": [x for x in items if not _is_network(x)],
                                               "networks": [x for x in items if _is_network(x)]})
    return OwnInfrastructure.from_mapping(read_user(path, "own-infrastructure list"), str(path))


# --- classification ----------------------------------------------------------------------------

def reply_text() -> pl.Expr:
    """The reply as rules see it: no leading "smtp;", no multi-line continuation prefixes
    ("450-4.2.1 "), single spaces; "" when there is no reply."""
    return (
        pl.col("response").fill_null("")
        .str.replace(r"^(?i)\s*smtp;\s*", "")
        .str.replace_all(r"(^|\s)\d{3}-(\d\.\d{1,3}\.\d{1,3}\s)?", " ")
        .str.replace_all(r"\s+", " ")
        .str.strip_chars()
    )


def _condition(rule: Rule) -> pl.Expr:
    cond = pl.lit(True)
    if rule.provider:
        cond = cond & (pl.col("provider").is_in(rule.provider) | pl.col("provider_family").is_in(rule.provider))
    if isinstance(rule.code, str):
        low = int(rule.code[0]) * 100
        cond = cond & pl.col("smtp_code").cast(pl.Int32).is_between(low, low + 99)
    elif rule.code:
        cond = cond & pl.col("smtp_code").cast(pl.Int32).is_in(list(rule.code))
    if rule.enhanced:
        cond = cond & pl.col("enhanced_code").str.contains(f"^(?:{rule.enhanced})$")
    if rule.text:
        cond = cond & pl.col("_reply").str.contains(f"(?i){rule.text}")
    if rule.stage:
        cond = cond & pl.col("smtp_stage").is_in(rule.stage)
    if rule.agent:
        cond = cond & pl.col("agent").is_in(rule.agent)
    if rule.outcome:
        cond = cond & pl.col("outcome").is_in(rule.outcome)
    if rule.remote is not None:
        cond = cond & (pl.col("remote") == pl.lit(bool(rule.remote)))
    if rule.side:
        cond = cond & pl.col("_side0").is_in(rule.side)
    return cond.fill_null(False)


def with_classes(attempts: pl.LazyFrame | pl.DataFrame, *, rules=None, own_infrastructure=None) -> pl.LazyFrame:
    """Add ``response_class``, ``rule_id`` and ``side`` (and the provider columns when missing).

    ``rules``: None (shipped), a YAML path or a list of rule mappings (tried before the shipped
    rules), or a :class:`RuleSet`.  ``own_infrastructure``: None, a YAML path, a mapping with
    hosts/networks/texts, or an :class:`OwnInfrastructure`.  One vectorized when/then chain;
    rows no rule matches get class ``other`` and rule_id ``unmatched``.
    """
    ruleset = _coerce_rules(rules)
    own = load_own_infrastructure(own_infrastructure)
    lf = attempts.lazy()
    have = lf.collect_schema()
    lf = lf.drop([c for c in ("response_class", "rule_id", "side") if c in have])
    if any(c not in have for c in PROVIDER_COLUMNS):
        lf = with_provider(lf)
    side0 = (
        pl.when(own.expr()).then(pl.lit("sender"))
        .when(~is_mx_attempt()).then(pl.lit("sender"))
        .when(pl.col("remote").fill_null(False)).then(pl.lit("receiver"))
        .otherwise(pl.lit("unknown"))
    )
    lf = lf.with_columns(side0.alias("_side0"))
    # Rules see only these columns: classify each distinct combination once and join back,
    # since real logs repeat the same replies many times.
    keys = ["provider", "provider_family", "smtp_code", "enhanced_code", "response", "smtp_stage", "agent", "outcome", "remote", "_side0"]
    index = None
    for i, rule in enumerate(ruleset.rules):
        cond = _condition(rule)
        index = pl.when(cond).then(pl.lit(i)) if index is None else index.when(cond).then(pl.lit(i))
    index = pl.lit(None, dtype=pl.Int64) if index is None else index.otherwise(pl.lit(None, dtype=pl.Int64))
    ids = {i: r.id for i, r in enumerate(ruleset.rules)}
    classes = {i: r.response_class for i, r in enumerate(ruleset.rules)}
    lookup = (
        lf.select(keys).unique()
        .with_columns(reply_text().alias("_reply"))
        .with_columns(index.alias("_rule"))
        .select(
            *keys,
            pl.col("_rule").replace_strict(classes, default="other", return_dtype=pl.String).alias("response_class"),
            pl.col("_rule").replace_strict(ids, default=UNMATCHED, return_dtype=pl.String).alias("rule_id"),
        )
    )
    lf = lf.join(lookup, on=keys, how="left", nulls_equal=True, maintain_order="left")
    # a local class means the sending side decided, whatever host name the row carries
    lf = lf.with_columns(pl.when(pl.col("response_class") == "local").then(pl.lit("sender")).otherwise(pl.col("_side0")).alias("side"))
    return lf.drop("_side0")


# --- scope: one provider's destinations, or everyone at once? --------------------------------------

def scope(attempts: pl.LazyFrame | pl.DataFrame, *, start: datetime, end: datetime, where: pl.Expr | None = None,
          own_infrastructure=None, threshold_per_10k: float | None = None, concentration: float = 0.8,
          many_destinations: int = 5) -> dict:
    """Which providers and how many destinations share a spike in ``[start, end)``, and the likely side.

    Receiver pressure clusters on one provider's destinations; sender pressure (our relay,
    our network, our IPs) shows across many providers and destinations at once.  ``where``
    defaults to 452 4.3.1 by code, wherever it came from, so an own relay's back pressure is
    visible here.  Denominator: MX attempts in the window (:func:`metrics.is_mx_attempt`).

    Returns a dict: ``side`` (receiver / sender / unknown / none), ``reason`` (the numbers in
    words), ``events``, ``attempts``, ``providers_hit``, ``destinations_hit``, ``top_provider``,
    ``top_share``, ``sender_side_share`` and ``providers`` — a frame per provider family with
    attempts, count, rate_per_10k, destinations, destinations_hit, mx_hosts_hit, sender_side,
    hit (rate above ``threshold_per_10k``, default the top of the lowest band, 2 per 10,000).
    """
    hit = response_is() if where is None else where
    # naive datetimes are taken as UTC, like everything inside the package
    start, end = (t if t.tzinfo else t.replace(tzinfo=timezone.utc) for t in (start, end))
    threshold = DEFAULT_BANDS.upper[0] * PER if threshold_per_10k is None else threshold_per_10k
    lf = attempts.lazy()
    need_classes = "side" not in lf.collect_schema() or own_infrastructure is not None
    if need_classes:
        lf = with_classes(lf, own_infrastructure=own_infrastructure)
    window = lf.filter(pl.col("ts").is_between(start, end, closed="left") & is_mx_attempt())
    window = window.with_columns(hit.fill_null(False).alias("_hit"))
    per = (
        window.group_by("provider_family")
        .agg(
            pl.len().cast(pl.Int64).alias("attempts"),
            pl.col("_hit").sum().cast(pl.Int64).alias("count"),
            pl.col("recipient_domain").n_unique().cast(pl.Int64).alias("destinations"),
            pl.col("recipient_domain").filter(pl.col("_hit")).n_unique().cast(pl.Int64).alias("destinations_hit"),
            pl.col("mx_host").filter(pl.col("_hit")).n_unique().cast(pl.Int64).alias("mx_hosts_hit"),
            (pl.col("_hit") & (pl.col("side") == "sender")).sum().cast(pl.Int64).alias("sender_side"),
        )
        .with_columns((pl.col("count") * PER / pl.col("attempts")).alias("rate_per_10k"))
        .with_columns(((pl.col("rate_per_10k") > threshold) & (pl.col("count") > 0)).alias("hit"))
        .sort(["count", "attempts", "provider_family"], descending=[True, True, False])
        .select("provider_family", "attempts", "count", "rate_per_10k", "destinations", "destinations_hit", "mx_hosts_hit", "sender_side", "hit")
        .collect()
    )
    events = int(per["count"].sum())
    total = int(per["attempts"].sum())
    dest_hit = int(window.filter(pl.col("_hit")).select(pl.col("recipient_domain").n_unique()).collect().item()) if events else 0
    hit_rows = per.filter(pl.col("hit"))
    result = {
        "start": start, "end": end, "events": events, "attempts": total,
        "providers_hit": hit_rows.height, "destinations_hit": dest_hit,
        "top_provider": per["provider_family"][0] if events else None,
        "top_share": (per["count"][0] / events) if events else 0.0,
        "sender_side_share": (int(per["sender_side"].sum()) / events) if events else 0.0,
        "providers": per,
    }
    if events == 0:
        result.update(side="none", reason=f"no matching responses in {total:,} MX attempts in the window")
        return result
    top, share = result["top_provider"], result["top_share"]
    top_row = per.row(0, named=True)
    if result["sender_side_share"] >= 0.5:
        side = "sender"
        reason = (f"{result['sender_side_share']:.0%} of {events:,} matching replies came from our own infrastructure "
                  f"(own relay/smarthost or local MTA), not from a destination MX")
    elif share >= concentration and top not in ("other", "unknown", "local"):
        side = "receiver"
        reason = (f"{top_row['count']:,} of {events:,} matching replies ({share:.0%}) came from {top} MX hosts "
                  f"({top_row['mx_hosts_hit']} hosts, {top_row['destinations_hit']} of {top_row['destinations']} {top} destinations, "
                  f"{top_row['rate_per_10k']:.1f} per 10,000 attempts); {result['providers_hit'] - int(top_row['hit'])} other provider(s) "
                  f"above {threshold:g} per 10,000")
    elif result["providers_hit"] >= 2 or (top == "other" and dest_hit >= many_destinations):
        side = "sender"
        names = ", ".join(f"{r['provider_family']} {r['rate_per_10k']:.1f}" for r in hit_rows.iter_rows(named=True))
        reason = (f"the spike is spread over {result['providers_hit']} providers (per 10,000: {names}) and {dest_hit} destinations "
                  f"at once; top provider {top} has only {share:.0%} of {events:,} matching replies")
    else:
        side = "unknown"
        reason = (f"{events:,} matching replies, top provider {top} with {share:.0%}, {result['providers_hit']} provider(s) above "
                  f"{threshold:g} per 10,000, {dest_hit} destination(s): not enough to tell")
    result.update(side=side, reason=reason)
    return result


def rules_table(rules=None) -> pl.DataFrame:
    """The active rules as a frame (order, rule_id, response_class, conditions, description)."""
    return _coerce_rules(rules).to_frame()


__all__ = ["CLASSES", "OwnInfrastructure", "Rule", "RuleSet", "default_rules", "load_own_infrastructure", "load_rules",
           "reply_text", "rules_table", "scope", "with_classes"]
