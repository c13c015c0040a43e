"""Stage configs: YAML files (``configs/stage{1,2,3}.yaml``, ``configs/distil.yaml``) read into typed
dataclasses.

A config is a YAML file, or the name of a shipped one, plus ``key.sub=value`` overrides (values
parsed as YAML): ``load_config("stage1", ["optim.lr=3e-4", "data.batch_size=32"])``. Unknown keys
are errors that list the known ones, so a typo cannot silently train with a default.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .settings import (  # noqa: F401 (re-exported: the settings live in settings.py)
    DISTIL_FILE_NAME,
    DataConfig,
    DistilConfig,
    LossConfig,
    ModelOptions,
    OptimConfig,
    StageConfig,
    _from_dict,
    merge_trees,
)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ValueError(f"override {dotted!r}: {part!r} is not a section")
    tree[leaf] = value


def resolve_config_path(name: str | os.PathLike) -> Path:
    """A YAML path, or the name of a shipped config (``stage1``, ``smoke``, ...)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"no config {str(name)!r}: give a .yaml file or one of {names}")


def load_config(
    name: str | os.PathLike, overrides: Sequence[str] = (), extra: dict[str, Any] | None = None
) -> StageConfig:
    """Read a stage config, apply ``extra`` (a nested dict) then the ``key=value`` overrides."""
    tree = yaml.safe_load(resolve_config_path(name).read_text()) or {}
    for key, value in _flatten(extra or {}):
        _set(tree, key, value)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected key=value")
        _set(tree, key.strip(), yaml.safe_load(text))
    return _from_dict(StageConfig, tree, "")


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items
