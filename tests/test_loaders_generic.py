"""Generic mapped CSV / JSON-lines loader and the --mapping CLI option."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from deferral_kit import cli, schema
from deferral_kit.loaders import detect, load
from deferral_kit.loaders.generic import load_mapping
from deferral_kit.sources import InputError, discover

FIX = Path(__file__).parent / "fixtures" / "generic"
UTC = timezone.utc


def test_csv_with_yaml_mapping():
    mapping = load_mapping(str(FIX / "inhouse_mapping.yaml"))
    res = load(FIX / "inhouse_attempts.csv", format="generic", mapping=mapping)
    df = res.attempts.collect()
    schema.validate(df)
    rows = df.to_dicts()
    acc = res.accounting
    assert acc.count("attempt") == 3
    assert acc.count("skipped", "outcome not mapped: opened") == 1
    assert acc.count("malformed", "unparseable timestamp") == 1
    assert acc.count("malformed", "invalid JSON or truncated row") == 1
    assert acc.lines_read == 6
    d, s, b = rows
    # 10:20:03 Europe/Berlin (CET in November) = 09:20:03 UTC
    assert d["ts"] == datetime(2026, 11, 2, 9, 20, 3, tzinfo=UTC)
    assert (d["outcome"], d["attempt"], s["outcome"], s["attempt"]) == ("deferred", 1, "delivered", 2)
    assert (d["smtp_code"], d["enhanced_code"], d["agent"], d["source"]) == (452, "4.3.1", "smtp", "generic")
    assert (d["mx_host"], d["mx_ip"], d["egress_pool"]) == ("contoso-com.mail.protection.outlook.com", "52.101.68.8", "pool-a")
    assert (d["recipient"], d["recipient_domain"], d["queue_id"], d["message_key"]) == ("Jane@Contoso.com", "contoso.com", "u-0001", "generic:u-0001")
    assert d["response"] == "452 4.3.1 Insufficient system resources (TSTE) [DB5PEPF00014B8F.eurprd04.prod.outlook.com]"
    assert (b["outcome"], b["smtp_code"], b["enhanced_code"], b["line_no"]) == ("bounced", 554, "5.7.9", 5)
    assert d["remote"] is None and d["dsn"] is None  # not in the source: null, not invented


def test_ndjson_with_dict_mapping_epoch_constants_and_attempt_column():
    mapping = {
        "columns": {"ts": "t", "queue_id": "id", "recipient": "to", "mx_host": "host", "outcome": "result", "response": "text",
                    "attempt": "try", "egress_pool": {"value": "outbound-1"}},
        "timestamp": {"format": "epoch_s"},
    }
    res = load(FIX / "inhouse_events.jsonl", format="generic", mapping=mapping)
    rows = res.attempts.collect().to_dicts()
    assert res.accounting.count("malformed", "invalid JSON or truncated row") == 1
    assert [(r["recipient"], r["outcome"], r["attempt"]) for r in rows] == [
        ("jane@contoso.com", "deferred", 3), ("jane@contoso.com", "delivered", 4), ("x@gmail.com", "deferred", 1)]
    assert rows[0]["ts"] == datetime(2026, 11, 2, 10, 20, 3, 250000, tzinfo=UTC)
    assert rows[2]["response"] == "421-4.7.28 [198.51.100.21] Gmail has detected an unusual rate"
    assert (rows[2]["smtp_code"], rows[2]["enhanced_code"]) == (421, "4.7.28")
    assert {r["egress_pool"] for r in rows} == {"outbound-1"}


def test_generic_is_never_detected_and_needs_a_mapping():
    sf = discover([FIX / "inhouse_attempts.csv"])[0]
    with pytest.raises(InputError, match="format not recognised"):
        detect(sf)
    with pytest.raises(InputError, match="needs a column mapping"):
        load(FIX / "inhouse_attempts.csv", format="generic")
    with pytest.raises(InputError, match=r"columns \['nope'\] named in the mapping are not in the CSV header"):
        load(FIX / "inhouse_attempts.csv", format="generic", mapping={"columns": {"ts": "nope"}}).attempts.collect()
    with pytest.raises(InputError, match="unknown canonical columns"):
        load(FIX / "inhouse_attempts.csv", format="generic", mapping={"columns": {"ts": "event_time", "colour": "x"}})


def test_cli_parse_with_mapping(tmp_path, capsys):
    out = tmp_path / "a.parquet"
    rc = cli.main(["parse", str(FIX / "inhouse_attempts.csv"), "--mapping", str(FIX / "inhouse_mapping.yaml"), "--out", str(out)])
    assert rc == 0
    df = pl.read_parquet(out)
    assert df.height == 3 and df["outcome"].to_list() == ["deferred", "delivered", "bounced"]
    assert "attempts: 3" in capsys.readouterr().out


def test_line_batches_read_lines_like_scan_lines(tmp_path):
    from polars.testing import assert_frame_equal

    from deferral_kit.loaders.generic import line_batches
    from deferral_kit.sources import scan_lines

    f = tmp_path / "mixed.log"
    f.write_bytes(b"first\r\n\nnul\x00after\n\xff bad utf-8\n  \nlast without newline")
    files = discover([f])
    want = scan_lines(files).collect()
    assert want["line"].to_list() == ["first", "", "nul", "\ufffd bad utf-8", "  ", "last without newline"]
    for size in (3, 10, 1 << 20):  # blocks cut inside lines, and one block
        assert_frame_equal(pl.concat(list(line_batches(files, batch_bytes=size))), want)


def test_squash_spaces_matches_the_plain_regex():
    from deferral_kit.loaders.generic import squash_spaces

    texts = ["452 4.3.1  Insufficient\tsystem\r\n resources ", " a", "a b", "a\u00a0 b", "", None]
    got = pl.DataFrame({"t": texts}).select(squash_spaces(pl.col("t")))["t"].to_list()
    assert got == ["452 4.3.1 Insufficient system resources", "a", "a b", "a b", "", None]
    assert got == pl.DataFrame({"t": texts}).select(pl.col("t").str.replace_all(r"\s+", " ").str.strip_chars())["t"].to_list()
