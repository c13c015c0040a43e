"""A stand-in "other pack" for the interop tests: an IPAdapter-style attention patch (test fixture).

Not part of CLAP2Diffusion. The interop tests install it into the test server's ``custom_nodes``
beside our pack, and import it in-process. It follows the conventions of cubiq's
ComfyUI_IPAdapter_plus (read, not copied) that make stacking hard:

- it patches the MODEL's ``transformer_options`` in place after one ``clone()``;
- for SD1.5 it registers under the two-part key ``(block, number)``, and its middle-block key is
  ``("middle", 1)``, which ComfyUI never looks up (so it never runs, as in IPAdapter_plus);
  ``key_parts="three"`` registers under ``(block, number, transformer_index)`` instead, as
  IPAdapter_plus does for SDXL;
- when a patch already sits at its key, it stacks by calling ``.add(callback, **kwargs)`` on it,
  mutating that object in place;
- its patch computes its own text attention (ignoring whatever it replaced) and adds one term per
  callback, each active while ``sigma_end <= sigma <= sigma_start``.

The term is known: ``weight * attention(q, K, V)`` over :data:`TOKENS` random tokens drawn from
``seed`` and the layer width (:func:`standin_term`).

Stacking in place is safe only while ``ModelPatcher.clone()`` deep-copies the patch objects: up to
ComfyUI 0.13. From 0.14 on (ComfyUI PR #12382, ``comfy.utils.deepcopy_list_dict``) a clone copies
the dicts and lists of ``model_options`` and shares the objects in them, so ``.add`` on a clone's
object also changes the MODEL it was cloned from and every other branch fed by that MODEL
(``tests/comfy_versions.py``). The interop tests expect each version's behaviour.
"""

from __future__ import annotations

from typing import Any

import comfy.ldm.modules.attention as comfy_attention
import torch
from comfy.ldm.modules.attention import SpatialTransformer

TOKENS = 4


def standin_term(q: torch.Tensor, heads: int, seed: int, weight: float) -> torch.Tensor:
    """The term one stand-in callback adds: ``q [B, S, H*d]`` -> ``[B, S, H*d]``."""
    inner = q.shape[-1]
    gen = torch.Generator().manual_seed(seed * 100_003 + inner)
    k, v = (t.to(q).expand(q.shape[0], -1, -1) for t in torch.randn(2, 1, TOKENS, inner, generator=gen))
    return weight * comfy_attention.optimized_attention(q, k, v, heads)


def standin_callback(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict,
                     *, seed: int, weight: float, **_: Any) -> torch.Tensor:
    return standin_term(q, extra_options["n_heads"], seed, weight)


class StandInAttn2Replace:
    """The object at an attn2 key: its own text attention plus every added callback's term."""

    def __init__(self, callback=None, **kwargs: Any) -> None:
        self.callbacks = [callback]
        self.kwargs = [kwargs]

    def add(self, callback, **kwargs: Any) -> None:
        """IPAdapter-style stacking: in place, on whatever object sits at the key."""
        self.callbacks.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        dtype = q.dtype
        out = comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"])
        sigmas = extra_options.get("sigmas")
        sigma = float(sigmas.detach().cpu()[0]) if sigmas is not None else 999999999.9
        for callback, kwargs in zip(self.callbacks, self.kwargs):
            if kwargs["sigma_end"] <= sigma <= kwargs["sigma_start"]:
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out.to(dtype=dtype)


def set_model_patch_replace(model: Any, patch_kwargs: dict, key: tuple) -> None:
    to = model.model_options["transformer_options"]
    attn2 = to.setdefault("patches_replace", {}).setdefault("attn2", {})
    if key not in attn2:
        attn2[key] = StandInAttn2Replace(standin_callback, **patch_kwargs)
    else:
        attn2[key].add(standin_callback, **patch_kwargs)


def patch_keys(unet: torch.nn.Module, key_parts: str) -> list[tuple]:
    """The keys the stand-in patches: every cross-attention layer, the way IPAdapter_plus names them."""
    keys: list[tuple] = []
    groups = [("input", i, m) for i, m in enumerate(unet.input_blocks)]
    groups += [("middle", 0, unet.middle_block)] + [("output", i, m) for i, m in enumerate(unet.output_blocks)]
    for block, number, seq in groups:
        for module in seq:
            if isinstance(module, SpatialTransformer):
                for t in range(len(module.transformer_blocks)):
                    if key_parts == "three":
                        keys.append((block, number, t))
                    elif t == 0:
                        keys.append(("middle", 1) if block == "middle" else (block, number))
    return keys


def apply_standin(model: Any, weight: float, seed: int, key_parts: str = "two",
                  start_percent: float = 0.0, end_percent: float = 1.0) -> Any:
    model = model.clone()
    sampling = model.get_model_object("model_sampling")
    kwargs = {"weight": weight, "seed": seed,
              "sigma_start": float(sampling.percent_to_sigma(start_percent)),
              "sigma_end": float(sampling.percent_to_sigma(end_percent))}
    for key in patch_keys(model.get_model_object("diffusion_model"), key_parts):
        set_model_patch_replace(model, kwargs, key)
    return model


class StandInAttentionPatch:
    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802 (ComfyUI's V1 node API)
        return {"required": {
            "model": ("MODEL", {"tooltip": "The MODEL to patch."}),
            "weight": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                 "tooltip": "Scale of the added attention term."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                             "tooltip": "Seed of the random tokens the term attends to."}),
            "key_parts": (["two", "three"], {"tooltip": "Register under (block, number) or "
                                                        "(block, number, transformer_index)."}),
        }}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The patched MODEL.",)
    FUNCTION = "apply"
    CATEGORY = "testing/clap2diffusion interop"
    DESCRIPTION = "Test fixture of the CLAP2Diffusion interop tests: an IPAdapter-style attn2 patch."

    def apply(self, model: Any, weight: float, seed: int, key_parts: str) -> tuple:
        return (apply_standin(model, weight, seed, key_parts),)


NODE_CLASS_MAPPINGS = {"InteropStandIn_AttentionPatch": StandInAttentionPatch}
NODE_DISPLAY_NAME_MAPPINGS = {"InteropStandIn_AttentionPatch": "Stand-in Attention Patch (interop tests)"}
