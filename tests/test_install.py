"""What a user's ComfyUI installs: requirements.txt holds exactly what the nodes import (no
training stack), pyproject.toml says the same, and the licence is the one pyproject names.

The imports are read statically from every file ComfyUI can load: the root ``__init__.py``,
everything under ``nodes/``, and every pack module those reach through relative imports
(function-level imports included).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Modules ComfyUI itself provides (its own code and its requirements, never pinned by the pack).
FROM_COMFYUI = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "torch", "numpy", "PIL",
                "typing_extensions"}
IMPORT_NAME = {"pyyaml": "yaml", "pillow": "PIL"}  # distributions whose module is named otherwise


def requirement_names(path: Path) -> list[str]:
    """Distribution names in a requirements file (``-r`` includes and comments skipped)."""
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.append(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].lower())
    return names


def requirement_lines(path: Path) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()
            if line.split("#", 1)[0].strip() and not line.startswith("-")]


def _relative_targets(path: Path, node: ast.ImportFrom) -> list[Path]:
    package = path.parent
    for _ in range(node.level - 1):
        package = package.parent
    base = package.joinpath(*node.module.split(".")) if node.module else package
    candidates = [base.with_suffix(".py"), base / "__init__.py"]
    candidates += [base / f"{alias.name}.py" for alias in node.names]
    candidates += [base / alias.name / "__init__.py" for alias in node.names]
    return [c for c in candidates if c.is_file()]


def runtime_imports() -> dict[str, set[str]]:
    """Top-level third-party modules ComfyUI's loading of the pack can reach -> the files importing them."""
    found: dict[str, set[str]] = {}
    todo = [REPO_ROOT / "__init__.py", *sorted((REPO_ROOT / "nodes").rglob("*.py"))]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                todo += _relative_targets(path, node)
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(path.relative_to(REPO_ROOT).as_posix())
    return found


def test_requirements_hold_exactly_what_the_nodes_import() -> None:
    imported = runtime_imports()
    required = {IMPORT_NAME.get(n, n.replace("-", "_")) for n in requirement_names(REPO_ROOT / "requirements.txt")}
    missing = {m: sorted(files) for m, files in imported.items() if m not in required | FROM_COMFYUI}
    unused = required - set(imported)
    assert not missing, f"the nodes import these, but requirements.txt does not name them: {missing}"
    assert not unused, f"requirements.txt installs what no node imports (move it to requirements-train.txt): {unused}"


def test_the_install_leaves_out_the_training_stack_and_comfyuis_own_packages() -> None:
    names = set(requirement_names(REPO_ROOT / "requirements.txt"))
    assert not names & {"diffusers", "accelerate", "librosa", "tensorboard"}
    assert not names & {"torch", "torchvision", "torchaudio", "numpy", "pillow"}  # ComfyUI's to choose


def test_the_training_requirements_are_the_pyproject_extra_and_reach_the_test_setup() -> None:
    train = REPO_ROOT / "requirements-train.txt"
    assert "-r requirements.txt" in train.read_text().splitlines()
    assert {"diffusers", "accelerate"} <= set(requirement_names(train))
    setup = (REPO_ROOT / "tools" / "setup.sh").read_text()
    assert re.search(r"-r requirements\.txt -r requirements-train\.txt -r requirements-dev\.txt", setup)


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_pyproject_lists_the_same_requirements() -> None:
    project = pyproject()["project"]
    assert project["dependencies"] == requirement_lines(REPO_ROOT / "requirements.txt")
    assert project["optional-dependencies"]["train"] == requirement_lines(REPO_ROOT / "requirements-train.txt")


def test_the_licence_file_is_the_one_pyproject_names() -> None:
    project = pyproject()["project"]
    licence = (REPO_ROOT / "LICENSE").read_text()
    assert project["license"] == {"text": "MIT"}
    assert licence.startswith("MIT License\n")
    assert "Permission is hereby granted, free of charge" in licence
