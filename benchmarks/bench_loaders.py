"""Loader throughput per format on >= 1 million records: records/s and peak memory.

    .venv/bin/python benchmarks/bench_loaders.py --format powermta [--messages-per-day 110000]
    .venv/bin/python benchmarks/bench_loaders.py --format all

Generates (once per format, cached under benchmarks/out/) the same 7-day world written as
that format (daily files, compressed as the software does), then times
``deferral_kit.loaders.load(..., format="auto")`` + collecting the attempts in a child
process and reports records (input lines / CSV rows / JSON records) per second and the
child's peak RSS.  The default volume gives about 1.0 M attempts, so every format has at
least 1 M records (Postfix and Exim have several lines per attempt).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cached_formats, machine_note, timed  # noqa: E402

CHILD = """
import json, sys, time
from deferral_kit.loaders import load
t = time.perf_counter()
res = load(sys.argv[1], format="auto")
n = res.attempts.collect().height
print(json.dumps({"attempts": n, "seconds": time.perf_counter() - t}))
"""


def count_records(folder: Path) -> int:
    """Input records: lines of every file after decompression, minus CSV / ``#`` headers;
    for webhook batches (one JSON array per line, SparkPost) the events in them."""
    from deferral_kit.sources import discover

    n = 0
    for sf in discover([folder]):
        with open(sf.readable, "rb") as fh:
            head = fh.read(1 << 16)
            fh.seek(0)
            if head.startswith(b'[{"msys":'):
                n += sum(buf.count(b'{"msys":') for buf in iter(lambda: fh.read(1 << 24), b""))
                continue
            n += sum(buf.count(b"\n") for buf in iter(lambda: fh.read(1 << 24), b""))
            if head.startswith(b"type,"):
                n -= 1
            n -= sum(1 for ln in head.split(b"\n")[:20] if ln.startswith(b"#"))  # Exchange's #Software ... #Fields header
    return n


def main(argv: list[str] | None = None) -> int:
    from deferral_kit.sample import FORMATS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", required=True, choices=(*FORMATS, "all"))
    ap.add_argument("--messages-per-day", type=int, default=110_000)
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--seed", type=int, default=6)
    args = ap.parse_args(argv)
    print(machine_note())
    print(f"{'format':<10} {'records':>12} {'attempts':>12} {'wall s':>8} {'records/s':>12} {'peak RSS MB':>12}")
    fmts = FORMATS if args.format == "all" else (args.format,)
    cached = cached_formats({f: f"loaders-{f}-{args.days}d-{args.messages_per_day}" for f in fmts}, days=args.days, seed=args.seed,
                            messages_per_day=args.messages_per_day, rotate=True)
    for fmt in fmts:
        folder, meta = cached[fmt]
        records = meta.get("records") or count_records(folder / "logs")
        if "records" not in meta:
            meta["records"] = records
            (folder / "meta.json").write_text(json.dumps(meta, indent=1))
        wall, rss, proc = timed([sys.executable, "-c", CHILD, str(folder / "logs")], stdout=subprocess.PIPE)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{fmt:<10} {records:>12,} {res['attempts']:>12,} {wall:>8.1f} {records / wall:>12,.0f} {rss:>12,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
