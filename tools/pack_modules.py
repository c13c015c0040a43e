"""Import the pack's ComfyUI-side modules outside ComfyUI, the way ComfyUI sees them.

Inside ComfyUI the pack is a package (its folder) and ``nodes/`` reaches the core through
relative imports (``..clap2diffusion_core``). Tests and developer tools that run ``nodes/``
in-process load it the same way, under :data:`PACK`, and take the core from
``pack.clap2diffusion_core`` too, so there is one copy of every class (a second, top-level
``clap2diffusion_core`` would have its own ``CheckpointError``). The root ``__init__.py`` (folder
registration, entry point) is not run.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import Any

from tools import test_models as tm

PACK = "clap2diffusion_pack"
REPO_ROOT = Path(__file__).resolve().parents[1]


def load(module: str) -> Any:
    """``load("nodes.model_patch")`` -> the module ``clap2diffusion_pack.nodes.model_patch``."""
    tm.import_comfy()
    if PACK not in sys.modules:
        package = types.ModuleType(PACK)
        package.__path__ = [str(REPO_ROOT)]
        sys.modules[PACK] = package
    return importlib.import_module(f"{PACK}.{module}")
