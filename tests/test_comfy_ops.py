"""comfy.ops (issue 25): the core builds its layers from ``operations=`` (torch.nn by default, for
training), and ComfyUI loads CLAP2Diffusion files with ComfyUI's ops, in the dtype model management
picks, held in a ModelPatcher that can load them partly (lowvram)."""

from __future__ import annotations

import types

import pytest
import torch
from comfy_pack import load
from torch import nn

from clap2diffusion_core.adapters import AdapterConfig
from clap2diffusion_core.model import CLAP2DiffusionModel, ModelConfig
from clap2diffusion_core.pooled_head import PooledHeadConfig


def recording_ops() -> tuple[types.SimpleNamespace, list[str]]:
    """An ``operations`` namespace whose layers record their construction (what comfy.ops looks like)."""
    built: list[str] = []

    class Linear(nn.Linear):
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            built.append("Linear")
            super().__init__(*args, **kwargs)

    class LayerNorm(nn.LayerNorm):
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            built.append("LayerNorm")
            super().__init__(*args, **kwargs)

    return types.SimpleNamespace(Linear=Linear, LayerNorm=LayerNorm), built


def every_module_config() -> ModelConfig:
    """Every module: decomposer, projector, pooled head and the SD1.5 adapter (16 layers)."""
    return ModelConfig(stage=3, adapter=AdapterConfig(), pooled=PooledHeadConfig())


def test_comfy_ops_every_layer_of_the_core_comes_from_operations():
    ops, built = recording_ops()
    model = CLAP2DiffusionModel(every_module_config(), operations=ops, dtype=torch.float16)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.LayerNorm)]
    assert len(built) == len(layers) > 24  # the 24 that comfy-test counted, plus the adapter's
    assert all(type(m) in (ops.Linear, ops.LayerNorm) for m in layers)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_comfy_ops_training_default_is_torch_nn_in_float32():
    """Training builds with the defaults: plain torch.nn layers and float32 master weights."""
    model = CLAP2DiffusionModel(every_module_config())
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.LayerNorm)]
    assert layers and {type(m) for m in layers} == {nn.Linear, nn.LayerNorm}
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_comfy_ops_loader_picks_comfy_ops_skips_random_init_and_matches_the_plain_load(test_models, monkeypatch):
    managed = load("nodes.managed")
    checkpoint = load("clap2diffusion_core.checkpoint")
    import comfy.ops

    inits: list[str] = []
    real_init = nn.init.kaiming_uniform_
    monkeypatch.setattr(nn.init, "kaiming_uniform_", lambda *a, **k: inits.append("init") or real_init(*a, **k))
    model = managed.load_managed(test_models.clap2diffusion_adapter)
    assert inits == []  # disable_weight_init: no random init of weights the file overwrites
    plain = checkpoint.load_checkpoint(test_models.clap2diffusion_adapter)
    assert inits  # what torch.nn layers do at construction
    # The default CPU server: float32 weights, ComfyUI's layers, computing as torch.nn does.
    assert isinstance(model.projector.out_proj, comfy.ops.disable_weight_init.Linear)
    assert (model.dtype, model.projector.out_proj.weight.dtype) == (torch.float32, torch.float32)
    assert managed.patcher_of(model).model is model
    embeds = nn.functional.normalize(torch.randn(3, 512, generator=torch.Generator().manual_seed(0)), dim=-1)
    ours = managed.on_device(model).project(model.encode(embeds))
    theirs = plain.project(plain.encode(embeds))
    assert torch.equal(ours.tokens, theirs.tokens) and ours.source == theirs.source


def test_comfy_ops_float16_storage_keeps_the_files_fingerprint_and_partial_lowvram_load_works(test_models):
    """Weights stored in float16 with manual_cast layers (what a --fp16-unet CPU server gets): half the
    bytes, the file's fingerprint, tokens within float16 rounding of float32; loaded partly (lowvram:
    every layer left to cast its weights per call, bare parameters cast in forward) the same tokens."""
    managed = load("nodes.managed")
    checkpoint = load("clap2diffusion_core.checkpoint")
    import comfy.ops

    path = test_models.clap2diffusion_adapter
    plain = checkpoint.load_checkpoint(path)
    half = checkpoint.load_checkpoint(path, dtype=torch.float16, operations=comfy.ops.manual_cast)
    half.compute_dtype = torch.float32
    assert half.fingerprint == plain.fingerprint
    assert managed.weight_bytes(half) == pytest.approx(managed.weight_bytes(plain) / 2, rel=0.001)
    embeds = nn.functional.normalize(torch.randn(3, 512, generator=torch.Generator().manual_seed(1)), dim=-1)
    full = half.project(half.encode(embeds))
    reference = plain.project(plain.encode(embeds))
    assert full.tokens.dtype == torch.float32
    assert (full.tokens - reference.tokens).abs().max() < 0.05  # tokens of norm 60, float16 weights

    patcher = managed.ModelPatcher(half, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    patcher.load(torch.device("cpu"), lowvram_model_memory=1)  # nothing fits: every layer offloaded
    cast = [m for m in half.modules() if getattr(m, "comfy_cast_weights", False)]
    assert half.model_lowvram and len(cast) == sum(isinstance(m, nn.Linear | nn.LayerNorm) for m in half.modules())
    partial = half.project(half.encode(embeds))
    assert torch.equal(partial.tokens, full.tokens)
