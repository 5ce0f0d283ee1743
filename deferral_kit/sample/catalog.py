"""The generated world's destinations and reply texts.

Reply texts follow what providers really answer (``research/smtp_codes.md``); the
placeholders in braces are filled per attempt by :mod:`deferral_kit.sample.world`:
``{egress_ip}``, ``{rcpt}``, ``{domain}``, ``{ms_fe}`` (a Microsoft front-end marker such
as ``DM6NAM11FT088.eop-nam11.prod.protection.outlook.com 2026-11-18T14:03:11.123Z
08DE2B4C5D6E7F80``), ``{gid}`` (a Gmail transaction id), ``{hex}``, ``{num}``, ``{mid}``.
Multi-line replies keep their lines separated by ``\\n``; each writer joins them the way
its MTA does (Postfix: one space; Exim: a literal ``\\n``; KumoMTA: spaces without the
continuation prefixes).
"""

from __future__ import annotations

from dataclasses import dataclass

# --- destinations --------------------------------------------------------------------------


@dataclass(frozen=True)
class MX:
    """One MX host and the addresses it resolves to."""

    host: str
    ips: tuple[str, ...]


@dataclass(frozen=True)
class Destination:
    """A recipient domain: provider, MX hosts in preference order, share of recipients."""

    domain: str
    provider: str
    family: str
    mxs: tuple[MX, ...]
    weight: float
    greylisting: bool = False  # first try of each recipient gets 450 4.2.0
    unreachable: bool = False  # every connect times out (ends in expiry)


def _ips(prefix: str, lasts: tuple[int, ...]) -> tuple[str, ...]:
    return tuple(f"{prefix}.{n}" for n in lasts)


_MS_CONSUMER = {
    "hotmail.com": (0.13, "hotmail-com.olc.protection.outlook.com", "52.101.42", (1, 3, 5)),
    "outlook.com": (0.08, "outlook-com.olc.protection.outlook.com", "52.101.68", (10, 11, 12)),
    "live.com": (0.04, "live-com.olc.protection.outlook.com", "52.101.8", (47, 48)),
    "msn.com": (0.015, "msn-com.olc.protection.outlook.com", "52.101.9", (21, 22)),
}

# Microsoft 365 tenants on vanity domains: MX is <domain with dots as dashes>.mail.protection.outlook.com
_M365_TENANTS = (
    "contoso-corp.com", "fabrikam.co.uk", "northwind-traders.com", "adventure-works.net", "tailspintoys.com",
    "wingtiptoys.org", "litwareinc.com", "proseware.de", "fourthcoffee.com", "woodgrovebank.com",
    "alpineskihouse.ch", "bluevalley-health.org", "cityofmaple.gov", "lakeside-school.edu", "greenleaf-legal.com",
    "harbor-logistics.com", "summitrealty.ca", "brightpath-consulting.com", "oakridge-mfg.com", "silverline-ins.com",
)

_GOOGLE_MX = (
    MX("gmail-smtp-in.l.google.com", ("142.250.27.26", "142.250.27.27", "142.251.9.26", "142.251.9.27")),
    MX("alt1.gmail-smtp-in.l.google.com", ("142.250.153.26", "142.250.153.27")),
    MX("alt2.gmail-smtp-in.l.google.com", ("74.125.200.26", "74.125.200.27")),
)
_WORKSPACE_MX = (
    MX("aspmx.l.google.com", ("172.253.62.26", "172.253.62.27", "64.233.184.26")),
    MX("alt1.aspmx.l.google.com", ("142.250.153.26", "142.250.153.27")),
)
_WORKSPACE_DOMAINS = (
    "acme-robotics.io", "quartzlabs.dev", "pinecrest-academy.org", "nimbus-analytics.com", "redwood-studio.co",
    "velvetcafe.com", "orbitmedia.agency", "cobalt-systems.net",
)
_YAHOO_MX = (
    MX("mta5.am0.yahoodns.net", ("67.195.204.72", "67.195.228.94", "98.136.96.74")),
    MX("mta6.am0.yahoodns.net", ("67.195.204.79", "98.136.96.91")),
    MX("mta7.am0.yahoodns.net", ("66.218.85.52", "98.136.96.77")),
)
_AOL_MX = (MX("mx-aol.mail.gm0.yahoodns.net", ("67.195.204.77", "98.136.96.75", "66.218.85.151")),)
_APPLE_MX = (
    MX("mx01.mail.icloud.com", ("17.57.154.33", "17.57.155.24", "17.42.251.41")),
    MX("mx02.mail.icloud.com", ("17.57.154.6", "17.42.251.56")),
)

