"""The pack's ComfyUI-side modules in the test process (``load``, from tools/pack_modules.py, where
the developer tools can use it too), and a tiny SD1.5 ModelPatcher."""

from __future__ import annotations

from typing import Any

from tools import test_models as tm
from tools.pack_modules import PACK, REPO_ROOT, load

__all__ = ["PACK", "REPO_ROOT", "load", "tiny_sd15_model"]


def tiny_sd15_model(seed: int = 0) -> Any:
    """A ComfyUI ModelPatcher of the tiny SD1.5 UNet (random weights), loaded by ComfyUI's own loader."""
    tm.import_comfy()
    import comfy.sd

    sd = {f"model.diffusion_model.{k}": v for k, v in tm.tiny_unet(seed).state_dict().items()}
    return comfy.sd.load_state_dict_guess_config(sd, output_vae=False, output_clip=False)[0]
