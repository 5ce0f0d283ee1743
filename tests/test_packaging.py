"""pyproject.toml and environment.yml list the same dependencies (the brief: a library is
added to both), under their conda-forge names."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
# PyPI name -> conda-forge name, where they differ
CONDA_NAME = {"nbconvert": "nbconvert-core", "isal": "python-isal"}


def _name(spec: str) -> str:
    return re.split(r"[<>=!~ \[;]", spec.strip(), maxsplit=1)[0].lower()


def test_environment_yml_has_every_runtime_dependency_of_pyproject_and_no_other():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pypi = {CONDA_NAME.get(_name(d), _name(d)) for d in project["dependencies"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {_name(d) for d in env["dependencies"] if isinstance(d, str)} - {"python", "pip", "pytest"}
    assert pypi == conda
    assert "python-isal" in conda  # the gzip inflater the loaders use for rotated logs
