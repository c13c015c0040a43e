"""The ComfyUI node API, imported in one place.

ComfyUI keeps ``comfy_api.latest`` moving; a custom node that must survive updates imports a
pinned version (``comfy_api.v0_0_2``), which ComfyUI keeps serving after ``latest`` moves on.
Every node module imports ``io``, ``ui`` and ``ComfyExtension`` from here, so moving to a newer
pinned version is a one-line change.
"""

from comfy_api.v0_0_2 import ComfyExtension, io, ui

__all__ = ["ComfyExtension", "io", "ui"]
