"""The pack's ComfyUI nodes. Each module lists its nodes in ``NODES``; this gathers them."""

from __future__ import annotations

import importlib
import logging

from .api import ComfyExtension, io

logger = logging.getLogger(__name__)

# One module per step of the pipeline, in the order a graph uses them.
_NODE_MODULES = (
    "audio_nodes",
    "clap_nodes",
    "clap2diffusion_nodes",
    "conditioning_nodes",
    "model_nodes",
    "token_nodes",
    "prompt_nodes",
    "schedule_nodes",
    "fit_nodes",
    "distil_nodes",
)


def all_nodes() -> list[type[io.ComfyNode]]:
    nodes: list[type[io.ComfyNode]] = []
    for name in _NODE_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            # Only a module of ours that is not written yet is skipped; a missing dependency fails loudly.
            if err.name != f"{__name__}.{name}":
                raise
            logger.debug("clap2diffusion: node module %s not present", name)
            continue
        nodes.extend(module.NODES)
    return nodes


class Clap2DiffusionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()
