"""The gated audio cross-attention adapter: layout, size, routing, gates, the shared math, and the
ComfyUI patch's clone / deepcopy / stacking behaviour (in-process, no server)."""

from __future__ import annotations

import copy

import comfy_pack
import pytest
import torch
import torch.nn.functional as F

from clap2diffusion_core.adapters import (
    SD15_LAYERS,
    AdapterConfig,
    AudioAdapter,
    adapter_parameter_count,
)
from clap2diffusion_core.audio_attention import (
    AudioKV,
    audio_attention,
    frame_mismatch,
    frame_rows,
    rows_for_chunks,
)
from clap2diffusion_core.checkpoint import CheckpointError, load_checkpoint
from clap2diffusion_core.errors import FrameBatchError
from clap2diffusion_core.levels import LEVELS
from clap2diffusion_core.testing import TINY_SD15_LAYERS, adapter_config, random_checkpoint, random_model

FG, BG, AMB = (LEVELS.index(name) for name in ("foreground", "background", "ambience"))


# ------------------------------------------------------------------------------------------------
# layout and size


def test_sd15_has_16_cross_attention_layers_in_comfyui_order():
    keys = [layer.key for layer in SD15_LAYERS]
    assert keys == (
        [("input", n, 0) for n in (1, 2, 4, 5, 7, 8)]
        + [("middle", 0, 0)]
        + [("output", n, 0) for n in range(3, 12)]
    )
    assert [layer.inner_dim for layer in SD15_LAYERS] == [320] * 2 + [640] * 2 + [1280] * 6 + [640] * 3 + [320] * 3
    assert {layer.heads for layer in SD15_LAYERS} == {8}
    assert SD15_LAYERS[0].diffusers_name == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert SD15_LAYERS[6].diffusers_name == "mid_block.attentions.0.transformer_blocks.0.attn2"
    assert SD15_LAYERS[-1].diffusers_name == "up_blocks.3.attentions.2.transformer_blocks.0.attn2"


def test_sd15_adapter_has_19_2m_parameters():
    adapter = AudioAdapter(AdapterConfig())
    count = sum(p.numel() for p in adapter.parameters())
    # 2 x 768 x (5 x 320 + 5 x 640 + 6 x 1280) projections + 16 gates + 16 x 3 routing logits
    assert count == 19_169_344 == adapter_parameter_count()
    assert len(adapter) == 16


def test_config_round_trips_through_json_and_the_checkpoint(tmp_path):
    path = random_checkpoint(tmp_path / "stage2.safetensors", stage=2, seed=4, layout="tiny")
    loaded = load_checkpoint(path)
    original = random_model(stage=2, seed=4, layout="tiny")
    assert loaded.config.adapter == original.config.adapter == adapter_config("tiny")
    for key, value in original.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert any(k.startswith("adapter.layers.3.to_v") for k in loaded.state_dict())


def test_config_rejects_layers_out_of_order_or_of_unequal_length():
    with pytest.raises(ValueError, match="canonical order"):
        AdapterConfig(
            layers=("output.0.0", "input.1.0"), diffusers_layers=("a", "b"), inner_dims=(320, 320), heads=(8, 8)
        )
    with pytest.raises(ValueError, match="equally long"):
        AdapterConfig(layers=("input.1.0",), diffusers_layers=("a", "b"), inner_dims=(320,), heads=(8,))
    with pytest.raises(ValueError, match="not divisible"):
        AdapterConfig(layers=("input.1.0",), diffusers_layers=("a",), inner_dims=(320,), heads=(7,))


def test_a_file_for_another_layout_names_expected_and_found():
    sd15 = AdapterConfig()
    with pytest.raises(CheckpointError) as err:
        sd15.check_fits(TINY_SD15_LAYERS, 768, "this MODEL")
    message = str(err.value)
    assert "16 cross-attention layers" in message and "(4 layers, context_dim 768)" in message
    assert "layers missing from this MODEL: input.2.0, input.4.0" in message
    assert "the file has no weights for: output.0.0, output.1.0" in message
    with pytest.raises(CheckpointError, match="context_dim: expected 768, found 1024"):
        sd15.check_fits(SD15_LAYERS, 1024)
    narrower = [layer._replace(heads=5) if layer.key == ("middle", 0, 0) else layer for layer in SD15_LAYERS]
    with pytest.raises(CheckpointError, match="layer middle.0.0: expected width 1280 with 8 heads, found 1280 with 5"):
        sd15.check_fits(narrower, 768)
    sd15.check_fits(SD15_LAYERS, 768)  # its own layout fits


