"""Rules on the sources themselves: the import boundaries are enforced by `make lint` (the core
never imports ComfyUI, the tools or the tests; the tools and benches never import the tests), and
every Python file encodes in cp1252 (what Windows consoles and some custom-node checkers use)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BANNED = ("comfy", "comfy_api", "folder_paths", "nodes", "tools", "tests")


def helper_modules() -> list[str]:
    """The modules in tests/ that are not tests: importable by bare name (pytest's pythonpath)."""
    tests = REPO_ROOT / "tests"
    names = [p.stem for p in tests.glob("*.py") if not p.stem.startswith("test_")]
    return sorted(names + [p.parent.name for p in tests.glob("*/__init__.py")])


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


@pytest.mark.parametrize("folder", ["tools", "bench", "clap2diffusion_core"])
@pytest.mark.parametrize("form", ["import tests.{m}\n", "from {m} import thing\n",
                                  "def f():\n    from {m} import thing\n    return thing\n"])
def test_lint_fails_when_tools_benches_or_the_core_import_a_test_helper(folder: str, form: str) -> None:
    """bench/frames_bench.py once put tests/ on sys.path for ``schedule_support``; every helper
    module in tests/ (listed afresh, so a new one must be added to the ruff.toml files) is banned."""
    helpers = helper_modules()
    assert "schedule_support" in helpers and "conftest" in helpers  # the listing itself works
    missing = []
    for module in helpers:
        source = form.format(m=module) + ("__all__ = ['thing', 'tests']\n" if "def" not in form else "")
        result = ruff(source, f"{folder}/scratch.py")
        banned = "tests" if form.startswith("import tests") else module
        if result.returncode != 1 or f"TID251 `{banned}` is banned" not in result.stdout:
            missing.append(module)
    assert not missing, f"{folder}/ may import the test helpers {missing}: ban them in its ruff.toml"


def test_tools_and_benches_may_import_comfyui_and_the_tools() -> None:
    source = "import comfy.sd\nimport folder_paths\n\nfrom tools import test_sounds\n\n__all__ = ['comfy', 'folder_paths', 'test_sounds']\n"
    for folder in ("tools", "bench"):
        result = ruff(source, f"{folder}/scratch.py")
        assert result.returncode == 0, result.stdout


def test_the_same_imports_are_fine_outside_the_core() -> None:
    result = ruff("import comfy.sd\nimport folder_paths\n\n__all__ = ['comfy', 'folder_paths']\n", "nodes/scratch.py")
    assert result.returncode == 0, result.stdout


def tracked_python_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "*.py"], cwd=REPO_ROOT, capture_output=True, check=True,
                             timeout=60).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every .py outside the envs
        return [p for p in REPO_ROOT.rglob("*.py") if not {".venv", ".venv-newer", ".comfyui", ".cache"} & set(p.parts)]
    return [REPO_ROOT / name for name in out.decode().split("\0") if name]


def test_every_python_file_encodes_in_cp1252() -> None:
    bad = {}
    for path in tracked_python_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                line.encode("cp1252")
            except UnicodeEncodeError as err:
                bad.setdefault(path.relative_to(REPO_ROOT).as_posix(), []).append(f"{number}: {line[err.start:err.end]!r}")
    assert len(tracked_python_files()) > 50  # the listing itself works
    assert not bad, f"characters cp1252 cannot encode (use ASCII, e.g. '->' for an arrow): {bad}"
