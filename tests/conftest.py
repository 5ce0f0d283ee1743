"""Shared fixtures: paths to the real-world samples in ../shared/realworld and generated worlds."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REALWORLD = ROOT.parent / "shared" / "realworld"


@pytest.fixture(scope="session")
def realworld() -> Path:
    """The real-world sample folder (read-only; never copied into the repo)."""
    if not REALWORLD.is_dir():
        pytest.fail(f"real-world samples not found at {REALWORLD}: tests expect ../shared/realworld beside the checkout")
    return REALWORLD
