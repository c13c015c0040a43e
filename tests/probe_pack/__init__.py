"""A test-only pack: one output node that writes a tensor it is given to the output folder.

Not part of CLAP2Diffusion. The conftest installs it into the test server's ``custom_nodes`` so a
test can read a socket's exact value (CLAP embeddings, [B, 512]) where core Preview Any shows a
rounded, abbreviated print of it.
"""

from __future__ import annotations

import os

import folder_paths
import torch
from safetensors.torch import save_file


class SaveTensorProbe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*", {}), "filename_prefix": ("STRING", {"default": "probe"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    @classmethod
    def VALIDATE_INPUTS(cls, input_types):
        return True  # any socket type

    def save(self, value, filename_prefix: str):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"SaveTensorProbe takes a tensor, got {type(value).__name__}")
        name = f"{filename_prefix}.safetensors"
        save_file({"value": value.detach().cpu().contiguous()}, os.path.join(folder_paths.get_output_directory(), name))
        return {"ui": {"probe": [name]}}


NODE_CLASS_MAPPINGS = {"SaveTensorProbe": SaveTensorProbe}
