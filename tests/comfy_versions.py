"""What differs between the ComfyUI versions the tests run on (0.3.75 in CI, 0.33 in `make test-newer`).

Read from the ComfyUI that runs: a server's ``/system_stats`` or the checkout's ``comfyui_version.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

#: The first ComfyUI whose ``ModelPatcher.clone()`` shares the objects in ``model_options`` (PR #12382,
#: ``comfy.utils.deepcopy_list_dict``: dicts and lists are copied, anything else is shared). Up to 0.13
#: a clone deep-copied them, patch objects included.
SHARED_PATCH_OBJECTS_SINCE = (0, 14, 0)
#: The ComfyUI `make setup` installs, on whose ``/object_info`` tools/make_workflows.py writes the
#: example workflows (byte for byte). Another version may draw core nodes differently (0.33: SaveImage
#: has an IMAGE output), so there only what the files queue is compared.
WORKFLOWS_MADE_ON = "0.3.75"


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.3.75"`` -> ``(0, 3, 75)``; ``"v0.33.0rc1"`` -> ``(0, 33, 0)``."""
    return tuple(int(n) for n in re.findall(r"\d+", text.strip().lstrip("v").split("-")[0])[:3])


def checkout_version(comfyui: Path) -> str:
    """``__version__`` from ``<ComfyUI>/comfyui_version.py``."""
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", (comfyui / "comfyui_version.py").read_text())
    if match is None:
        raise ValueError(f"{comfyui}/comfyui_version.py has no __version__")
    return match.group(1)


def clone_shares_patch_objects(version: str) -> bool:
    """Whether ``ModelPatcher.clone()`` shares patch objects (0.14+) instead of deep-copying them:
    then a pack that changes a patch object in place (``.add``) changes every branch of that MODEL."""
    return parse_version(version) >= SHARED_PATCH_OBJECTS_SINCE
