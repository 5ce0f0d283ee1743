"""Shared helpers for the benchmarks: cached generated logs and timed child processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"  # gitignored
TIME = shutil.which("time") or "/usr/bin/time"


def cached_world_files(name: str, fmt: str, *, days: int, seed: int, messages_per_day: int, rotate: bool = False) -> tuple[Path, dict]:
    """Write (once) the default world as ``fmt`` into ``benchmarks/out/<name>/``; returns the folder and its meta."""
    return cached_formats({fmt: name}, days=days, seed=seed, messages_per_day=messages_per_day, rotate=rotate)[fmt]


def cached_formats(names: dict[str, str], *, days: int, seed: int, messages_per_day: int, rotate: bool = False) -> dict[str, tuple[Path, dict]]:
    """Write (once) one default world in each format of ``names`` (format -> folder name under
    ``benchmarks/out/``), generating the world only if some format is missing."""
    out: dict[str, tuple[Path, dict]] = {}
    missing = []
    for fmt, name in names.items():
        folder = OUT / name
        meta_path = folder / "meta.json"
        want = {"format": fmt, "days": days, "seed": seed, "messages_per_day": messages_per_day, "rotate": rotate}
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if all(meta.get(k) == v for k, v in want.items()):
                out[fmt] = (folder, meta)
                continue
        missing.append(fmt)
    if not missing:
        return out
    from deferral_kit.sample import WorldConfig, default_episodes, generate, write

    print(f"generating the world for {', '.join(missing)} (once; cached under {OUT}) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    cfg = WorldConfig(days=days, seed=seed, messages_per_day=messages_per_day)
    cfg.episodes = default_episodes(cfg)
    world = generate(cfg)
    for fmt in missing:
        folder = OUT / names[fmt]
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        paths = write(world, fmt, folder / "logs", rotate=rotate)
        meta = {"format": fmt, "days": days, "seed": seed, "messages_per_day": messages_per_day, "rotate": rotate,
                "files": [str(p.relative_to(folder)) for p in paths], "bytes": sum(p.stat().st_size for p in paths),
                "messages": world.envelopes.height, "truth_attempts": world.truth.height,
                "seconds_to_generate": round(time.perf_counter() - t0, 1)}
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))
        out[fmt] = (folder, meta)
    return out


def timed(cmd: list[str], *, stdout=subprocess.DEVNULL) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run ``cmd`` under ``/usr/bin/time``: (wall seconds, peak RSS in MB, completed process)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.perf_counter()
        proc = subprocess.run([TIME, "-f", "%e %M", "-o", tf.name, *cmd], stdout=stdout, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        parts = tf.read().strip().splitlines()[-1].split()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall, int(parts[1]) / 1024, proc


def machine_note() -> str:
    load = os.getloadavg()
    return f"machine: {os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (shared machine: figures are indicative)"