# ------------------------------------------------------------------------------------------------
# routing and gates


def test_routing_starts_ambience_early_background_mid_foreground_late():
    route = AudioAdapter(AdapterConfig()).route_weights()
    assert route.shape == (16, 3)
    torch.testing.assert_close(route.sum(dim=1), torch.full((16,), 3.0))
    assert route[0].argmax() == AMB and route[-1].argmax() == FG
    assert route[7].argmax() == BG  # the middle of the UNet (middle block and first output)
    assert torch.all(route[1:, FG] >= route[:-1, FG]) and torch.all(route[1:, AMB] <= route[:-1, AMB])


def test_a_fresh_adapter_is_closed_and_changes_nothing():
    adapter = AudioAdapter(AdapterConfig())
    levels = torch.tensor([FG, BG, AMB])
    assert torch.count_nonzero(adapter.token_scales(levels, strength=2.0)) == 0
    assert adapter.active_layers(strength=1.0) == []


def test_token_scale_is_gate_times_strength_times_route_times_level_weight():
    adapter = random_model(stage=2, layout="tiny").adapter
    levels = torch.tensor([FG, BG, AMB, FG])
    scales = adapter.token_scales(levels, strength=0.5, level_weights=(2.0, 0.0, 1.0))
    gates, route = adapter.gates(), adapter.route_weights()
    expected = 0.5 * gates[:, None] * route[:, levels] * torch.tensor([2.0, 0.0, 1.0])[levels]
    torch.testing.assert_close(scales, expected)
    assert torch.count_nonzero(scales[:, 1]) == 0  # background weighted 0: its tokens carry nothing


def test_closed_gates_strength_0_and_all_levels_off_leave_layers_out():
    adapter = random_model(stage=2, layout="tiny").adapter
    assert adapter.active_layers(1.0) == [0, 1, 2, 3]
    with torch.no_grad():
        adapter.layers[2].gate.zero_()
    assert adapter.active_layers(1.0) == [0, 1, 3]
    assert adapter.active_layers(0.0) == []
    assert adapter.active_layers(1.0, level_weights=(0.0, 0.0, 0.0)) == []


# ------------------------------------------------------------------------------------------------
# the shared math


def test_audio_attention_is_softmax_attention_per_head():
    torch.manual_seed(0)
    q, key, value = torch.randn(2, 10, 64), torch.randn(2, 4, 7, 16), torch.randn(2, 4, 7, 16)
    out = audio_attention(q, key, value)
    qh = q.view(2, 10, 4, 16).transpose(1, 2)
    manual = torch.softmax(qh @ key.transpose(-1, -2) / 4.0, dim=-1) @ value
    torch.testing.assert_close(out, manual.transpose(1, 2).reshape(2, 10, 64))
    # scaling the values by a per-token constant == scaling each token's share after the softmax
    s = torch.rand(7)
    weights = torch.softmax(qh @ key.transpose(-1, -2) / 4.0, dim=-1)
    torch.testing.assert_close(
        audio_attention(q, key, value * s[:, None]),
        ((weights * s) @ value).transpose(1, 2).reshape(2, 10, 64),
    )


def test_layer_kv_is_the_projection_split_into_heads_with_scaled_values():
    adapter = random_model(stage=2, layout="tiny").adapter
    tokens, scale = torch.randn(2, 77, 768), torch.rand(77)
    key, value = adapter.layer_kv(1, tokens, scale)
    assert key.shape == value.shape == (2, 8, 77, 40)
    layer = adapter.layers[1]
    torch.testing.assert_close(key.transpose(1, 2).flatten(2), tokens @ layer.to_k.weight.T)
    torch.testing.assert_close(value.transpose(1, 2).flatten(2), (tokens @ layer.to_v.weight.T) * scale[:, None])


