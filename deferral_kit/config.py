"""Configuration as data: the YAML files shipped in ``deferral_kit/data/`` and the user's own.

Provider suffixes, response rules, threshold bands and the own-infrastructure list are
data, so they can change without code; a user file is read with the same parser as the
shipped one and a mistake in it is reported with the file name (exit status 2 on the CLI).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from .sources import InputError


class ConfigError(InputError, ValueError):
    """A configuration file cannot be read or does not have the expected shape."""


def shipped(name: str):
    """The parsed content of ``deferral_kit/data/<name>`` and its display name."""
    text = (resources.files("deferral_kit") / "data" / name).read_text(encoding="utf-8")
    return yaml.safe_load(text), f"deferral_kit/data/{name}"


def read_user(path: str | Path, what: str):
    """The parsed content of a user's YAML file; :class:`ConfigError` naming the file otherwise."""
    p = Path(path)
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{p}: cannot read {what}: {exc}") from exc
