"""Line and record accounting: every input line ends up parsed or counted as skipped, with a reason.

A loader reports, per file, how many lines it read and what became of each: an
``attempt`` row, a ``connection`` event, ``context`` it used (Postfix qmgr ``from=``
lines, ``removed``), ``skipped`` with a reason (not this MTA, inbound smtpd traffic, TLS
chatter, ...), ``duplicate`` (an identical line already read from another file), or
``malformed`` (looked like a record but could not be parsed: wrapped, truncated).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

CATEGORIES = ("attempt", "connection", "context", "skipped", "duplicate", "malformed")

TABLE_SCHEMA = pl.Schema({"file": pl.String, "format": pl.String, "category": pl.String, "reason": pl.String, "lines": pl.Int64})
EXAMPLE_SCHEMA = pl.Schema({"file": pl.String, "line_no": pl.Int64, "category": pl.String, "reason": pl.String, "text": pl.String})

EXAMPLES_PER_REASON = 3


@dataclass
class Accounting:
    """What became of every input line.

    ``table``: one row per (file, format, category, reason) with a line count.
    ``examples``: up to a few lines per malformed/skipped reason, so a user can see what was not read.
    ``problems``: file-level notes (a truncated gzip stream, a file with no records of its format).
    """

    table: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=TABLE_SCHEMA))
    examples: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=EXAMPLE_SCHEMA))
    problems: list[str] = field(default_factory=list)

    @classmethod
    def from_classified(cls, classified: pl.LazyFrame, *, fmt: str, problems: list[str] | None = None) -> Accounting:
        """Build from a frame with columns ``file, line_no, category, reason, text`` (one row per line)."""
        table, examples = pl.collect_all(
            [
                classified.group_by("file", "category", "reason")
                .agg(pl.len().cast(pl.Int64).alias("lines"))
                .select("file", pl.lit(fmt).alias("format"), "category", pl.col("reason").fill_null(""), "lines"),
                classified.filter(pl.col("category").is_in(["malformed", "skipped", "duplicate"]))
                .group_by("file", "category", "reason")
                .agg(pl.col("line_no").head(EXAMPLES_PER_REASON), pl.col("text").head(EXAMPLES_PER_REASON))
                .explode("line_no", "text")
                .select("file", "line_no", "category", pl.col("reason").fill_null(""), "text"),
            ]
        )
        return cls(
            table=table.cast(dict(TABLE_SCHEMA)).sort("file", "category", "reason"),
            examples=examples.cast(dict(EXAMPLE_SCHEMA)).sort("file", "line_no"),
            problems=list(problems or []),
        )

    @classmethod
    def concat(cls, parts: list[Accounting]) -> Accounting:
        if not parts:
            return cls()
        return cls(
            table=pl.concat([p.table for p in parts]),
            examples=pl.concat([p.examples for p in parts]),
            problems=[x for p in parts for x in p.problems],
        )

    def count(self, category: str | None = None, reason: str | None = None) -> int:
        t = self.table
        if category is not None:
            t = t.filter(pl.col("category") == category)
        if reason is not None:
            t = t.filter(pl.col("reason") == reason)
        return int(t["lines"].sum())

    @property
    def lines_read(self) -> int:
        return int(self.table["lines"].sum())

    def summary(self) -> pl.DataFrame:
        """Lines per category and reason over all files, largest first."""
        return (
            self.table.group_by("format", "category", "reason")
            .agg(pl.col("lines").sum())
            .sort(["category", "lines", "reason", "format"], descending=[False, True, False, False])  # (ties by name: the same text every run)
        )

    def to_text(self, *, examples: bool = True) -> str:
        """A human-readable accounting block for the terminal."""
        out = [f"lines read: {self.lines_read:,}"]
        for cat in CATEGORIES:
            n = self.count(cat)
            if n:
                out.append(f"  {cat:<11} {n:>12,}")
                if cat in ("skipped", "malformed", "duplicate", "context"):
                    rows = self.summary().filter(pl.col("category") == cat)
                    for r in rows.iter_rows(named=True):
                        out.append(f"      {r['reason'] or '-':<40} {r['lines']:>10,}")
        for p in self.problems:
            out.append(f"  problem: {p}")
        if examples and self.examples.height:
            bad = self.examples.filter(pl.col("category") == "malformed")
            if bad.height:
                out.append("  malformed examples:")
                for r in bad.head(10).iter_rows(named=True):
                    out.append(f"      {r['file']}:{r['line_no']}: [{r['reason']}] {r['text'][:160]}")
        return "\n".join(out)