_TAIL_WORDS = (
    "acorn", "birch", "cedar", "delta", "ember", "falcon", "granite", "harvest", "iris", "juniper", "kestrel",
    "lumen", "maple", "nova", "onyx", "prairie", "quill", "raven", "sierra", "tundra", "umber", "vista",
    "willow", "xenon", "yarrow", "zephyr",
)
_TAIL_SUFFIX = ("mail.example", "net", "de", "fr", "nl", "com.br", "it", "org")


def destinations() -> tuple[Destination, ...]:
    """The default recipient-domain mix (weights sum to 1)."""
    out: list[Destination] = []
    for dom, (w, host, pfx, lasts) in _MS_CONSUMER.items():
        out.append(Destination(dom, "microsoft_consumer", "microsoft", (MX(host, _ips(pfx, lasts)),), w))
    for i, dom in enumerate(_M365_TENANTS):
        host = dom.replace(".", "-") + ".mail.protection.outlook.com"
        ips = (f"52.101.{194 + i % 6}.{(i * 7) % 250 + 2}", f"52.101.{200 + i % 5}.{(i * 11) % 250 + 3}", f"40.93.{i % 8}.{(i * 13) % 250 + 1}")
        out.append(Destination(dom, "microsoft_365", "microsoft", (MX(host, ips),), 0.12 / len(_M365_TENANTS)))
    out.append(Destination("gmail.com", "google", "google", _GOOGLE_MX, 0.25))
    out.append(Destination("googlemail.com", "google", "google", _GOOGLE_MX, 0.005))
    for dom in _WORKSPACE_DOMAINS:
        out.append(Destination(dom, "google", "google", _WORKSPACE_MX, 0.045 / len(_WORKSPACE_DOMAINS)))
    out.append(Destination("yahoo.com", "yahoo", "yahoo", _YAHOO_MX, 0.07))
    out.append(Destination("ymail.com", "yahoo", "yahoo", _YAHOO_MX, 0.005))
    out.append(Destination("aol.com", "yahoo", "yahoo", _AOL_MX, 0.025))
    out.append(Destination("icloud.com", "apple", "apple", _APPLE_MX, 0.035))
    out.append(Destination("me.com", "apple", "apple", _APPLE_MX, 0.01))
    out.append(Destination("mac.com", "apple", "apple", _APPLE_MX, 0.005))
    # The long tail: many small domains with their own MX; a few greylist, one is unreachable.
    tail: list[tuple[str, bool, bool]] = []
    for i, word in enumerate(_TAIL_WORDS):
        for j, suf in enumerate(_TAIL_SUFFIX[: 2 + (i % 5)]):
            tail.append((f"{word}{'-' + str(j) if j else ''}.{suf}", (i + j) % 9 == 0, False))
    tail.append(("oldhost-unreachable.example", False, True))
    tail_w = 1.0 - sum(d.weight for d in out)
    for k, (dom, grey, down) in enumerate(tail):
        a, b = 20 + (k * 37) % 180, (k * 53) % 250 + 1
        if a in (100, 127, 169, 172, 192, 198):  # not loopback, private, link-local or our own range
            a += 1
        mxs = (MX(f"mx.{dom}", (f"{a}.{(k * 29) % 250 + 3}.{(k * 17) % 250}.{b}",)),)
        if k % 3 == 0:
            mxs += (MX(f"mx2.{dom}", (f"{a}.{(k * 29) % 250 + 3}.{(k * 17 + 1) % 250}.{b}",)),)
        # Zipf-like tail: a few bigger domains, many tiny ones.
        out.append(Destination(dom, "other", "other", mxs, 1.0 / (k + 3), greylisting=grey, unreachable=down))
    norm = sum(d.weight for d in out[-len(tail):])
    out[-len(tail):] = [Destination(d.domain, d.provider, d.family, d.mxs, d.weight / norm * tail_w, d.greylisting, d.unreachable) for d in out[-len(tail):]]
    return tuple(out)


