"""Input discovery, rotation order, transparent decompression and line scanning."""

from __future__ import annotations

import bz2
import gzip
import lzma
from pathlib import Path

import polars as pl
import pytest
import zstandard

from deferral_kit import sources
from deferral_kit.sources import InputError, compression_of, discover, head, line_batches, rotation_key, scan_lines


def _names(files) -> list[str]:
    return [f.path.name for f in files]


def test_rotated_set_is_read_oldest_first(tmp_path):
    (tmp_path / "mail.log").write_text("newest\n")
    (tmp_path / "mail.log.1").write_text("older\n")
    (tmp_path / "mail.log.2.gz").write_bytes(gzip.compress(b"older still\n"))
    (tmp_path / "mail.log.10.gz").write_bytes(gzip.compress(b"oldest\n"))
    (tmp_path / ".hidden").write_text("x\n")
    files = discover([tmp_path])
    assert _names(files) == ["mail.log.10.gz", "mail.log.2.gz", "mail.log.1", "mail.log"]
    assert [f.compression for f in files] == ["gzip", "gzip", None, None]
    assert scan_lines(files).select("line").collect()["line"].to_list() == ["oldest", "older still", "older", "newest"]


def test_dated_rotation_suffixes_sort_by_date_before_the_live_file(tmp_path):
    for name in ("maillog", "maillog-20261108", "maillog-20261101.gz", "postfix.log.20261101-120000.gz", "postfix.log"):
        p = tmp_path / name
        p.write_bytes(gzip.compress(b"x\n") if name.endswith(".gz") else b"x\n")
    assert _names(discover([tmp_path])) == [
        "maillog-20261101.gz", "maillog-20261108", "maillog", "postfix.log.20261101-120000.gz", "postfix.log",
    ]
    assert rotation_key(Path("/v/mail.log.3.gz")) == ("/v/mail.log", -3, "")


def test_glob_and_the_same_file_twice_are_read_once(tmp_path):
    (tmp_path / "a.log").write_text("a\n")
    (tmp_path / "b.log").write_text("b\n")
    files = discover([str(tmp_path / "*.log"), tmp_path / "a.log", str(tmp_path / "." / "a.log")])
    assert _names(files) == ["a.log", "b.log"]


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda p: p.mkdir(), "directory has no files"),
        (lambda p: None, "no such file or directory"),
    ],
)
def test_bad_paths_raise_an_error_naming_the_path(tmp_path, make, what):
    p = tmp_path / "logs"
    make(p)
    with pytest.raises(InputError, match=f"{p}: {what}"):
        discover([p])
    with pytest.raises(InputError, match="no file matches this pattern"):
        discover([str(tmp_path / "nothing*.log")])


