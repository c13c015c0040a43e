"""CLAP2Diffusion models as ComfyUI's model management holds its own models.

The core builds its layers from an ``operations`` namespace (``torch.nn`` by default, for training).
Here every CLAP2Diffusion model a node hands out is built with the ``comfy.ops`` class that
``comfy.ops.pick_operations`` chooses, in the weight dtype ``unet_dtype`` picks for the load
device (the file is made for the UNet it conditions; ``--fp16-unet``/``--bf16-unet`` choose it on
any device), and is held in a ModelPatcher:

- the weights are stored in that dtype (float16: half the memory of the file's float32) and are
  not randomly initialised before the file's weights are copied in (``disable_weight_init``);
- where the device cannot compute in that dtype (float16 on a CPU) ``manual_cast`` layers cast
  each weight to the compute dtype per call;
- ``load_model_gpu`` moves it to the compute device, freeing memory for it, and in lowvram mode
  loads it partly: the layers left behind cast their weights to the device per call.
"""

from __future__ import annotations

import logging
import math
import os

import comfy.model_management as mm
import comfy.ops
import torch
from comfy.model_patcher import ModelPatcher
from safetensors import safe_open

from ..clap2diffusion_core.checkpoint import load_checkpoint, read_metadata
from ..clap2diffusion_core.model import CLAP2DiffusionModel

log = logging.getLogger(__name__)

#: The weight dtypes a CLAP2Diffusion file may be stored in, in model management's order of preference.
SUPPORTED_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
#: The attribute a loaded model's ModelPatcher is kept under (a cycle the garbage collector frees).
PATCHER_ATTR = "comfy_patcher"


def parameter_count(path: str | os.PathLike) -> int:
    """Parameters in a CLAP2Diffusion file (its tensors are the model's parameters), from its header."""
    with safe_open(os.fspath(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118 (not a Mapping)


def choose_storage(parameters: int) -> tuple[torch.device, torch.device, torch.dtype, torch.dtype | None]:
    """``(load_device, offload_device, weight_dtype, manual_cast_dtype)`` as for a UNet of that size."""
    load_device = mm.get_torch_device()
    weight_dtype = mm.unet_dtype(load_device, model_params=parameters, supported_dtypes=SUPPORTED_DTYPES)
    manual_cast = mm.unet_manual_cast(weight_dtype, load_device, SUPPORTED_DTYPES)
    return load_device, mm.unet_offload_device(), weight_dtype, manual_cast


def load_managed(path: str | os.PathLike) -> CLAP2DiffusionModel:
    """Load a CLAP2Diffusion file as model management chooses (see the module docstring)."""
    read_metadata(path)  # refuses what is not a CLAP2Diffusion file before the header is read for sizes
    load_device, offload_device, weight_dtype, manual_cast = choose_storage(parameter_count(path))
    operations = comfy.ops.pick_operations(weight_dtype, manual_cast, load_device)
    model = load_checkpoint(path, device=offload_device, dtype=weight_dtype, operations=operations)
    model.compute_dtype = manual_cast or weight_dtype
    setattr(model, PATCHER_ATTR, ModelPatcher(model, load_device=load_device, offload_device=offload_device))
    stored = {p.dtype for p in model.parameters()}  # as allocated, not as asked for
    log.info("CLAP2Diffusion %s: weights %s (computing in %s), %.2f MB", model.name,
             ",".join(sorted(map(str, stored))), model.dtype, weight_bytes(model) / 2**20)
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters and buffers take, as stored."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def patcher_of(model: CLAP2DiffusionModel) -> ModelPatcher | None:
    """The ModelPatcher :func:`load_managed` put around ``model``; None for a model built elsewhere."""
    return getattr(model, PATCHER_ATTR, None)


def on_device(model: CLAP2DiffusionModel) -> CLAP2DiffusionModel:
    """``model`` with its weights loaded for computing (memory freed for them, partly in lowvram mode).
    A model built in memory by other code (no ModelPatcher) computes where its weights are."""
    patcher = patcher_of(model)
    if patcher is not None:
        mm.load_model_gpu(patcher)
    return model
