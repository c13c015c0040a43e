"""clap2diffusion_core.htsat: our HTS-AT forward gives transformers' numbers, and runs the wide
stages a few clips at a time on the CPU (issue 16: the faster encode at the same results)."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from transformers import ClapAudioConfig, ClapAudioModel

from clap2diffusion_core import htsat
from clap2diffusion_core.audio import WINDOW_SAMPLES
from clap2diffusion_core.clap import _pooled, load_clap_tower

SHRUNK = dict(depths=[2, 2, 2, 2], patch_embeds_hidden_size=32, num_attention_heads=[1, 2, 4, 8], hidden_size=256)


def audio_model(fused: bool = False, **config) -> ClapAudioModel:
    """A random HTS-AT whose relative-position tables are not zero (transformers initialises them
    to zeros, which would hide a wrong bias index)."""
    torch.manual_seed(0)
    model = ClapAudioModel(ClapAudioConfig(enable_fusion=fused, fusion_type="aff_2d" if fused else None, **config))
    for name, param in model.named_parameters():
        if name.endswith("relative_position_bias_table"):
            torch.nn.init.normal_(param)
    return model.eval()


def transformers_pooled(model: ClapAudioModel, mel: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return _pooled(model(input_features=mel, is_longer=torch.zeros(len(mel), 1, dtype=torch.bool)))


def log_mel(n: int, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """``[n, channels, 1001, 64]`` in the dB range CLAP's front end gives."""
    return torch.randn(n, channels, 1001, 64, generator=torch.Generator().manual_seed(seed)) * 10 - 40


@pytest.mark.parametrize(
    ("config", "fused"),
    [(SHRUNK, False), (SHRUNK, True), ({}, False)],
    ids=["shifted-windows", "fused-first-view", "full-size-htsat-tiny"],
)
def test_htsat_forward_matches_transformers_within_1e_5(config, fused):
    """Two blocks per stage, so every stage has a shifted block (mask and roll); the fused model
    reads its first mel view; ``{}`` is the full-size HTSAT-tiny of laion/clap-htsat-unfused."""
    model = audio_model(fused, **config)
    mel = log_mel(2, 4 if fused else 1)
    expected = transformers_pooled(model, mel)
    with torch.inference_mode():
        got = htsat.pooled_audio_features(model, mel)
    assert got.shape == expected.shape == (2, model.config.hidden_size)
    assert (got - expected).abs().max() < 1e-5


def test_htsat_forward_leaves_transformers_blocks_as_they_were():
    """transformers' forward shrinks a block's window in place on a small grid; ours must not
    mutate the model, so running ours first cannot change what transformers computes after."""
    model = audio_model(**SHRUNK)
    before = {name: (block.window_size, block.shift_size) for name, block in model.named_modules()
              if hasattr(block, "shift_size")}  # fmt: skip
    with torch.inference_mode():
        htsat.pooled_audio_features(model, log_mel(1))
    after = {name: (block.window_size, block.shift_size) for name, block in model.named_modules()
             if hasattr(block, "shift_size")}  # fmt: skip
    assert after == before


def test_wide_stages_run_two_clips_at_a_time_and_narrow_stages_on_the_whole_batch_on_cpu():
    """Stages 1-2 (4096 and 1024 tokens a clip) see two clips at a time, so their activations stay
    in cache and a batch of 8 holds a quarter of them; stages 3-4 see the whole batch."""
    model = audio_model(**SHRUNK)
    seen: dict[int, list[int]] = {i: [] for i in range(4)}
    hooks = [stage.blocks[0].layernorm_before.register_forward_hook(
                 lambda _m, args, _out, i=i: seen[i].append(args[0].shape[0]))
             for i, stage in enumerate(model.audio_encoder.layers)]  # fmt: skip
    with torch.inference_mode():
        batch = htsat.pooled_audio_features(model, log_mel(5))
    for hook in hooks:
        hook.remove()
    assert (htsat.WIDE_STAGES, htsat.WIDE_STAGE_CLIPS) == (2, 2)
    assert seen == {0: [2, 2, 1], 1: [2, 2, 1], 2: [5], 3: [5]}
    with torch.inference_mode():  # and a clip's embedding does not depend on its batch
        alone = torch.cat([htsat.pooled_audio_features(model, mel) for mel in log_mel(5).split(1)])
    assert (batch - alone).abs().max() < 1e-5