# --- replies -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A reply (or local failure) an attempt can end with."""

    code: int | None  # None: no reply from the remote side (connect failure, local suspension)
    enhanced: str | None
    text: str  # full reply, lines separated by \n; placeholders as in the module docstring
    stage: str
    outcome: str  # delivered | deferred | bounced
    response_class: str  # the class the reply is meant to have (truth for classify tests)


SESSION_STAGES = ("connect", "greeting", "HELO", "MAIL FROM")

MS_CAPACITY = Reply(452, "4.3.1", "452 4.3.1 Insufficient system resources (TSTE) [{ms_fe}]", "RCPT TO", "deferred", "capacity")
MS_REPUTATION = Reply(
    451, "4.7.650",
    "451 4.7.650 The mail server [{egress_ip}] has been temporarily rate limited due to IP reputation. For e-mail delivery information, see https://postmaster.live.com (S775) [{ms_fe}]",
    "RCPT TO", "deferred", "reputation",
)
MS_BLOCK = Reply(
    550, "5.7.1",
    "550 5.7.1 Unfortunately, messages from [{egress_ip}] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3150). You can also refer your provider to http://mail.live.com/mail/troubleshooting.aspx#errors. [{ms_fe}]",
    "RCPT TO", "bounced", "policy",
)
MS_UNKNOWN = Reply(550, "5.5.0", "550 5.5.0 Requested action not taken: mailbox unavailable (S2017062302). [{ms_fe}]", "RCPT TO", "bounced", "mailbox")
M365_UNKNOWN = Reply(550, "5.4.1", "550 5.4.1 Recipient address rejected: Access denied. For more information see https://aka.ms/EXOSmtpErrors [{ms_fe}]", "RCPT TO", "bounced", "mailbox")
EXCHANGE_RELAY_CAPACITY = Reply(
    452, "4.3.1",
    "452 4.3.1 Insufficient system resources (UsedDiskSpace[C:\\Program Files\\Microsoft\\Exchange Server\\V15\\TransportRoles\\data\\Queue])",
    "MAIL FROM", "deferred", "local",  # our own relay's back pressure: sender-side, as classify.py decides
)

