"""Format detection and dispatch in deferral_kit.loaders: mixed folders, unknown files, errors."""

from __future__ import annotations

import pytest

from deferral_kit.loaders import detect, formats, load
from deferral_kit.sources import InputError, discover

LINE = (
    "2026-11-18T13:02:32.073262+00:00 mail1 postfix-198.51.100.20/smtp[43097]: 4Fa1b2C3d4: "
    "to=<ann@hotmail.com>, relay=hotmail-com.olc.protection.outlook.com[52.101.8.47]:25, delay=1.2, "
    "delays=0.1/0/0.5/0.6, dsn=4.3.1, status=deferred (host hotmail-com.olc.protection.outlook.com[52.101.8.47] "
    "said: 452 4.3.1 Insufficient system resources (in reply to RCPT TO command))\n"
)


def test_folder_passes_over_files_that_are_not_logs_and_says_so(tmp_path):
    (tmp_path / "mail.log").write_text(LINE)
    (tmp_path / "README.txt").write_text("notes about these logs\n")
    res = load(tmp_path)
    att = res.attempts.collect()
    assert att.height == 1
    assert att.row(0, named=True)["enhanced_code"] == "4.3.1"
    assert len(res.accounting.problems) == 1
    assert "README.txt" in res.accounting.problems[0] and "format not recognised" in res.accounting.problems[0]


def test_a_named_file_that_is_not_a_log_is_an_error_naming_it(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    with pytest.raises(InputError, match=r"notes\.txt: format not recognised .*first line: 'hello'"):
        load(notes)


def test_a_folder_without_any_log_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("nothing here\n")
    with pytest.raises(InputError, match="no log file among"):
        load(tmp_path)


def test_unknown_format_name_and_empty_file(tmp_path):
    log = tmp_path / "mail.log"
    log.write_text(LINE)
    with pytest.raises(InputError, match="unknown format 'qmail'"):
        load(log, format="qmail")
    empty = tmp_path / "empty.log"
    empty.write_text("")
    with pytest.raises(InputError, match="empty.log: file is empty"):
        detect(discover([empty])[0])


def test_every_loader_is_registered():
    assert set(formats()) == {
        "exchange", "m365_trace", "powermta", "kumomta", "sendgrid", "mailgun", "ses",
        "sparkpost", "postmark", "exim", "postfix", "generic",
    }
