"""comfy-test (the community custom-node harness) passes its static levels on this pack (issue 25).

``make lint`` runs the same command; this test is how CI (``make test``) enforces it. Its SYNTAX
level rejects bare ``nn.Linear``/``nn.LayerNorm``/``nn.Conv*`` (layers that ComfyUI's model
management can neither cast nor offload: the pack builds them from ``comfy.ops`` through
``operations=``), hard-coded CUDA devices and autocast, and characters Windows' cp1252 cannot encode
in any .py file; its JAVASCRIPT level checks web/ (extension names, node ids).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The ``comfy-test`` console script, run by this interpreter (so the venv's, wherever it is).
COMFY_TEST = "import sys; from comfy_test.cli import main; sys.exit(main())"


def comfy_test_lint(path: Path) -> tuple[int, dict]:
    """``comfy-test lint --strict --json path`` in this interpreter: (exit code, its JSON report)."""
    done = subprocess.run(
        [sys.executable, "-c", COMFY_TEST, "lint", "--strict", "--json", str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if "No module named 'comfy_test'" in done.stderr:
        pytest.fail("comfy-test is not installed: pip install -r requirements-dev.txt (make setup does)")
    return done.returncode, json.loads(done.stdout)


def test_comfy_test_lint_passes_syntax_and_javascript_on_the_pack():
    code, report = comfy_test_lint(REPO_ROOT)
    failed = {name: (r["error"], r["details"]) for name, r in report["results"].items() if not r["passed"]}
    assert report["checks"] == ["syntax", "javascript"]
    assert (code, failed) == (0, {}), failed


def test_comfy_test_lint_rejects_a_bare_nn_linear(tmp_path):
    """The same command on a pack with a bare nn.Linear fails: the pass above is not vacuous."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "bad-pack"\n')
    bare_linear = "nn." + "Linear("  # split, or the lint of this pack would find it here
    (tmp_path / "model.py").write_text(f"from torch import nn\nlayer = {bare_linear}4, 4)\n")
    code, report = comfy_test_lint(tmp_path)
    assert code == 1
    assert f"model.py:\n  Line 2: {bare_linear})" in report["results"]["syntax"]["details"]