def test_rows_follow_cond_or_uncond_in_any_order():
    cond, uncond = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0]])
    assert rows_for_chunks(cond, uncond, [1, 0], 2).flatten().tolist() == [0, 0, 1, 2]
    assert rows_for_chunks(cond, uncond, [0, 1], 2).flatten().tolist() == [1, 2, 0, 0]
    assert rows_for_chunks(cond, uncond, [0], 2).flatten().tolist() == [1, 2]
    # one sound for a batch of latents
    assert rows_for_chunks(uncond + 5, uncond, [0, 1], 3).flatten().tolist() == [5, 5, 5, 0, 0, 0]
    # a context window of the frames: the latents of this call hear their own rows
    frames = torch.arange(6.0)[:, None] + 1
    assert rows_for_chunks(frames, uncond, [1, 0], 2, rows=[4, 5]).flatten().tolist() == [0, 0, 5, 6]
    # rows that do not match the latents are never repeated or cut
    with pytest.raises(FrameBatchError):
        rows_for_chunks(cond, uncond, [0, 0, 1], 1)


def test_frame_rows_name_the_row_of_each_latent_or_refuse():
    """Row i is for latent i; a window picks its frames' rows; any other count is an error that says
    which counts to make equal (ComfyUI would repeat or cut the rows without a word)."""
    assert frame_rows(1, 5) is None  # one row: every latent
    assert frame_rows(8, 8) is None  # row i for latent i
    assert frame_rows(8, 4, window=[4, 5, 6, 7]) == [4, 5, 6, 7]
    assert frame_rows(8, 8, window=list(range(8))) is None
    assert frame_rows(8, 8, window=[0, 1]) is None  # a window that is not this call's is not used
    with pytest.raises(FrameBatchError, match=r"8 rows, one per frame, but the latent batch has 6 latents.*batch_size of 8"):
        raise frame_mismatch(8, 6)
    with pytest.raises(FrameBatchError, match="a UNet call"):
        frame_rows(8, 4)
    with pytest.raises(FrameBatchError, match="context windows"):
        frame_rows(8, 4, window=[6, 7, 8, 9])


def test_audio_kv_is_computed_once_and_batches_are_memoised():
    model = random_model(stage=2, layout="tiny", seed=2)
    audio = model.project(model.encode(F.normalize(torch.randn(1, 512), dim=-1)))
    with torch.no_grad():
        model.adapter.layers[1].gate.zero_()
    silence = model.silence_tokens()
    kv = AudioKV(model.adapter, audio.tokens, silence, audio.token_levels, strength=0.7,
                 dtype=torch.float16)
    assert kv.layers == (0, 2, 3)  # the closed layer holds nothing and is never patched
    assert kv.slots[0].k_cond.dtype == torch.float16 and not kv.slots[0].k_cond.requires_grad
    scales = model.adapter.token_scales(audio.token_levels, 0.7)
    k, v = model.adapter.layer_kv(2, silence, scales[2])
    torch.testing.assert_close(kv.slots[1].v_uncond, v.half())
    first = kv.batch(1, [1, 0], 2, torch.device("cpu"), torch.float16)
    assert first[0].shape == (4, 8, 77, 40)
    assert kv.batch(1, [1, 0], 2, torch.device("cpu"), torch.float16)[0] is first[0]
    kv.clear_memo()
    assert kv.batch(1, [1, 0], 2, torch.device("cpu"), torch.float16)[0] is not first[0]


# ------------------------------------------------------------------------------------------------
# the ComfyUI patch (in-process)


@pytest.fixture(scope="module")
def comfy_tiny():
    """(nodes.model_patch, a ComfyUI ModelPatcher of the tiny SD15 UNet, a stage-2 model for it)."""
    patch = comfy_pack.load("nodes.model_patch")
    testing = comfy_pack.load("clap2diffusion_core.testing")
    model = comfy_pack.tiny_sd15_model(0)
    c2d = testing.random_model(stage=2, layout="tiny", seed=1)
    return patch, model, c2d


def _audio(c2d, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return c2d.project(c2d.encode(F.normalize(torch.randn(1, 512, generator=gen), dim=-1)))


def _replaces(model) -> dict:
    return model.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})


TINY_KEYS = [("input", 1, 0), ("middle", 0, 0), ("output", 0, 0), ("output", 1, 0)]


def test_apply_returns_a_clone_and_leaves_the_input_model_alone(comfy_tiny):
    patch, model, c2d = comfy_tiny
    before = copy.deepcopy(model.model_options)
    patched = patch.apply_audio_to_model(model, c2d, _audio(c2d))
    assert patched is not model and patched.model is model.model  # same weights, new options
    assert model.model_options == before and not patch.audio_injections(model)
    (injection,) = patch.audio_injections(patched)
    assert list(injection.keys) == TINY_KEYS
    assert not _replaces(patched), "the patch table is composed at call time, never stored"


