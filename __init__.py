"""CLAP2Diffusion for ComfyUI: sound + text -> image.

ComfyUI imports this file. It registers the model folders and hands ComfyUI the node list
through the V3 entry point; all model logic lives in ``clap2diffusion_core``.
"""

from __future__ import annotations

import os

import folder_paths

from .nodes import Clap2DiffusionExtension

PACK_DIR = os.path.dirname(os.path.abspath(__file__))


def _register_folder(name: str, *extra_paths: str) -> None:
    """Add ``models/<name>`` (and extra paths) keeping whatever extra_model_paths.yaml set."""
    default = os.path.join(folder_paths.models_dir, name)
    paths, extensions = folder_paths.folder_names_and_paths.get(name, ([], set()))
    paths = list(paths)
    for path in (default, *extra_paths):
        if path not in paths:
            paths.append(path)
    folder_paths.folder_names_and_paths[name] = (
        paths,
        set(extensions) | set(folder_paths.supported_pt_extensions),
    )


_register_folder("clap")
_register_folder("clap2diffusion", os.path.join(PACK_DIR, "checkpoints"))

WEB_DIRECTORY = "web"  # frontend glue: the audio player on Load Audio (CLAP2Diffusion)


async def comfy_entrypoint() -> Clap2DiffusionExtension:
    return Clap2DiffusionExtension()
