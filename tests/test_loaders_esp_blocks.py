"""The ESP loaders decode large JSON-lines files block by block: the result must not depend on
the block size (line numbers, duplicates across blocks, accounting examples)."""

from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from deferral_kit.loaders import _json, load

ESP = Path(__file__).parent / "fixtures" / "esp"
CASES = [("ses", "ses_firehose.jsonl"), ("mailgun", "mailgun_retry.jsonl"), ("sendgrid", "sendgrid_batches.jsonl"),
         ("postmark", "postmark_events.jsonl")]


def _sorted(df: pl.DataFrame) -> pl.DataFrame:
    return df.sort(pl.all(), nulls_last=True)  # examples tied on (file, line_no) come in no set order


@pytest.mark.parametrize(("fmt", "name"), CASES)
def test_block_size_does_not_change_the_result(fmt, name, tmp_path, monkeypatch):
    src = (ESP / name).read_text()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # the same export twice (duplicates across files and blocks) plus a damaged line
    (tmp_path / "a" / name).write_text(src)
    (tmp_path / "b" / name).write_text(src + '{"truncated": \nnot json\n\n' + src)
    whole = load([tmp_path / "a", tmp_path / "b"], format=fmt)
    monkeypatch.setattr(_json, "WHOLE_FILE_BYTES", 0)
    monkeypatch.setattr(_json, "BLOCK_BYTES", 200)
    blocks = load([tmp_path / "a", tmp_path / "b"], format=fmt)
    assert_frame_equal(blocks.attempts.collect(), whole.attempts.collect())
    assert_frame_equal(blocks.accounting.table, whole.accounting.table)
    assert_frame_equal(_sorted(blocks.accounting.examples), _sorted(whole.accounting.examples))
    assert blocks.accounting.problems == whole.accounting.problems
    assert whole.accounting.count("duplicate") > 0


def test_examples_are_the_first_records_of_a_reason_with_their_text(tmp_path):
    """With more records of one skipped reason than examples, the examples are the first ones,
    each with its JSON text (so a user sees what was not read)."""
    import json

    from deferral_kit.loaders import load

    events = [
        {"email": f"user{i}@example.com", "timestamp": 1700000000 + i, "event": "open", "sg_event_id": f"ev{i}",
         "sg_message_id": f"msg{i}.filter0001", "useragent": "Mozilla/5.0", "ip": "192.0.2.7"}
        for i in range(6)
    ] + [
        {"email": "user9@example.com", "timestamp": 1700000100, "event": "deferred", "sg_event_id": "ev9",
         "sg_message_id": "msg9.filter0001", "response": "452 4.3.1 Insufficient system resources", "attempt": "1",
         "tls": 1, "ip": "192.0.2.7"}
    ]
    f = tmp_path / "sendgrid-events.jsonl"
    f.write_text("".join(json.dumps(e) + "\n" for e in events))
    res = load([f], format="sendgrid")
    assert res.attempts.collect().height == 1
    ex = res.accounting.examples.filter(pl.col("category") == "skipped")
    assert ex["line_no"].to_list() == [1, 2, 3]
    assert all('"event":"open"' in t.replace(" ", "") for t in ex["text"].to_list())