GMAIL_RATE = Reply(
    450, "4.2.1",
    "450-4.2.1 The user you are trying to contact is receiving mail at a rate that\n450-4.2.1 prevents additional messages from being delivered. Please resend your\n"
    "450-4.2.1 message at a later time. If the user is able to receive mail at that\n450-4.2.1 time, your message will be delivered. For more information, please\n"
    "450-4.2.1 visit\n450 4.2.1  https://support.google.com/mail/?p=ReceivingRate {gid} - gsmtp",
    "RCPT TO", "deferred", "rate_limit",
)
GMAIL_UNSOLICITED = Reply(
    421, "4.7.28",
    "421-4.7.28 Gmail has detected an unusual rate of unsolicited mail originating\n421-4.7.28 from your IP address [{egress_ip}]. To protect our users from spam, mail sent\n"
    "421-4.7.28 from your IP address has been temporarily rate limited. For more\n421-4.7.28 information, go to\n"
    "421-4.7.28  https://support.google.com/mail/?p=UnsolicitedRateLimitError to\n421 4.7.28 review our Bulk Email Senders Guidelines. {gid} - gsmtp",
    "end of DATA", "deferred", "rate_limit",
)
GMAIL_OVER_QUOTA = Reply(
    452, "4.2.2",
    "452-4.2.2 The recipient's inbox is out of storage space. Please direct the\n452-4.2.2 recipient to\n452 4.2.2  https://support.google.com/mail/?p=OverQuotaTemp {gid} - gsmtp",
    "RCPT TO", "deferred", "mailbox",
)
GMAIL_UNKNOWN = Reply(
    550, "5.1.1",
    "550-5.1.1 The email account that you tried to reach does not exist. Please try\n550-5.1.1 double-checking the recipient's email address for typos or\n"
    "550-5.1.1 unnecessary spaces. For more information, go to\n550 5.1.1  https://support.google.com/mail/?p=NoSuchUser {gid} - gsmtp",
    "RCPT TO", "bounced", "mailbox",
)
YAHOO_TSS04 = Reply(
    421, "4.7.0",
    "421 4.7.0 [TSS04] Messages from {egress_ip} temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
    "MAIL FROM", "deferred", "rate_limit",
)
YAHOO_UNKNOWN = Reply(554, None, "554 delivery error: dd Sorry your message to {rcpt} cannot be delivered. This mailbox is disabled (554.30). - mta{num3}.mail.bf1.yahoo.com", "end of DATA", "bounced", "mailbox")
APPLE_TEMP = Reply(451, None, "451 [BS02] Temporary server error. Please try again later", "RCPT TO", "deferred", "other")
APPLE_UNKNOWN = Reply(550, "5.1.1", "550 5.1.1 <{rcpt}>: user does not exist", "RCPT TO", "bounced", "mailbox")
GREYLISTED = Reply(450, "4.2.0", "450 4.2.0 <{rcpt}>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/{domain}.html", "RCPT TO", "deferred", "policy")
OTHER_OVER_QUOTA = Reply(452, "4.2.2", "452 4.2.2 <{rcpt}>: Recipient address rejected: Mailbox full", "RCPT TO", "deferred", "mailbox")
OTHER_UNKNOWN = Reply(550, "5.1.1", "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown in virtual mailbox table", "RCPT TO", "bounced", "mailbox")
CONNECT_TIMEOUT = Reply(None, "4.4.1", "Connection timed out", "connect", "deferred", "connection")

DELIVERED = {
    "microsoft": Reply(250, "2.6.0", "250 2.6.0 <{mid}> [InternalId={num}, Hostname={ms_host}] {size} bytes in 0.{num3}, {kbs}.{num3} KB/sec Queued mail for delivery", "end of DATA", "delivered", "delivered"),
    "google": Reply(250, "2.0.0", "250 2.0.0 OK  {unix} {gid} - gsmtp", "end of DATA", "delivered", "delivered"),
    "yahoo": Reply(250, None, "250 ok dirdel", "end of DATA", "delivered", "delivered"),
    "apple": Reply(250, "2.0.0", "250 2.0.0 Ok: queued as {hex}", "end of DATA", "delivered", "delivered"),
    "other": Reply(250, "2.0.0", "250 2.0.0 Ok: queued as {hex}", "end of DATA", "delivered", "delivered"),
    "relay": Reply(250, "2.6.0", "250 2.6.0 <{mid}> [InternalId={num}, Hostname=EXCH01.corp.example] Queued mail for delivery", "end of DATA", "delivered", "delivered"),
}

UNKNOWN_USER = {"microsoft_consumer": MS_UNKNOWN, "microsoft_365": M365_UNKNOWN, "google": GMAIL_UNKNOWN, "yahoo": YAHOO_UNKNOWN, "apple": APPLE_UNKNOWN, "other": OTHER_UNKNOWN}
OVER_QUOTA = {"google": GMAIL_OVER_QUOTA, "other": OTHER_OVER_QUOTA}

# Background (always-on) transient replies: provider -> [(reply, probability per attempt)].
BACKGROUND: dict[str, tuple[tuple[Reply, float], ...]] = {
    "microsoft_consumer": ((MS_CAPACITY, 0.0001), (MS_REPUTATION, 0.0015), (MS_BLOCK, 0.0004)),
    "microsoft_365": ((MS_CAPACITY, 0.0001), (MS_REPUTATION, 0.0005)),
    "google": ((GMAIL_RATE, 0.004), (GMAIL_UNSOLICITED, 0.0015)),
    "yahoo": ((YAHOO_TSS04, 0.012),),
    "apple": ((APPLE_TEMP, 0.004),),
    "other": (),
}