def stage_batches(model: ClapAudioModel, mel: torch.Tensor, **kwargs) -> tuple[torch.Tensor, dict[int, list[int]]]:
    """Our pooled features for ``mel`` and, per stage, the batch size each of its calls saw."""
    seen: dict[int, list[int]] = {i: [] for i in range(len(model.audio_encoder.layers))}
    hooks = [stage.blocks[0].layernorm_before.register_forward_hook(
                 lambda _m, args, _out, i=i: seen[i].append(args[0].shape[0]))
             for i, stage in enumerate(model.audio_encoder.layers)]  # fmt: skip
    try:
        with torch.inference_mode():
            return htsat.pooled_audio_features(model, mel, **kwargs), seen
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_htsat_cuda_branch_runs_on_the_cpu_by_a_switch_and_equals_the_cpu_branch_within_1e_5(how, monkeypatch):
    """The branch a GPU takes (F.linear, every stage on the whole batch) has no GPU to run on here:
    ``branch="cuda"`` or CLAP2DIFFUSION_HTSAT_BRANCH=cuda runs it on the CPU. It must equal the CPU
    branch (oneDNN linears, wide stages two clips at a time) and transformers, within 1e-5; the
    batch sizes each stage saw prove which branch ran."""
    model = audio_model()  # full-size HTSAT-tiny
    mel = log_mel(3)
    cpu, cpu_seen = stage_batches(model, mel)
    if how == "argument":
        cuda, cuda_seen = stage_batches(model, mel, branch="cuda")
    else:
        monkeypatch.setenv(htsat.BRANCH_ENV, "cuda")
        cuda, cuda_seen = stage_batches(model, mel)
    assert cpu_seen == {0: [2, 1], 1: [2, 1], 2: [3], 3: [3]}
    assert cuda_seen == {0: [3], 1: [3], 2: [3], 3: [3]}
    assert (cuda - cpu).abs().max() < 1e-5
    assert (cuda - transformers_pooled(model, mel)).abs().max() < 1e-5
    monkeypatch.setenv(htsat.BRANCH_ENV, "tpu")
    with pytest.raises(ValueError, match="CLAP2DIFFUSION_HTSAT_BRANCH"):
        htsat.pooled_audio_features(model, mel[:1])


def test_the_cuda_branch_uses_f_linear_and_the_cpu_branch_onednn(monkeypatch):
    """Which linear each branch calls: F.linear on the CUDA branch, a 1x1 convolution (oneDNN) on the CPU."""
    calls: list[str] = []
    conv2d, linear = F.conv2d, F.linear

    def counted_conv2d(x, weight, *args, **kwargs):  # noqa: ANN001, ANN202
        if tuple(weight.shape[-2:]) == (1, 1):  # a linear as a 1x1 kernel (not the patch embedding)
            calls.append("conv2d")
        return conv2d(x, weight, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", counted_conv2d)
    monkeypatch.setattr(F, "linear", lambda *a, **k: calls.append("linear") or linear(*a, **k))
    model = audio_model(**SHRUNK)
    stage_batches(model, log_mel(1), branch="cuda")
    assert calls and set(calls) == {"linear"}
    calls.clear()
    stage_batches(model, log_mel(1), branch="cpu")
    assert calls and set(calls) == {"conv2d"}


def test_linear_through_onednn_is_f_linear():
    layer = types.SimpleNamespace(weight=torch.randn(384, 96) / 10, bias=torch.randn(384))  # what _linear reads
    x = torch.randn(2, 64, 96)
    assert (htsat._linear(x, layer) - F.linear(x, layer.weight, layer.bias)).abs().max() < 1e-5
    assert htsat._linear(x, layer).shape == (2, 64, 384)


def test_full_size_test_clap_tower_encodes_like_transformers_within_1e_4(test_models):
    """The cached test CLAP (laion/clap-htsat-unfused's architecture): the tower's embeddings, mel
    to projection, against transformers' ClapAudioModel on the same mel."""
    tower = load_clap_tower(test_models.clap_folder, "audio")
    windows = (torch.rand(2, WINDOW_SAMPLES, generator=torch.Generator().manual_seed(5)) - 0.5) * 0.5
    with torch.inference_mode():
        mel = torch.cat([tower.log_mel(w[None]) for w in windows]).unsqueeze(1)
        expected = torch.nn.functional.normalize(tower.audio_projection(transformers_pooled(tower.audio_model, mel)))
    assert (tower.encode_windows(windows) - expected).abs().max() < 1e-4