def test_compression_is_recognised_by_content_not_name(tmp_path):
    payload = b"Jan  1 00:00:00 h postfix/qmgr[1]: A1: removed\n"
    cases = {
        "gz_without_suffix": gzip.compress(payload),
        "z.bz2": bz2.compress(payload),
        "z.xz": lzma.compress(payload),
        "z.zst": zstandard.ZstdCompressor().compress(payload),
        "plain.gz": payload,  # named .gz but plain text
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    files = discover([tmp_path])
    assert {f.path.name: f.compression for f in files} == {
        "gz_without_suffix": "gzip", "z.bz2": "bzip2", "z.xz": "xz", "z.zst": "zstd", "plain.gz": None,
    }
    for f in files:
        assert head(f) == payload.decode()
        assert scan_lines([f]).collect()["line"].to_list() == [payload.decode().rstrip("\n")]


@pytest.fixture(params=["isal", "zlib"])
def inflater(request, monkeypatch):
    """gzip inflated by ISA-L (the dependency) and by the standard library's zlib (the
    fallback where isal has no wheel): the same lines and the same problems either way."""
    if request.param == "zlib":
        import zlib

        monkeypatch.setattr(sources, "_inflate", zlib)
        monkeypatch.setattr(sources, "_INFLATE_ERRORS", (zlib.error,))
    else:
        assert sources._inflate.__name__ == "isal.isal_zlib"
    return request.param


def test_multi_member_gzip_is_read_completely(tmp_path, inflater):
    p = tmp_path / "mail.log.1.gz"
    # (zero padding after a member, as some copy tools leave it)
    p.write_bytes(gzip.compress(b"one\n") + gzip.compress(b"two\n") + b"\x00" * 8)
    assert scan_lines(discover([p])).collect()["line"].to_list() == ["one", "two"]


def test_truncated_gzip_keeps_the_decompressed_part_and_records_a_problem(tmp_path, inflater):
    lines = [f"line {i} " + "x" * 50 for i in range(5000)]
    data = gzip.compress("\n".join(lines).encode() + b"\n")
    p = tmp_path / "mail.log.2.gz"
    p.write_bytes(data[: len(data) // 2])
    (sf,) = discover([p])
    got = scan_lines([sf]).collect()["line"].to_list()
    assert 0 < len(got) < 5000
    assert got[:-1] == lines[: len(got) - 1]  # every complete line before the cut is intact
    assert sf.problems and sf.problems[0].startswith("truncated gzip stream")


def test_garbage_with_gzip_magic_is_an_input_error(tmp_path, inflater):
    p = tmp_path / "broken.gz"
    p.write_bytes(b"\x1f\x8b" + b"\x00" * 5)
    (sf,) = discover([p])
    with pytest.raises(InputError, match=str(p)):
        _ = sf.readable


def test_scan_lines_keeps_numbering_strips_cr_and_replaces_invalid_utf8(tmp_path):
    p = tmp_path / "x.log"
    p.write_bytes(b"first\r\n\nthird \xff\xfe end\nlast without newline")
    df = scan_lines(discover([p])).collect()
    assert df.schema == pl.Schema({"file": pl.String, "line_no": pl.Int64, "line": pl.String})
    assert df.select("line_no", "line").rows() == [
        (1, "first"), (2, ""), (3, "third \ufffd\ufffd end"), (4, "last without newline"),
    ]
    assert df["file"].unique().to_list() == [str(p)]


def test_compression_of_plain_and_empty_files(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "plain").write_text("hello\n")
    assert compression_of(tmp_path / "empty") is None
    assert compression_of(tmp_path / "plain") is None
    assert scan_lines(discover([tmp_path / "empty"])).collect().height == 0


@pytest.mark.parametrize("batch_bytes", [1, 7, 64, 1 << 20])
def test_line_batches_give_the_lines_of_scan_lines_whatever_the_block_size(tmp_path, batch_bytes):
    # blocks cut mid-line, lines longer than a block, CRLF, empty lines, invalid UTF-8, no final newline
    p = tmp_path / "maillog"
    p.write_bytes(b"Oct  1 00:00:01 mx postfix/qmgr[7]: A1: removed\r\n\nbad \xff byte\nno newline at the end")
    sf = discover([p])[0]
    batches = list(line_batches(sf, batch_bytes=batch_bytes))
    assert pl.concat(batches).equals(scan_lines([sf]).collect())
    assert pl.concat(batches)["line_no"].to_list() == [1, 2, 3, 4]
    # whole lines per batch (a line longer than a block makes its block longer); a file
    # smaller than a block is one batch
    assert len(batches) == 1 if batch_bytes >= 1 << 20 else len(batches) >= 2


def test_line_batches_of_an_empty_file_are_none(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    assert list(line_batches(discover([tmp_path / "empty"])[0])) == []


def test_lines_with_nul_bytes_are_read_not_fatal(tmp_path):
    """Binary junk (NUL bytes) inside a log must not stop the read: every line keeps its number."""
    from deferral_kit.sources import discover, line_batches, scan_lines

    p = tmp_path / "mail.log"
    p.write_bytes(b"Nov 18 13:02:32 h postfix/smtp[1]: junk\x00\x01 more\x00x\n\x00\x00\x00\nNov 18 13:02:33 h postfix/qmgr[2]: ABC: removed\n")
    (sf,) = discover([p])
    batch = pl.concat(list(line_batches(sf)))
    assert batch["line_no"].to_list() == [1, 2, 3]
    assert batch["line"][0] == "Nov 18 13:02:32 h postfix/smtp[1]: junk\ufffd\x01 more\ufffdx"
    assert batch["line"][2].endswith("ABC: removed")
    scanned = scan_lines([sf]).collect()
    assert scanned["line_no"].to_list() == [1, 2, 3]
    assert scanned["line"][0].startswith("Nov 18 13:02:32 h postfix/smtp[1]: junk")


def test_compressed_files_decompressed_in_parallel_keep_their_own_content(tmp_path):
    """A rotated set of gzip files is decompressed two at a time: each file gets its own scratch
    copy (no name collision) with its own lines, and a truncated one keeps its problem note."""
    import gzip as gz

    from deferral_kit.sources import decompress_all

    for n in range(1, 7):
        (tmp_path / f"mail.log.{n}.gz").write_bytes(gz.compress(f"file {n} line 1\nfile {n} line 2\n".encode()))
    cut = gz.compress(b"".join(b"file 7 line %d\n" % i for i in range(1, 2000)))
    (tmp_path / "mail.log.7.gz").write_bytes(cut[: len(cut) // 2])
    files = discover([tmp_path])
    decompress_all(files)
    assert len({sf.readable for sf in files}) == 7
    for sf in files:
        n = int(sf.path.name.split(".")[2])
        lines = scan_lines([sf]).collect()["line"].to_list()
        assert lines[0] == f"file {n} line 1"
        assert all(ln.startswith(f"file {n} ") for ln in lines if ln)
    (seventh,) = [sf for sf in files if sf.path.name == "mail.log.7.gz"]
    assert seventh.problems and "truncated gzip" in seventh.problems[0]