def test_the_injection_survives_clone_and_deepcopy_as_the_same_object(comfy_tiny):
    patch, model, c2d = comfy_tiny
    patched = patch.apply_audio_to_model(model, c2d, _audio(c2d))
    (one,) = patch.audio_injections(patched)
    assert copy.deepcopy(one) is one
    again = patched.clone()
    assert patch.audio_injections(again) == (one,)
    assert [m.model for m in again.get_additional_models_with_key(patch.CALLBACK_KEY)] == [one.kv]


def test_adapter_keys_and_values_live_in_a_model_patcher(comfy_tiny):
    patch, model, c2d = comfy_tiny
    patched = patch.apply_audio_to_model(model, c2d, _audio(c2d))
    (kv_patcher,) = patched.get_additional_models_with_key(patch.CALLBACK_KEY)
    assert isinstance(kv_patcher.model, comfy_pack.load("clap2diffusion_core.audio_attention").AudioKV)
    assert kv_patcher.model_size() == sum(p.numel() * p.element_size() for p in kv_patcher.model.parameters())
    assert kv_patcher.load_device == model.load_device and kv_patcher.offload_device == model.offload_device


def test_comfyui_memory_management_loads_the_keys_and_values_with_the_unet(comfy_tiny):
    import comfy.model_management as mm
    import comfy.sampler_helpers

    patch, model, c2d = comfy_tiny
    patched = patch.apply_audio_to_model(model, c2d, _audio(c2d))
    (injection,) = patch.audio_injections(patched)
    try:
        comfy.sampler_helpers.prepare_sampling(patched, (1, 4, 8, 8), {}, patched.model_options)  # as KSampler
        assert any(loaded.model.model is injection.kv for loaded in mm.current_loaded_models)
    finally:
        mm.unload_all_models()


def test_strength_0_or_closed_gates_return_the_input_model(comfy_tiny):
    patch, model, c2d = comfy_tiny
    assert patch.apply_audio_to_model(model, c2d, _audio(c2d), strength=0.0) is model
    closed = copy.deepcopy(c2d)
    with torch.no_grad():
        for layer in closed.adapter.layers:
            layer.gate.zero_()
    assert patch.apply_audio_to_model(model, closed, _audio(closed)) is model


def test_stacking_adds_a_second_injection_and_leaves_the_first_model_alone(comfy_tiny):
    patch, model, c2d = comfy_tiny
    first = patch.apply_audio_to_model(model, c2d, _audio(c2d, 1), strength=0.5)
    second = patch.apply_audio_to_model(first, c2d, _audio(c2d, 2), strength=1.5, start_percent=0.2)
    (inner,) = patch.audio_injections(first)
    assert patch.audio_injections(second)[0] is inner and len(patch.audio_injections(second)) == 2
    outer = patch.audio_injections(second)[1]
    assert {id(m.model) for m in second.get_additional_models_with_key(patch.CALLBACK_KEY)} == {
        id(inner.kv), id(outer.kv)}
    # composed at call time: the second sound's patch wraps the first one's at every layer
    options = inner.compose(second.model_options["transformer_options"], model.model.diffusion_model)
    options = outer.compose(options, model.model.diffusion_model)
    table = options["patches_replace"]["attn2"]
    assert all(table[key].injection is outer and table[key].inner.injection is inner for key in TINY_KEYS)
    assert all(table[key].inner.inner is None for key in TINY_KEYS)


def test_stage_1_files_and_other_layouts_are_refused_with_a_clear_message(comfy_tiny):
    patch, model, _ = comfy_tiny
    testing = comfy_pack.load("clap2diffusion_core.testing")
    checkpoint = comfy_pack.load("clap2diffusion_core.checkpoint")
    stage1 = testing.random_model(stage=1)
    with pytest.raises(checkpoint.CheckpointError, match="stage 1: .*Use Apply Audio to Conditioning"):
        patch.apply_audio_to_model(model, stage1, _audio(stage1))
    sd15 = testing.random_model(stage=2, layout="sd15")
    with pytest.raises(checkpoint.CheckpointError, match="16 cross-attention layers.*this MODEL \\(4 layers"):
        patch.apply_audio_to_model(model, sd15, _audio(sd15))
    with pytest.raises(ValueError, match="start_percent"):
        patch.apply_audio_to_model(model, testing, _audio(testing.random_model(stage=2, layout="tiny")), start_percent=0.8,
                                   end_percent=0.2)
