"""Rules on the sources themselves: the core's import boundary is enforced by `make lint`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BANNED = ("comfy", "comfy_api", "folder_paths", "nodes", "tools", "tests")


def ruff(source: str, filename: str) -> subprocess.CompletedProcess:
    """`ruff check` (the repo's config for ``filename``) on ``source``, nothing written to disk."""
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                           "--stdin-filename", filename, "-"],
                          input=source, capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)


@pytest.mark.parametrize("module", BANNED)
@pytest.mark.parametrize("form", ["import {m}.sub\n", "from {m} import thing\n",
                                  "def f():\n    from {m}.sub import thing\n    return thing\n"])
def test_lint_fails_when_the_core_imports_comfyui_tools_or_tests(module: str, form: str) -> None:
    source = form.format(m=module) + ("__all__ = ['thing', 'sub']\n" if "def" not in form else "")
    result = ruff(source, "clap2diffusion_core/training/scratch.py")
    assert result.returncode == 1, result.stdout
    assert f"TID251 `{module}` is banned" in result.stdout


def test_the_same_imports_are_fine_outside_the_core() -> None:
    result = ruff("import comfy.sd\nimport folder_paths\n\n__all__ = ['comfy', 'folder_paths']\n", "nodes/scratch.py")
    assert result.returncode == 0, result.stdout
