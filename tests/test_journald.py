"""``journalctl -o json`` exports → the syslog lines the Postfix parser reads
(deferral_kit.loaders.journald).

The fixtures are written the way journalctl writes them:

* Older journalctl (systemd < 254, e.g. Debian 11): ``{ "__CURSOR" : "s=…;i=…;b=…;m=…;t=…;x=…",
  "__REALTIME_TIMESTAMP" : "…", "__MONOTONIC_TIMESTAMP" : "…", "_BOOT_ID" : "…", … }``, the
  address fields first, ``" : "`` and ``", "`` between fields, byte arrays as ``[ 72, 105 ]``
  (as in openfaas/faasd pkg/logs/requestor_test.go and the examples of
  https://www.freedesktop.org/wiki/Software/systemd/json/).
* systemd ≥ 254 (Debian 13, Fedora): compact ``{"_COMM":"smtpd",…}`` with the fields in hash
  order and ``__SEQNUM``, ``__SEQNUM_ID``, ``_RUNTIME_SCOPE`` added (as in a public Go test
  that captured ``postfix/smtpd`` records from such a host).
* Values are JSON strings (timestamps: microseconds since the epoch); a value that is not
  printable UTF-8 is an array of byte values; a field over 4096 bytes is ``null`` unless
  journalctl ran with ``--all`` (journalctl(1), ``-o json``; https://systemd.io/JOURNAL_EXPORT_FORMATS/).
* Postfix logs through syslog(3), so its entries carry ``_TRANSPORT=syslog``,
  ``SYSLOG_IDENTIFIER`` = its syslog_name/daemon, ``SYSLOG_PID``, ``SYSLOG_TIMESTAMP`` (the
  local-time stamp of the datagram, with a trailing space) and ``_SOURCE_REALTIME_TIMESTAMP``.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from deferral_kit import schema
from deferral_kit.loaders import load
from deferral_kit.loaders.journald import is_journal_json, journal_postfix, to_syslog_lines

BOOT = "3b9e5d4c2a1f4e8d9c7b6a5f4e3d2c1b"
MACHINE = "0f6c2d8e9a4b4c3d8e7f6a5b4c3d2e1f"
SEQNUM_ID = "a7c3e1f09b2d4e6f8a1c3e5b7d9f0a2c"

OUTLOOK_452 = (
    "3F2A1C0D1E: to=<a@outlook.com>, relay=outlook-com.olc.protection.outlook.com[52.101.8.36]:25, delay=1.2, "
    "delays=0.1/0/0.6/0.5, dsn=4.3.1, status=deferred (host outlook-com.olc.protection.outlook.com[52.101.8.36] said: "
    "452 4.3.1 Insufficient system resources (in reply to RCPT TO command))"
)
QMGR_FROM = "3F2A1C0D1E: from=<news@shop.example>, size=4211, nrcpt=1 (queue active)"


def _value(v, *, spaced: bool) -> str:
    if isinstance(v, list):  # bytes
        return "[ " + ", ".join(map(str, v)) + " ]" if spaced else "[" + ",".join(map(str, v)) + "]"
    return json.dumps(v, ensure_ascii=False)


def classic(fields: list[tuple[str, object]]) -> str:
    """One record as journalctl before systemd 254 writes it."""
    return "{ " + ", ".join(f"{json.dumps(k)} : {_value(v, spaced=True)}" for k, v in fields) + " }"


def compact(fields: list[tuple[str, object]]) -> str:
    """One record as journalctl of systemd ≥ 254 writes it."""
    return "{" + ",".join(f"{json.dumps(k)}:{_value(v, spaced=False)}" for k, v in fields) + "}"


def postfix_entry(*, seq: int, src: int, ident: str, pid: str, message, host: str = "mx1", realtime_lag: int = 24) -> dict:
    """The fields journald stores for a Postfix syslog message (``src``: when it was sent, µs)."""
    rt = src + realtime_lag
    mono = 29082368151 + (src - 1700000000123456)
    comm = ident.rsplit("/", 1)[-1]
    return {
        "__CURSOR": f"s={SEQNUM_ID};i={seq:x};b={BOOT};m={mono:x};t={rt:x};x={(seq * 0x9E3779B97F4A7C15) & (2**64 - 1):016x}",
        "__REALTIME_TIMESTAMP": str(rt),
        "__MONOTONIC_TIMESTAMP": str(mono),
        "__SEQNUM": str(seq),
        "__SEQNUM_ID": SEQNUM_ID,
        "_BOOT_ID": BOOT,
        "PRIORITY": "6",
        "SYSLOG_FACILITY": "2",
        "SYSLOG_IDENTIFIER": ident,
        "SYSLOG_PID": pid,
        "_HOSTNAME": host,
        "_TRANSPORT": "syslog",
        "_SYSTEMD_UNIT": "postfix@-.service",
        "_UID": "107",
        "_GID": "114",
        "_COMM": comm,
        "_EXE": f"/usr/lib/postfix/sbin/{comm}",
        "_CMDLINE": f"{comm} -l -t unix -u" if comm == "qmgr" else f"{comm} -t unix -u -c",
        "_CAP_EFFECTIVE": "0",
        "_SYSTEMD_CGROUP": "/system.slice/system-postfix.slice/postfix@-.service",
        "_SYSTEMD_SLICE": "system-postfix.slice",
        "_SYSTEMD_INVOCATION_ID": "37095c77bbbd4b01bbb094839a39b5a1",
        "_RUNTIME_SCOPE": "system",
        "_MACHINE_ID": MACHINE,
        "SYSLOG_TIMESTAMP": "Nov 14 23:13:20 ",  # local time (CET) of the datagram
        "MESSAGE": message,
        "_PID": pid,
        "_SOURCE_REALTIME_TIMESTAMP": str(src),
    }


# journalctl < 254: address fields, then the entry's fields in the order journald stored them
CLASSIC_ORDER = (
    "__CURSOR", "__REALTIME_TIMESTAMP", "__MONOTONIC_TIMESTAMP", "_BOOT_ID", "PRIORITY", "SYSLOG_FACILITY",
    "SYSLOG_IDENTIFIER", "SYSLOG_PID", "_HOSTNAME", "_TRANSPORT", "_SYSTEMD_UNIT", "_UID", "_GID", "_COMM", "_EXE",
    "_CMDLINE", "_CAP_EFFECTIVE", "_SYSTEMD_CGROUP", "_SYSTEMD_SLICE", "_SYSTEMD_INVOCATION_ID", "_MACHINE_ID",
    "SYSLOG_TIMESTAMP", "MESSAGE", "_PID", "_SOURCE_REALTIME_TIMESTAMP",
)
# journalctl ≥ 254: hash order (this is the order of a captured postfix/smtpd record)
COMPACT_ORDER = (
    "_COMM", "_CAP_EFFECTIVE", "SYSLOG_IDENTIFIER", "_HOSTNAME", "_EXE", "PRIORITY", "_RUNTIME_SCOPE", "_CMDLINE",
    "__REALTIME_TIMESTAMP", "_BOOT_ID", "SYSLOG_PID", "__CURSOR", "_SOURCE_REALTIME_TIMESTAMP", "SYSLOG_TIMESTAMP",
    "_PID", "__MONOTONIC_TIMESTAMP", "SYSLOG_FACILITY", "__SEQNUM_ID", "_SYSTEMD_SLICE", "_SYSTEMD_CGROUP",
    "_SYSTEMD_INVOCATION_ID", "_GID", "MESSAGE", "_TRANSPORT", "_SYSTEMD_UNIT", "_UID", "__SEQNUM", "_MACHINE_ID",
)


def as_classic(entry: dict) -> str:
    return classic([(k, entry[k]) for k in CLASSIC_ORDER if k in entry])


def as_compact(entry: dict) -> str:
    return compact([(k, entry[k]) for k in COMPACT_ORDER if k in entry])


def convert(lines: list[str]) -> list[str]:
    df = pl.DataFrame({"line_no": list(range(1, len(lines) + 1)), "line": lines}, schema={"line_no": pl.Int64, "line": pl.String})
    out = to_syslog_lines(df)
    assert out.columns == ["line_no", "line"] and out.dtypes == [pl.Int64, pl.String]
    assert out.get_column("line_no").to_list() == list(range(1, len(lines) + 1))
    return out.get_column("line").to_list()


QMGR = postfix_entry(seq=0x1F4A2, src=1699999999123456, ident="postfix/qmgr", pid="1187", message=QMGR_FROM)
SMTP = postfix_entry(seq=0x1F4A3, src=1700000000123456, ident="postfix/smtp", pid="4242", message=OUTLOOK_452)
SYSTEMD = {  # the unit's own start message (journal transport, pid 1)
    "__CURSOR": f"s={SEQNUM_ID};i=1f3c0;b={BOOT};m=6b2f0a1c4;t=60a2414b3e2c5;x=d6c17d27f4813d72",
    "__REALTIME_TIMESTAMP": "1699999201000389",
    "__MONOTONIC_TIMESTAMP": "28784369092",
    "_BOOT_ID": BOOT,
    "PRIORITY": "6",
    "SYSLOG_FACILITY": "3",
    "SYSLOG_IDENTIFIER": "systemd",
    "_PID": "1",
    "_HOSTNAME": "mx1",
    "_TRANSPORT": "journal",
    "_SYSTEMD_UNIT": "init.scope",
    "_COMM": "systemd",
    "MESSAGE": "Started postfix@-.service - Postfix Mail Transport Agent (instance -).",
    "_SOURCE_REALTIME_TIMESTAMP": "1699999201000321",
}

SMTP_SYSLOG = f"2023-11-14T22:13:20.123456Z mx1 postfix/smtp[4242]: {OUTLOOK_452}"
QMGR_SYSLOG = f"2023-11-14T22:13:19.123456Z mx1 postfix/qmgr[1187]: {QMGR_FROM}"
SYSTEMD_SYSLOG = "2023-11-14T22:00:01.000321Z mx1 systemd[1]: Started postfix@-.service - Postfix Mail Transport Agent (instance -)."


# --- detection ------------------------------------------------------------------------------

def test_detects_both_serializations_and_postfix_records():
    for ser in (as_classic, as_compact):
        head = "\n".join([ser(SYSTEMD), ser(QMGR), ser(SMTP)]) + "\n"
        assert is_journal_json(head) and journal_postfix(head)
        assert is_journal_json(ser(SYSTEMD)) and not journal_postfix(ser(SYSTEMD))
    out2 = postfix_entry(seq=5, src=1700000000000000, ident="postfix-out2/qmgr", pid="7", message=QMGR_FROM)
    assert journal_postfix(as_compact(out2))
    # a head cut in the middle of a record still counts by its complete records
    assert journal_postfix(as_compact(SMTP) + "\n" + as_compact(QMGR)[:300])


@pytest.mark.parametrize(
    "text",
    [
        f"Nov 14 23:13:20 mx1 postfix/smtp[4242]: {OUTLOOK_452}\n",
        f"2023-11-14T22:13:20.123456Z mx1 postfix/smtp[4242]: {OUTLOOK_452}\n",
        '{"type":"TransientFailure","id":"1d98076abbbc11ed940250ebf67f93bd","recipient":"a@outlook.com","timestamp":1700000000}\n',
        # -o json-pretty is one field per line: not this format
        '{\n\t"__REALTIME_TIMESTAMP" : "1700000000123480",\n\t"MESSAGE" : "x"\n}\n',
        # a syslog line whose message happens to be journal JSON
        'Nov 14 23:13:20 mx1 app[1]: {"__REALTIME_TIMESTAMP":"1700000000123480","MESSAGE":"x"}\n',
        "",
    ],
)
def test_other_text_is_not_journal_json(text):
    assert not is_journal_json(text) and not journal_postfix(text)


# --- conversion -----------------------------------------------------------------------------

@pytest.mark.parametrize("ser", [as_classic, as_compact], ids=["classic", "compact"])
def test_records_become_rfc3339_syslog_lines(ser):
    assert convert([ser(SYSTEMD), ser(QMGR), ser(SMTP)]) == [SYSTEMD_SYSLOG, QMGR_SYSLOG, SMTP_SYSLOG]


def test_source_timestamp_preferred_realtime_used_without_it():
    # _SOURCE_REALTIME_TIMESTAMP (when Postfix sent it) wins over __REALTIME_TIMESTAMP (+24 µs)
    assert convert([as_compact(SMTP)])[0].startswith("2023-11-14T22:13:20.123456Z ")
    no_source = {k: v for k, v in SMTP.items() if k != "_SOURCE_REALTIME_TIMESTAMP"}
    assert convert([as_compact(no_source)]) == [SMTP_SYSLOG.replace(".123456Z", ".123480Z")]


def test_missing_host_and_pid():
    e = {k: v for k, v in QMGR.items() if k not in ("_HOSTNAME", "SYSLOG_PID", "_PID")}
    assert convert([as_classic(e)]) == [f"2023-11-14T22:13:19.123456Z - postfix/qmgr: {QMGR_FROM}"]
    only_pid = {k: v for k, v in QMGR.items() if k != "SYSLOG_PID"} | {"_PID": "1190"}
    assert convert([as_classic(only_pid)]) == [QMGR_SYSLOG.replace("[1187]", "[1190]")]


def test_byte_array_message_is_decoded_with_replacement_characters():
    # cleanup logs a header verbatim; a Latin-1 Subject is not UTF-8, so journald stores
    # the message as bytes
    raw = (
        b"4F2B1C0D1E: warning: header Subject: Bestellbest\xe4tigung Nr. 4711 from mail.shop.example[198.51.100.7]; "
        b"from=<orders@shop.example> to=<b@web.de> proto=ESMTP helo=<mail.shop.example>"
    )
    e = postfix_entry(seq=9, src=1700000001000000, ident="postfix/cleanup", pid="4240", message=list(raw))
    want = "2023-11-14T22:13:21.000000Z mx1 postfix/cleanup[4240]: " + raw.decode("utf-8", "replace")
    assert "Bestellbest\ufffdtigung" in want
    assert convert([as_classic(e)]) == [want]
    assert convert([as_compact(e), as_compact(SMTP)]) == [want, SMTP_SYSLOG]
    # valid UTF-8 that journald wrote as bytes (it holds a control character) stays as it was
    esc = postfix_entry(seq=10, src=1700000001000000, ident="postfix/smtp", pid="1", message=list("é\x1b€ ok".encode()))
    assert convert([as_compact(esc)]) == ["2023-11-14T22:13:21.000000Z mx1 postfix/smtp[1]: é\x1b€ ok"]
    assert convert([as_compact(postfix_entry(seq=11, src=1700000001000000, ident="postfix/smtp", pid="1", message=[]))]) == [
        "2023-11-14T22:13:21.000000Z mx1 postfix/smtp[1]: "
    ]


def test_newlines_in_message_become_spaces():
    e = postfix_entry(seq=12, src=1700000000123456, ident="postfix/smtp", pid="4242", message="first\nsecond\r\nthird")
    assert convert([as_compact(e)]) == ["2023-11-14T22:13:20.123456Z mx1 postfix/smtp[4242]: first second  third"]


def test_quotes_and_escapes_in_message():
    msg = '5D1E2F3A4B: to=<"user 1234 with space"@icloud.com>, relay=none, delay=0.1, delays=0/0/0/0, dsn=5.1.3, status=bounced (bad address syntax \\ "x")'
    e = postfix_entry(seq=13, src=1700000000123456, ident="postfix/smtp", pid="4242", message=msg)
    assert convert([as_classic(e)]) == [f"2023-11-14T22:13:20.123456Z mx1 postfix/smtp[4242]: {msg}"]


def test_lines_that_are_not_records_pass_through_in_place():
    truncated = as_compact(SMTP)[:200]  # journalctl killed while writing
    null_message = as_compact(SMTP).replace(json.dumps(OUTLOOK_452), "null")  # over 4096 bytes, no --all
    no_stamp = as_compact({k: v for k, v in SMTP.items() if "REALTIME" not in k})
    several = as_compact(SMTP).replace(json.dumps(OUTLOOK_452), '["a","b"]')
    garbage = "{not json at all}"
    lines = ["", as_classic(QMGR), truncated, garbage, null_message, no_stamp, several, "-- No entries --", as_compact(SMTP)]
    assert convert(lines) == ["", QMGR_SYSLOG, truncated, garbage, null_message, no_stamp, several, "-- No entries --", SMTP_SYSLOG]


def test_many_records_with_a_broken_one_keep_count_and_order():
    n = 5000
    entries = [
        postfix_entry(seq=i, src=1700000000000000 + i * 1000, ident="postfix/smtp", pid=str(1000 + i), message=f"{i:010X}: removed")
        for i in range(n)
    ]
    lines = [as_compact(e) for e in entries]
    lines[3001] = '{"__REALTIME_TIMESTAMP":"1700000003001000","MESSAGE":"cut here'  # not a candidate
    lines[4002] = '{"__REALTIME_TIMESTAMP":"1700000004002000","MESSAGE":"x"} {"MESSAGE"}'  # braces, not JSON
    out = convert(lines)
    assert len(out) == n
    assert out[3001] == lines[3001] and out[4002] == lines[4002]
    want = [
        datetime.fromtimestamp(1700000000 + i / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        + f" mx1 postfix/smtp[{1000 + i}]: {i:010X}: removed"
        for i in range(n)
    ]
    assert [o for i, o in enumerate(out) if i not in (3001, 4002)] == [w for i, w in enumerate(want) if i not in (3001, 4002)]


def test_empty_frame():
    assert convert([]) == []


# --- through the Postfix loader -------------------------------------------------------------

def test_converted_export_loads_as_postfix(tmp_path):
    bytes_reply = postfix_entry(
        seq=0x1F4A5, src=1700000002500000, ident="postfix/smtp", pid="4243",
        message=list(
            b"3F2A1C0D1E: to=<b@web.de>, relay=mx-ha03.web.de[212.227.17.8]:25, delay=3.4, delays=2/0/0.9/0.5, dsn=4.2.2, "
            b"status=deferred (host mx-ha03.web.de[212.227.17.8] said: 452 4.2.2 Postfach voll / mailbox full \xfc "
            b"(in reply to RCPT TO command))"
        ),
    )
    export = [as_compact(SYSTEMD), as_compact(QMGR), as_compact(SMTP), as_compact(bytes_reply), "", as_compact(SMTP)[:200]]
    f = tmp_path / "postfix.jsonl"
    f.write_text("\n".join(convert(export)) + "\n", encoding="utf-8")
    res = load([f], format="postfix", year=2023)
    att = res.attempts.collect()
    schema.validate(att)
    cols = ["ts", "log_host", "instance", "agent", "queue_id", "sender", "size", "recipient_domain", "mx_host", "mx_ip",
            "smtp_code", "enhanced_code", "dsn", "smtp_stage", "outcome", "remote", "line_no"]
    assert att.select(cols).rows() == [
        (datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=timezone.utc), "mx1", "postfix", "smtp", "3F2A1C0D1E",
         "news@shop.example", 4211, "outlook.com", "outlook-com.olc.protection.outlook.com", "52.101.8.36",
         452, "4.3.1", "4.3.1", "RCPT TO", "deferred", True, 3),
        (datetime(2023, 11, 14, 22, 13, 22, 500000, tzinfo=timezone.utc), "mx1", "postfix", "smtp", "3F2A1C0D1E",
         "news@shop.example", 4211, "web.de", "mx-ha03.web.de", "212.227.17.8",
         452, "4.2.2", "4.2.2", "RCPT TO", "deferred", True, 4),
    ]
    assert att.get_column("response").to_list()[1] == "452 4.2.2 Postfach voll / mailbox full \ufffd"
    acc = res.accounting
    assert acc.lines_read == len(export)
    assert acc.count("attempt") == 2 and acc.count("context") == 1
    assert acc.count("skipped", "not postfix: systemd") == 1 and acc.count("skipped", "empty line") == 1
    # the cut-off record is kept as it was and counted
    assert acc.count("malformed", "no syslog header") == 1
    assert acc.examples.filter(pl.col("category") == "malformed").get_column("text").to_list() == [export[-1]]


def test_journal_export_is_detected_and_read_like_its_syslog_lines(tmp_path):
    """`journalctl -u postfix -o json > export.json` given as it is: detected as Postfix and read
    exactly like the same records written as syslog lines."""
    export = [as_compact(SYSTEMD), as_classic(QMGR), as_compact(SMTP)]
    raw = tmp_path / "export.json"
    raw.write_text("\n".join(export) + "\n", encoding="utf-8")
    text = tmp_path / "export.log"
    text.write_text("\n".join(convert(export)) + "\n", encoding="utf-8")
    got, want = load([raw], year=2023), load([text], format="postfix", year=2023)
    drop = ["file"]
    assert_frame_equal(got.attempts.collect().drop(drop), want.attempts.collect().drop(drop))
    assert got.attempts.collect().height == 1
    assert got.accounting.count("attempt") == 1 and got.accounting.count("skipped", "not postfix: systemd") == 1


def test_overlapping_journal_exports_count_duplicates_once(tmp_path):
    """Two exports of overlapping time ranges hold the same records (same __CURSOR): the second
    copy of each is a duplicate, not a second attempt."""
    first = [as_compact(SYSTEMD), as_compact(QMGR)]
    second = [as_compact(QMGR), as_compact(SMTP)]
    (tmp_path / "a.json").write_text("\n".join(first) + "\n", encoding="utf-8")
    (tmp_path / "b.json").write_text("\n".join(second) + "\n", encoding="utf-8")
    res = load([tmp_path / "a.json", tmp_path / "b.json"], year=2023)
    assert res.attempts.collect().height == 1
    assert res.accounting.count("duplicate") == 1
    assert res.accounting.count("context") == 1
